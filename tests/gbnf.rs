//! GBNF grammars (llama.cpp's format) through EtLlm's translation: every sample grammar
//! llama.cpp publishes (`tests/fixtures/gbnf/`, copied from its `grammars/`) translates and
//! compiles, and accepts and rejects what its text says it should, byte by byte, on a
//! vocabulary of single bytes; a bounded GBNF grammar constrains a real generation, whose
//! output is checked with `serde_json`.

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

/// Checks each sample against its expected verdict (worked out from the grammar's text).
fn check(name: &str, samples: &[(&str, Verdict)]) {
    let compiler = byte_compiler();
    let gbnf = fixture(name);
    for &(text, want) in samples {
        let mut c = compiler
            .compile(GrammarType::Gbnf, &gbnf)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(verdict(&mut c, text), want, "{name}: {text:?}");
    }
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

#[test]
fn json_gbnf() {
    check(
        "json.gbnf",
        &[
            ("{\"a\":1}", Accept),
            (
                "{ \"a\": [1, 2.5e3, true, null], \"b\": {\"c\": \"x\\u00e9\\n\"} }",
                Accept,
            ),
            ("{}", Accept),
            ("{\n  \"k\": -0.5}", Accept),
            ("{\"a\":1", Prefix),
            ("[1]", Reject),
            ("{\"a\":01}", Reject),
            ("{'a':1}", Reject),
            ("{\"a\":tru}", Reject),
            ("{\"a\":\"\u{1}\"}", Reject),
        ],
    );
}

#[test]
fn json_arr_gbnf() {
    check(
        "json_arr.gbnf",
        &[
            ("[\n1,\n\"two\",\n{\"x\": [3]}]", Accept),
            ("[\n]", Accept),
            ("[1]", Reject),
            ("[\n1,2]", Reject),
            ("[\n1", Prefix),
        ],
    );
}

#[test]
fn arithmetic_gbnf() {
    check(
        "arithmetic.gbnf",
        &[
            ("a=b\n", Accept),
            ("x1 +y_2 = 42\n", Accept),
            // No space may follow an operator: only terms end with whitespace.
            ("x1 + y_2 = 42\n", Reject),
            // The right side is one term, not an expression.
            ("x1 = 2+3\n", Reject),
            ("(a+b)*c = 12\ny=(z)\n", Accept),
            ("=a\n", Reject),
            ("a+=b\n", Reject),
            ("A=b\n", Reject),
            ("a=b", Prefix),
        ],
    );
}

#[test]
fn list_gbnf() {
    check(
        "list.gbnf",
        &[
            ("- milk\n- eggs\n", Accept),
            ("- one item\n", Accept),
            ("* milk\n", Reject),
            ("- \n", Reject),
            ("- milk", Prefix),
        ],
    );
}

#[test]
fn chess_gbnf() {
    check(
        "chess.gbnf",
        &[
            ("1. e4 e5\n2. Nf3 Nc6\n", Accept),
            ("1. O-O O-O-O\n2. Kxe8 a1=Q#\n", Accept),
            ("1. e4 e5\n", Prefix),
            ("1. e9 e5\n", Reject),
            ("1.e4 e5\n", Reject),
            ("1. e4 e5\n0. d4 d5\n", Reject),
        ],
    );
}

#[test]
fn english_gbnf() {
    check(
        "english.gbnf",
        &[
            ("Hello, world!", Accept),
            ("a\tb [x] {y} \\z", Accept),
            ("héllo", Reject),
            ("a  b", Reject),
            (" a", Reject),
        ],
    );
}

#[test]
fn japanese_gbnf() {
    check(
        "japanese.gbnf",
        &[
            ("こんにちは、世界", Accept),
            ("カタカナ ひらがな", Accept),
            ("hello", Reject),
            ("日本語 ", Prefix),
        ],
    );
}

#[test]
fn c_gbnf() {
    check(
        "c.gbnf",
        &[
            ("int main(){return 0;}", Accept),
            ("float f(int x){x = x*2;return x;}", Accept),
            ("int f(){// hi\n}", Accept),
            ("char g(){while(a<b){a = a+1;}}", Accept),
            ("int main(){return 0}", Reject),
            ("main(){}", Reject),
            ("int main(){return 0;", Prefix),
        ],
    );
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
