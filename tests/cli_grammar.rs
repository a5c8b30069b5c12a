//! The `etllm` command line's constrained-decoding flags, run as a user runs them; outputs
//! are checked with the `jsonschema` and `regex` crates.

mod common;

use std::process::{Command, Output};

use common::*;
use serde_json::Value;

fn etllm() -> Command {
    Command::new(env!("CARGO_BIN_EXE_etllm"))
}

/// `etllm generate` on the test fixture, greedy, with `extra` flags, as JSON lines.
fn generate(extra: &[&str]) -> Output {
    etllm()
        .args(["generate", "--model"])
        .arg(model_path("dyn_xnnpack"))
        .arg("--tokenizer")
        .arg(tokenizer_path())
        .args([
            "--prompt",
            "Once upon a time",
            "--temperature",
            "0",
            "--max-new-tokens",
            "100",
        ])
        .args(extra)
        .output()
        .unwrap()
}

/// The generated text and the stats of a `--json` run.
fn text_and_stats(out: &Output) -> (String, Value) {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut text = String::new();
    let mut stats = Value::Null;
    for line in String::from_utf8(out.stdout.clone()).unwrap().lines() {
        let v: Value = serde_json::from_str(line).unwrap();
        match v.get("stats") {
            Some(s) => stats = s.clone(),
            None => text.push_str(v["text"].as_str().unwrap()),
        }
    }
    (text, stats)
}

fn schema_file() -> std::path::PathBuf {
    fixtures_dir().join("grammar/person.schema.json")
}

#[test]
fn json_schema_flag_output_validates() {
    let (text, stats) = text_and_stats(&generate(&[
        "--json-schema",
        schema_file().to_str().unwrap(),
        "--json",
    ]));
    let schema: Value =
        serde_json::from_str(&std::fs::read_to_string(schema_file()).unwrap()).unwrap();
    let value: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
    assert!(jsonschema::is_valid(&schema, &value), "{text:?}");
    assert_eq!(stats["stop_reason"], "grammar_complete", "{stats}");
}

#[test]
fn regex_flag_output_fully_matches() {
    let (text, _) = text_and_stats(&generate(&["--regex", "[a-z]{2,5}-[0-9]{2}", "--json"]));
    assert!(
        regex::Regex::new("^[a-z]{2,5}-[0-9]{2}$")
            .unwrap()
            .is_match(&text),
        "{text:?}"
    );
}

#[test]
fn grammar_flag_takes_the_type_from_the_extension() {
    let lark = fixtures_dir().join("grammar/greeting.lark");
    let (text, stats) = text_and_stats(&generate(&["--grammar", lark.to_str().unwrap(), "--json"]));
    assert_eq!(stats["stop_reason"], "grammar_complete", "{text:?}");
    // The grammar's language, written as an equivalent regular expression.
    let re =
        regex::Regex::new(r"^(hi|hello|hey) ([a-z]{2,6}|\(([a-z]{2,6}|\([a-z]{2,6}\))\))[!.?]$")
            .unwrap();
    assert!(re.is_match(&text), "{text:?}");
}

#[test]
fn grammar_flag_without_a_known_extension_needs_a_type() {
    let dir = std::env::temp_dir().join(format!("etllm-cli-grammar-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("g.txt");
    std::fs::write(&file, "start: \"a\"").unwrap();
    let out = generate(&["--grammar", file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--grammar-type"));
    let (text, _) = text_and_stats(&generate(&[
        "--grammar",
        file.to_str().unwrap(),
        "--grammar-type",
        "lark",
        "--json",
    ]));
    assert_eq!(text, "a");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn two_grammar_flags_are_a_usage_error() {
    let out = generate(&[
        "--regex",
        "a",
        "--json-schema",
        schema_file().to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn a_bad_grammar_is_an_error_naming_it() {
    let out = generate(&["--regex", "(unclosed"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("grammar error") && err.contains("regex"),
        "{err}"
    );
    assert!(out.stdout.is_empty());
}

#[test]
fn chat_takes_the_grammar_flags_for_every_reply() {
    let mut child = etllm()
        .args(["chat", "--model"])
        .arg(model_path("dyn_xnnpack"))
        .arg("--tokenizer")
        .arg(tokenizer_path())
        .args([
            "--temperature",
            "0",
            "--max-new-tokens",
            "20",
            "--regex",
            "(yes|no)",
            "--json",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(b"Is it?\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let replies: Vec<String> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| v.get("reply").and_then(|r| r.as_str()).map(str::to_string))
        .collect();
    assert_eq!(replies.len(), 1, "{replies:?}");
    for r in &replies {
        assert!(r == "yes" || r == "no", "{replies:?}");
    }
}
