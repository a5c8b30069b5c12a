"""A KV-in-model KV-cache manager in Python: the standard export, whose KV cache lives
inside the model, driven through ``forward(tokens[1, seq], input_pos[1])`` or
``forward(tokens[1, seq], cache_positions[seq])``.

It mirrors ``examples/c/kv_in_model_manager.c`` (EtLlm's built-in ``KvCacheInModel``):
the manager owns only the token and position buffers; the model keeps the cache. Its
saved state is only a tag and a version (the cache is the model's, which EtLlm saves).
"""

from __future__ import annotations

from typing import List, Tuple

import numpy as np

import etllm

STATE = b"pyKV\x01\x00\x00\x00"  # tag, format version 1


class KvInModelManager(etllm.IoManager):
    def __init__(self) -> None:
        self.tokens = np.zeros(0, np.int64)
        self.positions = np.zeros(0, np.int64)
        self.positions_vector = False
        self.max_chunk = 0
        self.max_context = 0

    def load(self, model: etllm.ModelInfo) -> Tuple[int, int]:
        n_in, n_out = model.method("forward")
        if n_in != 2 or n_out < 1:
            raise etllm.UnsupportedModelError(
                f"`forward` takes {n_in} inputs and returns {n_out} outputs; this manager "
                "drives forward(tokens, input_pos) -> logits"
            )
        tokens, pos = model.input("forward", 0), model.input("forward", 1)
        ints = (np.dtype(np.int64), np.dtype(np.int32))
        if tokens.dtype not in ints or len(tokens.shape) != 2 or tokens.shape[0] != 1:
            raise etllm.UnsupportedModelError("the tokens input of `forward` is not [1, seq] ints")
        meta = model.metadata()
        seq = tokens.shape[1]
        if seq > 1 and not meta.enable_dynamic_shape:
            raise etllm.UnsupportedModelError(
                f"`forward` takes exactly {seq} tokens per call (static shape)"
            )
        if pos.dtype not in ints or len(pos.shape) != 1 or (1 < pos.shape[0] < seq):
            raise etllm.UnsupportedModelError("the position input is not an int [1] or [seq] tensor")
        if meta.max_context_len < 1:
            raise etllm.UnsupportedModelError("the model does not say its max context length")
        self.positions_vector = pos.shape[0] > 1
        self.max_chunk = seq
        self.max_context = meta.max_context_len
        self.tokens = np.zeros((1, seq), tokens.dtype)
        self.positions = np.zeros(pos.shape[0], pos.dtype)
        return self.max_chunk, self.max_context

    def reset(self) -> None:
        pass  # the cache lives in the model; positions past 0 are masked

    def rewind(self, pos: int) -> None:
        if not 0 <= pos <= self.max_context:
            raise etllm.InvalidArgumentError(f"cannot rewind to {pos}")

    def _step(self, tokens: np.ndarray, start_pos: int) -> etllm.Step:
        n = len(tokens)
        if not 1 <= n <= self.max_chunk:
            raise ValueError(f"a step takes 1 to {self.max_chunk} tokens, got {n}")
        if start_pos < 0 or start_pos + n > self.max_context:
            raise ValueError(f"positions {start_pos}..{start_pos + n} exceed the context")
        tok = self.tokens[:, :n]  # a contiguous view of the first n slots
        tok[0, :] = tokens
        n_pos = n if self.positions_vector else 1
        pos = self.positions[:n_pos]
        pos[:] = np.arange(start_pos, start_pos + n_pos)
        return etllm.Step("forward", [tok, pos])

    def prepare_prefill(self, tokens: np.ndarray, start_pos: int) -> etllm.Step:
        return self._step(tokens, start_pos)

    def prepare_decode(self, token: int, pos: int) -> etllm.Step:
        return self._step(np.array([token], np.uint64), pos)

    def _update(self, outputs: List[np.ndarray]) -> np.ndarray:
        if not outputs or outputs[0].dtype != np.float32:
            raise ValueError("`forward` returned no f32 logits")
        return etllm.last_row(outputs[0])

    update_prefill = _update
    update_decode = _update

    def save_state(self) -> bytes:
        return STATE  # nothing of a conversation stays here between steps

    def restore_state(self, state: bytes) -> None:
        if state != STATE:
            raise ValueError(f"not a saved state of KvInModelManager ({len(state)} bytes)")
