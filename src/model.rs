//! A loaded `.pte` LLM: its program, its methods' signatures and the metadata that the
//! export recorded as constant methods.

use std::collections::BTreeMap;
use std::path::PathBuf;

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
    /// The caller's method that replaces `forward` (managers know it by that name).
    alias: Option<String>,
    info: ModelInfo,
}

/// What to open: the program, its external data files and the method that plays
/// `forward`.
#[derive(Debug, Clone, Default)]
pub(crate) struct ModelFiles {
    /// The `.pte`.
    pub(crate) program: PathBuf,
    /// External data files (`.ptd`) given by the caller. When empty, a `.ptd` beside the
    /// program with the same stem is used if there is one (see [`ModelFiles::data_paths`]).
    pub(crate) data: Vec<PathBuf>,
    /// The method that runs model steps, when not `forward` (e.g. `lora_forward` in a
    /// multi-method LoRA export).
    pub(crate) method: Option<String>,
}

impl ModelFiles {
    /// The program, then the data files it opens with.
    pub(crate) fn all_paths(&self) -> Vec<PathBuf> {
        let mut paths = vec![self.program.clone()];
        paths.extend(self.data_paths());
        paths
    }

    /// The caller's step method, or `forward`.
    pub(crate) fn step_method(&self) -> &str {
        self.method.as_deref().unwrap_or("forward")
    }

    /// The data files to open: the caller's, or else `<stem>.ptd` beside the program
    /// when that file exists.
    pub(crate) fn data_paths(&self) -> Vec<PathBuf> {
        if !self.data.is_empty() {
            return self.data.clone();
        }
        let sibling = self.program.with_extension("ptd");
        if sibling != self.program && sibling.is_file() {
            vec![sibling]
        } else {
            Vec::new()
        }
    }
}

/// The methods that run a program's steps, chosen as upstream's `create_text_llm_runner`
/// chooses them (`extension/llm/runner/constants.h`): prefill runs `forward` if the
/// program has it, else `prefill`; decode runs `decode` if the program has it (and it is not
/// the prefill method), else the prefill method. `None` when the program has neither
/// `forward` nor `prefill`.
pub fn step_methods(names: &[String]) -> Option<(&'static str, &'static str)> {
    let has = |n: &str| names.iter().any(|m| m == n);
    let prefill = if has("forward") {
        "forward"
    } else if has("prefill") {
        "prefill"
    } else {
        return None;
    };
    let decode = if has("decode") { "decode" } else { prefill };
    Some((prefill, decode))
}

