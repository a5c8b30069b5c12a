//! The manager for exports that keep their KV cache inside the model.

use crate::error::{Error, Result};
use crate::io_manager::{
    fill_integers, forward_tokens, integer_input, integer_tensor, last_logits, IoManager,
    StepInputs,
};
use crate::model::ModelInfo;
use crate::tensor::{HostTensor, TensorView};

/// Drives `forward(tokens[1, seq], input_pos[1])` and the variant whose second input is the
/// full cache-positions vector `[seq]`. The cache itself is state inside the program, so
/// rewinding only moves the position: entries past it are masked by the model and
/// overwritten by the next steps.
#[derive(Debug, Default)]
pub struct KvCacheInModel {
    inputs: Vec<HostTensor>,
    max_chunk: usize,
    max_context: usize,
    /// True when input 1 is a positions vector rather than a start position.
    positions_vector: bool,
}

impl KvCacheInModel {
    /// A manager to be loaded with [`IoManager::load`].
    pub fn new() -> Self {
        Self::default()
    }

    fn prepare(&mut self, tokens: &[u64], start_pos: usize) -> Result<StepInputs<'_>> {
        let n = tokens.len();
        if n == 0 || n > self.max_chunk {
            return Err(Error::IoManager(format!(
                "a step takes 1 to {} tokens, got {n}",
                self.max_chunk
            )));
        }
        if start_pos + n > self.max_context {
            return Err(Error::IoManager(format!(
                "positions {start_pos}..{} exceed the context of {}",
                start_pos + n,
                self.max_context
            )));
        }
        let [tok, pos] = &mut self.inputs[..] else {
            return Err(Error::IoManager("the manager is not loaded".into()));
        };
        fill_integers(tok, &[1, n], tokens.iter().copied())?;
        if self.positions_vector {
            fill_integers(pos, &[n], start_pos as u64..(start_pos + n) as u64)?;
        } else {
            fill_integers(pos, &[1], std::iter::once(start_pos as u64))?;
        }
        Ok(StepInputs::of("forward", &self.inputs))
    }
}

impl IoManager for KvCacheInModel {
    fn load(&mut self, model: &ModelInfo) -> Result<()> {
        let (forward, tok_dtype, seq) = forward_tokens(model, 2, "(tokens, input_pos)")?;
        let (pos_dtype, pos_sizes) = integer_input(&forward.inputs[1], "the position", "forward")?;
        let pos_numel: usize = pos_sizes.iter().product();
        self.positions_vector = pos_numel > 1;
        if pos_sizes.len() != 1 || (self.positions_vector && pos_numel < seq) {
            return Err(Error::UnsupportedModel(format!(
                "the position input of `forward` has shape {pos_sizes:?}; expected [1] or [seq]"
            )));
        }
        self.max_chunk = seq;
        self.max_context = model.metadata.max_context_len;
        self.inputs = vec![
            integer_tensor(tok_dtype, vec![1, 1], seq),
            integer_tensor(pos_dtype, vec![1], pos_numel.max(1)),
        ];
        Ok(())
    }

    fn max_prefill_chunk(&self) -> usize {
        self.max_chunk
    }

    fn max_context(&self) -> usize {
        self.max_context
    }

    fn reset(&mut self) -> Result<()> {
        Ok(())
    }

    fn rewind(&mut self, pos: usize) -> Result<()> {
        if pos > self.max_context {
            return Err(Error::InvalidArgument(format!(
                "cannot rewind to {pos}: the context holds {}",
                self.max_context
            )));
        }
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
