//! The manager for exports without a KV cache.

use crate::error::{Error, Result};
use crate::io_manager::{
    fill_integers, integer_tensor, last_logits, method_tokens, IoManager, StepInputs,
};
use crate::model::ModelInfo;
use crate::tensor::{HostTensor, TensorView};

/// Drives `forward(tokens[1, seq])` for a model without KV cache: it keeps the whole token
/// history and feeds all of it at every step, so each step costs a full forward pass over
/// the sequence. The context is the method's maximum sequence length.
#[derive(Debug, Default)]
pub struct NoKvCache {
    history: Vec<u64>,
    inputs: Vec<HostTensor>,
    max_seq: usize,
}

impl NoKvCache {
    /// A manager to be loaded with [`IoManager::load`].
    pub fn new() -> Self {
        Self::default()
    }

    fn prepare(&mut self, tokens: &[u64], start_pos: usize) -> Result<StepInputs<'_>> {
        if start_pos != self.history.len() {
            return Err(Error::IoManager(format!(
                "step at position {start_pos}, but the history holds {} tokens",
                self.history.len()
            )));
        }
        let n = self.history.len() + tokens.len();
        if tokens.is_empty() || n > self.max_seq {
            return Err(Error::IoManager(format!(
                "the sequence would hold {n} tokens; this model takes 1 to {}",
                self.max_seq
            )));
        }
        self.history.extend_from_slice(tokens);
        fill_integers(&mut self.inputs[0], &[1, n], self.history.iter().copied())?;
        Ok(StepInputs::of("forward", &self.inputs))
    }
}

impl IoManager for NoKvCache {
    fn load(&mut self, model: &ModelInfo) -> Result<()> {
        let (_, dtype, seq) = method_tokens(model, "forward", 1, "(tokens)")?;
        self.max_seq = seq.min(model.metadata.max_context_len);
        self.inputs = vec![integer_tensor(dtype, vec![1, 1], seq)];
        self.history.clear();
        Ok(())
    }

    fn max_prefill_chunk(&self) -> usize {
        self.max_seq
    }

    fn max_context(&self) -> usize {
        self.max_seq
    }

    fn reset(&mut self) -> Result<()> {
        self.history.clear();
        Ok(())
    }

    fn rewind(&mut self, pos: usize) -> Result<()> {
        if pos > self.history.len() {
            return Err(Error::InvalidArgument(format!(
                "cannot rewind to {pos}: the history holds {} tokens",
                self.history.len()
            )));
        }
        self.history.truncate(pos);
        Ok(())
    }

    fn prepare_prefill(&mut self, tokens: &[u64], start_pos: usize) -> Result<StepInputs<'_>> {
        self.prepare(tokens, start_pos)
    }

    fn update_prefill<'o>(&mut self, outputs: &[TensorView<'o>]) -> Result<&'o [f32]> {
        last_logits(outputs)
    }

    fn prepare_decode(&mut self, token: u64, pos: usize) -> Result<StepInputs<'_>> {
        self.prepare(&[token], pos)
    }

    fn update_decode<'o>(&mut self, outputs: &[TensorView<'o>]) -> Result<&'o [f32]> {
        last_logits(outputs)
    }
}
