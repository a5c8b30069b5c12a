"""Runner: load a model and tokenizer, generate with streaming callbacks."""

from __future__ import annotations

import ctypes
import dataclasses
import os
import queue
import threading
from typing import TYPE_CHECKING, Any, Callable, Iterator, List, Optional, Sequence, Tuple, TypeVar, Union

from . import _ffi
from ._config import GenerationConfig, Stats
from ._errors import NotFoundError, check, error_for
from ._io_manager import IoManager, make_vtable
from ._multimodal import Input, inputs_to_c

if TYPE_CHECKING:
    from ._session import Session

PathLike = Union[str, "os.PathLike[str]"]
Prompt = Union[str, Sequence[int]]
TokenCallback = Callable[["Piece"], Any]
StatsCallback = Callable[[Stats], Any]

PRESETS = {None: 0, "none": 0, "llama": 1}
_G = TypeVar("_G", bound="_Generator")


def preset_value(preset: Optional[str]) -> int:
    try:
        return PRESETS[preset if preset is None else str(preset).lower()]
    except KeyError:
        raise ValueError(f"preset must be None or 'llama', not {preset!r}") from None


class Piece(str):
    """A piece of generated text (complete UTF-8) with the token that produced it:
    ``token_id`` is ``None`` for echoed prompt text and for text released at the end."""

    token_id: Optional[int]

    def __new__(cls, text: str, token_id: Optional[int] = None) -> "Piece":
        p = super().__new__(cls, text)
        p.token_id = token_id
        return p


def _ids_array(ids: Sequence[int]) -> "ctypes.Array[ctypes.c_uint32]":
    values = [int(i) for i in ids]
    for i in values:
        if not 0 <= i < 2**32:
            raise ValueError(f"token id {i} is not a u32")
    return (ctypes.c_uint32 * max(1, len(values)))(*values)


def _c_callbacks(
    token_callback: Optional[TokenCallback], stats_callback: Optional[StatsCallback]
) -> Tuple[Any, Any, List[str], List[BaseException]]:
    """The C token and stats callbacks of one generate call over the Python ones: every
    piece of text goes to the list returned (then to ``token_callback``), and an exception
    a callback raises stops generation and goes to the error list (it must not reach C)."""
    pieces: List[str] = []
    errors: List[BaseException] = []

    def on_token(_user: Any, ptr: Any, n: int, token_id: int) -> int:
        try:
            text = ctypes.string_at(ptr, n).decode("utf-8")
            pieces.append(text)
            if token_callback is not None:
                piece = Piece(text, token_id if token_id >= 0 else None)
                return 1 if token_callback(piece) is True else 0
            return 0
        except BaseException as e:  # noqa: BLE001 - never let it reach C
            errors.append(e)
            return 1

    def on_stats(_user: Any, stats: Any) -> None:
        if stats_callback is None:
            return
        try:
            stats_callback(Stats(stats[0]))
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    return _ffi.TOKEN_CB(on_token), _ffi.STATS_CB(on_stats), pieces, errors


