"""Chat templates and multi-turn conversations kept in the KV cache."""

from __future__ import annotations

import ctypes
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from . import _ffi
from ._config import GenerationConfig, Stats
from ._errors import check
from ._runner import (  # noqa: F401 (Piece: for TokenCallback)
    PathLike,
    Piece,
    Runner,
    StatsCallback,
    TokenCallback,
    _c_callbacks,
    _config_of,
)
from ._session import Session


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
    """A multi-turn chat that keeps earlier turns in the KV cache: each :meth:`send`
    renders the conversation with the chat template and feeds only the text it adds for
    that turn. It runs on a :class:`Runner` (its own conversation) or on a
    :class:`Session`; do not generate on it between turns.

    ``template`` renders the messages (``None``: the runner's chat template; for a session,
    that of the runner that made it, which must then be open). ``system`` adds a system
    message.

    If the template renders earlier turns differently once a message is added (some
    templates do), the conversation is fed again from the first token that differs.

    :meth:`to_json` and :meth:`from_json` carry the conversation to another process, with
    the saved state of the session it runs on (as the state's user data)::

        state = session.save(chat.to_json().encode())
        ...
        user_data = other_session.load(state)
        chat = etllm.Conversation.from_json(other_session, user_data.decode(), template)
    """

    def __init__(
        self,
        target: Union[Runner, Session],
        template: Optional[ChatTemplate] = None,
        system: Optional[str] = None,
        *,
        _json: Optional[str] = None,
    ) -> None:
        self._ptr: Optional[int] = None
        if isinstance(target, Session):
            self.runner: Optional[Runner] = None
            self.session: Optional[Session] = target
            runner = target._runner
        elif isinstance(target, Runner):
            self.runner, self.session = target, None
            runner = target
        else:
            raise TypeError("a Conversation runs on an etllm.Runner or an etllm.Session")
        self._target: Union[Runner, Session] = target
        out = ctypes.c_void_p()
        if template is None and runner._ptr is None:
            raise ValueError("the session's runner is closed: pass the chat template")
        runner_ptr = None if template is not None else runner._p()
        template_ptr = None if template is None else template._p()
        if _json is None:
            status = _ffi.lib.etllm_conversation_new(runner_ptr, template_ptr, ctypes.byref(out))
        else:
            status = _ffi.lib.etllm_conversation_from_json(
                runner_ptr, template_ptr, _json.encode("utf-8"), ctypes.byref(out)
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
        """Sends a user message and returns the reply (streamed as in ``Runner.generate``).
        ``num_bos``, ``num_eos`` and ``echo`` are ignored: the template places special
        tokens, and only the reply streams. On error the conversation is as it was."""
        config = _config_of(config, overrides)
        cfg, keep = config._to_c()
        c_token, c_stats, pieces, errors = _c_callbacks(token_callback, stats_callback)
        out = _ffi.lib.etllm_stats_default()
        target = self._target
        send = (
            _ffi.lib.etllm_conversation_send_session
            if isinstance(target, Session)
            else _ffi.lib.etllm_conversation_send
        )
        status = send(
            self._p(), target._p(), user.encode("utf-8"), ctypes.byref(cfg), c_token,
            c_stats, None, ctypes.byref(out),
        )
        del keep
        target.last_stats = Stats(out)
        target._finish(status, errors[0] if errors else None)
        return "".join(pieces)

    def rewind(self) -> bool:
        """Drops the last turn and rewinds the conversation to where it began; ``False``
        when there was none."""
        dropped = ctypes.c_bool()
        target = self._target
        rewind = (
            _ffi.lib.etllm_conversation_rewind_session
            if isinstance(target, Session)
            else _ffi.lib.etllm_conversation_rewind
        )
        target._finish(rewind(self._p(), target._p(), ctypes.byref(dropped)))
        return bool(dropped.value)

    def reset(self) -> None:
        """Forgets every turn (a system message stays) and resets the runner or session."""
        target = self._target
        reset = (
            _ffi.lib.etllm_conversation_reset_session
            if isinstance(target, Session)
            else _ffi.lib.etllm_conversation_reset
        )
        target._finish(reset(self._p(), target._p()))

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

    def to_json(self) -> str:
        """The conversation as JSON (its messages, the text fed and where each turn began),
        for :meth:`from_json`."""
        out = ctypes.c_void_p()
        check(_ffi.lib.etllm_conversation_to_json(self._p(), ctypes.byref(out)))
        return _ffi.take_string(out)

    @classmethod
    def from_json(
        cls,
        target: Union[Runner, Session],
        text: str,
        template: Optional[ChatTemplate] = None,
    ) -> "Conversation":
        """A conversation on ``target`` from :meth:`to_json`'s text (for example the user
        data of a state it just loaded), rendered with ``template`` (``None``: the
        runner's). Raises :class:`InvalidStateError` when the text is not such JSON."""
        return cls(target, template, _json=text)

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

