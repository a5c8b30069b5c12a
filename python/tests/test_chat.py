"""Chat templates through the C ABI, against transformers' own renderings."""

from __future__ import annotations

import json

import etllm
from conftest import FIXTURES, TOKENIZER, greedy, model


def test_chat_template_renders_like_transformers():
    data = json.loads((FIXTURES / "chat" / "cases.json").read_text())
    templates = {}
    for name, spec in data["templates"].items():
        t = etllm.ChatTemplate(spec["source"])
        for key, value in spec.get("tokens", {}).items():
            t.set_token(key, value)
        templates[name] = t
    for case in data["cases"]:
        if "text" not in case:
            continue
        messages = data["conversations"][case["conversation"]]
        got = templates[case["template"]].apply(messages, case["add_generation_prompt"])
        assert got == case["text"], (case["template"], case["conversation"])


def test_runner_applies_its_chat_template():
    with etllm.Runner(model("dyn_xnnpack"), TOKENIZER) as r:
        r.set_chat_template(etllm.ChatTemplate.llama2())
        text = r.apply_chat_template([{"role": "user", "content": "Hi"}])
        assert text == etllm.ChatTemplate.llama2().apply([{"role": "user", "content": "Hi"}])
        assert "Hi" in text


def test_conversation_rewind_gives_the_same_reply():
    with etllm.Runner(model("dyn_xnnpack"), TOKENIZER) as r:
        conv = etllm.Conversation(r, etllm.ChatTemplate.llama2(), system="Be brief.")
        first = conv.send("Hello", greedy(6))
        assert conv.rewind()
        assert conv.send("Hello", greedy(6)) == first
        assert [m["role"] for m in conv.messages] == ["system", "user", "assistant"]
