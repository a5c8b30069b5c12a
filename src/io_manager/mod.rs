//! KV-cache managers: they prepare every input of each model step and take its outputs.
//!
//! The runner drives a manager through [`IoManager`]: for each prefill chunk and each
//! decode step it asks for the step's method and inputs, runs the method, and hands every
//! output back. A manager may own extra inputs (caches, masks, rope rows) and read extra
//! outputs (updated cache rows); it also tells the runner where the step's logits are.
//!
//! Two managers are built in:
//! - [`KvCacheInModel`] for the standard export whose KV cache lives inside the model:
//!   `forward(tokens[1, seq], input_pos[1])`, or with the full cache-positions vector
//!   `forward(tokens[1, seq], cache_positions[seq])`;
//! - [`NoKvCache`] for an export without KV cache, `forward(tokens[1, seq])`, which is fed
//!   the whole sequence at every step;
//! - [`StaticAttention`] for static-attention exports whose KV caches are explicit inputs
//!   and outputs (chosen when the export has `kv_cache_specs` constant methods).

mod kv_in_model;
mod no_kv_cache;
mod state;
mod static_attention;

pub use kv_in_model::KvCacheInModel;
pub use no_kv_cache::NoKvCache;
pub use static_attention::StaticAttention;

use crate::error::{Error, Result};
use crate::model::ModelInfo;
use crate::tensor::{DType, HostData, HostTensor, TensorData, TensorView, ValueSpec};

/// The method to run for one step, and every one of its inputs.
#[derive(Debug, Clone)]
pub struct StepInputs<'a> {
    /// Name of the method, e.g. `forward`.
    pub method: &'a str,
    /// One tensor per method input, in order. The runtime reads them in place.
    pub inputs: Vec<TensorView<'a>>,
}

impl<'a> StepInputs<'a> {
    /// A step of `method` over views of `inputs`.
    pub fn of(method: &'a str, inputs: &'a [HostTensor]) -> Self {
        Self {
            method,
            inputs: inputs.iter().map(HostTensor::view).collect(),
        }
    }
}

/// A KV-cache manager. See the [module documentation](self).
///
/// Positions count tokens already in the cache: a step that starts at `start_pos` with `n`
/// tokens leaves the cache holding `start_pos + n` positions.
///
/// A manager that wraps the built-in [`KvCacheInModel`] and counts the model steps (a
/// manager for a new layout implements the same methods on its own buffers:
/// `examples/c/static_attention_manager.c` and `examples/python/` have complete ones):
///
/// ```
/// use std::ops::ControlFlow;
/// use std::sync::{atomic::{AtomicUsize, Ordering}, Arc};
/// use etllm::io_manager::{IoManager, KvCacheInModel, StepInputs};
/// use etllm::{model::ModelInfo, tensor::TensorView, GenerationConfig, Runner, RunnerOptions};
///
/// struct Counting { inner: KvCacheInModel, steps: Arc<AtomicUsize> }
///
/// impl IoManager for Counting {
///     fn load(&mut self, model: &ModelInfo) -> etllm::Result<()> { self.inner.load(model) }
///     fn max_prefill_chunk(&self) -> usize { self.inner.max_prefill_chunk() }
///     fn max_context(&self) -> usize { self.inner.max_context() }
///     fn reset(&mut self) -> etllm::Result<()> { self.inner.reset() }
///     fn rewind(&mut self, pos: usize) -> etllm::Result<()> { self.inner.rewind(pos) }
///     fn prepare_prefill(&mut self, tokens: &[u64], start: usize) -> etllm::Result<StepInputs<'_>> {
///         self.steps.fetch_add(1, Ordering::Relaxed);
///         self.inner.prepare_prefill(tokens, start)
///     }
///     fn update_prefill<'o>(&mut self, outputs: &[TensorView<'o>]) -> etllm::Result<&'o [f32]> {
///         self.inner.update_prefill(outputs)
///     }
///     fn prepare_decode(&mut self, token: u64, pos: usize) -> etllm::Result<StepInputs<'_>> {
///         self.steps.fetch_add(1, Ordering::Relaxed);
///         self.inner.prepare_decode(token, pos)
///     }
///     fn update_decode<'o>(&mut self, outputs: &[TensorView<'o>]) -> etllm::Result<&'o [f32]> {
///         self.inner.update_decode(outputs)
///     }
/// }
///
/// let steps = Arc::new(AtomicUsize::new(0));
/// let manager = Counting { inner: KvCacheInModel::new(), steps: steps.clone() };
/// let options = RunnerOptions { io_manager: Some(Box::new(manager)), ..Default::default() };
/// let mut runner = Runner::open(
///     "tests/fixtures/dyn_xnnpack/model.pte",
///     "tests/fixtures/tokenizer.json",
///     options,
/// )?;
/// let config = GenerationConfig { max_new_tokens: 5, temperature: 0.0, ..Default::default() };
/// runner.generate("Once upon a time", &config, |_| ControlFlow::Continue(()), |_| {})?;
/// // One prefill step (the model has dynamic shape), then a decode step per token after
/// // the first (the first comes from the prefill's logits).
/// assert_eq!(steps.load(Ordering::Relaxed), 1 + 4);
/// # Ok::<(), etllm::Error>(())
/// ```
pub trait IoManager: Send {
    /// Called once after the model is loaded, before any other method. Checks that the
    /// model's signature fits this manager and allocates the manager's buffers.
    fn load(&mut self, model: &ModelInfo) -> Result<()>;