impl Model {
    pub(crate) fn load(files: &ModelFiles) -> Result<Self> {
        let path = files.program.as_path();
        let alias = files.method.as_deref().filter(|m| *m != "forward");
        // Two methods that share the KV cache (upstream's prefill/decode programs, exported
        // with `share_mutable_buffers`) need one set of memory arenas.
        let pair =
            |names: &[String]| step_methods(names).filter(|(p, d)| alias.is_none() && p != d);
        let mut program = Program::load(path, &files.data_paths(), |names| pair(names).is_some())?;
        let names = program.method_names();
        let step_method = match files.method.as_deref() {
            Some(m) => m,
            None => step_methods(&names).map_or("forward", |(p, _)| p),
        };
        if !names.iter().any(|n| n == step_method) {
            let methods = if names.is_empty() {
                "none".to_string()
            } else {
                names.join(", ")
            };
            return Err(if files.method.is_some() {
                Error::InvalidArgument(format!(
                    "{} has no method `{step_method}` (its methods: {methods})",
                    path.display()
                ))
            } else {
                Error::UnsupportedModel(format!(
                    "{} has no `forward` method, nor a `prefill` method (its methods: {methods})",
                    path.display()
                ))
            });
        }
        if let Some((prefill, decode)) = pair(&names) {
            for method in [prefill, decode] {
                if program.planned_buffer_count(method)? < 2 {
                    return Err(Error::UnsupportedModel(format!(
                        "{}: `{prefill}` and `{decode}` run the prompt and the generated \
                         tokens, but `{method}` keeps its own KV cache (the export did not \
                         share mutable buffers between methods: export_llm's \
                         `multimethod.share_mutable_buffers: true`), so decode would run on \
                         an empty cache",
                        path.display()
                    )));
                }
            }
        }
        let mut consts: BTreeMap<String, ConstValue> = BTreeMap::new();
        let mut methods = BTreeMap::new();
        for name in &names {
            let info = program.method_info(name)?;
            if info.inputs.is_empty() {
                consts.insert(name.clone(), program.call_constant(name)?);
            } else if alias.is_some() && name == "forward" {
                // Replaced by the alias; not loaded, so its memory is not planned.
            } else {
                program.load_method(name)?;
                methods.insert(name.clone(), info);
            }
        }
        if let Some(alias) = alias {
            let info = methods.remove(alias).expect("checked above");
            methods.insert("forward".to_string(), info);
        }
        let metadata = metadata_from(&consts)?;
        Ok(Self {
            program,
            alias: alias.map(str::to_string),
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

    /// The program's buffers that hold state between calls (see
    /// [`Program::state_arenas`](crate::et::Program::state_arenas)).
    pub(crate) fn state_arenas(&self) -> Vec<&[u8]> {
        self.program.state_arenas()
    }

    /// The same buffers, to write.
    pub(crate) fn state_arenas_mut(&mut self) -> Vec<&mut [u8]> {
        self.program.state_arenas_mut()
    }

    pub(crate) fn execute(
        &mut self,
        method: &str,
        inputs: &[TensorView<'_>],
    ) -> Result<Vec<TensorView<'_>>> {
        let method = match &self.alias {
            Some(alias) if method == "forward" => alias.as_str(),
            _ => method,
        };
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

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("etllm-model-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_ptd_with_the_models_stem_is_found_beside_it() {
        let dir = scratch("sibling");
        std::fs::write(dir.join("model.ptd"), b"x").unwrap();
        let files = ModelFiles {
            program: dir.join("model.pte"),
            ..Default::default()
        };
        assert_eq!(files.data_paths(), vec![dir.join("model.ptd")]);
        let other = ModelFiles {
            program: dir.join("other.pte"),
            ..Default::default()
        };
        assert!(other.data_paths().is_empty());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn optimum_executorchs_metadata_names_are_read() {
        // HF optimum-executorch writes get_eos_id (singular), no get_max_context_len, and
        // get_head_dim as a float.
        let consts: BTreeMap<String, ConstValue> = [
            ("get_eos_id", ConstValue::Int(151_645)),
            ("get_max_seq_len", ConstValue::Int(64)),
            ("get_vocab_size", ConstValue::Int(151_936)),
            ("get_head_dim", ConstValue::Double(64.0)),
            ("use_kv_cache", ConstValue::Bool(true)),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let meta = metadata_from(&consts).unwrap();
        assert_eq!(meta.eos_ids, vec![151_645]);
        assert_eq!(meta.max_seq_len, 64);
        assert_eq!(meta.max_context_len, 64);
        assert_eq!(meta.vocab_size, Some(151_936));
        assert!(!meta.raw.contains_key("get_head_dim"));
    }

    #[test]
    fn data_paths_given_by_the_caller_replace_the_search() {
        let dir = scratch("given");
        std::fs::write(dir.join("model.ptd"), b"x").unwrap();
        let files = ModelFiles {
            program: dir.join("model.pte"),
            data: vec![dir.join("a.ptd"), dir.join("b.ptd")],
            method: None,
        };
        assert_eq!(
            files.data_paths(),
            vec![dir.join("a.ptd"), dir.join("b.ptd")]
        );
        std::fs::remove_dir_all(dir).unwrap();
    }
}
