"""Tokenizer: HF tokenizer.json, tiktoken, SentencePiece or llama2.c, found from content."""

from __future__ import annotations

import ctypes
import os
from typing import List, Optional, Sequence

from . import _ffi
from ._errors import NotFoundError, check
from ._runner import PathLike, _ids_array, preset_value


def _take_buffer(ptr: ctypes.c_void_p, n: int) -> bytes:
    try:
        return ctypes.string_at(ptr.value, n) if ptr.value else b""
    finally:
        _ffi.lib.etllm_buffer_free(ptr)


class TextStream:
    """Incremental decoding: token ids in, complete UTF-8 out (see :meth:`Tokenizer.stream`)."""

    def __init__(self, tokenizer: "Tokenizer") -> None:
        self._ptr: Optional[int] = None
        out = ctypes.c_void_p()
        check(_ffi.lib.etllm_text_stream_new(tokenizer._p(), ctypes.byref(out)))
        self._ptr = out.value

    def _out(self, fn, *args) -> str:
        if self._ptr is None:
            raise ValueError("the stream is closed")
        text, n = ctypes.c_void_p(), ctypes.c_size_t()
        check(fn(self._ptr, *args, ctypes.byref(text), ctypes.byref(n)))
        return ctypes.string_at(text.value, n.value).decode("utf-8") if n.value else ""

    def push(self, token_id: int) -> str:
        """Adds a token; returns the text it completes (often "")."""
        return self._out(_ffi.lib.etllm_text_stream_push, int(token_id))

    def flush(self) -> str:
        """Releases what is held back (incomplete bytes become U+FFFD) and starts over."""
        return self._out(_ffi.lib.etllm_text_stream_flush)

    def close(self) -> None:
        """Frees the object now (otherwise it is freed when garbage-collected)."""
        ptr, self._ptr = self._ptr, None
        if ptr is not None:
            _ffi.lib.etllm_text_stream_free(ptr)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass


class Tokenizer:
    """A tokenizer loaded from ``path``, whatever its format (``preset="llama"`` applies
    Llama's BOS/EOS conventions). Immutable; safe to share between threads."""

    def __init__(self, path: PathLike, preset: Optional[str] = None) -> None:
        self._ptr: Optional[int] = None
        out = ctypes.c_void_p()
        check(_ffi.lib.etllm_tokenizer_load(os.fsencode(path), preset_value(preset), ctypes.byref(out)))
        self._ptr = out.value

    def _p(self) -> int:
        if self._ptr is None:
            raise ValueError("the tokenizer is closed")
        return self._ptr

    def encode(self, text: str, num_bos: int = 0, num_eos: int = 0) -> List[int]:
        """Token ids of ``text`` with ``num_bos`` BOS before and ``num_eos`` EOS after."""
        if num_bos < 0 or num_eos < 0:
            raise ValueError("num_bos and num_eos must be >= 0")
        ids = ctypes.POINTER(ctypes.c_uint32)()
        n = ctypes.c_size_t()
        check(
            _ffi.lib.etllm_tokenizer_encode(
                self._p(), text.encode("utf-8"), num_bos, num_eos, ctypes.byref(ids), ctypes.byref(n)
            )
        )
        try:
            return list(ids[: n.value])
        finally:
            _ffi.lib.etllm_buffer_free(ctypes.cast(ids, ctypes.c_void_p))

    def decode(self, ids: Sequence[int]) -> str:
        """The text of ``ids``; an id outside the vocabulary raises :class:`TokenizerError`."""
        arr = _ids_array(ids)
        text, n = ctypes.c_void_p(), ctypes.c_size_t()
        check(_ffi.lib.etllm_tokenizer_decode(self._p(), arr, len(ids), ctypes.byref(text), ctypes.byref(n)))
        return _take_buffer(text, n.value).decode("utf-8")

    def token_to_piece(self, token_id: int) -> bytes:
        """The piece as the vocabulary stores it (bytes: not always UTF-8)."""
        text, n = ctypes.c_void_p(), ctypes.c_size_t()
        check(_ffi.lib.etllm_tokenizer_token_to_piece(self._p(), int(token_id), ctypes.byref(text), ctypes.byref(n)))
        return _take_buffer(text, n.value)

    @property
    def vocab_size(self) -> int:
        """Number of token ids."""
        n = ctypes.c_size_t()
        check(_ffi.lib.etllm_tokenizer_vocab_size(self._p(), ctypes.byref(n)))
        return n.value

    @property
    def bos_id(self) -> Optional[int]:
        """The tokenizer's BOS id, or ``None`` when it defines none."""
        out = ctypes.c_uint32()
        try:
            check(_ffi.lib.etllm_tokenizer_bos_id(self._p(), ctypes.byref(out)))
        except NotFoundError:
            return None
        return out.value

    @property
    def eos_ids(self) -> List[int]:
        """The tokenizer's EOS ids."""
        ids = ctypes.POINTER(ctypes.c_uint32)()
        n = ctypes.c_size_t()
        check(_ffi.lib.etllm_tokenizer_eos_ids(self._p(), ctypes.byref(ids), ctypes.byref(n)))
        return list(ids[: n.value]) if n.value else []

    def stream(self) -> TextStream:
        """An incremental decoder over this tokenizer."""
        return TextStream(self)

    def close(self) -> None:
        """Frees the object now (otherwise it is freed when garbage-collected)."""
        ptr, self._ptr = self._ptr, None
        if ptr is not None:
            _ffi.lib.etllm_tokenizer_free(ptr)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass
