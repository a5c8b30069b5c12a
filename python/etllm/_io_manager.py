"""KV-cache managers written in Python: the ``etllm_io_manager`` vtable as an ABC."""

# No `from __future__ import annotations` here: the NamedTuples' field annotations must be
# real objects for documentation tools (pdoc) to resolve them.

import abc
import ctypes
import itertools
import threading
from dataclasses import dataclass
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from . import _ffi
from ._errors import EtLlmError, check

_DTYPES = {
    _ffi.DTYPE_F32: np.dtype(np.float32),
    _ffi.DTYPE_I64: np.dtype(np.int64),
    _ffi.DTYPE_I32: np.dtype(np.int32),
    _ffi.DTYPE_F16: np.dtype(np.float16),
}
_CODES = {dt: code for code, dt in _DTYPES.items()}
_IO_MANAGER_ERROR = 12


class TensorInfo(NamedTuple):
    """An input or output description: element type (``None`` for a type EtLlm does not
    pass) and shape (for a dynamic dimension, its upper bound)."""

    dtype: Optional[np.dtype]
    shape: Tuple[int, ...]


@dataclass(frozen=True)
class ModelMetadata:
    """What the model's metadata says; -1 where it does not say."""

    max_seq_len: int
    max_context_len: int
    vocab_size: int
    bos_id: int
    use_kv_cache: bool
    enable_dynamic_shape: bool


class Step(NamedTuple):
    """One model step: the method to run and every one of its inputs, in order.

    Each input is a C-contiguous numpy array of float32, int64 or int32 that the manager
    owns; the runtime reads it in place (no copy), so it must stay unchanged until the
    matching update returns."""

    method: str
    inputs: Sequence[np.ndarray]


class ModelInfo:
    """What a manager sees of the model in :meth:`IoManager.load`: methods, their input and
    output descriptions, the constant methods' values and the metadata. Valid only during
    that call."""

    def __init__(self, ptr: int) -> None:
        self._ptr: Optional[int] = ptr

    def _p(self) -> int:
        if self._ptr is None:
            raise RuntimeError("a ModelInfo is valid only during IoManager.load")
        return self._ptr

    def method_names(self) -> List[str]:
        """Names of the program's methods (``forward``, constant methods, ...)."""
        n = ctypes.c_size_t()
        check(_ffi.lib.etllm_model_info_num_methods(self._p(), ctypes.byref(n)))
        names = []
        for i in range(n.value):
            name = ctypes.c_char_p()
            check(_ffi.lib.etllm_model_info_method_name(self._p(), i, ctypes.byref(name)))
            names.append((name.value or b"").decode("utf-8"))
        return names

    def has_method(self, name: str) -> bool:
        """Whether the program has a method called ``name``."""
        return name in self.method_names()

    def method(self, name: str) -> Tuple[int, int]:
        """``(num_inputs, num_outputs)`` of method ``name`` (:class:`NotFoundError` if none)."""
        ni, no = ctypes.c_size_t(), ctypes.c_size_t()
        check(
            _ffi.lib.etllm_model_info_method(
                self._p(), name.encode("utf-8"), ctypes.byref(ni), ctypes.byref(no)
            )
        )
        return ni.value, no.value

    def _describe(self, fn, name: str, index: int) -> TensorInfo:
        v = _ffi.TensorViewC()
        check(fn(self._p(), name.encode("utf-8"), index, ctypes.byref(v)))
        return TensorInfo(_DTYPES.get(v.dtype), tuple(v.sizes[: v.ndim]))

    def input(self, method: str, index: int) -> TensorInfo:
        """Description of input ``index`` of ``method``."""
        return self._describe(_ffi.lib.etllm_model_info_input, method, index)

    def output(self, method: str, index: int) -> TensorInfo:
        """Description of output ``index`` of ``method``."""
        return self._describe(_ffi.lib.etllm_model_info_output, method, index)

    def constant_shape(self, name: str) -> Tuple[int, ...]:
        """Shape of the tensor that constant method ``name`` returns."""
        sizes = (ctypes.c_int64 * _ffi.MAX_DIMS)()
        ndim = ctypes.c_uint32()
        check(
            _ffi.lib.etllm_model_info_constant_shape(
                self._p(), name.encode("utf-8"), sizes, ctypes.byref(ndim)
            )
        )
        return tuple(sizes[: ndim.value])

    def constant_ints(self, name: str) -> np.ndarray:
        """The integers of constant method ``name``, flattened (int64)."""
        n = ctypes.c_size_t()
        key = name.encode("utf-8")
        check(_ffi.lib.etllm_model_info_constant_ints(self._p(), key, None, 0, ctypes.byref(n)))
        out = np.zeros(n.value, dtype=np.int64)
        ptr = out.ctypes.data_as(ctypes.POINTER(ctypes.c_int64))
        check(_ffi.lib.etllm_model_info_constant_ints(self._p(), key, ptr, n.value, ctypes.byref(n)))
        return out

    def constant_int(self, name: str) -> int:
        """The single integer constant method ``name`` returns (ValueError if it holds more)."""
        values = self.constant_ints(name)
        if values.size != 1:
            raise ValueError(f"constant method `{name}` holds {values.size} values, not one")
        return int(values[0])

    def constant_floats(self, name: str) -> np.ndarray:
        """The floats of constant method ``name`` (float32), in its shape."""
        n = ctypes.c_size_t()
        key = name.encode("utf-8")
        check(_ffi.lib.etllm_model_info_constant_floats(self._p(), key, None, 0, ctypes.byref(n)))
        out = np.zeros(n.value, dtype=np.float32)
        ptr = out.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        check(
            _ffi.lib.etllm_model_info_constant_floats(self._p(), key, ptr, n.value, ctypes.byref(n))
        )
        shape = self.constant_shape(name)
        return out.reshape(shape) if int(np.prod(shape)) == out.size else out

    def metadata(self) -> ModelMetadata:
        """The model's metadata (-1 where the export does not say)."""
        m = _ffi.ModelMetadataC()
        m.struct_size = ctypes.sizeof(m)
        check(_ffi.lib.etllm_model_info_metadata(self._p(), ctypes.byref(m)))
        return ModelMetadata(
            m.max_seq_len, m.max_context_len, m.vocab_size, m.bos_id,
            bool(m.use_kv_cache), bool(m.enable_dynamic_shape),
        )


