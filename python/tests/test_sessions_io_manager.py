"""Sessions driven by KV-cache managers written in Python (the examples' managers): the
model's manager sets a session's state aside and brings it back through the manager's
save_state/restore_state, and a saved state restores into another runner with another
manager instance. Continuations are checked against the fixtures' eager-PyTorch greedy
references."""

from __future__ import annotations

import pytest

import etllm
from conftest import TOKENIZER, generated_ids, greedy, model, reference
from kv_in_model_manager import KvInModelManager
from static_attention_manager import StaticAttentionManager

LAYOUTS = [("static_attention", StaticAttentionManager), ("dyn_xnnpack", KvInModelManager)]


def cases(fixture):
    return [c for c in reference(fixture)["cases"] if not c.get("beyond_cache")]


@pytest.mark.parametrize("fixture,manager", LAYOUTS)
def test_two_sessions_take_turns_through_a_python_manager(fixture, manager):
    a, b = cases(fixture)[:2]
    runner = etllm.Runner(model(fixture), TOKENIZER, io_manager=manager())
    with runner.session() as sa, runner.session() as sb:
        got_a = generated_ids(sa, a["prompt_ids"], greedy(4))
        got_b = generated_ids(sb, b["prompt_ids"], greedy(4))
        got_a += generated_ids(sa, "", greedy(4))
        got_b += generated_ids(sb, "", greedy(4))
    assert got_a == a["greedy_ids"][:8]
    assert got_b == b["greedy_ids"][:8]


@pytest.mark.parametrize("fixture,manager", LAYOUTS)
def test_a_state_saved_through_a_python_manager_restores_in_another_runner(fixture, manager):
    case = cases(fixture)[1]
    runner = etllm.Runner(model(fixture), TOKENIZER, io_manager=manager())
    with runner.session() as session:
        first = generated_ids(session, case["prompt_ids"], greedy(3))
        state = session.save(b"note")
        generated_ids(session, "", greedy(5))  # moves on
    other = etllm.Runner(model(fixture), TOKENIZER, io_manager=manager())
    with other.session() as restored:
        assert restored.load(state) == b"note"
        rest = generated_ids(restored, "", greedy(5))
    assert first + rest == case["greedy_ids"][:8]


class CannotSave(KvInModelManager):
    """A manager without save_state/restore_state (the ABC's refusing defaults)."""

    save_state = etllm.IoManager.save_state
    restore_state = etllm.IoManager.restore_state


def test_a_python_manager_that_cannot_save_serves_one_session_only():
    case = cases("dyn_xnnpack")[0]
    runner = etllm.Runner(model("dyn_xnnpack"), TOKENIZER, io_manager=CannotSave())
    assert generated_ids(runner, case["prompt_ids"], greedy(3)) == case["greedy_ids"][:3]
    with runner.session() as second:
        with pytest.raises(etllm.IoManagerError, match="cannot save"):
            generated_ids(second, case["prompt_ids"], greedy(1))
    assert generated_ids(runner, "", greedy(3)) == case["greedy_ids"][3:6]