    /// The most tokens one prefill step accepts (1 for a model without dynamic shape).
    fn max_prefill_chunk(&self) -> usize;

    /// The most positions this manager can hold (normally the model's max context).
    fn max_context(&self) -> usize;

    /// True when the model keeps its KV cache as a ring buffer (attention-sink or
    /// sliding-window exports): positions then grow past [`max_context`](Self::max_context),
    /// which bounds one call's prompt and new tokens only, as in upstream's runner. When a
    /// step at a position past `max_context` fails, the runner takes the model for a
    /// bounded one after all and ends the generation with `ContextFull`. A conversation
    /// can then only be rewound to its start or kept where it is. Default: false.
    fn ring_buffer(&self) -> bool {
        false
    }

    /// Forgets everything: the next step starts at position 0.
    fn reset(&mut self) -> Result<()>;

    /// Rolls the cache back so that it holds only the first `pos` positions.
    fn rewind(&mut self, pos: usize) -> Result<()>;

    /// Inputs for a prefill step of `tokens` (at most [`max_prefill_chunk`](Self::max_prefill_chunk))
    /// starting at `start_pos`.
    fn prepare_prefill(&mut self, tokens: &[u64], start_pos: usize) -> Result<StepInputs<'_>>;

    /// Takes the outputs of the prefill step prepared last and returns the logits that
    /// predict the token after its last token.
    fn update_prefill<'o>(&mut self, outputs: &[TensorView<'o>]) -> Result<&'o [f32]>;

    /// Inputs for a decode step of one `token` at position `pos`.
    fn prepare_decode(&mut self, token: u64, pos: usize) -> Result<StepInputs<'_>>;

    /// Takes the outputs of the decode step prepared last and returns the next-token logits.
    fn update_decode<'o>(&mut self, outputs: &[TensorView<'o>]) -> Result<&'o [f32]>;

    /// Appends the manager's conversation state to `out`: whatever it keeps from step to
    /// step (its own KV caches, positions, token history), in a layout of its choosing.
    /// Sessions use it to keep several conversations on one model and to save a
    /// conversation to a file; [`restore_state`](Self::restore_state) reads it back. The
    /// model's own mutable buffers are saved by EtLlm, not here. It is called between
    /// steps, never between a prepare and its update; on error, whatever it appended is
    /// not a state and the caller drops it. The default refuses: a manager without it
    /// serves one conversation only.
    ///
    /// The built-in managers write a header (a four-byte kind tag and a little-endian
    /// `u32` format version) and then their fields, and refuse a state of another kind,
    /// version or cache layout with an [`Error::IoManager`] that says which.
    fn save_state(&mut self, out: &mut Vec<u8>) -> Result<()> {
        let _ = out;
        Err(cannot_save())
    }

    /// Replaces the manager's conversation state with `state`, bytes that
    /// [`save_state`](Self::save_state) wrote (on this manager or another instance of the
    /// same kind, for the same model). On error the manager must keep the state it had.
    fn restore_state(&mut self, state: &[u8]) -> Result<()> {
        let _ = state;
        Err(cannot_restore())
    }
}

/// The error of a manager that does not implement [`IoManager::save_state`].
pub(crate) fn cannot_save() -> Error {
    Error::IoManager(
        "this KV-cache manager cannot save its state (it does not implement save_state)".into(),
    )
}

/// The error of a manager that does not implement [`IoManager::restore_state`].
pub(crate) fn cannot_restore() -> Error {
    Error::IoManager(
        "this KV-cache manager cannot restore a state (it does not implement restore_state)".into(),
    )
}

/// Chooses the built-in manager that fits the model's `forward` signature.
pub fn default_manager_for(model: &ModelInfo) -> Result<Box<dyn IoManager>> {
    let names: Vec<String> = model.methods.keys().cloned().collect();
    let (prefill, _) = crate::model::step_methods(&names).ok_or_else(|| {
        Error::UnsupportedModel("the model has no `forward` (or `prefill`) method".to_string())
    })?;
    let forward = &model.methods[prefill];
    if static_attention::is_static_attention(model) {
        return Ok(Box::new(StaticAttention::new()));
    }
    match forward.inputs.len() {
        1 => Ok(Box::new(NoKvCache::new())),
        2 => Ok(Box::new(KvCacheInModel::new())),
        n => Err(Error::UnsupportedModel(format!(
            "`{prefill}` takes {n} inputs; the built-in managers handle (tokens) and \
             (tokens, input_pos) signatures. Supply your own IoManager for other layouts"
        ))),
    }
}

