//! The manager for exports without a KV cache.

use crate::error::{Error, Result};
use crate::io_manager::state::{self, Reader};
use crate::io_manager::{
    fill_integers, integer_tensor, last_logits, method_tokens, IoManager, StepInputs,
};
use crate::model::ModelInfo;
use crate::tensor::{HostTensor, TensorView};

/// Drives `forward(tokens[1, seq])` for a model without KV cache: it keeps the whole token
/// history and feeds all of it at every step, so each step costs a full forward pass over
/// the sequence. The context is the method's maximum sequence length.
///
/// Its saved state ([`IoManager::save_state`]) is the token history: the 8-byte header
/// (tag `NOKV`, version 1), a `u64` token count, then each token as a `u64`, all
/// little-endian. A restore refuses more tokens than the model takes.
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

    fn loaded(&self) -> Result<()> {
        match self.inputs.is_empty() {
            true => Err(Error::IoManager("the manager is not loaded".into())),
            false => Ok(()),
        }
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

    fn save_state(&mut self, out: &mut Vec<u8>) -> Result<()> {
        self.loaded()?;
        out.reserve(state::HEADER_LEN + 8 * (1 + self.history.len()));
        state::write_header(out, state::NO_KV_CACHE);
        out.extend_from_slice(&(self.history.len() as u64).to_le_bytes());
        for t in &self.history {
            out.extend_from_slice(&t.to_le_bytes());
        }
        Ok(())
    }

    fn restore_state(&mut self, saved: &[u8]) -> Result<()> {
        self.loaded()?;
        let mut r = Reader::new(saved, state::NO_KV_CACHE)?;
        let n = r.size("the token count")?;
        if n > self.max_seq {
            return Err(Error::IoManager(format!(
                "the NoKvCache state holds {n} tokens; this model takes at most {}",
                self.max_seq
            )));
        }
        let tokens = r.bytes(n * 8, "the tokens")?;
        r.finish()?;
        self.history.clear();
        self.history.extend(
            tokens
                .chunks_exact(8)
                .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes"))),
        );
        Ok(())
    }
}