class _Generator:
    """What a :class:`Runner` and a :class:`Session` share: a conversation over a loaded
    model, generated on with the C functions ``<_C>generate``, ``<_C>prefill``, ... .

    Each subclass names the public members in its own body (``generate =
    _Generator.generate``): the API reference (pdoc) documents a class's own members, not
    those of a private base."""

    _C = "etllm_runner_"  # the prefix of the C functions
    _KIND = "runner"
    _ptr: Optional[int]
    _bridge: Any
    last_stats: Optional[Stats]

    def _fn(self, name: str) -> Callable[..., int]:
        return getattr(_ffi.lib, self._C + name)

    # ---- plumbing ----------------------------------------------------------------------------

    def _p(self) -> int:
        if self._ptr is None:
            raise ValueError(f"the {self._KIND} is closed")
        return self._ptr

    def _finish(self, status: int, *extra: Optional[BaseException]) -> None:
        """Raises, in order: an exception from a Python callback, one from the Python
        KV-cache manager, then the C status."""
        err = error_for(status) if status != 0 else None
        for e in extra:
            if e is not None:
                raise e
        if self._bridge is not None:
            e = self._bridge.take_error()
            if e is not None:
                raise e
        if err is not None:
            raise err

    def _call(self, fn: Callable[..., int], *args: Any) -> None:
        self._finish(fn(self._p(), *args))

    def close(self) -> None:
        """Frees it now (otherwise it is freed when garbage-collected); the model stays
        loaded while a runner or session over it is open. Further calls raise ValueError."""
        ptr, self._ptr = self._ptr, None
        if ptr is not None:
            self._fn("free")(ptr)

    def __enter__(self: _G) -> _G:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def _int64(self, fn: Callable[..., int]) -> int:
        out = ctypes.c_int64()
        self._call(fn, ctypes.byref(out))
        return out.value

    # ---- the conversation --------------------------------------------------------------------

    @property
    def position(self) -> int:
        """Tokens in the conversation so far."""
        return self._int64(self._fn("position"))

    def stop(self) -> None:
        """Asks a running generate to end before its next model step; any thread."""
        check(self._fn("stop")(self._p()))

    def reset(self) -> None:
        """Forgets the conversation: the next generate starts at position 0."""
        self._call(self._fn("reset"))

    def rewind(self, pos: int) -> None:
        """Rolls the conversation back to its first ``pos`` tokens."""
        self._call(self._fn("rewind"), int(pos))

    # ---- generation --------------------------------------------------------------------------

    def generate(
        self,
        prompt: Prompt,
        config: Optional[GenerationConfig] = None,
        token_callback: Optional[TokenCallback] = None,
        stats_callback: Optional[StatsCallback] = None,
        **overrides: Any,
    ) -> str:
        """Generates from ``prompt`` (text, or a sequence of token ids) and returns all the
        text streamed (the echoed prompt first when ``config.echo``).

        ``token_callback(piece)`` gets each :class:`Piece` as it is produced; returning
        ``True`` stops generation. ``stats_callback(stats)`` gets the :class:`Stats` at
        the end (also in ``last_stats``). Keyword arguments override fields of
        ``config`` (``runner.generate("Hi", max_new_tokens=8, temperature=0)``). An
        exception raised by a callback stops generation and is raised here.
        """
        text, status, error = self._generate(
            prompt, _config_of(config, overrides), token_callback, stats_callback
        )
        self._finish(status, error)
        return text

    def _generate(
        self,
        prompt: Prompt,
        config: GenerationConfig,
        token_callback: Optional[TokenCallback],
        stats_callback: Optional[StatsCallback],
    ) -> Tuple[str, int, Optional[BaseException]]:
        """One generate call: the text streamed, the C status and the first exception a
        callback raised (``last_stats`` is set)."""
        if isinstance(prompt, str):
            text = prompt.encode("utf-8")
            return self._stream_call(
                lambda *rest: self._fn("generate")(self._p(), text, *rest),
                config, token_callback, stats_callback,
            )
        ids = _ids_array(prompt)
        return self._stream_call(
            lambda *rest: self._fn("generate_tokens")(self._p(), ids, len(prompt), *rest),
            config, token_callback, stats_callback,
        )

    def _stream_call(
        self,
        call: Callable[..., int],
        config: GenerationConfig,
        token_callback: Optional[TokenCallback],
        stats_callback: Optional[StatsCallback],
    ) -> Tuple[str, int, Optional[BaseException]]:
        """Runs ``call(config, token_cb, stats_cb, user_data, out_stats)``, a streaming C
        call (its handle and prompt already bound): the text streamed, the C status and the
        first exception a callback raised (``last_stats`` is set)."""
        cfg, keep = config._to_c()
        c_token, c_stats, pieces, errors = _c_callbacks(token_callback, stats_callback)
        out = _ffi.lib.etllm_stats_default()
        status = call(ctypes.byref(cfg), c_token, c_stats, None, ctypes.byref(out))
        del keep
        self.last_stats = Stats(out)
        return "".join(pieces), status, errors[0] if errors else None

    def generate_inputs(
        self,
        inputs: Sequence[Input],
        config: Optional[GenerationConfig] = None,
        token_callback: Optional[TokenCallback] = None,
        stats_callback: Optional[StatsCallback] = None,
        **overrides: Any,
    ) -> str:
        """Generates from a multimodal prompt: ``inputs``, a list of :class:`Text`,
        :class:`Tokens`, :class:`Image` and :class:`Features` (a plain ``str`` is
        :class:`Text`, a list of ints :class:`Tokens`), fed in order after the conversation
        so far, as upstream's ``MultimodalRunner`` does. Otherwise like :meth:`generate`:
        returns the text streamed, with the same callbacks, ``last_stats`` and overrides.

        Images need a multimodal export (``vision_encoder``, ``token_embedding``,
        ``text_decoder``): an image for a text-only model raises
        :class:`UnsupportedModelError`, one that cannot be decoded
        :class:`InvalidMediaError`. ``num_bos`` / ``num_eos`` apply to the first input when
        it is text or tokens and the conversation is empty; ``echo`` echoes the text
        inputs. Every input is decoded and checked before the model runs: a bad input, or
        inputs that do not fit the context (:class:`ContextFullError`), change nothing.
        """
        arr, n, keep = inputs_to_c(inputs)
        text, status, error = self._stream_call(
            lambda *rest: self._fn("generate_inputs")(self._p(), arr, n, *rest),
            _config_of(config, overrides), token_callback, stats_callback,
        )
        del keep
        self._finish(status, error)
        return text

    def stream(
        self, prompt: Prompt, config: Optional[GenerationConfig] = None, **overrides: Any
    ) -> Iterator[Piece]:
        """Yields each :class:`Piece` as it is generated (``for piece in runner.stream(...)``).

        Generation runs on a worker thread; leaving the loop early stops it. Errors are
        raised from the iteration; the stats end up in ``last_stats``."""
        config = _config_of(config, overrides)
        # A small queue: generation runs at most a few tokens ahead of the consumer.
        q: "queue.Queue[Any]" = queue.Queue(maxsize=4)
        done = object()
        failure: List[BaseException] = []

        def work() -> None:
            try:
                self.generate(prompt, config, q.put)
            except BaseException as e:  # noqa: BLE001 - handed to the consumer
                failure.append(e)
            finally:
                q.put(done)

        worker = threading.Thread(target=work, name="etllm-stream", daemon=True)
        worker.start()
        finished = False
        try:
            while True:
                item = q.get()
                if item is done:
                    finished = True
                    break
                yield item
        finally:
            if not finished:
                self.stop()
                while worker.is_alive() or not q.empty():  # unblock the worker's put
                    try:
                        if q.get(timeout=0.05) is done:
                            break
                    except queue.Empty:
                        pass
            worker.join()
        if failure:
            raise failure[0]

    def prefill(
        self, prompt: Prompt, config: Optional[GenerationConfig] = None, **overrides: Any
    ) -> Stats:
        """Feeds ``prompt`` into the conversation without generating (only ``num_bos``,
        ``num_eos`` and ``reuse_prefix`` of the config apply); a later ``generate("")``
        continues after it."""
        config = _config_of(config, overrides)
        cfg, keep = config._to_c()
        out = _ffi.lib.etllm_stats_default()
        if isinstance(prompt, str):
            status = self._fn("prefill")(
                self._p(), prompt.encode("utf-8"), ctypes.byref(cfg), ctypes.byref(out)
            )
        else:
            ids = _ids_array(prompt)
            status = self._fn("prefill_tokens")(
                self._p(), ids, len(prompt), ctypes.byref(cfg), ctypes.byref(out)
            )
        del keep
        self._finish(status)
        return Stats(out)

    def prefill_inputs(
        self, inputs: Sequence[Input], config: Optional[GenerationConfig] = None, **overrides: Any
    ) -> Stats:
        """Feeds ``inputs`` (see :meth:`generate_inputs`) into the conversation without
        generating (only ``num_bos`` and ``num_eos`` of the config apply); a later
        generate continues after them."""
        config = _config_of(config, overrides)
        arr, n, keep = inputs_to_c(inputs)
        cfg, keep_cfg = config._to_c()
        out = _ffi.lib.etllm_stats_default()
        status = self._fn("prefill_inputs")(self._p(), arr, n, ctypes.byref(cfg), ctypes.byref(out))
        del keep, keep_cfg
        self._finish(status)
        return Stats(out)