class IoManager(abc.ABC):
    """A KV-cache manager: the methods of the C ``etllm_io_manager`` vtable.

    The runner calls :meth:`load` once, then for each step ``prepare_*`` followed by the
    matching ``update_*``, with :meth:`reset` and :meth:`rewind` between steps, all on the
    thread that called into the runner. Raise any exception to fail: the runner's call
    fails (the conversation is rolled back) and the exception comes out of that call.

    Outputs arrive as read-only numpy arrays that are views of the runtime's buffers (no
    copy), valid until the next step: copy what you keep. The inputs of a :class:`Step`
    are handed to the runtime without a copy.

    A manager that keeps a conversation's data between steps (its own KV caches, its
    position) may override :meth:`save_state` and :meth:`restore_state`, both of them, so
    that several conversations can share one model and a conversation can be stored and
    resumed. A manager that overrides neither cannot save: EtLlm refuses to swap its
    conversation out.
    """

    @abc.abstractmethod
    def load(self, model: ModelInfo) -> Tuple[int, int]:
        """Check the model fits, allocate; return ``(max_prefill_chunk, max_context)``."""

    @abc.abstractmethod
    def reset(self) -> None:
        """Forget everything: the next step starts at position 0."""

    @abc.abstractmethod
    def rewind(self, pos: int) -> None:
        """Keep only the first ``pos`` positions."""

    @abc.abstractmethod
    def prepare_prefill(self, tokens: np.ndarray, start_pos: int) -> Step:
        """The step feeding ``tokens`` (uint64, a copy the manager may keep) at ``start_pos``."""

    @abc.abstractmethod
    def update_prefill(self, outputs: List[np.ndarray]) -> np.ndarray:
        """Take the outputs of the prefill step; return the next-token logits (a float32
        contiguous array, usually a view of an output, valid until the next step)."""

    @abc.abstractmethod
    def prepare_decode(self, token: int, pos: int) -> Step:
        """The step feeding ``token`` at position ``pos``."""

    @abc.abstractmethod
    def update_decode(self, outputs: List[np.ndarray]) -> np.ndarray:
        """As :meth:`update_prefill`, for the decode step."""

    def save_state(self) -> bytes:
        """The manager's conversation state (what it keeps between steps), as bytes of a
        format of its own: a tag and a version first, and the layout the data depends on
        (cache shapes), so that :meth:`restore_state` can refuse a foreign state. Called
        between steps. The default cannot save (``NotImplementedError``)."""
        raise NotImplementedError(
            f"{type(self).__name__} cannot save its state (it does not override save_state)"
        )

    def restore_state(self, state: bytes) -> None:
        """Replaces the conversation state with ``state``, bytes :meth:`save_state` wrote.
        Check everything before changing anything: when it raises, the manager must keep
        the state it had. The default cannot restore (``NotImplementedError``)."""
        raise NotImplementedError(
            f"{type(self).__name__} cannot restore a state (it does not override restore_state)"
        )

    def close(self) -> None:
        """Called once when the runner lets go of the manager (``destroy``)."""


