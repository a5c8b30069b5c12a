"""Every C status maps to its own exception carrying the status name, code and message."""

from __future__ import annotations

import pytest

import etllm
from conftest import FIXTURES, TOKENIZER, greedy, model


def c_statuses():
    statuses, code = [], 1
    while etllm.status_name(code) != "unknown status":
        statuses.append(code)
        code += 1
    return statuses


def test_every_c_status_has_its_exception_class():
    statuses = c_statuses()
    assert len(statuses) >= 18
    for code in statuses:
        cls = etllm.ERROR_CLASSES[code]
        err = cls("msg", code)
        assert isinstance(err, etllm.EtLlmError) and err.status == code
        assert err.status_name == etllm.status_name(code)
        assert str(err) == f"{etllm.status_name(code)} ({code}): msg"
    assert len(set(etllm.ERROR_CLASSES.values())) == len(statuses)


def raises(cls, fn, *args, **kwargs):
    with pytest.raises(cls) as info:
        fn(*args, **kwargs)
    err = info.value
    assert err.status == cls.status and err.message, err
    assert err.status_name.startswith("ETLLM_ERR_")
    return err


def test_missing_model_raises_file_access_error():
    err = raises(etllm.FileAccessError, etllm.Runner, FIXTURES / "nope.pte", TOKENIZER)
    assert "nope.pte" in err.message


def test_corrupt_model_raises_invalid_model_error(tmp_path):
    bad = tmp_path / "bad.pte"
    bad.write_bytes(b"\x01" * 4096)
    raises(etllm.InvalidModelError, etllm.Runner, bad, TOKENIZER)


def test_model_without_forward_raises_unsupported_model_error():
    err = raises(etllm.UnsupportedModelError, etllm.Runner, FIXTURES / "no_forward.pte", TOKENIZER)
    assert "forward" in err.message


def test_model_with_an_unsupported_operator_raises_unsupported_model_error():
    err = raises(etllm.UnsupportedModelError, etllm.Runner, FIXTURES / "unsupported_op" / "model.pte",
                 TOKENIZER)
    assert "llama::fast_hadamard_transform.out" in err.message


def test_model_with_a_non_utf8_method_name_raises_invalid_model_error():
    err = raises(etllm.InvalidModelError, etllm.Runner, FIXTURES / "corrupt" / "bad_method_name.pte",
                 TOKENIZER)
    assert "not valid UTF-8" in err.message


def test_model_with_an_out_of_range_operator_index_raises_invalid_model_error():
    err = raises(etllm.InvalidModelError, etllm.Runner,
                 FIXTURES / "corrupt" / "op_index_out_of_range.pte", TOKENIZER)
    assert "Op index 1000000 out of range" in err.message


def test_model_with_impossible_planned_memory_raises_invalid_model_error():
    err = raises(etllm.InvalidModelError, etllm.Runner,
                 FIXTURES / "corrupt" / "planned_buffer_too_large.pte", TOKENIZER)
    assert "memory-planned buffers" in err.message


def test_tokenizer_bigger_than_the_vocab_raises_invalid_tokenizer_error():
    raises(etllm.InvalidTokenizerError, etllm.Runner, model("dyn_xnnpack"), FIXTURES / "tokenizer_big.json")


def test_bad_config_raises_invalid_argument_error():
    with etllm.Runner(model("dyn_xnnpack"), TOKENIZER) as r:
        err = raises(etllm.InvalidArgumentError, r.generate, "The", greedy(2), temperature=-1.0)
        assert "temperature" in err.message
        assert isinstance(err, ValueError)


def test_too_long_prompt_raises_context_full_error():
    with etllm.Runner(model("dyn_xnnpack"), TOKENIZER) as r:
        raises(etllm.ContextFullError, r.generate, [5] * 200, greedy(2))
        assert r.position == 0


def test_call_from_inside_a_callback_raises_busy_error():
    with etllm.Runner(model("dyn_xnnpack"), TOKENIZER) as r:
        raises(etllm.BusyError, r.generate, "The", greedy(3), lambda p: r.reset())


def test_unloaded_runner_raises_not_loaded_error():
    with etllm.Runner(model("dyn_xnnpack"), TOKENIZER, load=False) as r:
        assert not r.is_loaded()
        raises(etllm.NotLoadedError, lambda: r.max_context_len)
        r.load()
        assert r.max_context_len == 128


def test_rewind_past_the_position_raises_invalid_argument_error():
    with etllm.Runner(model("dyn_xnnpack"), TOKENIZER) as r:
        raises(etllm.InvalidArgumentError, r.rewind, 5)


def test_out_of_vocabulary_id_raises_tokenizer_error():
    raises(etllm.TokenizerError, etllm.Tokenizer(TOKENIZER).decode, [100000])


def test_unknown_format_raises_invalid_tokenizer_error(tmp_path):
    bad = tmp_path / "tok.bin"
    bad.write_bytes(b"\x00not a tokenizer")
    raises(etllm.InvalidTokenizerError, etllm.Tokenizer, bad)


def test_broken_chat_template_raises_chat_template_error():
    raises(etllm.ChatTemplateError, etllm.ChatTemplate, "{% for %}")


def test_missing_chat_template_raises_not_found_error(tmp_path):
    raises(etllm.NotFoundError, etllm.ChatTemplate.from_model_dir, tmp_path)


def test_id_outside_the_vocabulary_raises_invalid_argument_error():
    with etllm.Runner(model("dyn_xnnpack"), TOKENIZER) as r:
        raises(etllm.InvalidArgumentError, r.generate, [1, 600], greedy(2))


def test_bad_preset_raises_value_error():
    with pytest.raises(ValueError, match="preset"):
        etllm.Tokenizer(TOKENIZER, preset="gpt")
