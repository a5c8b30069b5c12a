//! A loaded `.pte` LLM: its program, its methods' signatures and the metadata that the
//! export recorded as constant methods.

use std::collections::BTreeMap;
use std::path::Path;

use crate::error::{Error, Result};
use crate::et::Program;
use crate::tensor::{MethodInfo, TensorView};

// Defined with the runtime's other values in `crate::tensor` (the ExecuTorch adapter makes
// them); re-exported here, where the public API has always had it.
pub use crate::tensor::ConstValue;

/// Default maximum sequence length when the model has no `get_max_seq_len` (upstream's).
pub const DEFAULT_MAX_SEQ_LEN: usize = 128;

/// What the export recorded about the model. Fields the model does not define take
/// upstream's defaults: dynamic shape off, max_seq_len 128, KV cache on, max_context_len
/// equal to max_seq_len, BOS/EOS from the tokenizer.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelMetadata {
    /// `get_max_seq_len`: the most tokens one `forward` call accepts.
    pub max_seq_len: usize,
    /// `get_max_context_len`: the most positions the KV cache holds.
    pub max_context_len: usize,
    /// `get_vocab_size`, if recorded.
    pub vocab_size: Option<usize>,
    /// `get_bos_id`, if recorded.
    pub bos_id: Option<u32>,
    /// `get_eos_ids` (or `get_eos_id`), empty if not recorded.
    pub eos_ids: Vec<u32>,
    /// `use_kv_cache`.
    pub use_kv_cache: bool,
    /// `enable_dynamic_shape`.
    pub enable_dynamic_shape: bool,
    /// Every metadata method that returned an integer or boolean, by name, as recorded.
    pub raw: BTreeMap<String, i64>,
}

/// What a KV-cache manager sees of the model when it is loaded.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    /// The export's metadata.
    pub metadata: ModelMetadata,
    /// Every non-constant method with its signature, by name (`forward`, ...).
    pub methods: BTreeMap<String, MethodInfo>,
    /// The value of every constant method (a method without inputs), by name.
    pub constants: BTreeMap<String, ConstValue>,
}

/// A loaded model.
pub(crate) struct Model {
    program: Program,
    info: ModelInfo,
}

impl Model {
    pub(crate) fn load(path: &Path) -> Result<Self> {
        let mut program = Program::load(path)?;
        let names = program.method_names();
        if !names.iter().any(|n| n == "forward") {
            return Err(Error::UnsupportedModel(format!(
                "{} has no `forward` method (its methods: {})",
                path.display(),
                if names.is_empty() {
                    "none".to_string()
                } else {
                    names.join(", ")
                }
            )));
        }
        let mut consts: BTreeMap<String, ConstValue> = BTreeMap::new();
        let mut methods = BTreeMap::new();
        for name in &names {
            let info = program.method_info(name)?;
            if info.inputs.is_empty() {
                consts.insert(name.clone(), program.call_constant(name)?);
            } else {
                program.load_method(name)?;
                methods.insert(name.clone(), info);
            }
        }
        let metadata = metadata_from(&consts)?;
        Ok(Self {
            program,
            info: ModelInfo {
                metadata,
                methods,
                constants: consts,
            },
        })
    }

    pub(crate) fn info(&self) -> &ModelInfo {
        &self.info
    }

    pub(crate) fn execute(
        &mut self,
        method: &str,
        inputs: &[TensorView<'_>],
    ) -> Result<Vec<TensorView<'_>>> {
        self.program.execute(method, inputs)
    }
}

fn metadata_from(consts: &BTreeMap<String, ConstValue>) -> Result<ModelMetadata> {
    let int = |name: &str| -> Result<Option<i64>> {
        match consts.get(name) {
            None => Ok(None),
            Some(v) if v.as_int().is_some() => Ok(v.as_int()),
            Some(other) => Err(Error::UnsupportedModel(format!(
                "metadata method `{name}` returned {other:?}, expected an integer"
            ))),
        }
    };
    let positive = |name: &str| -> Result<Option<usize>> {
        match int(name)? {
            None => Ok(None),
            Some(v) if v > 0 => Ok(Some(v as usize)),
            Some(v) => Err(Error::UnsupportedModel(format!(
                "metadata method `{name}` returned {v}, expected a positive integer"
            ))),
        }
    };
    let token_id = |name: &str, v: i64| -> Result<u32> {
        u32::try_from(v).map_err(|_| {
            Error::UnsupportedModel(format!("metadata method `{name}` returned token id {v}"))
        })
    };
    let max_seq_len = positive("get_max_seq_len")?.unwrap_or(DEFAULT_MAX_SEQ_LEN);
    let max_context_len = positive("get_max_context_len")?.unwrap_or(max_seq_len);
    let vocab_size = positive("get_vocab_size")?;
    let bos_id = int("get_bos_id")?
        .map(|v| token_id("get_bos_id", v))
        .transpose()?;
    let eos_ids = match consts
        .get("get_eos_ids")
        .or_else(|| consts.get("get_eos_id"))
    {
        None => Vec::new(),
        Some(v) if v.as_ints().is_some() => v
            .as_ints()
            .unwrap_or_default()
            .into_iter()
            .map(|id| token_id("get_eos_ids", id))
            .collect::<Result<_>>()?,
        Some(other) => {
            return Err(Error::UnsupportedModel(format!(
                "metadata method `get_eos_ids` returned {other:?}, expected integers"
            )))
        }
    };
    let use_kv_cache = int("use_kv_cache")?.is_none_or(|v| v != 0);
    let enable_dynamic_shape = int("enable_dynamic_shape")?.is_some_and(|v| v != 0);
    let raw = consts
        .keys()
        .filter_map(|k| int(k).ok().flatten().map(|v| (k.clone(), v)))
        .collect();
    Ok(ModelMetadata {
        max_seq_len,
        max_context_len,
        vocab_size,
        bos_id,
        eos_ids,
        use_kv_cache,
        enable_dynamic_shape,
        raw,
    })
}