def last_row(output: np.ndarray) -> np.ndarray:
    """The last row of a ``[..., vocab]`` logits output, as a 1-D view (no copy)."""
    return output.reshape(-1, output.shape[-1])[-1]


# ---- The bridge: C vtable functions dispatching to Python managers ---------------------------

_bridges: Dict[int, "_Bridge"] = {}
_bridges_lock = threading.Lock()
_next_key = itertools.count(1)
_array_types: Dict[int, type] = {}


def _view_to_array(v: _ffi.TensorViewC) -> np.ndarray:
    dtype = _DTYPES.get(v.dtype)
    shape = tuple(v.sizes[: v.ndim])
    if dtype is None:
        raise EtLlmError(f"an output has a type EtLlm does not pass ({v.dtype})", _IO_MANAGER_ERROR)
    n = v.nbytes
    if n == 0 or not v.data:
        return np.empty(shape, dtype)
    t = _array_types.get(n)
    if t is None:
        t = _array_types[n] = ctypes.c_char * n
    arr = np.frombuffer(t.from_address(v.data), dtype=dtype).reshape(shape)
    arr.flags.writeable = False
    return arr


class _Bridge:
    __slots__ = ("manager", "error", "keep", "logits", "views")

    def __init__(self, manager: IoManager) -> None:
        self.manager = manager
        self.error: Optional[BaseException] = None
        self.keep: object = None  # the prepared step's objects, until its update returns
        self.logits: Optional[np.ndarray] = None  # valid until the next step
        self.views: Dict[int, ctypes.Array] = {}

    def fail(self, e: BaseException) -> int:
        if self.error is None:
            self.error = e
        status = e.status if isinstance(e, EtLlmError) and e.status > 0 else _IO_MANAGER_ERROR
        msg = f"{type(e).__name__}: {e}" if not isinstance(e, EtLlmError) else e.message
        _ffi.lib.etllm_set_error_message(msg.encode("utf-8", "replace"))
        return status

    def take_error(self) -> Optional[BaseException]:
        e, self.error = self.error, None
        return e

    def fill_step(self, step: Step, out_step) -> None:
        if not isinstance(step, tuple) or len(step) != 2:
            raise TypeError("a prepare method must return a Step(method, inputs)")
        method, inputs = step
        n = len(inputs)
        views = self.views.get(n)
        if views is None:
            views = self.views[n] = (_ffi.TensorViewC * n)()
        for i, a in enumerate(inputs):
            if not isinstance(a, np.ndarray):
                raise TypeError(f"step input {i} is {type(a).__name__}, not a numpy array")
            code = _CODES.get(a.dtype)
            if code is None:
                raise TypeError(f"step input {i} is {a.dtype}; EtLlm takes float32, float16, int64, int32")
            if not a.flags.c_contiguous:
                raise ValueError(f"step input {i} is not C-contiguous (it is passed without a copy)")
            if a.ndim > _ffi.MAX_DIMS:
                raise ValueError(f"step input {i} has {a.ndim} dimensions; at most 8")
            v = views[i]
            v.dtype = code
            v.ndim = a.ndim
            for d, s in enumerate(a.shape):
                v.sizes[d] = s
            v.data = a.__array_interface__["data"][0]
            v.nbytes = a.nbytes
        name = method.encode("utf-8")
        self.keep = (name, views, inputs)
        out_step[0].method = name
        out_step[0].inputs = views
        out_step[0].num_inputs = n

    def update(self, which: str, outputs, num_outputs, out_logits, out_vocab) -> int:
        try:
            arrays = [_view_to_array(outputs[i]) for i in range(num_outputs)]
            fn = self.manager.update_prefill if which == "prefill" else self.manager.update_decode
            logits = fn(arrays)
            if not isinstance(logits, np.ndarray) or logits.dtype != np.float32:
                raise TypeError("an update method must return the logits as a float32 array")
            if not logits.flags.c_contiguous or logits.size == 0:
                raise ValueError("the logits must be a non-empty C-contiguous array")
            self.logits = logits
            out_logits[0] = logits.__array_interface__["data"][0]
            out_vocab[0] = logits.size
            return 0
        except BaseException as e:  # noqa: BLE001 - every exception must stay in Python
            return self.fail(e)
        finally:
            self.keep = None


def _bridge(user_data: Optional[int]) -> _Bridge:
    return _bridges[user_data or 0]


