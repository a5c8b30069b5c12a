"""Shared paths and helpers. Tests compare with the eager-PyTorch references in
tests/fixtures/*/reference.json and with the `etllm` CLI (ETLLM_CLI, else the installed
prefix's or cargo's build)."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import List

import pytest

import etllm

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures"
TOKENIZER = FIXTURES / "tokenizer.json"
EXAMPLES = REPO / "examples" / "python"

# Let tests import the example managers (examples/python/*.py), so the examples are run.
sys.path.insert(0, str(EXAMPLES))


def model(name: str) -> str:
    return str(FIXTURES / name / "model.pte")


def reference(name: str) -> dict:
    return json.loads((FIXTURES / name / "reference.json").read_text())


def greedy(max_new_tokens: int = 24) -> etllm.GenerationConfig:
    return etllm.GenerationConfig(
        temperature=0.0, max_new_tokens=max_new_tokens, ignore_eos=True, echo=False
    )


def generated_ids(runner: etllm.Runner, prompt, config: etllm.GenerationConfig) -> List[int]:
    ids: List[int] = []
    runner.generate(prompt, config, lambda p: ids.append(p.token_id) if p.token_id is not None else None)
    return ids


def cli_path() -> str:
    found = os.environ.get("ETLLM_CLI")
    if found:
        return found
    for candidate in (REPO / "target" / "release" / "etllm", shutil.which("etllm")):
        if candidate and Path(candidate).is_file():
            return str(candidate)
    pytest.fail("no etllm CLI: set ETLLM_CLI (tools/test-all.sh sets it) or build target/release/etllm")
    raise AssertionError


@pytest.fixture(scope="session")
def cli() -> str:
    return cli_path()
