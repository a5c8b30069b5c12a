"""Exports made with upstream's published recipes (tests/fixtures/shipped/: quantized, bf16,
external weights, LoRA, upstream's layouts) give the reference's greedy tokens through the
Python package, with data files and method names passed as upstream's Python runner takes
them."""

from __future__ import annotations

import json
import shutil

import pytest

import etllm
from conftest import FIXTURES, TOKENIZER, generated_ids, greedy

SHIPPED = FIXTURES / "shipped"
NAMES = sorted(p.parent.name for p in SHIPPED.glob("*/reference.json") if (p.parent / "model.pte").exists())


def _cases(name):
    ref = json.loads((SHIPPED / name / "reference.json").read_text())
    return [c for c in ref["cases"] if not c.get("beyond_cache")]


@pytest.mark.parametrize("name", NAMES)
def test_greedy_tokens_equal_the_reference(name):
    for case in _cases(name):
        data = [str(SHIPPED / name / f) for f in case.get("data_files", [])]
        method = case.get("method")
        with etllm.Runner(
            SHIPPED / name / "model.pte",
            TOKENIZER,
            data_paths=data or None,
            method_name=None if method in (None, "forward") else method,
        ) as r:
            ids = generated_ids(r, case["prompt_ids"], greedy(len(case["greedy_ids"])))
            assert ids == case["greedy_ids"], (name, case["prompt"])


def _ptd_fixture():
    if not (SHIPPED / "fp32_ptd" / "model.ptd").exists():
        pytest.skip("no fp32_ptd fixture")
    return SHIPPED / "fp32_ptd"


def test_data_path_takes_one_file_as_upstreams_runner_does(tmp_path):
    src = _ptd_fixture()
    shutil.copy(src / "model.pte", tmp_path / "model.pte")
    shutil.copy(src / "model.ptd", tmp_path / "weights.ptd")
    case = _cases("fp32_ptd")[0]
    with etllm.Runner(tmp_path / "model.pte", TOKENIZER, data_path=tmp_path / "weights.ptd") as r:
        assert generated_ids(r, case["prompt_ids"], greedy(len(case["greedy_ids"]))) == case["greedy_ids"]


def test_a_missing_data_file_is_a_file_access_error_naming_it(tmp_path):
    src = _ptd_fixture()
    missing = tmp_path / "nowhere.ptd"
    with pytest.raises(etllm.FileAccessError, match="nowhere.ptd"):
        etllm.Runner(src / "model.pte", TOKENIZER, data_path=missing)


def test_a_model_without_its_data_file_says_a_data_file_is_needed(tmp_path):
    src = _ptd_fixture()
    shutil.copy(src / "model.pte", tmp_path / "model.pte")
    with pytest.raises(etllm.InvalidModelError, match="data"):
        etllm.Runner(tmp_path / "model.pte", TOKENIZER)


def test_data_path_and_data_paths_together_are_refused():
    with pytest.raises(ValueError):
        etllm.Runner(FIXTURES / "dyn_xnnpack" / "model.pte", TOKENIZER, data_path="a.ptd", data_paths=["b.ptd"])


def test_an_unknown_method_name_is_an_invalid_argument():
    with pytest.raises(etllm.InvalidArgumentError, match="no_such_method"):
        etllm.Runner(FIXTURES / "dyn_xnnpack" / "model.pte", TOKENIZER, method_name="no_such_method")
