#!/usr/bin/env python3
"""Streams a generation to stdout with EtLlm's Python package.

    python examples/python/generate.py MODEL.pte TOKENIZER [--prompt TEXT] [--max-new-tokens N]
        [--temperature X] [--seed S]

Text goes to stdout as it is generated; the stats go to stderr as JSON.
"""

from __future__ import annotations

import argparse
import sys

import etllm


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("tokenizer")
    p.add_argument("--prompt", default="Once upon a time")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    args = p.parse_args()

    config = etllm.GenerationConfig(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        seed=args.seed,
        num_bos=1,
        echo=True,
    )
    try:
        with etllm.Runner(args.model, args.tokenizer) as runner:
            for piece in runner.stream(args.prompt, config):
                sys.stdout.write(piece)
                sys.stdout.flush()
            sys.stdout.write("\n")
            print(runner.last_stats.to_json(), file=sys.stderr)
    except etllm.EtLlmError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
