#!/usr/bin/env python3
"""A multi-turn chat with rewind (docs/tutorials/chat-with-rewind.md).

    python examples/python/chat.py MODEL.pte TOKENIZER [--template FILE.jinja]
        [--max-new-tokens N] [MESSAGE ...]

Sends the messages one by one (default: two), then drops the last turn with
``Conversation.rewind`` and sends that message again: decoding is greedy, so the
regenerated reply must be the same; the script exits 1 if it is not. Earlier turns stay in
the KV cache: each turn feeds only what the chat template adds for it. Without
``--template`` the model's own template is used (``chat_template.jinja`` or
``tokenizer_config.json`` beside the tokenizer, else the built-in Llama 3 one); the test
models' context holds 128 tokens, so CI passes ``examples/data/compact_chat.jinja``.
"""

from __future__ import annotations

import argparse
import sys

import etllm


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("tokenizer")
    p.add_argument("messages", nargs="*", default=["Once upon a time", "Tell me more."])
    p.add_argument("--template", help="a Jinja chat template file")
    p.add_argument("--max-new-tokens", type=int, default=32)
    args = p.parse_args()

    def stream(piece: etllm.Piece) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    config = etllm.GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=0)
    try:
        with etllm.Runner(args.model, args.tokenizer) as runner:
            template = None
            if args.template:
                with open(args.template, encoding="utf-8") as f:
                    template = etllm.ChatTemplate(f.read())
            chat = etllm.Conversation(runner, template)
            replies = []
            starts = []
            for message in args.messages:
                starts.append(runner.position)
                print(f"user: {message}\nassistant: ", end="")
                replies.append(chat.send(message, config, token_callback=stream))
                print()

            # Drop the last turn and send it again.
            if not chat.rewind():
                print("error: no turn to drop", file=sys.stderr)
                return 1
            print(f"(rewound to position {runner.position})")
            if runner.position != starts[-1]:
                print(f"error: rewind went to {runner.position}, not {starts[-1]}", file=sys.stderr)
                return 1
            print(f"user: {args.messages[-1]}\nassistant: ", end="")
            again = chat.send(args.messages[-1], config, token_callback=stream)
            print()
            if again != replies[-1]:
                print("error: the regenerated reply differs", file=sys.stderr)
                return 1
            if len(chat.messages) != 2 * len(args.messages):
                print(f"error: {len(chat.messages)} messages", file=sys.stderr)
                return 1
            print(f"ok: {len(chat.messages)} messages; the rewound turn regenerated the same reply",
                  file=sys.stderr)
    except etllm.EtLlmError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
