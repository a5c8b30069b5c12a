"""Chat templates and multi-turn conversations kept in the KV cache."""

from __future__ import annotations

import ctypes
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

from . import _ffi
from ._config import GenerationConfig, Stats
from ._errors import check
from ._runner import PathLike, Piece, Runner, StatsCallback, TokenCallback  # noqa: F401 (Piece: for TokenCallback)


def _messages(messages: Sequence[Any]) -> Tuple[Any, List[Tuple[bytes, bytes]]]:
    keep: List[Tuple[bytes, bytes]] = []
    for m in messages:
        try:
            role, content = m["role"], m["content"]
        except (KeyError, TypeError):
            raise TypeError("each message must be a dict with 'role' and 'content'") from None
        if not isinstance(role, str) or not isinstance(content, str):
            raise TypeError("a message's role and content must be str")
        keep.append((role.encode("utf-8"), content.encode("utf-8")))
    arr = (_ffi.ChatMessageC * max(1, len(keep)))()
    for i, (r, c) in enumerate(keep):
        arr[i].role = r
        arr[i].content = c
    return arr, keep


class ChatTemplate:
    """A Jinja chat template rendered as HF transformers renders chat templates."""

    def __init__(self, source: str) -> None:
        self._ptr: Optional[int] = None
        out = ctypes.c_void_p()
        check(_ffi.lib.etllm_chat_template_new(source.encode("utf-8"), ctypes.byref(out)))
        self._ptr = out.value

    @classmethod
    def _from(cls, fn, *args) -> "ChatTemplate":
        t = cls.__new__(cls)
        t._ptr = None
        out = ctypes.c_void_p()
        check(fn(*args, ctypes.byref(out)))
        t._ptr = out.value
        return t

    @classmethod
    def llama3(cls) -> "ChatTemplate":
        """The built-in Llama 3 Instruct template (``bos_token`` ``<|begin_of_text|>``)."""
        return cls._from(_ffi.lib.etllm_chat_template_llama3)

    @classmethod
    def llama2(cls) -> "ChatTemplate":
        """The built-in Llama 2 Chat template (``bos_token`` ``<s>``)."""
        return cls._from(_ffi.lib.etllm_chat_template_llama2)

    @classmethod
    def from_model_dir(cls, path: PathLike) -> "ChatTemplate":
        """A model's template, read as HF transformers does (``chat_template.jinja``, else
        ``tokenizer_config.json``, whose special tokens are set); ``path`` is the folder or
        the ``tokenizer_config.json``. Raises :class:`NotFoundError` when there is none."""
        return cls._from(_ffi.lib.etllm_chat_template_from_model_dir, os.fsencode(path))

    def _p(self) -> int:
        if self._ptr is None:
            raise ValueError("the chat template is closed")
        return self._ptr

    def set_token(self, name: str, value: str) -> None:
        """Sets a special token the template refers to (``bos_token``, ``eos_token``, ...)."""
        check(_ffi.lib.etllm_chat_template_set_token(self._p(), name.encode(), value.encode()))

    def apply(self, messages: Sequence[Dict[str, str]], add_generation_prompt: bool = True) -> str:
        """Renders ``messages`` (dicts with ``role`` and ``content``) as HF transformers'
        ``apply_chat_template(..., tokenize=False)`` does; ``add_generation_prompt`` appends
        the assistant turn's opening."""
        arr, keep = _messages(messages)
        out = ctypes.c_void_p()
        check(
            _ffi.lib.etllm_chat_template_apply(
                self._p(), arr, len(keep), bool(add_generation_prompt), ctypes.byref(out)
            )
        )
        return _ffi.take_string(out)

    def close(self) -> None:
        """Frees the object now (otherwise it is freed when garbage-collected)."""
        ptr, self._ptr = self._ptr, None
        if ptr is not None:
            _ffi.lib.etllm_chat_template_free(ptr)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass


