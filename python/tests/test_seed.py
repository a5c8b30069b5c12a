"""The same seed gives the same tokens through Python as through the `etllm` CLI (Rust),
with every sampling filter on: mirrors c_tests/test_seed.c."""

from __future__ import annotations

import json
import subprocess

import etllm
from conftest import TOKENIZER, generated_ids, model

PROMPT = "Once upon a time"
CLI_SAMPLING = [
    "--temperature", "0.8", "--top-k", "40", "--top-p", "0.9", "--min-p", "0.02",
    "--repetition-penalty", "1.1", "--max-new-tokens", "24", "--ignore-eos", "--bos", "1",
]


def config_for(seed: int) -> etllm.GenerationConfig:
    return etllm.GenerationConfig(
        echo=False, temperature=0.8, top_k=40, top_p=0.9, min_p=0.02, repetition_penalty=1.1,
        max_new_tokens=24, ignore_eos=True, num_bos=1, seed=seed,
    )


def cli_ids(cli: str, seed: int):
    out = subprocess.run(
        [cli, "generate", "--model", model("dyn_xnnpack"), "--tokenizer", str(TOKENIZER),
         "--prompt", PROMPT, "--seed", str(seed), *CLI_SAMPLING, "--json"],
        check=True, capture_output=True, text=True,
    ).stdout
    lines = [json.loads(line) for line in out.splitlines() if line.strip()]
    return [x["id"] for x in lines if "id" in x and x["id"] is not None]


def test_python_and_cli_draw_the_same_tokens(cli):
    with etllm.Runner(model("dyn_xnnpack"), TOKENIZER) as r:
        for seed in (1, 2, 3):
            want = cli_ids(cli, seed)
            assert len(want) == 24
            r.reset()
            assert generated_ids(r, PROMPT, config_for(seed)) == want, seed


def test_different_seeds_draw_different_tokens():
    with etllm.Runner(model("dyn_xnnpack"), TOKENIZER) as r:
        a = generated_ids(r, PROMPT, config_for(1))
        r.reset()
        b = generated_ids(r, PROMPT, config_for(2))
        assert a != b