@_ffi.LOAD_FN
def _c_load(user_data, model, out_chunk, out_context):
    b = _bridge(user_data)
    info = ModelInfo(model)
    try:
        chunk, context = b.manager.load(info)
        out_chunk[0] = int(chunk)
        out_context[0] = int(context)
        return 0
    except BaseException as e:  # noqa: BLE001
        return b.fail(e)
    finally:
        info._ptr = None


@_ffi.RESET_FN
def _c_reset(user_data):
    b = _bridge(user_data)
    try:
        b.manager.reset()
        return 0
    except BaseException as e:  # noqa: BLE001
        return b.fail(e)


@_ffi.REWIND_FN
def _c_rewind(user_data, pos):
    b = _bridge(user_data)
    try:
        b.manager.rewind(int(pos))
        return 0
    except BaseException as e:  # noqa: BLE001
        return b.fail(e)


@_ffi.PREPARE_PREFILL_FN
def _c_prepare_prefill(user_data, tokens, num_tokens, start_pos, out_step):
    b = _bridge(user_data)
    try:
        b.logits = None
        toks = np.ctypeslib.as_array(tokens, shape=(num_tokens,)).copy()
        b.fill_step(b.manager.prepare_prefill(toks, int(start_pos)), out_step)
        return 0
    except BaseException as e:  # noqa: BLE001
        b.keep = None
        return b.fail(e)


@_ffi.PREPARE_DECODE_FN
def _c_prepare_decode(user_data, token, pos, out_step):
    b = _bridge(user_data)
    try:
        b.logits = None
        b.fill_step(b.manager.prepare_decode(int(token), int(pos)), out_step)
        return 0
    except BaseException as e:  # noqa: BLE001
        b.keep = None
        return b.fail(e)


@_ffi.UPDATE_FN
def _c_update_prefill(user_data, outputs, num_outputs, out_logits, out_vocab):
    return _bridge(user_data).update("prefill", outputs, num_outputs, out_logits, out_vocab)


@_ffi.UPDATE_FN
def _c_update_decode(user_data, outputs, num_outputs, out_logits, out_vocab):
    return _bridge(user_data).update("decode", outputs, num_outputs, out_logits, out_vocab)


@_ffi.SAVE_STATE_FN
def _c_save_state(user_data, buffer):
    b = _bridge(user_data)
    try:
        state = b.manager.save_state()
        if not isinstance(state, (bytes, bytearray, memoryview)):
            raise TypeError(f"save_state must return bytes, not {type(state).__name__}")
        data = bytes(state)
        check(_ffi.lib.etllm_state_buffer_append(buffer, data, len(data)))
        return 0
    except BaseException as e:  # noqa: BLE001
        return b.fail(e)


@_ffi.RESTORE_STATE_FN
def _c_restore_state(user_data, data, length):
    b = _bridge(user_data)
    try:
        b.manager.restore_state(ctypes.string_at(data, length) if length else b"")
        return 0
    except BaseException as e:  # noqa: BLE001
        return b.fail(e)


def _overrides(manager: IoManager, name: str) -> bool:
    return getattr(type(manager), name) is not getattr(IoManager, name)


@_ffi.DESTROY_FN
def _c_destroy(user_data):
    with _bridges_lock:
        b = _bridges.pop(user_data or 0, None)
    if b is not None:
        try:
            b.manager.close()
        except BaseException:  # noqa: BLE001 - destroy cannot fail; nothing to report to
            pass


def make_vtable(manager: IoManager) -> Tuple[_ffi.IoManagerC, _Bridge]:
    """A C vtable for ``manager``; the runner that receives it owns it (destroy)."""
    if not isinstance(manager, IoManager):
        raise TypeError("io_manager must be an etllm.IoManager")
    bridge = _Bridge(manager)
    with _bridges_lock:
        key = next(_next_key)
        _bridges[key] = bridge
    vt = _ffi.IoManagerC()
    vt.struct_size = ctypes.sizeof(vt)
    vt.user_data = key
    vt.load = _c_load
    vt.reset = _c_reset
    vt.rewind = _c_rewind
    vt.prepare_prefill = _c_prepare_prefill
    vt.update_prefill = _c_update_prefill
    vt.prepare_decode = _c_prepare_decode
    vt.update_decode = _c_update_decode
    vt.destroy = _c_destroy
    # A manager that does not override them cannot save: the callbacks stay NULL, which is
    # what the C ABI means by that (one without the other is refused by the runner).
    if _overrides(manager, "save_state"):
        vt.save_state = _c_save_state
    if _overrides(manager, "restore_state"):
        vt.restore_state = _c_restore_state
    return vt, bridge


__all__ = ["IoManager", "ModelInfo", "ModelMetadata", "Step", "TensorInfo", "last_row"]
