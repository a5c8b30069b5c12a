"""GenerationConfig and Stats."""

from __future__ import annotations

import ctypes
import json
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Sequence, Tuple, Union

from . import _ffi
from ._errors import check

STOP_REASONS = (
    "none",
    "eos",
    "length",
    "context_full",
    "stopped",
    "callback",
    "stop_string",
    "grammar_complete",
    "grammar_incomplete",
)
GRAMMAR_TYPES = ("json_schema", "regex", "lark", "lark_grammar", "gbnf")


@dataclass
class GenerationConfig:
    """Settings of one generation: the fields and defaults of the C and Rust config.

    Names and defaults follow upstream ExecuTorch's ``GenerationConfig`` (``echo=True``,
    ``max_new_tokens=-1``, ``warming=False``, ``seq_len=-1``, ``temperature=0.8``,
    ``num_bos=0``, ``num_eos=0``); EtLlm adds ``ignore_eos``, ``seed`` (``None``: from the
    clock), ``top_k``, ``top_p``, ``min_p``, ``repetition_penalty``, ``stop_token_ids`` and
    ``stop_strings``. ``max_new_tokens=N`` yields exactly N tokens. Ranges are checked by
    the library when the config is used (:class:`InvalidArgumentError`).

    Constrained decoding uses upstream's ``grammar`` and ``grammar_type`` fields: the
    generated text must match ``grammar``, a JSON schema (``grammar_type="json_schema"``,
    the default; a ``dict`` is serialized for you), a regular expression (``"regex"``), a
    Lark grammar (``"lark"`` or ``"lark_grammar"``) or a llama.cpp GBNF grammar
    (``"gbnf"``). An empty grammar is unconstrained. A grammar that does not compile raises
    :class:`GrammarError` before any model step. ``grammar_fast_forward`` (default ``True``)
    feeds text the grammar forces to the model in one step instead of sampling it.

    ``reuse_prefix=True`` makes the prompt the whole conversation (as chat UIs resend it):
    the conversation keeps the longest prefix of its tokens that the prompt starts with and
    feeds only the rest; ``Stats.reused_prompt_tokens`` counts the tokens kept. With the
    default ``False`` the prompt continues the conversation.
    """

    echo: bool = True
    max_new_tokens: int = -1
    warming: bool = False
    seq_len: int = -1
    temperature: float = 0.8
    num_bos: int = 0
    num_eos: int = 0
    ignore_eos: bool = False
    seed: Optional[int] = None
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    stop_token_ids: Sequence[int] = field(default_factory=tuple)
    stop_strings: Sequence[str] = field(default_factory=tuple)
    grammar: Union[str, Dict[str, Any]] = ""
    grammar_type: str = "json_schema"
    grammar_fast_forward: bool = True
    reuse_prefix: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.grammar, dict):
            if self.grammar_type != "json_schema":
                raise TypeError("a dict grammar is a JSON schema: use grammar_type='json_schema'")
            self.grammar = json.dumps(self.grammar)
        if not isinstance(self.grammar, str):
            raise TypeError("GenerationConfig.grammar must be a str (or a dict JSON schema)")
        if self.grammar_type not in GRAMMAR_TYPES:
            raise ValueError(
                f"GenerationConfig.grammar_type is {self.grammar_type!r}; use one of "
                + ", ".join(GRAMMAR_TYPES)
            )
        for name in ("echo", "warming", "ignore_eos", "grammar_fast_forward", "reuse_prefix"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"GenerationConfig.{name} must be a bool")
        for name in ("max_new_tokens", "seq_len", "num_bos", "num_eos", "top_k"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"GenerationConfig.{name} must be an int")
            if not -(2**31) <= v < 2**31:
                raise ValueError(f"GenerationConfig.{name} = {v} does not fit in 32 bits")
        for name in ("temperature", "top_p", "min_p", "repetition_penalty"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise TypeError(f"GenerationConfig.{name} must be a number")
        if self.seed is not None:
            if isinstance(self.seed, bool) or not isinstance(self.seed, int):
                raise TypeError("GenerationConfig.seed must be an int or None")
            if not 0 <= self.seed < 2**64:
                raise ValueError("GenerationConfig.seed must be in [0, 2**64)")
        if isinstance(self.stop_strings, str):
            raise TypeError("GenerationConfig.stop_strings must be a sequence of str, not a str")
        self.stop_token_ids = tuple(int(t) for t in self.stop_token_ids)
        self.stop_strings = tuple(self.stop_strings)
        for s in self.stop_strings:
            if not isinstance(s, str):
                raise TypeError("GenerationConfig.stop_strings must hold str")
        for t in self.stop_token_ids:
            if not 0 <= t < 2**32:
                raise ValueError(f"stop token id {t} is not a u32")

    def _to_c(self) -> Tuple[_ffi.GenerationConfigC, Any]:
        """The C struct, and the objects it points into (keep them alive with it)."""
        c = _ffi.lib.etllm_generation_config_default()
        c.echo = self.echo
        c.warming = self.warming
        c.ignore_eos = self.ignore_eos
        c.has_seed = self.seed is not None
        c.seed = self.seed if self.seed is not None else 0
        c.max_new_tokens = self.max_new_tokens
        c.seq_len = self.seq_len
        c.temperature = float(self.temperature)
        c.num_bos = self.num_bos
        c.num_eos = self.num_eos
        c.top_k = self.top_k
        c.top_p = float(self.top_p)
        c.min_p = float(self.min_p)
        c.repetition_penalty = float(self.repetition_penalty)
        ids = (ctypes.c_uint32 * max(1, len(self.stop_token_ids)))(*self.stop_token_ids)
        c.stop_token_ids = ids
        c.num_stop_token_ids = len(self.stop_token_ids)
        encoded = [s.encode("utf-8") for s in self.stop_strings]
        strs = (ctypes.c_char_p * max(1, len(encoded)))(*encoded)
        c.stop_strings = strs
        c.num_stop_strings = len(encoded)
        text = self.grammar if isinstance(self.grammar, str) else json.dumps(self.grammar)
        grammar = text.encode("utf-8")
        grammar_type = self.grammar_type.encode("utf-8")
        c.grammar = grammar
        c.grammar_type = grammar_type
        c.grammar_no_fast_forward = not self.grammar_fast_forward
        c.reuse_prefix = self.reuse_prefix
        return c, (ids, strs, encoded, grammar, grammar_type)


_STATS_FIELDS = [name for name, _ in _ffi.StatsC._fields_ if name not in ("struct_size",)]


class Stats:
    """Timestamps (microseconds; 0 when not reached), token counts and summed times of one
    generation, as the C ``etllm_stats``; ``stop_reason`` is a string (``"eos"``,
    ``"length"``, ``"context_full"``, ``"stopped"``, ``"callback"``, ``"stop_string"``,
    ``"grammar_complete"``, ``"grammar_incomplete"``, ``"none"``). :meth:`to_json` gives
    upstream's JSON (milliseconds). ``reused_prompt_tokens`` counts the prompt tokens that
    ``reuse_prefix`` found in place (part of ``num_prompt_tokens``, not fed again)."""

    model_load_start_us: int
    model_load_end_us: int
    inference_start_us: int
    token_encode_end_us: int
    prompt_eval_end_us: int
    first_token_us: int
    inference_end_us: int
    aggregate_sampling_time_us: int
    aggregate_model_execution_time_us: int
    num_prompt_tokens: int
    num_generated_tokens: int
    decode_model_execution_time_us: int
    reused_prompt_tokens: int
    stop_reason: str

    def __init__(self, c: Optional[_ffi.StatsC] = None) -> None:
        if c is None:
            c = _ffi.lib.etllm_stats_default()
        self._c = _ffi.StatsC()
        ctypes.pointer(self._c)[0] = c
        for name in _STATS_FIELDS:
            value = getattr(c, name)
            if name == "stop_reason":
                value = STOP_REASONS[value] if 0 <= value < len(STOP_REASONS) else str(value)
            setattr(self, name, value)

    def to_json(self) -> str:
        """The stats as a JSON object with upstream's names (``etllm_stats_to_json``)."""
        out = ctypes.c_void_p()
        check(_ffi.lib.etllm_stats_to_json(ctypes.byref(self._c), ctypes.byref(out)))
        return _ffi.take_string(out)

    def to_dict(self) -> Dict[str, Any]:
        """The fields as a dict (microseconds, as in the C struct)."""
        return {name: getattr(self, name) for name in _STATS_FIELDS}

    @property
    def decode_tokens_per_second(self) -> float:
        """Generated tokens after the first, per second of decoding (0 when unknown)."""
        span = self.inference_end_us - self.first_token_us
        if self.first_token_us == 0 or span <= 0 or self.num_generated_tokens < 2:
            return 0.0
        return (self.num_generated_tokens - 1) * 1e6 / span

    def __repr__(self) -> str:
        return "Stats(" + ", ".join(f"{k}={v!r}" for k, v in self.to_dict().items()) + ")"


__all__ = ["GenerationConfig", "Stats"]
