"""Tokenizer against the HF tokenizers ids recorded in the references."""

from __future__ import annotations

import json

import etllm
from conftest import FIXTURES, TOKENIZER, reference


def test_encode_equals_reference_prompt_ids():
    tok = etllm.Tokenizer(TOKENIZER)
    for case in reference("dyn_xnnpack")["cases"]:
        assert tok.encode(case["prompt"], num_bos=1) == case["prompt_ids"]


def test_decode_gives_back_the_prompt():
    tok = etllm.Tokenizer(TOKENIZER)
    for case in reference("dyn_xnnpack")["cases"]:
        assert tok.decode(case["prompt_ids"][1:]) == case["prompt"]


def test_text_stream_releases_complete_utf8_only():
    tok = etllm.Tokenizer(TOKENIZER)
    case = reference("dyn_xnnpack")["cases"][2]  # accented Latin, CJK and emoji
    stream = tok.stream()
    pieces = [stream.push(i) for i in case["prompt_ids"][1:]]
    assert "".join(pieces) + stream.flush() == case["prompt"]
    assert all(p.encode("utf-8").decode("utf-8") == p for p in pieces)


def test_special_ids_come_from_the_tokenizer():
    tok = etllm.Tokenizer(TOKENIZER)
    assert tok.vocab_size == 512 and tok.bos_id == 1 and tok.eos_ids == [2]
    assert tok.token_to_piece(1) == b"<s>"


def test_every_format_encodes_and_decodes_as_its_reference():
    ref = json.loads((FIXTURES / "tokenizers" / "reference.json").read_text())
    for name, spec in ref.items():
        tok = etllm.Tokenizer(FIXTURES / "tokenizers" / spec["file"])
        assert tok.vocab_size == spec["vocab_size"], name
        for case in spec["cases"]:
            if not case["text"]:
                continue  # llama2.c refuses empty text, as upstream does (tested in Rust)
            assert tok.encode(case["text"]) == case["ids"], (name, case["text"])
            assert tok.encode(case["text"], 1, 1) == case["ids_bos_eos"], (name, case["text"])
            assert tok.decode(case["ids"]) == case["decoded"], (name, case["text"])