/// Checks that `method` takes `n_inputs` inputs, the first a `[1, seq]` integer token
/// tensor (one token per call unless the model has dynamic shape). Returns the method, the
/// tokens' element type and `seq`, the most tokens per call. `drives` names the signature
/// the calling manager handles, for the error message.
pub(crate) fn method_tokens<'m>(
    model: &'m ModelInfo,
    method: &str,
    n_inputs: usize,
    drives: &str,
) -> Result<(&'m crate::tensor::MethodInfo, DType, usize)> {
    let info = model
        .methods
        .get(method)
        .ok_or_else(|| Error::UnsupportedModel(format!("no `{method}` method")))?;
    if info.inputs.len() != n_inputs {
        return Err(Error::UnsupportedModel(format!(
            "`{method}` takes {} inputs; this manager drives {drives}",
            info.inputs.len()
        )));
    }
    let (dtype, sizes) = integer_input(&info.inputs[0], "the tokens", method)?;
    if sizes.len() != 2 || sizes[0] != 1 || sizes[1] == 0 {
        return Err(Error::UnsupportedModel(format!(
            "the tokens input of `{method}` has shape {sizes:?}; expected [1, seq]"
        )));
    }
    if sizes[1] > 1 && !model.metadata.enable_dynamic_shape {
        return Err(Error::UnsupportedModel(format!(
            "`{method}` takes exactly {} tokens per call (static shape); EtLlm needs \
             dynamic shape or one token per call",
            sizes[1]
        )));
    }
    Ok((info, dtype, sizes[1]))
}

/// Element type of a token or position input: i64 or i32.
pub(crate) fn integer_input(
    spec: &ValueSpec,
    what: &str,
    method: &str,
) -> Result<(DType, Vec<usize>)> {
    match spec.tensor() {
        Some(t) if matches!(t.dtype, DType::I64 | DType::I32) => Ok((t.dtype, t.sizes.clone())),
        Some(t) => Err(Error::UnsupportedModel(format!(
            "{what} input of `{method}` is a {:?} tensor; expected i64 or i32",
            t.dtype
        ))),
        None => Err(Error::UnsupportedModel(format!(
            "{what} input of `{method}` is not a tensor"
        ))),
    }
}

/// A zeroed integer tensor able to hold `capacity` elements, with sizes `sizes`.
pub(crate) fn integer_tensor(dtype: DType, sizes: Vec<usize>, capacity: usize) -> HostTensor {
    let data = match dtype {
        DType::I32 => HostData::I32(vec![0; capacity]),
        _ => HostData::I64(vec![0; capacity]),
    };
    let mut t = HostTensor::new(vec![capacity], data).expect("capacity matches");
    t.set_sizes(&sizes).expect("sizes fit capacity");
    t
}

/// Writes `values` at the start of an integer tensor and sets its sizes.
pub(crate) fn fill_integers(
    t: &mut HostTensor,
    sizes: &[usize],
    values: impl Iterator<Item = u64>,
) -> Result<()> {
    t.set_sizes(sizes)?;
    match t.data_mut() {
        crate::tensor::HostDataMut::I64(buf) => {
            for (slot, v) in buf.iter_mut().zip(values) {
                *slot = v as i64;
            }
        }
        crate::tensor::HostDataMut::I32(buf) => {
            for (slot, v) in buf.iter_mut().zip(values) {
                *slot = i32::try_from(v).map_err(|_| {
                    Error::InvalidArgument(format!("value {v} does not fit an i32 input"))
                })?;
            }
        }
        _ => return Err(Error::IoManager("integer input holds floats".into())),
    }
    Ok(())
}

/// The logits row `row` of a logits output shaped `[vocab]`, `[1, vocab]` or
/// `[1, rows, vocab]`.
pub fn logits_row<'o>(output: &TensorView<'o>, row: usize) -> Result<&'o [f32]> {
    let data = match output.data {
        TensorData::F32(v) => v,
        _ => {
            return Err(Error::UnsupportedModel(format!(
                "the logits output is {:?}; EtLlm reads f32 logits",
                output.dtype()
            )))
        }
    };
    let vocab = *output
        .sizes
        .last()
        .ok_or_else(|| Error::UnsupportedModel("the logits output is a scalar".into()))?;
    let rows = data.len().checked_div(vocab).unwrap_or(0);
    if row >= rows {
        return Err(Error::UnsupportedModel(format!(
            "the logits output has shape {:?}; row {row} does not exist",
            output.sizes
        )));
    }
    Ok(&data[row * vocab..(row + 1) * vocab])
}

/// The last logits row of the first output, for models whose outputs are logits of the
/// last position (`[1, vocab]`) or of every position fed (`[1, n, vocab]`).
pub(crate) fn last_logits<'o>(outputs: &[TensorView<'o>]) -> Result<&'o [f32]> {
    let out = outputs
        .first()
        .ok_or_else(|| Error::UnsupportedModel("`forward` returned no output".into()))?;
    let rows = match out.sizes.len() {
        0 | 1 => 1,
        2 => out.sizes[0].max(1),
        _ => out.sizes[out.sizes.len() - 2],
    };
    logits_row(out, rows - 1)
}