class Runner(_Generator):
    """One model, one tokenizer, one conversation (KV cache).

    ``Runner(model_path, tokenizer_path)`` opens both (``load=False`` defers that to
    :meth:`load` or the first generate). ``io_manager`` replaces the built-in KV-cache
    manager with an :class:`IoManager` written in Python; ``num_threads`` sizes
    ExecuTorch's (process-wide) thread pool, which cannot be resized while any model is
    loaded (another size then fails the load with :class:`InvalidArgumentError`); ``preset="llama"`` applies Llama's tokenizer
    conventions. ``data_path`` (one path, as upstream's Python runner) or ``data_paths`` (a
    list) name the external data files (``.ptd``) that hold weights the export kept out of the
    ``.pte``; with neither, ``<stem>.ptd`` beside the model is used if it exists.
    ``method_name`` picks the method that runs the model's steps when it is not ``forward``
    (e.g. ``"lora_forward"`` in a multi-method LoRA export). ``preprocessor_config`` is the
    image processor's settings (a Hugging Face ``preprocessor_config.json``) of a multimodal
    export whose vision encoder takes pixel values (see :meth:`generate_inputs`); without
    it, ``preprocessor_config.json`` beside the model, else beside the tokenizer, is used
    if there is one (given for a model without a vision encoder, it fails the load with
    :class:`InvalidArgumentError`). A runner runs one call at a time (another call meanwhile raises
    :class:`BusyError`), except :meth:`stop`, which works from any thread. The model runs
    with the GIL released, so other Python threads keep going.
    """

    def __init__(
        self,
        model_path: PathLike,
        tokenizer_path: PathLike,
        *,
        io_manager: Optional[IoManager] = None,
        num_threads: int = 0,
        preset: Optional[str] = None,
        data_path: Optional[PathLike] = None,
        data_paths: Optional[Sequence[PathLike]] = None,
        method_name: Optional[str] = None,
        preprocessor_config: Optional[PathLike] = None,
        load: bool = True,
    ) -> None:
        self._ptr: Optional[int] = None
        self._bridge = None
        self.last_stats: Optional[Stats] = None
        options = _ffi.lib.etllm_runner_options_default()
        if isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 0:
            raise ValueError("num_threads must be an int >= 0")
        options.num_threads = num_threads
        options.preset = preset_value(preset)
        if data_path is not None and data_paths is not None:
            raise ValueError("give data_path or data_paths, not both")
        if isinstance(data_paths, (str, bytes, os.PathLike)):
            raise ValueError("data_paths must be a list of paths (use data_path for one)")
        paths = [data_path] if data_path is not None else list(data_paths or [])
        # Kept alive until the runner has copied them (during the create call below).
        encoded = [os.fsencode(p) for p in paths]
        path_array = (ctypes.c_char_p * max(1, len(encoded)))(*encoded)
        options.data_paths = ctypes.cast(path_array, ctypes.POINTER(ctypes.c_char_p))
        options.num_data_paths = len(encoded)
        if method_name is not None:
            if not isinstance(method_name, str) or not method_name:
                raise ValueError("method_name must be a non-empty str or None")
            options.method_name = method_name.encode()
        if preprocessor_config is not None:
            options.preprocessor_config = os.fsencode(preprocessor_config)
        vtable = None
        if io_manager is not None:
            vtable, self._bridge = make_vtable(io_manager)
            options.io_manager = ctypes.pointer(vtable)
        out = ctypes.c_void_p()
        create = _ffi.lib.etllm_runner_open if load else _ffi.lib.etllm_runner_new
        status = create(
            os.fsencode(model_path), os.fsencode(tokenizer_path), ctypes.byref(options),
            ctypes.byref(out),
        )
        self._finish(status)
        self._ptr = out.value

    # The conversation (see _Generator).
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

    # ---- loading and state -------------------------------------------------------------------

    def load(self) -> None:
        """Loads the tokenizer and model (nothing when already loaded)."""
        self._call(_ffi.lib.etllm_runner_load)

    def is_loaded(self) -> bool:
        """Whether the model and tokenizer are loaded."""
        out = ctypes.c_bool()
        self._call(_ffi.lib.etllm_runner_is_loaded, ctypes.byref(out))
        return bool(out.value)

    @property
    def max_context_len(self) -> int:
        """Most positions (tokens) a conversation can hold."""
        return self._int64(_ffi.lib.etllm_runner_max_context_len)

    @property
    def max_seq_len(self) -> int:
        """Most tokens one model call accepts (the export's ``get_max_seq_len``)."""
        return self._int64(_ffi.lib.etllm_runner_max_seq_len)

    @property
    def vocab_size(self) -> int:
        """Size of the model's vocabulary."""
        return self._int64(_ffi.lib.etllm_runner_vocab_size)

    @property
    def bos_id(self) -> Optional[int]:
        """The BOS id ``num_bos`` adds (the model's, else the tokenizer's); ``None`` if neither defines one."""
        out = ctypes.c_uint32()
        try:
            self._call(_ffi.lib.etllm_runner_bos_id, ctypes.byref(out))
        except NotFoundError:
            return None
        return out.value

    @property
    def eos_ids(self) -> List[int]:
        """Ids that end a generation (the model's, else the tokenizer's)."""
        n = ctypes.c_size_t()
        self._call(_ffi.lib.etllm_runner_eos_ids, None, 0, ctypes.byref(n))
        ids = (ctypes.c_uint32 * max(1, n.value))()
        self._call(_ffi.lib.etllm_runner_eos_ids, ids, n.value, ctypes.byref(n))
        return list(ids[: n.value])

    def warmup(self) -> None:
        """Runs a short generation so the first real one does not pay first-call costs."""
        self._call(_ffi.lib.etllm_runner_warmup)

    def session(self) -> "Session":
        """A new, empty conversation over this runner's model (loaded first if needed): a
        :class:`Session`, which shares the loaded weights and has a KV cache of its own.
        The runner's own conversation is not affected."""
        from ._session import Session

        return Session(self)

    # ---- chat --------------------------------------------------------------------------------

    def apply_chat_template(
        self, messages: Sequence[Any], add_generation_prompt: bool = True
    ) -> str:
        """Renders ``messages`` (dicts with ``role`` and ``content``) with the model's chat
        template, as HF transformers' ``apply_chat_template(..., tokenize=False)``."""
        from ._chat import _messages

        arr, keep = _messages(messages)
        out = ctypes.c_void_p()
        status = _ffi.lib.etllm_runner_apply_chat_template(
            self._p(), arr, len(keep), bool(add_generation_prompt), ctypes.byref(out)
        )
        self._finish(status)
        return _ffi.take_string(out)

    def set_chat_template(self, template: Optional[Any]) -> None:
        """Uses ``template`` (a :class:`ChatTemplate`) from now on; ``None``: the model's."""
        self._call(_ffi.lib.etllm_runner_set_chat_template, None if template is None else template._p())


def _config_of(config: Optional[GenerationConfig], overrides: dict) -> GenerationConfig:
    if config is None:
        config = GenerationConfig()
    elif not isinstance(config, GenerationConfig):
        raise TypeError("config must be an etllm.GenerationConfig")
    if overrides:
        config = dataclasses.replace(config, **overrides)
    return config
