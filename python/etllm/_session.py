"""Session: a conversation of its own over a runner's loaded model, with saved states."""

from __future__ import annotations

import ctypes
import os
from typing import Any, List, Optional, Union

from . import _ffi
from ._config import Stats
from ._runner import PathLike, Runner, _Generator

BytesLike = Union[bytes, bytearray, memoryview]


def _bytes(data: BytesLike, what: str) -> bytes:
    if isinstance(data, str) or not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"{what} must be bytes (encode text first), not {type(data).__name__}")
    return bytes(data)


class Session(_Generator):
    """A conversation of its own (KV cache, position, tokens) over a runner's loaded model.

    Made by :meth:`Runner.session`. A session has the runner's conversation methods
    (:meth:`generate`, :meth:`generate_inputs`, :meth:`stream`, :meth:`prefill`,
    :meth:`prefill_inputs`, :meth:`stop`, :meth:`reset`, :meth:`rewind`, :attr:`position`,
    and ``last_stats``), on a conversation of its own;
    sessions of one model share its weights. The model's KV cache holds the session (or
    runner) that ran last: running another one copies that state aside and brings the
    other's back (about the part of the cache in use), so a session that keeps running pays
    nothing.

    Its state can be saved, with user data of your own (:meth:`save`, :meth:`save_file`),
    and restored into a session of the same model, in this process or another
    (:meth:`load`, :meth:`load_file`), which then continues token for token as the original
    would. A state that is not one, is truncated or corrupt, or comes from another model
    raises :class:`InvalidStateError`, and the session keeps its own.

    Threads: one call at a time on a session (another meanwhile raises :class:`BusyError`),
    except :meth:`stop`. Sessions of one model may run on different threads; their calls
    take turns. A call on the same model (any of its sessions, or the runner) made from
    inside a callback of a running call raises :class:`BusyError`. A session keeps the
    model loaded: it works on after its runner is closed. Use it as a context manager, or
    :meth:`close` it, to free it at once::

        with runner.session() as chat:
            chat.generate("Once upon a time", max_new_tokens=16)
            state = chat.save(b"my app data")
    """

    _C = "etllm_session_"
    _KIND = "session"

    # The conversation, as the Runner's (see _Generator).
    close = _Generator.close
    position = _Generator.position
    generate = _Generator.generate
    generate_inputs = _Generator.generate_inputs
    stream = _Generator.stream
    prefill = _Generator.prefill
    prefill_inputs = _Generator.prefill_inputs
    stop = _Generator.stop
    reset = _Generator.reset
    rewind = _Generator.rewind

    def __init__(self, runner: Runner) -> None:
        self._ptr: Optional[int] = None
        # Errors of a Python KV-cache manager are reported through the runner's bridge;
        # the runner also renders a Conversation's messages when it has no template.
        self._bridge = runner._bridge
        self._runner = runner
        self.last_stats: Optional[Stats] = None
        out = ctypes.c_void_p()
        status = _ffi.lib.etllm_session_new(runner._p(), ctypes.byref(out))
        runner._finish(status)
        self._ptr = out.value

    @property
    def tokens(self) -> List[int]:
        """The conversation's tokens (:attr:`position` of them): those in the KV cache, then
        the last generated one."""
        n = ctypes.c_size_t()
        self._call(_ffi.lib.etllm_session_tokens, None, 0, ctypes.byref(n))
        ids = (ctypes.c_uint32 * max(1, n.value))()
        self._call(_ffi.lib.etllm_session_tokens, ids, n.value, ctypes.byref(n))
        return list(ids[: n.value])

    # ---- saved states ------------------------------------------------------------------------

    def save(self, user_data: BytesLike = b"") -> bytes:
        """The session's state as bytes (its KV cache without the all-zero parts, the
        KV-cache manager's state and its tokens), with ``user_data`` (any bytes, for example
        a :meth:`Conversation.to_json` encoded) kept as it is. Restore it with :meth:`load`.
        A Python :class:`IoManager` that cannot save its state raises
        :class:`IoManagerError`."""
        data = _bytes(user_data, "user_data")
        out, n = ctypes.c_void_p(), ctypes.c_size_t()
        self._call(_ffi.lib.etllm_session_save_state, data, len(data), ctypes.byref(out), ctypes.byref(n))
        return _ffi.take_bytes(out, n.value)

    def load(self, state: BytesLike) -> bytes:
        """Replaces the conversation with a state :meth:`save` made on a session of the same
        model and returns its user data. Raises :class:`InvalidStateError` (the session
        keeps its state) for a state that is not one, is truncated or corrupt, or comes
        from another model."""
        data = _bytes(state, "state")
        out, n = ctypes.c_void_p(), ctypes.c_size_t()
        self._call(_ffi.lib.etllm_session_load_state, data, len(data), ctypes.byref(out), ctypes.byref(n))
        return _ffi.take_bytes(out, n.value)

    def save_file(self, path: PathLike, user_data: BytesLike = b"") -> None:
        """:meth:`save` into the file at ``path``, written beside it and renamed into place
        (a reader never sees half a state). Raises :class:`FileAccessError` when it cannot
        be written."""
        data = _bytes(user_data, "user_data")
        self._call(_ffi.lib.etllm_session_save_state_file, os.fsencode(path), data, len(data))

    def load_file(self, path: PathLike) -> bytes:
        """:meth:`load` from a file :meth:`save_file` wrote; returns its user data. An
        unreadable file raises :class:`FileAccessError`, a bad state
        :class:`InvalidStateError`."""
        out, n = ctypes.c_void_p(), ctypes.c_size_t()
        self._call(_ffi.lib.etllm_session_load_state_file, os.fsencode(path), ctypes.byref(out), ctypes.byref(n))
        return _ffi.take_bytes(out, n.value)

    def __repr__(self) -> str:
        if self._ptr is None:
            return "<etllm.Session (closed)>"
        return f"<etllm.Session position={self.position}>"


__all__ = ["Session"]
