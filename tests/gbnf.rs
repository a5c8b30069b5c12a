//! GBNF grammars (llama.cpp's format) through EtLlm's translation: every sample grammar
//! llama.cpp publishes (`tests/fixtures/gbnf/`, copied from its `grammars/`) translates and
//! compiles, and on 74 sample texts (those grammars and three of edge cases) gives, byte by
//! byte on a vocabulary of single bytes, the verdict llama.cpp's own grammar engine gives
//! (complete match, prefix, or refused); a bounded GBNF grammar constrains a real
//! generation, whose output is checked with `serde_json`.

mod common;

use std::ops::ControlFlow;

use common::*;
use etllm::grammar::{Compiler, Constraint};
use etllm::tokenizer::TokenBytes;
use etllm::{GenerationConfig, GrammarType, StopReason};

/// A compiler for a vocabulary of the 256 bytes plus an EOS token.
fn byte_compiler() -> Compiler {
    let mut tokens: Vec<TokenBytes> = (0..=255u8).map(|b| TokenBytes::Text(vec![b])).collect();
    tokens.push(TokenBytes::Special("</s>".into()));
    Compiler::new(&tokens, 257, &[256]).unwrap()
}

#[derive(Debug, PartialEq, Eq, Clone, Copy)]
enum Verdict {
    /// A complete match.
    Accept,
    /// Not a match, but a prefix of one.
    Prefix,
    /// Refused at some byte.
    Reject,
}
use Verdict::*;

fn verdict(c: &mut Constraint, text: &str) -> Verdict {
    for &b in text.as_bytes() {
        if !c.allows(b as u32).unwrap() {
            return Reject;
        }
        c.commit(b as u32).unwrap();
    }
    if c.is_accepting() {
        Accept
    } else {
        Prefix
    }
}

fn fixture(name: &str) -> String {
    std::fs::read_to_string(fixtures_dir().join("gbnf").join(name)).unwrap()
}

#[test]
fn every_sample_grammar_of_llama_cpp_translates_and_compiles() {
    let compiler = byte_compiler();
    let mut names: Vec<_> = std::fs::read_dir(fixtures_dir().join("gbnf"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".gbnf"))
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "arithmetic.gbnf",
            "c.gbnf",
            "chess.gbnf",
            "english.gbnf",
            "japanese.gbnf",
            "json.gbnf",
            "json_arr.gbnf",
            "list.gbnf"
        ]
    );
    for name in names {
        compiler
            .compile(GrammarType::Gbnf, &fixture(&name))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
    }
}

#[derive(serde::Deserialize)]
struct Samples {
    samples: Vec<Sample>,
}

#[derive(serde::Deserialize)]
struct Sample {
    grammar: String,
    text: String,
    verdict: String,
}

#[test]
fn every_sample_gets_llama_cpp_s_own_verdict() {
    // samples.json: llama.cpp's gbnf-validator on each text (tools/fixtures/make_gbnf_samples.py).
    let samples: Samples = serde_json::from_str(&fixture("samples.json")).unwrap();
    let compiler = byte_compiler();
    let mut per_verdict = std::collections::HashMap::<&str, usize>::new();
    for s in &samples.samples {
        let want = match s.verdict.as_str() {
            "accept" => Accept,
            "prefix" => Prefix,
            "reject" => Reject,
            other => panic!("verdict {other}"),
        };
        let mut c = compiler
            .compile(GrammarType::Gbnf, &fixture(&s.grammar))
            .unwrap_or_else(|e| panic!("{}: {e}", s.grammar));
        assert_eq!(
            verdict(&mut c, &s.text),
            want,
            "{}: {:?}",
            s.grammar,
            s.text
        );
        *per_verdict.entry(s.verdict.as_str()).or_default() += 1;
    }
    // Every grammar has samples of each kind it can have; 74 in all.
    assert_eq!(samples.samples.len(), 74);
    assert!(per_verdict.values().all(|&n| n >= 10), "{per_verdict:?}");
}

/// A GBNF grammar with a bounded language: a small JSON object.
const ANSWER: &str = r#"
# A yes/no answer with a score, as a JSON object.
root   ::= "{\"answer\": " answer ", \"score\": " score "}"
answer ::= "\"yes\"" | "\"no\"" | "\"maybe\""
score  ::= [0-9] | "10"
"#;

#[test]
fn a_gbnf_grammar_constrains_generation() {
    let mut runner = open("dyn_xnnpack");
    for seed in [None, Some(1), Some(2), Some(3)] {
        let config = GenerationConfig {
            echo: false,
            temperature: if seed.is_some() { 1.0 } else { 0.0 },
            seed,
            max_new_tokens: 60,
            grammar: ANSWER.into(),
            grammar_type: GrammarType::Gbnf,
            ..Default::default()
        };
        runner.reset().unwrap();
        let (t, stats) = generate_text(&mut runner, "Is it?", &config);
        let text = t.text;
        assert_eq!(stats.stop_reason, StopReason::GrammarComplete, "{text:?}");
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert!(
            ["yes", "no", "maybe"].contains(&v["answer"].as_str().unwrap()),
            "{text}"
        );
        assert!(v["score"].as_u64().unwrap() <= 10, "{text}");
    }
}

#[test]
fn a_bad_gbnf_grammar_is_a_grammar_error_naming_the_place() {
    let mut runner = open("dyn_xnnpack");
    let config = GenerationConfig {
        grammar: "root ::= \"a\" missing".into(),
        grammar_type: GrammarType::Gbnf,
        ..Default::default()
    };
    let err = runner
        .generate("x", &config, |_| ControlFlow::Continue(()), |_| {})
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("line 1, column 14: undefined rule `missing`"),
        "{err}"
    );
}
