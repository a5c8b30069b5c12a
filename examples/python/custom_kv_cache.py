#!/usr/bin/env python3
"""Generates with a KV-cache manager written in Python, and checks it against the built-in
one.

    python examples/python/custom_kv_cache.py MODEL.pte TOKENIZER [--prompt TEXT] [--max-new-tokens N]

The manager is chosen from the model: StaticAttentionManager
(static_attention_manager.py) for a static-attention export (a `cache_len` constant),
else KvInModelManager (kv_in_model_manager.py) for the standard export. Both are plain
subclasses of etllm.IoManager: they fill numpy arrays that the runtime reads in place
and take the runtime's outputs as numpy views. Exits 1 if the tokens differ.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import etllm  # noqa: E402
from kv_in_model_manager import KvInModelManager  # noqa: E402
from static_attention_manager import StaticAttentionManager  # noqa: E402


class Chooser(etllm.IoManager):
    """Delegates to the manager that fits the model's layout."""

    def __init__(self) -> None:
        self.inner: etllm.IoManager = KvInModelManager()

    def load(self, model: etllm.ModelInfo):
        try:
            model.constant_ints("cache_len")
            self.inner = StaticAttentionManager()
        except etllm.NotFoundError:
            self.inner = KvInModelManager()
        return self.inner.load(model)

    def reset(self):
        self.inner.reset()

    def rewind(self, pos):
        self.inner.rewind(pos)

    def prepare_prefill(self, tokens, start_pos):
        return self.inner.prepare_prefill(tokens, start_pos)

    def update_prefill(self, outputs):
        return self.inner.update_prefill(outputs)

    def prepare_decode(self, token, pos):
        return self.inner.prepare_decode(token, pos)

    def update_decode(self, outputs):
        return self.inner.update_decode(outputs)

    def save_state(self):
        return self.inner.save_state()

    def restore_state(self, state):
        self.inner.restore_state(state)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("tokenizer")
    p.add_argument("--prompt", default="Once upon a time")
    p.add_argument("--max-new-tokens", type=int, default=32)
    args = p.parse_args()
    config = etllm.GenerationConfig(
        max_new_tokens=args.max_new_tokens, temperature=0, num_bos=1, echo=False, ignore_eos=True
    )

    chooser = Chooser()
    with etllm.Runner(args.model, args.tokenizer, io_manager=chooser) as runner:
        ids = []
        for piece in runner.stream(args.prompt, config):
            sys.stdout.write(piece)
            sys.stdout.flush()
            if piece.token_id is not None:
                ids.append(piece.token_id)
        sys.stdout.write("\n")
        rate = runner.last_stats.decode_tokens_per_second
    with etllm.Runner(args.model, args.tokenizer) as builtin:
        want = []
        builtin.generate(args.prompt, config, lambda p: want.append(p.token_id) if p.token_id is not None else None)
    name = type(chooser.inner).__name__
    if ids != want:
        print(f"{name}: tokens differ from the built-in manager's", file=sys.stderr)
        return 1
    print(f"{name}: {len(ids)} tokens, same as the built-in manager ({rate:.0f} tokens/s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
