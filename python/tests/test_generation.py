"""Runner, GenerationConfig, Stats, callbacks and streaming against eager references."""

from __future__ import annotations

import ctypes
import json
import threading
import time

import pytest

import etllm
from conftest import TOKENIZER, generated_ids, greedy, model, reference

MODELS = ["dyn_xnnpack", "static_xnnpack", "dyn_portable", "no_kv_cache", "cache_positions",
          "static_attention", "sdpa_dyn_gqa", "sdpa_static_mha"]


@pytest.fixture(scope="module")
def runner():
    r = etllm.Runner(model("dyn_xnnpack"), TOKENIZER)
    yield r
    r.close()


@pytest.mark.parametrize("name", MODELS)
def test_greedy_tokens_equal_eager_reference(name):
    ref = reference(name)
    with etllm.Runner(model(name), TOKENIZER) as r:
        for case in ref["cases"]:
            if case.get("beyond_cache"):
                continue
            r.reset()
            ids = generated_ids(r, case["prompt_ids"], greedy(len(case["greedy_ids"])))
            assert ids == case["greedy_ids"], case["prompt"]


@pytest.mark.parametrize("name", ["dyn_xnnpack", "static_attention"])
def test_text_prompt_with_bos_equals_reference_prompt_ids(name):
    ref = reference(name)
    with etllm.Runner(model(name), TOKENIZER) as r:
        for case in ref["cases"]:
            if case.get("beyond_cache"):
                continue
            r.reset()
            config = greedy(len(case["greedy_ids"]))
            config.num_bos = 1
            assert generated_ids(r, case["prompt"], config) == case["greedy_ids"]
            assert r.last_stats.num_prompt_tokens == len(case["prompt_ids"])


def test_generation_config_defaults_equal_the_c_library():
    c = etllm._ffi.lib.etllm_generation_config_default()
    py = etllm.GenerationConfig()
    assert py.echo == c.echo and py.warming == c.warming and py.ignore_eos == c.ignore_eos
    assert (py.seed is None) == (not c.has_seed)
    for name in ("max_new_tokens", "seq_len", "num_bos", "num_eos", "top_k"):
        assert getattr(py, name) == getattr(c, name), name
    for name in ("temperature", "top_p", "min_p", "repetition_penalty"):
        assert getattr(py, name) == pytest.approx(getattr(c, name)), name
    assert c.num_stop_token_ids == 0 and c.num_stop_strings == 0
    assert py.reuse_prefix == c.reuse_prefix is False


def test_ctypes_structs_have_the_c_library_layout():
    # struct_size is sizeof() as the library was compiled; the last fields are the newest
    # (etllm_generation_config.reuse_prefix, etllm_stats.reused_prompt_tokens).
    ffi = etllm._ffi
    for cls, default in ((ffi.GenerationConfigC, ffi.lib.etllm_generation_config_default),
                         (ffi.StatsC, ffi.lib.etllm_stats_default),
                         (ffi.RunnerOptionsC, ffi.lib.etllm_runner_options_default)):
        assert ctypes.sizeof(cls) == default().struct_size, cls.__name__
    assert ffi.GenerationConfigC._fields_[-1][0] == "reuse_prefix"
    assert ffi.StatsC._fields_[-1][0] == "reused_prompt_tokens"
    assert ffi.StatsC.reused_prompt_tokens.offset == ctypes.sizeof(ffi.StatsC) - 8


def test_generation_config_repr_names_every_field():
    text = repr(etllm.GenerationConfig(max_new_tokens=5, seed=3))
    assert text.startswith("GenerationConfig(echo=True, max_new_tokens=5,")
    assert "seed=3" in text and "temperature=0.8" in text


def test_generation_config_rejects_wrong_types():
    with pytest.raises(TypeError):
        etllm.GenerationConfig(max_new_tokens="8")
    with pytest.raises(TypeError):
        etllm.GenerationConfig(stop_strings="stop")


def test_generate_returns_the_streamed_text_with_echo(runner):
    runner.reset()
    pieces = []
    text = runner.generate("The", greedy(6), pieces.append, echo=True, num_bos=1)
    assert text == "".join(pieces)
    assert pieces[0] == "The" and pieces[0].token_id is None
    assert sum(p.token_id is not None for p in pieces) == 6


def test_stream_yields_the_same_pieces_as_generate(runner):
    runner.reset()
    want = []
    runner.generate("Hello", greedy(10), want.append)
    runner.reset()
    got = list(runner.stream("Hello", greedy(10)))
    assert got == want and [p.token_id for p in got] == [p.token_id for p in want]
    assert runner.last_stats.num_generated_tokens == 10