class Conversation:
    """A multi-turn chat on ``runner`` that keeps earlier turns in its KV cache: each
    :meth:`send` feeds only the text the template adds for that turn. Do not generate on
    the runner between turns."""

    def __init__(
        self, runner: Runner, template: Optional[ChatTemplate] = None, system: Optional[str] = None
    ) -> None:
        self._ptr: Optional[int] = None
        self.runner = runner
        out = ctypes.c_void_p()
        status = _ffi.lib.etllm_conversation_new(
            runner._p(), None if template is None else template._p(), ctypes.byref(out)
        )
        runner._finish(status)
        self._ptr = out.value
        if system is not None:
            check(_ffi.lib.etllm_conversation_set_system(self._p(), system.encode("utf-8")))

    def _p(self) -> int:
        if self._ptr is None:
            raise ValueError("the conversation is closed")
        return self._ptr

    def send(
        self,
        user: str,
        config: Optional[GenerationConfig] = None,
        token_callback: Optional[TokenCallback] = None,
        stats_callback: Optional[StatsCallback] = None,
        **overrides: Any,
    ) -> str:
        """Sends a user message and returns the reply (streamed as in ``Runner.generate``)."""
        from ._runner import Piece, _config_of

        config = _config_of(config, overrides)
        cfg, keep = config._to_c()
        pieces: List[str] = []
        errors: List[BaseException] = []

        def on_token(_u: Any, ptr: Any, n: int, token_id: int) -> int:
            try:
                text = ctypes.string_at(ptr, n).decode("utf-8")
                pieces.append(text)
                if token_callback is not None:
                    return 1 if token_callback(Piece(text, token_id if token_id >= 0 else None)) is True else 0
                return 0
            except BaseException as e:  # noqa: BLE001
                errors.append(e)
                return 1

        def on_stats(_u: Any, stats: Any) -> None:
            if stats_callback is not None:
                try:
                    stats_callback(Stats(stats[0]))
                except BaseException as e:  # noqa: BLE001
                    errors.append(e)

        c_token, c_stats = _ffi.TOKEN_CB(on_token), _ffi.STATS_CB(on_stats)
        out = _ffi.lib.etllm_stats_default()
        status = _ffi.lib.etllm_conversation_send(
            self._p(), self.runner._p(), user.encode("utf-8"), ctypes.byref(cfg), c_token,
            c_stats, None, ctypes.byref(out),
        )
        del keep
        self.runner.last_stats = Stats(out)
        self.runner._finish(status, errors[0] if errors else None)
        return "".join(pieces)

    def rewind(self) -> bool:
        """Drops the last turn; ``False`` when there was none."""
        dropped = ctypes.c_bool()
        status = _ffi.lib.etllm_conversation_rewind(self._p(), self.runner._p(), ctypes.byref(dropped))
        self.runner._finish(status)
        return bool(dropped.value)

    def reset(self) -> None:
        """Forgets every turn (a system message stays) and resets the runner."""
        self.runner._finish(_ffi.lib.etllm_conversation_reset(self._p(), self.runner._p()))

    @property
    def messages(self) -> List[Dict[str, str]]:
        """The conversation so far: the system message, then each user turn and reply."""
        n = ctypes.c_size_t()
        check(_ffi.lib.etllm_conversation_num_messages(self._p(), ctypes.byref(n)))
        out = []
        for i in range(n.value):
            role, content = ctypes.c_void_p(), ctypes.c_void_p()
            check(_ffi.lib.etllm_conversation_message(self._p(), i, ctypes.byref(role), ctypes.byref(content)))
            out.append({"role": _ffi.take_string(role), "content": _ffi.take_string(content)})
        return out

    def close(self) -> None:
        """Frees the object now (otherwise it is freed when garbage-collected)."""
        ptr, self._ptr = self._ptr, None
        if ptr is not None:
            _ffi.lib.etllm_conversation_free(ptr)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass
