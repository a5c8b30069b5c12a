#!/usr/bin/env python3
"""Decode tokens/s with a KV-cache manager written in Python against the built-in (Rust)
manager, on the same model in the same process.

    taskset -c 0 python tools/bench/python_io_manager.py [--model M.pte] [--tokenizer T]
        [--runs 21] [--tokens N]

Fresh runners each run, opened and run in alternating order, 1 thread, greedy (EOS
ignored); both must produce the same tokens. Prints both medians and the median of the
per-run ratios Python / built-in. Needs `pip install ./python` (numpy comes with it).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "examples", "python"))

import etllm  # noqa: E402
from kv_in_model_manager import KvInModelManager  # noqa: E402
from static_attention_manager import StaticAttentionManager  # noqa: E402


def run(model: str, tokenizer: str, manager, tokens: int):
    ids = []
    config = etllm.GenerationConfig(temperature=0, max_new_tokens=tokens, ignore_eos=True,
                                    echo=False, num_bos=1)
    with etllm.Runner(model, tokenizer, io_manager=manager, num_threads=1) as r:
        r.warmup()
        r.generate("Once upon a time", config, lambda p: ids.append(p.token_id))
        return r.last_stats.decode_tokens_per_second, ids


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=os.path.join(REPO, "tests/fixtures/static_attention/model.pte"))
    p.add_argument("--tokenizer", default=os.path.join(REPO, "tests/fixtures/tokenizer.json"))
    p.add_argument("--runs", type=int, default=21)
    p.add_argument("--tokens", type=int, default=-1, help="-1: to the end of the context")
    p.add_argument("--manager", choices=["auto", "static", "kv"], default="auto")
    args = p.parse_args()
    static = args.manager == "static" or (args.manager == "auto" and "static_attention" in args.model)
    make = StaticAttentionManager if static else KvInModelManager
    py_rates, rust_rates, ratios = [], [], []
    for i in range(args.runs):
        order = [True, False] if i % 2 == 0 else [False, True]
        got = {}
        for python in order:
            got[python] = run(args.model, args.tokenizer, make() if python else None, args.tokens)
        if got[True][1] != got[False][1]:
            print("the Python manager's tokens differ from the built-in's", file=sys.stderr)
            return 1
        py_rates.append(got[True][0])
        rust_rates.append(got[False][0])
        ratios.append(got[True][0] / got[False][0])
    print(f"model: {args.model}\nmanager: {make.__name__}, {len(got[True][1])} tokens a run, {args.runs} runs")
    print(f"built-in decode: median {statistics.median(rust_rates):.0f} tokens/s")
    print(f"Python   decode: median {statistics.median(py_rates):.0f} tokens/s")
    print(f"ratio Python / built-in: median {statistics.median(ratios):.3f} "
          f"(min {min(ratios):.3f}, max {max(ratios):.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
