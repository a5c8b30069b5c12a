"""A static-attention KV-cache manager in Python: KV caches as explicit model inputs and
outputs, upstream's ``static_attention.py`` layout (see
``tests/fixtures/static_attention/README.md``), read entirely from the model's constant
methods.

It mirrors ``examples/c/static_attention_manager.c`` (EtLlm's built-in
``StaticAttention``): ring-buffer caches shared by ``forward`` (decode) and ``prefill``,
masks, RoPE rows copied from the model's tables, padded chunked prefill, sliding window
past the cache, rewind and reset. The caches are numpy arrays handed to the runtime
without a copy; the new rows come back as views of the runtime's outputs.

Its state (``save_state``, for EtLlm's sessions and saved conversations) is a header
(tag ``pySA``, version, cache layout, position) and the filled cache slots; ``restore_state``
checks it all before it changes anything.
"""

from __future__ import annotations

import struct
from typing import Dict, List, Optional, Tuple

import numpy as np

import etllm

TOKENS, MASK, COS, SIN, LAST_VALID = range(5)
HIDDEN = -np.inf

# Saved state: tag, format version, layers, heads, cache_len, head_dim, position
# (little-endian), then each layer's k and v caches: the first min(pos, cache_len) slots
# of every head, as little-endian float32.
STATE_HEADER = struct.Struct("<4sI5q")
STATE_TAG, STATE_VERSION = b"pySA", 1


class _Method:
    """Layout and buffers of one method (`forward` or `prefill`)."""

    def __init__(self, model: etllm.ModelInfo, name: str, mgr: "StaticAttentionManager") -> None:
        self.name = name
        self.num_inputs, self.num_outputs = model.method(name)
        specs = _ints(model, f"{name}_input_specs", "input_specs")
        if specs.size != 5:
            raise etllm.UnsupportedModelError(f"`{name}_input_specs` has {specs.size} entries; expected 5")
        self.slot = [int(s) for s in specs]
        kv = _ints(model, f"{name}_kv_cache_specs", "kv_cache_specs")
        if kv.size == 0 or kv.size % 5:
            raise etllm.UnsupportedModelError(f"`{name}_kv_cache_specs` is not rows of 5")
        self.kv = kv.reshape(-1, 5)[:, :4].astype(int).tolist()  # k_in, k_out, v_in, v_out
        if np.any(kv.reshape(-1, 5)[:, 4] != mgr.cache_len):
            raise etllm.UnsupportedModelError("this manager needs one cache length for every layer")
        covered = sorted(self.slot + [r[0] for r in self.kv] + [r[2] for r in self.kv])
        if covered != list(range(self.num_inputs)):
            raise etllm.UnsupportedModelError(f"the specs of `{name}` do not cover its inputs once each")
        infos = [model.input(name, i) for i in range(self.num_inputs)]
        tok = infos[self.slot[TOKENS]]
        if tok.dtype not in (np.int32, np.int64) or len(tok.shape) != 2 or tok.shape[0] != 1:
            raise etllm.UnsupportedModelError(f"the tokens input of `{name}` is not int [1, L]")
        self.len = L = tok.shape[1]
        C, half = mgr.cache_len, mgr.half
        if infos[self.slot[MASK]].shape != (1, L, C + L):
            raise etllm.UnsupportedModelError(f"the mask input of `{name}` is not [1, {L}, {C + L}]")
        for s in (COS, SIN):
            if infos[self.slot[s]].shape != (L, half):
                raise etllm.UnsupportedModelError(f"a rope input of `{name}` is not [{L}, {half}]")
        if mgr.heads == 0:
            mgr.heads = infos[self.kv[0][0]].shape[1]
        for row in self.kv:
            for i in (row[0], row[2]):
                if infos[i].shape != (1, mgr.heads, C, mgr.head_dim):
                    raise etllm.UnsupportedModelError(f"cache input {i} of `{name}` has shape {infos[i].shape}")
        self.tokens = np.zeros((1, L), tok.dtype)
        self.mask = np.zeros((1, L, C + L), np.float32)
        own = np.triu(np.full((L, L), HIDDEN, np.float32), 1)
        self.mask[0, :, C:] = own
        self.mask[0, :, :C] = HIDDEN
        self.cos = np.ones((L, half), np.float32)
        self.sin = np.zeros((L, half), np.float32)
        self.last_valid = np.zeros(infos[self.slot[LAST_VALID]].shape, infos[self.slot[LAST_VALID]].dtype)
        self.inputs: List[Optional[np.ndarray]] = [None] * self.num_inputs
        self.inputs[self.slot[TOKENS]] = self.tokens
        self.inputs[self.slot[MASK]] = self.mask
        self.inputs[self.slot[COS]] = self.cos
        self.inputs[self.slot[SIN]] = self.sin
        self.inputs[self.slot[LAST_VALID]] = self.last_valid

    def bind_caches(self, k: List[np.ndarray], v: List[np.ndarray]) -> None:
        for layer, row in enumerate(self.kv):
            self.inputs[row[0]] = k[layer]
            self.inputs[row[2]] = v[layer]