def test_leaving_a_stream_early_stops_generation(runner):
    runner.reset()
    for i, _ in enumerate(runner.stream("Hello", greedy(100))):
        if i == 2:
            break
    assert runner.last_stats.stop_reason == "stopped"
    runner.reset()
    assert len(generated_ids(runner, "Hello", greedy(3))) == 3  # still usable


def test_token_callback_returning_true_stops(runner):
    runner.reset()
    seen = []
    runner.generate("The", greedy(20), lambda p: seen.append(p) or len(seen) == 4)
    assert len(seen) == 4 and runner.last_stats.stop_reason == "callback"


def test_stats_callback_gets_the_stats(runner):
    runner.reset()
    got = []
    runner.generate("The", greedy(5), None, got.append, num_bos=1)
    (stats,) = got
    assert stats.num_generated_tokens == 5 and stats.num_prompt_tokens == 2
    assert stats.stop_reason == "length"
    assert stats.inference_start_us <= stats.first_token_us <= stats.inference_end_us


def test_stats_to_json_uses_upstream_names(runner):
    runner.reset()
    runner.generate("The", greedy(3))
    data = json.loads(runner.last_stats.to_json())
    for key in ("prompt_tokens", "generated_tokens", "inference_start_ms", "first_token_ms"):
        assert key in data, key


def test_exception_in_token_callback_comes_out_of_generate(runner):
    class Boom(Exception):
        pass

    def cb(piece):
        raise Boom("from the callback")

    runner.reset()
    with pytest.raises(Boom, match="from the callback"):
        runner.generate("The", greedy(5), cb)
    runner.reset()
    assert len(generated_ids(runner, "The", greedy(2))) == 2


def test_exception_in_stats_callback_comes_out_of_generate(runner):
    runner.reset()
    with pytest.raises(KeyError):
        runner.generate("The", greedy(2), None, lambda s: {}["missing"])


def test_stop_from_another_thread_ends_generation(runner):
    started, stop_called = threading.Event(), threading.Event()

    def cb(piece):
        started.set()
        stop_called.wait(10)  # generation is paused here until the other thread stopped it

    def stopper():
        started.wait(10)
        runner.stop()
        stop_called.set()

    t = threading.Thread(target=stopper)
    t.start()
    runner.reset()
    runner.generate("The", greedy(100), cb)
    t.join()
    assert runner.last_stats.stop_reason == "stopped"
    assert runner.last_stats.num_generated_tokens < 100


def test_other_threads_run_while_the_model_runs():
    # The static-attention fixture fills 256 positions; no Python callback runs meanwhile,
    # so the other thread can only make progress if the GIL is released during the call.
    with etllm.Runner(model("static_attention"), TOKENIZER) as r:
        r.warmup()
        ticks, done = [], threading.Event()

        def count():
            while not done.is_set():
                ticks.append(time.perf_counter())

        config = greedy(-1)
        t = threading.Thread(target=count)
        t.start()
        time.sleep(0.01)
        inside = []
        for _ in range(5):
            r.reset()
            before = time.perf_counter()
            r.generate("The", config)
            after = time.perf_counter()
            inside.append(sum(before < x < after for x in list(ticks)))
        done.set()
        t.join()
        assert r.last_stats.num_generated_tokens > 200
        assert max(inside) > 0, inside


def test_prefill_then_generate_empty_prompt_continues(runner):
    case = reference("dyn_xnnpack")["cases"][1]
    runner.reset()
    runner.prefill(case["prompt_ids"])
    assert runner.position == len(case["prompt_ids"])
    assert generated_ids(runner, "", greedy(24)) == case["greedy_ids"]


def test_rewind_regenerates_the_same_tokens(runner):
    case = reference("dyn_xnnpack")["cases"][3]
    runner.reset()
    first = generated_ids(runner, case["prompt_ids"], greedy(8))
    runner.rewind(len(case["prompt_ids"]) - 1)
    again = generated_ids(runner, case["prompt_ids"][-1:], greedy(8))
    assert first == again == case["greedy_ids"][:8]


def test_model_properties_come_from_the_model(runner):
    assert runner.is_loaded()
    assert runner.vocab_size == 512 and runner.max_context_len == 128
    assert runner.bos_id == 1 and runner.eos_ids == [2]


def test_stop_strings_end_generation_before_the_string(runner):
    runner.reset()
    full = runner.generate("The", greedy(24))
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    runner.reset()
    text = runner.generate("The", greedy(24), stop_strings=[stop])
    assert stop not in text and runner.last_stats.stop_reason == "stop_string"
