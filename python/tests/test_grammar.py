"""Constrained decoding from Python: every constrained output is checked by an independent
checker (the ``jsonschema`` package for JSON schemas, the ``lark`` package for Lark
grammars, ``re.fullmatch`` for regular expressions) on random-weight fixtures whose
unconstrained text is gibberish; the same seed gives the same constrained tokens as the
``etllm`` CLI (Rust); bad grammars raise GrammarError and leave the runner usable."""

from __future__ import annotations

import json
import re
import subprocess

import jsonschema
import lark
import pytest

import etllm
from conftest import FIXTURES, TOKENIZER, generated_ids, model

PROMPT = "Once upon a time"
SCHEMA_FILE = FIXTURES / "grammar" / "person.schema.json"
LARK_FILE = FIXTURES / "grammar" / "greeting.lark"
SEEDS = (None, 1, 2, 3, 4)

SCHEMAS = {
    "required_and_optional": json.loads(SCHEMA_FILE.read_text()),
    "enum": {
        "type": "object",
        "properties": {"size": {"enum": ["S", "M", "L", "XL"]}},
        "required": ["size"],
        "additionalProperties": False,
    },
    "bounded_array": {
        "type": "array",
        "items": {"type": "integer", "minimum": 0, "maximum": 50},
        "minItems": 1,
        "maxItems": 3,
    },
    "nested": {
        "type": "object",
        "properties": {
            "point": {
                "type": "object",
                "properties": {
                    "x": {"type": "integer", "minimum": -99, "maximum": 99},
                    "y": {"type": "integer", "minimum": -99, "maximum": 99},
                },
                "required": ["x", "y"],
                "additionalProperties": False,
            },
            "label": {"type": "string", "maxLength": 5},
        },
        "required": ["point"],
        "additionalProperties": False,
    },
    "string_pattern": {
        "type": "object",
        "properties": {"zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
        "required": ["zip"],
        "additionalProperties": False,
    },
    "number": {
        "type": "object",
        "properties": {"p": {"type": "number", "minimum": 0, "maximum": 1}, "ok": {"type": "boolean"}},
        "required": ["p", "ok"],
        "additionalProperties": False,
    },
}


def config(grammar, grammar_type="json_schema", seed=None, max_new_tokens=100):
    return etllm.GenerationConfig(
        echo=False,
        temperature=0.0 if seed is None else 1.0,
        seed=seed,
        max_new_tokens=max_new_tokens,
        num_bos=1,
        grammar=grammar,
        grammar_type=grammar_type,
    )


@pytest.fixture(scope="module")
def runner():
    with etllm.Runner(model("dyn_xnnpack"), TOKENIZER) as r:
        yield r


def generate(runner, cfg, prompt=PROMPT):
    runner.reset()
    text = runner.generate(prompt, cfg)
    return text, runner.last_stats


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_json_schema_outputs_validate_with_jsonschema(runner, name):
    schema = SCHEMAS[name]
    for seed in SEEDS:
        text, stats = generate(runner, config(schema, seed=seed))
        assert stats.stop_reason == "grammar_complete", (name, seed, text)
        jsonschema.validate(json.loads(text), schema)


def test_lark_outputs_parse_with_the_lark_package(runner):
    grammar = LARK_FILE.read_text()
    parser = lark.Lark(grammar, start="start", parser="earley", lexer="dynamic")
    for seed in SEEDS:
        text, stats = generate(runner, config(grammar, "lark", seed=seed, max_new_tokens=60))
        assert stats.stop_reason == "grammar_complete", (seed, text)
        parser.parse(text)  # raises when the text is not in the grammar's language


def test_onnxruntime_genai_spelling_lark_grammar_is_accepted(runner):
    grammar = LARK_FILE.read_text()
    text, stats = generate(runner, config(grammar, "lark_grammar", seed=3, max_new_tokens=60))
    assert stats.stop_reason == "grammar_complete"
    lark.Lark(grammar, start="start").parse(text)


def test_regex_outputs_fully_match(runner):
    for pattern in (r"[a-z]{3,8}", r"(cat|dog)s?", r"[0-9]{3}-[0-9]{4}"):
        for seed in SEEDS:
            text, stats = generate(runner, config(pattern, "regex", seed=seed, max_new_tokens=40))
            assert stats.stop_reason in ("grammar_complete", "length"), (pattern, seed, text)
            assert re.fullmatch(pattern, text), (pattern, seed, text)


def test_unconstrained_output_of_the_fixture_is_not_json(runner):
    text, _ = generate(runner, config("", max_new_tokens=30))
    with pytest.raises(ValueError):
        json.loads(text)


def cli_ids(cli, seed):
    out = subprocess.run(
        [cli, "generate", "--model", model("dyn_xnnpack"), "--tokenizer", str(TOKENIZER),
         "--prompt", PROMPT, "--seed", str(seed), "--temperature", "1", "--max-new-tokens",
         "100", "--bos", "1", "--json-schema", str(SCHEMA_FILE), "--json"],
        check=True, capture_output=True, text=True,
    ).stdout
    lines = [json.loads(line) for line in out.splitlines() if line.strip()]
    return [x["id"] for x in lines if "id" in x and x["id"] is not None]


def test_python_and_cli_draw_the_same_constrained_tokens(runner, cli):
    schema = SCHEMA_FILE.read_text()
    for seed in (1, 2, 3):
        want = cli_ids(cli, seed)
        assert want
        runner.reset()
        assert generated_ids(runner, PROMPT, config(schema, seed=seed)) == want, seed


@pytest.mark.parametrize(
    "grammar,grammar_type",
    [
        ('{"type": ', "json_schema"),
        ("(unclosed", "regex"),
        ("start: missing_rule", "lark"),
        ("root ::= missing-rule", "gbnf"),
    ],
)
def test_bad_grammars_raise_grammar_error_and_leave_the_runner_usable(runner, grammar, grammar_type):
    runner.reset()
    with pytest.raises(etllm.GrammarError) as e:
        runner.generate(PROMPT, config(grammar, grammar_type))
    assert grammar_type.split("_")[0] in str(e.value)
    assert runner.position == 0
    text = runner.generate(PROMPT, max_new_tokens=4, temperature=0.0, ignore_eos=True, echo=False)
    assert runner.last_stats.num_generated_tokens == 4 and isinstance(text, str)


def test_unknown_grammar_type_is_refused_before_the_call():
    with pytest.raises(ValueError, match="grammar_type"):
        etllm.GenerationConfig(grammar="x", grammar_type="yaml")


def test_too_few_tokens_is_grammar_incomplete(runner):
    text, stats = generate(runner, config(SCHEMAS["nested"], max_new_tokens=3))
    assert stats.stop_reason == "grammar_incomplete"
    assert stats.num_generated_tokens == 3 and text.startswith("{")


def test_outputs_validate_with_fast_forward_off_too(runner):
    schema = SCHEMAS["nested"]
    for seed in SEEDS:
        cfg = config(schema, seed=seed)
        cfg.grammar_fast_forward = False
        text, stats = generate(runner, cfg)
        assert stats.stop_reason == "grammar_complete", (seed, text)
        jsonschema.validate(json.loads(text), schema)
