"""Saved states of KV-cache managers written in Python: IoManager.save_state and
restore_state behind the vtable's save_state/restore_state callbacks (their defaults
refuse; exceptions become errors), and the example managers' states on the fixtures.

The callbacks are called the way EtLlm calls them (ctypes, with an etllm_state_buffer); a
state restored after another conversation took the model over continues like the run
that never left (the runner is rewound to the saved position by hand)."""

from __future__ import annotations

import ctypes

import pytest

import etllm
from etllm import _ffi
from etllm._io_manager import make_vtable
from conftest import TOKENIZER, generated_ids, greedy, model, reference
from kv_in_model_manager import KvInModelManager
from static_attention_manager import StaticAttentionManager

IO_MANAGER_ERROR = 12


class Vtable:
    """A manager's C vtable, called as EtLlm calls it; destroyed on exit."""

    def __init__(self, manager: etllm.IoManager) -> None:
        self.vt, self.bridge = make_vtable(manager)

    def __enter__(self) -> "Vtable":
        return self

    def __exit__(self, *exc) -> None:
        self.vt.destroy(self.vt.user_data)

    def save(self):
        """(status, the bytes appended to a new etllm_state_buffer)."""
        buffer = ctypes.c_void_p()
        assert _ffi.lib.etllm_state_buffer_new(ctypes.byref(buffer)) == 0
        try:
            status = self.vt.save_state(self.vt.user_data, buffer)
            data, n = ctypes.c_void_p(), ctypes.c_size_t()
            assert _ffi.lib.etllm_state_buffer_data(buffer, ctypes.byref(data), ctypes.byref(n)) == 0
            return status, ctypes.string_at(data.value, n.value) if n.value else b""
        finally:
            _ffi.lib.etllm_state_buffer_free(buffer)

    def restore(self, state: bytes) -> int:
        return self.vt.restore_state(self.vt.user_data, state, len(state))


class Plain(etllm.IoManager):
    """A manager that overrides neither save_state nor restore_state."""

    def load(self, model):
        return 1, 1

    def reset(self):
        pass

    def rewind(self, pos):
        pass

    def prepare_prefill(self, tokens, start_pos):
        raise NotImplementedError

    def update_prefill(self, outputs):
        raise NotImplementedError

    def prepare_decode(self, token, pos):
        raise NotImplementedError

    def update_decode(self, outputs):
        raise NotImplementedError


class Remembers(Plain):
    def __init__(self):
        self.state = b"a conversation"

    def save_state(self):
        return self.state

    def restore_state(self, state):
        self.state = state


def test_the_callbacks_reach_save_state_and_restore_state():
    m = Remembers()
    with Vtable(m) as vt:
        assert vt.save() == (0, b"a conversation")
        assert vt.restore(b"another one\x00with a NUL") == 0
        assert m.state == b"another one\x00with a NUL"
        assert vt.restore(b"") == 0 and m.state == b""


def test_the_default_cannot_save_and_leaves_the_callbacks_null():
    with pytest.raises(NotImplementedError, match="cannot save"):
        Plain().save_state()
    with pytest.raises(NotImplementedError, match="cannot restore"):
        Plain().restore_state(b"")
    with Vtable(Plain()) as vt:
        # NULL callbacks: the C ABI's "this manager cannot save".
        assert not vt.vt.save_state and not vt.vt.restore_state


def test_an_exception_in_save_state_becomes_an_io_manager_error():
    boom = ValueError("disk full")

    class Fails(Remembers):
        def save_state(self):
            raise boom

    with Vtable(Fails()) as vt:
        assert vt.save() == (IO_MANAGER_ERROR, b"")
        assert vt.bridge.take_error() is boom  # raised again by the call that saved


def test_an_exception_in_restore_state_keeps_its_etllm_status():
    class Refuses(Remembers):
        def restore_state(self, state):
            raise etllm.InvalidArgumentError("not mine", 3)

    with Vtable(Refuses()) as vt:
        assert vt.restore(b"junk") == 3
        assert isinstance(vt.bridge.take_error(), etllm.InvalidArgumentError)


def test_save_state_returning_something_else_than_bytes_is_an_error():
    class Wrong(Remembers):
        def save_state(self):
            return 42

    with Vtable(Wrong()) as vt:
        assert vt.save()[0] == IO_MANAGER_ERROR
        assert isinstance(vt.bridge.take_error(), TypeError)


def test_a_manager_overriding_only_save_state_is_refused():
    class Half(KvInModelManager):
        restore_state = etllm.IoManager.restore_state

    with pytest.raises(etllm.InvalidArgumentError, match="save_state but not restore_state"):
        etllm.Runner(model("dyn_xnnpack"), TOKENIZER, io_manager=Half())


def prompt_of(case_index: int, extra: int = 0):
    case = reference("static_attention")["cases"][case_index]
    return case["prompt_ids"] + case["greedy_ids"][:extra]


def continue_after_another_conversation(prompt, n=12):
    """Prefill, save, the reference continuation; another conversation of the same length,
    rewind to the saved position, restore through the callback: the same continuation."""
    m = StaticAttentionManager()
    r = etllm.Runner(model("static_attention"), TOKENIZER, io_manager=m)
    with Vtable(m) as vt:
        r.prefill(prompt, num_bos=0)
        status, state = vt.save()
        assert status == 0
        want = generated_ids(r, "", greedy(n))
        other = [3 + (t * 7) % 500 for t in reversed(prompt)]
        r.reset()
        r.prefill(other, num_bos=0)
        assert generated_ids(r, "", greedy(n)) != want
        r.reset()
        r.prefill(other, num_bos=0)
        r.rewind(len(prompt) - 1)  # drops the held token of the other conversation
        assert vt.restore(state) == 0
        assert generated_ids(r, prompt[-1:], greedy(n)) == want


def test_python_static_attention_state_continues_like_the_uninterrupted_run():
    continue_after_another_conversation(prompt_of(2))


def test_python_static_attention_state_past_the_cache_continues_like_the_uninterrupted_run():
    prompt = prompt_of(5, 30)  # 77 positions in a 64-slot cache: the window has slid
    continue_after_another_conversation(prompt)


def test_python_static_attention_refuses_bad_states_and_keeps_its_own():
    m = StaticAttentionManager()
    r = etllm.Runner(model("static_attention"), TOKENIZER, io_manager=m)
    prompt = prompt_of(2)
    r.prefill(prompt, num_bos=0)
    want = generated_ids(r, "", greedy(8))
    r.reset()
    r.prefill(prompt, num_bos=0)
    state = m.save_state()
    bad = [state[:n] for n in range(0, len(state), 97)] + [state + b"\0", b"garbage" * 10]
    bad.append(b"pyKV\x01\x00\x00\x00")
    bad.append(state[:4] + b"\x02" + state[5:])  # a newer version
    layout = bytearray(state)
    layout[24] ^= 1  # the cache length
    bad.append(bytes(layout))
    with Vtable(m) as vt:
        for b in bad:
            assert vt.restore(b) == IO_MANAGER_ERROR, len(b)
            assert isinstance(vt.bridge.take_error(), ValueError)
    assert generated_ids(r, "", greedy(8)) == want


def test_python_kv_in_model_state_is_a_tag_that_restore_checks():
    m = KvInModelManager()
    with Vtable(m) as vt:
        assert vt.save() == (0, b"pyKV\x01\x00\x00\x00")
        assert vt.restore(b"pyKV\x01\x00\x00\x00") == 0
        assert vt.restore(b"pySA\x01\x00\x00\x00") == IO_MANAGER_ERROR
        assert isinstance(vt.bridge.take_error(), ValueError)
