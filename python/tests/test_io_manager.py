"""KV-cache managers written in Python (examples/python/) reproduce the built-in managers'
tokens, and the eager references; the IoManager contract (views, errors, close)."""

from __future__ import annotations

import numpy as np
import pytest

import etllm
from conftest import TOKENIZER, generated_ids, greedy, model, reference
from kv_in_model_manager import KvInModelManager
from static_attention_manager import StaticAttentionManager


def builtin_and_python(name, manager):
    return etllm.Runner(model(name), TOKENIZER), etllm.Runner(model(name), TOKENIZER, io_manager=manager)


@pytest.mark.parametrize("name", ["dyn_xnnpack", "static_xnnpack", "dyn_portable", "cache_positions"])
def test_python_kv_in_model_manager_reproduces_the_builtin(name):
    builtin, python = builtin_and_python(name, KvInModelManager())
    for case in reference(name)["cases"]:
        builtin.reset()
        python.reset()
        want = generated_ids(builtin, case["prompt_ids"], greedy(24))
        got = generated_ids(python, case["prompt_ids"], greedy(24))
        assert got == want == case["greedy_ids"], case["prompt"]


def test_python_static_attention_manager_reproduces_the_builtin():
    builtin, python = builtin_and_python("static_attention", StaticAttentionManager())
    for case in reference("static_attention")["cases"]:
        builtin.reset()
        python.reset()
        n = len(case["greedy_ids"])
        want = generated_ids(builtin, case["prompt_ids"], greedy(n))
        got = generated_ids(python, case["prompt_ids"], greedy(n))
        assert got == want, case["name"]
        if case.get("beyond_cache"):
            assert got[:18] == case["greedy_ids"][:18]  # full attention up to the cache length
        else:
            assert got == case["greedy_ids"], case["name"]


def test_python_static_attention_manager_rewinds_like_the_builtin():
    builtin, python = builtin_and_python("static_attention", StaticAttentionManager())
    case = reference("static_attention")["cases"][2]
    results = []
    for r in (builtin, python):
        first = generated_ids(r, case["prompt_ids"], greedy(10))
        r.rewind(len(case["prompt_ids"]) + 3)
        again = generated_ids(r, [first[3]], greedy(10))
        results.append((first, again, r.position))
    assert results[0] == results[1]


def test_python_managers_sample_like_the_builtin():
    config = etllm.GenerationConfig(temperature=0.9, top_k=50, seed=11, max_new_tokens=30,
                                    ignore_eos=True, echo=False, num_bos=1)
    for name, manager in (("dyn_xnnpack", KvInModelManager()), ("static_attention", StaticAttentionManager())):
        builtin, python = builtin_and_python(name, manager)
        assert generated_ids(python, "Once upon a time", config) == generated_ids(builtin, "Once upon a time", config)


class Recording(KvInModelManager):
    """Checks what crosses the boundary."""

    def __init__(self):
        super().__init__()
        self.checked = 0
        self.closed = 0
        self.last_inputs = None

    def prepare_decode(self, token, pos):
        step = super().prepare_decode(token, pos)
        self.last_inputs = step.inputs
        return step

    def update_decode(self, outputs):
        (logits,) = outputs
        assert not logits.flags.owndata and not logits.flags.writeable  # a view of the runtime's buffer
        assert logits.dtype == np.float32 and logits.shape == (1, 512)
        row = super().update_decode(outputs)
        assert np.shares_memory(row, logits)  # handed back without a copy
        # The step's inputs are this manager's own arrays, read in place.
        assert np.shares_memory(self.last_inputs[0], self.tokens)
        self.checked += 1
        return row

    def close(self):
        self.closed += 1


def test_outputs_arrive_as_views_and_inputs_go_without_copy():
    m = Recording()
    r = etllm.Runner(model("dyn_xnnpack"), TOKENIZER, io_manager=m)
    assert len(generated_ids(r, "The", greedy(5))) == 5
    assert m.checked == 4  # the first token comes from the prefill
    r.close()
    assert m.closed == 1


class FailsAt(KvInModelManager):
    def __init__(self, step, exc):
        super().__init__()
        self.step, self.exc, self.n = step, exc, 0

    def prepare_decode(self, token, pos):
        self.n += 1
        if self.n == self.step:
            raise self.exc
        return super().prepare_decode(token, pos)


def test_exception_in_a_manager_comes_out_of_generate_and_rolls_back():
    boom = ValueError("manager boom")
    m = FailsAt(3, boom)
    r = etllm.Runner(model("dyn_xnnpack"), TOKENIZER, io_manager=m)
    with pytest.raises(ValueError) as info:
        generated_ids(r, "The", greedy(8))
    assert info.value is boom
    assert r.position == 0  # rolled back
    case = reference("dyn_xnnpack")["cases"][0]
    assert generated_ids(r, case["prompt_ids"], greedy(24)) == case["greedy_ids"]


def test_exception_in_load_comes_out_of_the_constructor():
    class BadLoad(KvInModelManager):
        def load(self, model):
            raise RuntimeError("no such layout")

    with pytest.raises(RuntimeError, match="no such layout"):
        etllm.Runner(model("dyn_xnnpack"), TOKENIZER, io_manager=BadLoad())


def test_manager_refusing_a_layout_raises_its_error():
    with pytest.raises(etllm.UnsupportedModelError, match="cache_len"):
        etllm.Runner(model("dyn_xnnpack"), TOKENIZER, io_manager=StaticAttentionManager())


def test_bad_step_input_is_refused_with_a_clear_error():
    class NonContiguous(KvInModelManager):
        def prepare_decode(self, token, pos):
            step = super().prepare_decode(token, pos)
            return etllm.Step("forward", [np.zeros((2, 2), np.int64).T, step.inputs[1]])

    r = etllm.Runner(model("dyn_xnnpack"), TOKENIZER, io_manager=NonContiguous())
    with pytest.raises(ValueError, match="C-contiguous"):
        generated_ids(r, "The", greedy(3))


def test_model_info_describes_the_model():
    seen = {}

    class Inspect(KvInModelManager):
        def load(self, info):
            seen["methods"] = info.method_names()
            seen["forward"] = info.method("forward")
            seen["in0"] = info.input("forward", 0)
            seen["eos"] = info.constant_ints("get_eos_ids").tolist()
            seen["meta"] = info.metadata()
            seen["info"] = info
            return super().load(info)

    etllm.Runner(model("dyn_xnnpack"), TOKENIZER, io_manager=Inspect())
    assert "forward" in seen["methods"] and seen["forward"] == (2, 1)
    assert seen["in0"] == etllm.TensorInfo(np.dtype(np.int64), (1, 127))
    assert seen["eos"] == [2]
    assert seen["meta"].max_context_len == 128 and seen["meta"].enable_dynamic_shape
    with pytest.raises(RuntimeError, match="only during"):
        seen["info"].method_names()
