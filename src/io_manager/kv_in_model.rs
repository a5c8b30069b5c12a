//! The manager for exports that keep their KV cache inside the model.

use crate::error::{Error, Result};
use crate::io_manager::state::{self, Reader};
use crate::io_manager::{
    fill_integers, integer_input, integer_tensor, last_logits, method_tokens, IoManager, StepInputs,
};
use crate::model::{step_methods, ModelInfo};
use crate::tensor::{HostTensor, TensorView};

/// Drives `forward(tokens[1, seq], input_pos[1])` and the variant whose second input is the
/// full cache-positions vector `[seq]`. The cache itself is state inside the program, so
/// rewinding only moves the position: entries past it are masked by the model and
/// overwritten by the next steps.
///
/// Upstream's layouts it also drives (as upstream's `TextLLMRunner` does):
/// - two-method programs: the prompt runs `forward` (or `prefill` when there is no
///   `forward`) and each generated token runs `decode` when the program has it; each
///   method's position input is read from its own signature (the program must share its KV
///   cache between the two: see [`step_methods`]);
/// - logits of every position (`debug.generate_full_logits`): the last row is taken;
/// - ring-buffer exports (attention sink, sliding window), which upstream's runner
///   recognises by `get_max_seq_len` < `get_max_context_len`: positions are absolute and grow
///   past the context, which then bounds one call's prompt and new tokens only (see
///   [`IoManager::ring_buffer`]).
///
/// Its saved state ([`IoManager::save_state`]) is the 8-byte header alone (tag `KVIM`,
/// version 1): the manager keeps nothing of a conversation between steps (the runner
/// passes every position), and the cache is the model's, which EtLlm saves itself.
#[derive(Debug, Default)]
pub struct KvCacheInModel {
    prefill: Stage,
    /// `None` when decode runs the prefill method.
    decode: Option<Stage>,
    max_chunk: usize,
    max_context: usize,
    ring: bool,
}

/// One method and its two inputs.
#[derive(Debug, Default)]
struct Stage {
    method: String,
    inputs: Vec<HostTensor>,
    /// True when input 1 is a positions vector rather than a start position.
    positions_vector: bool,
}

impl Stage {
    /// Checks `method`'s `(tokens, position)` signature and allocates its inputs.
    fn load(model: &ModelInfo, method: &str) -> Result<(Self, usize)> {
        let (info, tok_dtype, seq) = method_tokens(model, method, 2, "(tokens, input_pos)")?;
        let (pos_dtype, pos_sizes) = integer_input(&info.inputs[1], "the position", method)?;
        let pos_numel: usize = pos_sizes.iter().product();
        let positions_vector = pos_numel > 1;
        if pos_sizes.len() != 1 || (positions_vector && pos_numel < seq) {
            return Err(Error::UnsupportedModel(format!(
                "the position input of `{method}` has shape {pos_sizes:?}; expected [1] or [seq]"
            )));
        }
        let stage = Stage {
            method: method.to_string(),
            inputs: vec![
                integer_tensor(tok_dtype, vec![1, 1], seq),
                integer_tensor(pos_dtype, vec![1], pos_numel.max(1)),
            ],
            positions_vector,
        };
        Ok((stage, seq))
    }

    fn prepare(&mut self, tokens: &[u64], start_pos: usize) -> Result<StepInputs<'_>> {
        let n = tokens.len();
        let [tok, pos] = &mut self.inputs[..] else {
            return Err(Error::IoManager("the manager is not loaded".into()));
        };
        fill_integers(tok, &[1, n], tokens.iter().copied())?;
        if self.positions_vector {
            fill_integers(pos, &[n], start_pos as u64..(start_pos + n) as u64)?;
        } else {
            fill_integers(pos, &[1], std::iter::once(start_pos as u64))?;
        }
        Ok(StepInputs::of(&self.method, &self.inputs))
    }
}

impl KvCacheInModel {
    /// A manager to be loaded with [`IoManager::load`].
    pub fn new() -> Self {
        Self::default()
    }

    fn check(&self, n: usize, start_pos: usize, limit: usize) -> Result<()> {
        if n == 0 || n > limit {
            return Err(Error::IoManager(format!(
                "a step takes 1 to {limit} tokens, got {n}"
            )));
        }
        if !self.ring && start_pos + n > self.max_context {
            return Err(Error::IoManager(format!(
                "positions {start_pos}..{} exceed the context of {}",
                start_pos + n,
                self.max_context
            )));
        }
        Ok(())
    }
}

impl IoManager for KvCacheInModel {
    fn load(&mut self, model: &ModelInfo) -> Result<()> {
        let names: Vec<String> = model.methods.keys().cloned().collect();
        let (prefill, decode) = step_methods(&names)
            .ok_or_else(|| Error::UnsupportedModel("no `forward` method".into()))?;
        let (prefill_stage, seq) = Stage::load(model, prefill)?;
        self.decode = if decode != prefill {
            Some(Stage::load(model, decode)?.0)
        } else {
            None
        };
        self.prefill = prefill_stage;
        self.max_chunk = seq;
        let meta = &model.metadata;
        self.max_context = meta.max_context_len;
        self.ring = meta.max_seq_len < meta.max_context_len;
        Ok(())
    }

    fn max_prefill_chunk(&self) -> usize {
        self.max_chunk
    }

    fn max_context(&self) -> usize {
        self.max_context
    }

    fn ring_buffer(&self) -> bool {
        self.ring
    }

    fn reset(&mut self) -> Result<()> {
        Ok(())
    }

    fn rewind(&mut self, pos: usize) -> Result<()> {
        if !self.ring && pos > self.max_context {
            return Err(Error::InvalidArgument(format!(
                "cannot rewind to {pos}: the context holds {}",
                self.max_context
            )));
        }
        Ok(())
    }

    fn prepare_prefill(&mut self, tokens: &[u64], start_pos: usize) -> Result<StepInputs<'_>> {
        self.check(tokens.len(), start_pos, self.max_chunk)?;
        self.prefill.prepare(tokens, start_pos)
    }

    fn update_prefill<'o>(&mut self, outputs: &[TensorView<'o>]) -> Result<&'o [f32]> {
        last_logits(outputs)
    }

    fn prepare_decode(&mut self, token: u64, pos: usize) -> Result<StepInputs<'_>> {
        self.check(1, pos, 1)?;
        match &mut self.decode {
            Some(stage) => stage.prepare(&[token], pos),
            None => self.prefill.prepare(&[token], pos),
        }
    }

    fn update_decode<'o>(&mut self, outputs: &[TensorView<'o>]) -> Result<&'o [f32]> {
        last_logits(outputs)
    }

    fn save_state(&mut self, out: &mut Vec<u8>) -> Result<()> {
        state::write_header(out, state::KV_IN_MODEL);
        Ok(())
    }

    fn restore_state(&mut self, saved: &[u8]) -> Result<()> {
        Reader::new(saved, state::KV_IN_MODEL)?.finish()
    }
}
