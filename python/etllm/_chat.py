"""Chat templates and multi-turn conversations kept in the KV cache."""

from __future__ import annotations

import ctypes
import dataclasses
import json
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from . import _ffi
from ._config import GenerationConfig, Stats
from ._errors import InvalidArgumentError, InvalidStateError, check
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
    that of the runner that made it, which must then stay open). ``system`` adds a system
    message.

    If the template renders earlier turns differently once a message is added (some
    templates do), the conversation is fed again from the first token that differs.

    On a :class:`Session`, :meth:`to_json` and :meth:`from_json` carry the conversation to
    another process, with the session's saved state (as its user data)::

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
    ) -> None:
        self._ptr: Optional[int] = None
        self._chat: Optional[_SessionChat] = None
        if isinstance(target, Session):
            self.runner: Optional[Runner] = None
            self.session: Optional[Session] = target
            self._chat = _SessionChat(target, template)
            if system is not None:
                self._chat.set_system(system)
            return
        if not isinstance(target, Runner):
            raise TypeError("a Conversation runs on an etllm.Runner or an etllm.Session")
        self.runner = target
        self.session = None
        out = ctypes.c_void_p()
        status = _ffi.lib.etllm_conversation_new(
            target._p(), None if template is None else template._p(), ctypes.byref(out)
        )
        target._finish(status)
        self._ptr = out.value
        if system is not None:
            check(_ffi.lib.etllm_conversation_set_system(self._p(), system.encode("utf-8")))

    def _p(self) -> int:
        if self._ptr is None:
            raise ValueError("the conversation is closed")
        return self._ptr

    def _runner(self) -> Runner:
        assert self.runner is not None
        return self.runner

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
        if self._chat is not None:
            return self._chat.send(user, config, token_callback, stats_callback)
        cfg, keep = config._to_c()
        c_token, c_stats, pieces, errors = _c_callbacks(token_callback, stats_callback)
        out = _ffi.lib.etllm_stats_default()
        runner = self._runner()
        status = _ffi.lib.etllm_conversation_send(
            self._p(), runner._p(), user.encode("utf-8"), ctypes.byref(cfg), c_token,
            c_stats, None, ctypes.byref(out),
        )
        del keep
        runner.last_stats = Stats(out)
        runner._finish(status, errors[0] if errors else None)
        return "".join(pieces)

    def rewind(self) -> bool:
        """Drops the last turn and rewinds the conversation to where it began; ``False``
        when there was none."""
        if self._chat is not None:
            return self._chat.rewind()
        dropped = ctypes.c_bool()
        runner = self._runner()
        status = _ffi.lib.etllm_conversation_rewind(self._p(), runner._p(), ctypes.byref(dropped))
        runner._finish(status)
        return bool(dropped.value)

    def reset(self) -> None:
        """Forgets every turn (a system message stays) and resets the runner or session."""
        if self._chat is not None:
            self._chat.reset()
            return
        runner = self._runner()
        runner._finish(_ffi.lib.etllm_conversation_reset(self._p(), runner._p()))

    @property
    def messages(self) -> List[Dict[str, str]]:
        """The conversation so far: the system message, then each user turn and reply."""
        if self._chat is not None:
            return [dict(m) for m in self._chat.messages]
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
        for :meth:`from_json`; the format of Rust's ``Conversation::to_json``. Only a
        conversation on a :class:`Session` has it (raises TypeError on a Runner)."""
        if self._chat is None:
            raise TypeError("to_json needs a Conversation on an etllm.Session")
        return self._chat.to_json()

    @classmethod
    def from_json(
        cls, session: Session, text: str, template: Optional[ChatTemplate] = None
    ) -> "Conversation":
        """A conversation on ``session`` from :meth:`to_json`'s text (for example the user
        data of a state the session just loaded), rendered with ``template`` (``None``: the
        runner's). Raises :class:`InvalidStateError` when the text is not such JSON."""
        if not isinstance(session, Session):
            raise TypeError("from_json needs an etllm.Session")
        conv = cls(session, template)
        assert conv._chat is not None
        conv._chat.restore(text)
        return conv

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


class _SessionChat:
    """A Conversation's turns on a Session: the rules of Rust's ``Conversation`` (which
    the C API offers only on a runner), on top of the session's generate, rewind and
    ``reuse_prefix``."""

    def __init__(self, session: Session, template: Optional[ChatTemplate]) -> None:
        self.session = session
        self.template = template
        self.messages: List[Dict[str, str]] = []
        self.fed = ""  # the rendered text fed to the session so far
        self.turns: List[Tuple[int, int, str]] = []  # per turn: position, messages, fed before it
        self.refed = 0

    def render(self, messages: List[Dict[str, str]], add_generation_prompt: bool) -> str:
        if self.template is not None:
            return self.template.apply(messages, add_generation_prompt)
        return self.session._render(messages, add_generation_prompt)

    def set_system(self, content: str) -> None:
        if self.turns:
            raise InvalidArgumentError("the system message must come before the first turn")
        self.messages = [m for m in self.messages if m["role"] != "system"]
        self.messages.insert(0, {"role": "system", "content": content})

    def send(
        self,
        user: str,
        config: GenerationConfig,
        token_callback: Optional[TokenCallback],
        stats_callback: Optional[StatsCallback],
    ) -> str:
        session = self.session
        first = not self.fed
        messages = self.messages + [{"role": "user", "content": user}]
        full = self.render(messages, True)
        # Extend the fed text when the template kept it; else start over, keeping the
        # tokens the session already holds that the new text starts with (prefix reuse).
        extend = not first and full.startswith(self.fed)
        config = dataclasses.replace(
            config, num_bos=0, num_eos=0, echo=False, reuse_prefix=not extend
        )
        saved = (session.position, len(self.messages), self.fed)
        reply, status, error = session._generate(
            full[len(self.fed):] if extend else full, config, token_callback, stats_callback
        )
        if status != 0:
            if not extend:
                # The session may have been rewound: earlier turns are fed again next time.
                self.fed = ""
                self.turns = []
            session._finish(status, error)
        stats = session.last_stats
        assert stats is not None
        if extend:
            self.turns.append(saved)
        else:
            if not first:
                self.refed += 1
            self.turns = [(0, saved[1], "")]
        messages.append({"role": "assistant", "content": reply})
        history = self.render(messages, False)
        spoken = full + reply
        # After an end-of-turn token (fed at the start of the next call) the model has seen
        # this turn as the template writes it in history. After any other stop it has seen
        # the prompt and the reply, and the template's end of the turn is still to come.
        self.fed = history if stats.stop_reason == "eos" or not history.startswith(spoken) else spoken
        self.messages = messages
        session._finish(0, error)  # an exception a callback raised
        return reply

    def rewind(self) -> bool:
        if not self.turns:
            return False
        pos, n_messages, fed = self.turns[-1]
        if pos == 0:
            self.session.reset()
        else:
            self.session.rewind(pos)
        self.turns.pop()
        self.messages = self.messages[:n_messages]
        self.fed = fed
        return True

    def reset(self) -> None:
        self.session.reset()
        self.messages = [m for m in self.messages if m["role"] == "system"]
        self.turns = []
        self.fed = ""

    def to_json(self) -> str:
        return json.dumps(
            {
                "messages": self.messages,
                "fed": self.fed,
                "turns": [list(t) for t in self.turns],
                "refed": self.refed,
            },
            ensure_ascii=False,
            separators=(",", ":"),
        )

    def restore(self, text: str) -> None:
        try:
            saved = json.loads(text)
            messages = [{"role": str(m["role"]), "content": str(m["content"])} for m in saved["messages"]]
            turns = [(int(p), int(n), str(f)) for p, n, f in saved["turns"]]
            fed, refed = str(saved["fed"]), int(saved["refed"])
        except (ValueError, TypeError, KeyError) as e:
            raise InvalidStateError(f"its chat is not valid: {e}") from None
        self.messages, self.turns, self.fed, self.refed = messages, turns, fed, refed
