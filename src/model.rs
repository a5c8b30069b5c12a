//! A loaded `.pte` LLM: its program, its methods' signatures and the metadata that the
//! export recorded as constant methods.

use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::error::{Error, Result};
use crate::et::Program;
use crate::tensor::{DType, HostData, HostTensor, MethodInfo, TensorSpec, TensorView, ValueSpec};

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

/// Upstream's method names for multimodal exports (`extension/llm/runner/constants.h`).
pub(crate) const TOKEN_EMBEDDING: &str = "token_embedding";
/// The decoder that takes embeddings and cache positions.
pub(crate) const TEXT_DECODER: &str = "text_decoder";
/// The image encoder of a multimodal export.
pub(crate) const VISION_ENCODER: &str = "vision_encoder";
/// The audio encoder of a multimodal export.
pub(crate) const AUDIO_ENCODER: &str = "audio_encoder";
/// The encoder of an encoder-decoder (Whisper) export (`extension/asr/runner`).
pub(crate) const SEQ2SEQ_ENCODER: &str = "encoder";

/// How the program is driven.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ModelKind {
    /// `forward` (or `prefill` / `decode`) takes tokens.
    Tokens,
    /// Upstream's multimodal layout: `token_embedding(tokens)` and
    /// `text_decoder(embeddings, cache_position)`, plus encoders. Managers see a `forward`
    /// that chains the two.
    Embeddings,
    /// Upstream's encoder-decoder (ASR) layout: `encoder(features)` and
    /// `text_decoder(tokens, encoder_output, cache_position)`.
    Seq2Seq,
}

/// A loaded model.
pub(crate) struct Model {
    program: Program,
    /// The caller's method that replaces `forward` (managers know it by that name).
    alias: Option<String>,
    info: ModelInfo,
    kind: ModelKind,
    /// Embeddings between `token_embedding` and `text_decoder`, in the decoder's dtype.
    embeds: Option<HostTensor>,
    /// The most embedding rows one `text_decoder` call takes, and their width (the
    /// buffer's sizes change with each call).
    embed_limits: Option<(usize, usize)>,
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
        let has = |n: &str| names.iter().any(|m| m == n);
        let kind = if has(step_method) {
            ModelKind::Tokens
        } else if files.method.is_none() && has(TEXT_DECODER) && has(TOKEN_EMBEDDING) {
            ModelKind::Embeddings
        } else if files.method.is_none() && has(TEXT_DECODER) && has(SEQ2SEQ_ENCODER) {
            ModelKind::Seq2Seq
        } else {
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
        };
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
        let mut embeds = None;
        let mut embed_limits = None;
        if kind == ModelKind::Embeddings {
            let (forward, buffer) = embedding_forward(&methods)?;
            methods.insert("forward".to_string(), forward);
            embed_limits = Some((buffer.sizes()[1], buffer.sizes()[2]));
            embeds = Some(buffer);
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
            kind,
            embeds,
            embed_limits,
        })
    }

    pub(crate) fn kind(&self) -> ModelKind {
        self.kind
    }

    /// The most embedding rows one `text_decoder` call takes, and their width.
    pub(crate) fn embedding_rows(&self) -> Option<(usize, usize)> {
        self.embed_limits
    }

    /// Runs `text_decoder` of a multimodal export on `rows` (f32, `n` rows of the model's
    /// width; at most [`embedding_rows`](Self::embedding_rows)) at `pos`.
    pub(crate) fn decode_embeddings(
        &mut self,
        rows: &[f32],
        pos: usize,
    ) -> Result<Vec<TensorView<'_>>> {
        let (max_rows, dim) = self
            .embedding_rows()
            .ok_or_else(|| Error::UnsupportedModel("the model does not take embeddings".into()))?;
        let n = rows.len() / dim;
        if n == 0 || n > max_rows || !rows.len().is_multiple_of(dim) {
            return Err(Error::InvalidArgument(format!(
                "{} values are not 1 to {max_rows} rows of {dim}",
                rows.len()
            )));
        }
        let positions = self.positions(pos, n)?;
        let buffer = self.embeds.as_mut().expect("checked above");
        buffer.set_sizes(&[1, n, dim])?;
        buffer.data_mut().write_floats(0, rows)?;
        self.program
            .execute(TEXT_DECODER, &[buffer.view(), positions.view()])
    }

    fn positions(&self, pos: usize, n: usize) -> Result<HostTensor> {
        let spec = self
            .info
            .methods
            .get(TEXT_DECODER)
            .and_then(|m| m.inputs.get(1))
            .and_then(|v| v.tensor())
            .ok_or_else(|| {
                Error::UnsupportedModel("`text_decoder` has no cache-position input".into())
            })?;
        let values: Vec<i64> = if spec.numel() > 1 {
            (pos..pos + n).map(|p| p as i64).collect()
        } else {
            vec![pos as i64]
        };
        let len = values.len();
        let data = match spec.dtype {
            DType::I32 => HostData::I32(values.iter().map(|&v| v as i32).collect()),
            _ => HostData::I64(values),
        };
        HostTensor::new(vec![len], data)
    }

    /// Runs a method on one input and copies its first output out, widened to f32.
    pub(crate) fn run_encoder(
        &mut self,
        method: &str,
        input: TensorView<'_>,
    ) -> Result<HostTensor> {
        let outputs = self.program.execute(method, &[input])?;
        let first = outputs
            .first()
            .ok_or_else(|| Error::UnsupportedModel(format!("`{method}` returned nothing")))?;
        let values = first.as_f32().ok_or_else(|| {
            Error::UnsupportedModel(format!(
                "`{method}` returned {:?} values; expected floats",
                first.dtype()
            ))
        })?;
        HostTensor::new(first.sizes.clone(), HostData::F32(values.to_vec()))
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
        if self.kind == ModelKind::Embeddings && method == "forward" {
            return self.forward_through_embeddings(inputs);
        }
        let method = match &self.alias {
            Some(alias) if method == "forward" => alias.as_str(),
            _ => method,
        };
        self.program.execute(method, inputs)
    }
}