def _ints(model: etllm.ModelInfo, name: str, fallback: str) -> np.ndarray:
    try:
        return model.constant_ints(name)
    except etllm.NotFoundError:
        return model.constant_ints(fallback)


class StaticAttentionManager(etllm.IoManager):
    def __init__(self) -> None:
        self.loaded = False
        self.pos = 0
        self.heads = 0
        self.pending: Optional[Tuple[_Method, int]] = None

    def load(self, model: etllm.ModelInfo) -> Tuple[int, int]:
        self.loaded = False
        self.heads = 0
        try:
            model.method("forward")
        except etllm.NotFoundError:
            raise etllm.UnsupportedModelError("the model has no `forward` (decode) method") from None
        try:
            self.cache_len = model.constant_int("cache_len")
            self.head_dim = model.constant_int("head_dim")
        except etllm.NotFoundError as e:
            raise etllm.UnsupportedModelError(f"not a static-attention layout: {e.message}") from None
        if self.head_dim % 2:
            raise etllm.UnsupportedModelError("head_dim is odd; RoPE rotates pairs")
        self.half = self.head_dim // 2
        self.freqs_cos = model.constant_floats("freqs_cos").reshape(-1, self.half)
        self.freqs_sin = model.constant_floats("freqs_sin").reshape(-1, self.half)
        self.rope_rows = self.freqs_cos.shape[0]
        self.methods: Dict[str, _Method] = {"forward": _Method(model, "forward", self)}
        if "prefill" in model.method_names():
            self.methods["prefill"] = _Method(model, "prefill", self)
        layers = len(self.methods["forward"].kv)
        shape = (1, self.heads, self.cache_len, self.head_dim)
        # Zeroed: a hidden slot gets weight 0, and 0 * NaN would still be NaN.
        self.k = [np.zeros(shape, np.float32) for _ in range(layers)]
        self.v = [np.zeros(shape, np.float32) for _ in range(layers)]
        for m in self.methods.values():
            if len(m.kv) != layers:
                raise etllm.UnsupportedModelError("`prefill` and `forward` differ in layers")
            m.bind_caches(self.k, self.v)
        self.pos = 0
        self.pending = None
        self.loaded = True
        self._update_masks()
        chunk = self.methods.get("prefill", self.methods["forward"]).len
        return chunk, self.rope_rows

    def _update_masks(self) -> None:
        visible = min(self.pos, self.cache_len)
        for m in self.methods.values():
            m.mask[0, :, :visible] = 0.0
            m.mask[0, :, visible : self.cache_len] = HIDDEN

    def reset(self) -> None:
        self.pos = 0
        self.pending = None
        if self.loaded:
            self._update_masks()

    def rewind(self, pos: int) -> None:
        self.pending = None
        if not 0 <= pos <= self.pos:
            raise etllm.InvalidArgumentError(f"cannot rewind to {pos} from {self.pos}")
        if self.pos > self.cache_len and pos < self.pos:
            raise etllm.InvalidArgumentError(
                f"cannot rewind to {pos}: the sliding window has moved past the cache length "
                f"{self.cache_len} and the older entries are gone"
            )
        self.pos = pos
        self._update_masks()

    def _prepare(self, tokens: np.ndarray, start_pos: int, prefill: bool) -> etllm.Step:
        if not self.loaded:
            raise RuntimeError("the manager is not loaded")
        if start_pos != self.pos:
            raise ValueError(f"step at position {start_pos}, but the cache is at {self.pos}")
        n = len(tokens)
        if n > self.rope_rows - self.pos:
            raise ValueError(f"positions {self.pos}..{self.pos + n} exceed the {self.rope_rows} RoPE positions")
        m = self.methods["prefill"] if prefill and "prefill" in self.methods else self.methods["forward"]
        if not 1 <= n <= m.len:
            raise ValueError(f"`{m.name}` takes 1 to {m.len} tokens per call, got {n}")
        m.tokens[0, :n] = tokens
        m.tokens[0, n:] = 0
        m.cos[:n] = self.freqs_cos[self.pos : self.pos + n]
        m.sin[:n] = self.freqs_sin[self.pos : self.pos + n]
        m.cos[n:] = 1.0
        m.sin[n:] = 0.0
        m.last_valid[...] = n - 1
        self.pending = (m, n)
        return etllm.Step(m.name, m.inputs)

    def prepare_prefill(self, tokens: np.ndarray, start_pos: int) -> etllm.Step:
        return self._prepare(tokens, start_pos, True)

    def prepare_decode(self, token: int, pos: int) -> etllm.Step:
        return self._prepare(np.array([token], np.uint64), pos, False)

    def _update(self, outputs: List[np.ndarray]) -> np.ndarray:
        if self.pending is None:
            raise RuntimeError("update without a prepared step")
        m, n = self.pending
        self.pending = None
        if len(outputs) != m.num_outputs:
            raise ValueError(f"`{m.name}` returned {len(outputs)} outputs; its layout has {m.num_outputs}")
        logits = outputs[0]
        rows = logits.reshape(-1, logits.shape[-1])
        row = n - 1 if rows.shape[0] == m.len and m.len > 1 else rows.shape[0] - 1
        slots = (self.pos + np.arange(n)) % self.cache_len
        for layer, (_, k_out, _, v_out) in enumerate(m.kv):
            self.k[layer][0][:, slots, :] = outputs[k_out][0][:, :n, :]
            self.v[layer][0][:, slots, :] = outputs[v_out][0][:, :n, :]
        self.pos += n
        self._update_masks()
        return rows[row]

    update_prefill = _update
    update_decode = _update

    def save_state(self) -> bytes:
        if not self.loaded:
            raise RuntimeError("the manager is not loaded")
        valid = min(self.pos, self.cache_len)  # ring slots: a slid window is saved whole
        layout = (len(self.k), self.heads, self.cache_len, self.head_dim)
        parts = [STATE_HEADER.pack(STATE_TAG, STATE_VERSION, *layout, self.pos)]
        for k, v in zip(self.k, self.v):
            for cache in (k, v):
                parts.append(cache[0, :, :valid, :].astype("<f4").tobytes())
        return b"".join(parts)

    def restore_state(self, state: bytes) -> None:
        if not self.loaded:
            raise RuntimeError("the manager is not loaded")
        if len(state) < STATE_HEADER.size:
            raise ValueError(
                f"not a saved static-attention state: {len(state)} bytes, shorter than its "
                f"{STATE_HEADER.size}-byte header"
            )
        tag, version, *layout, pos = STATE_HEADER.unpack_from(state)
        if tag != STATE_TAG:
            raise ValueError(f"not a saved static-attention state (it starts with {tag!r})")
        if version != STATE_VERSION:
            raise ValueError(f"the state has format version {version}; this manager reads {STATE_VERSION}")
        ours = [len(self.k), self.heads, self.cache_len, self.head_dim]
        if layout != ours:
            raise ValueError(
                f"the state is of {layout[0]} layers of caches [1, {layout[1]}, {layout[2]}, "
                f"{layout[3]}]; this model has {ours[0]} layers of [1, {ours[1]}, {ours[2]}, {ours[3]}]"
            )
        if not 0 <= pos <= self.rope_rows:
            raise ValueError(f"the state is at position {pos}; this model has {self.rope_rows} RoPE positions")
        layers, heads, _, head_dim = ours
        valid = min(pos, self.cache_len)
        expected = STATE_HEADER.size + 2 * layers * heads * valid * head_dim * 4
        if len(state) != expected:
            raise ValueError(f"the state holds {len(state)} bytes; at position {pos} it takes {expected}")
        # Checked: from here on nothing fails. The caches are written in place (the
        # methods' input lists point at them); slots past the saved ones are zeroed.
        data = np.frombuffer(state, "<f4", offset=STATE_HEADER.size)
        data = data.reshape(layers, 2, heads, valid, head_dim)
        for layer in range(layers):
            for cache, saved in ((self.k[layer], data[layer, 0]), (self.v[layer], data[layer, 1])):
                cache[0, :, :valid, :] = saved
                cache[0, :, valid:, :] = 0.0
        self.pos = pos
        self.pending = None
        self._update_masks()