impl Model {
    /// The `forward` that managers see on a multimodal export: the tokens' embeddings,
    /// then the decoder.
    fn forward_through_embeddings(
        &mut self,
        inputs: &[TensorView<'_>],
    ) -> Result<Vec<TensorView<'_>>> {
        let [tokens, positions] = inputs else {
            return Err(Error::IoManager(format!(
                "`forward` takes (tokens, cache_position); got {} inputs",
                inputs.len()
            )));
        };
        let buffer = self.embeds.as_mut().expect("made at load");
        {
            let outputs = self
                .program
                .execute(TOKEN_EMBEDDING, std::slice::from_ref(tokens))?;
            let rows = outputs.first().ok_or_else(|| {
                Error::UnsupportedModel("`token_embedding` returned nothing".into())
            })?;
            let values = rows.as_f32().ok_or_else(|| {
                Error::UnsupportedModel("`token_embedding` did not return floats".into())
            })?;
            buffer.set_sizes(&rows.sizes)?;
            buffer.data_mut().write_floats(0, values)?;
        }
        self.program
            .execute(TEXT_DECODER, &[buffer.view(), positions.clone()])
    }
}

/// The synthesized `forward` of a multimodal export, `(tokens, cache_position) -> logits`,
/// and the buffer for the embeddings between the two methods.
fn embedding_forward(methods: &BTreeMap<String, MethodInfo>) -> Result<(MethodInfo, HostTensor)> {
    let embed = &methods[TOKEN_EMBEDDING];
    let decoder = &methods[TEXT_DECODER];
    let tensor = |m: &MethodInfo, i: usize, what: &str| -> Result<TensorSpec> {
        m.inputs
            .get(i)
            .and_then(|v| v.tensor())
            .cloned()
            .ok_or_else(|| {
                Error::UnsupportedModel(format!(
                    "`{}` has no tensor input {i} ({what}); upstream's multimodal layout is \
                     token_embedding(tokens) and text_decoder(embeddings, cache_position)",
                    m.name
                ))
            })
    };
    let tokens = tensor(embed, 0, "the token ids")?;
    let rows = tensor(decoder, 0, "the embeddings")?;
    let positions = tensor(decoder, 1, "the cache positions")?;
    if embed.inputs.len() != 1 || decoder.inputs.len() != 2 || rows.sizes.len() != 3 {
        return Err(Error::UnsupportedModel(format!(
            "token_embedding takes {:?} and text_decoder takes {:?}; upstream's multimodal \
             layout is token_embedding(tokens[1, seq]) and text_decoder(embeddings[1, seq, \
             dim], cache_position)",
            embed.inputs, decoder.inputs
        )));
    }
    let data = HostData::float_zeros(rows.dtype, rows.numel()).ok_or_else(|| {
        Error::UnsupportedModel(format!(
            "text_decoder takes {:?} embeddings; expected f32, f16 or bf16",
            rows.dtype
        ))
    })?;
    let buffer = HostTensor::new(rows.sizes.clone(), data)?;
    let forward = MethodInfo {
        name: "forward".into(),
        inputs: vec![ValueSpec::Tensor(tokens), ValueSpec::Tensor(positions)],
        outputs: decoder.outputs.clone(),
    };
    Ok((forward, buffer))
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
    fn a_small_decoder_call_does_not_shrink_the_rows_a_call_takes() {
        // Image rows go to `text_decoder` in chunks of this size: a one-row call before
        // must not make every later chunk one row long.
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/multimodal");
        let mut model = Model::load(&ModelFiles {
            program: dir.join("model.pte"),
            ..Default::default()
        })
        .unwrap();
        let limits = model.embedding_rows().unwrap();
        assert_eq!(limits, (127, 64));
        model.decode_embeddings(&[0.0; 64], 0).unwrap();
        assert_eq!(model.embedding_rows(), Some(limits));
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
