//! `etllm tokenize` and `etllm detokenize`, checked against the reference output recorded
//! by `tools/fixtures/make_tokenizers.py`.

mod common;

use common::output_ok;
use std::path::PathBuf;
use std::process::Command;

fn etllm() -> Command {
    Command::new(env!("CARGO_BIN_EXE_etllm"))
}

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizers")
}

/// The first reference case of `format` whose text is `text`.
fn case(format: &str, text: &str) -> serde_json::Value {
    let all: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir().join("reference.json")).unwrap())
            .unwrap();
    all[format]["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["text"] == text)
        .unwrap()
        .clone()
}

const TEXT: &str = "Café naïve façade déjà vu";

#[test]
fn tokenize_prints_reference_ids_with_bos_and_eos() {
    let out = output_ok(
        etllm()
            .args(["tokenize", "--tokenizer"])
            .arg(dir().join("llama2c.bin"))
            .args(["--text", TEXT, "--bos", "1", "--eos", "1"]),
    );
    let ids: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(ids, case("llama2c", TEXT)["ids_bos_eos"]);
}

#[test]
fn tokenize_reads_the_text_from_a_file() {
    let path = std::env::temp_dir().join(format!("etllm-cli-tok-{}.txt", std::process::id()));
    std::fs::write(&path, TEXT).unwrap();
    let out = output_ok(
        etllm()
            .args(["tokenize", "--tokenizer"])
            .arg(dir().join("tiktoken.model"))
            .arg("--file")
            .arg(&path),
    );
    let ids: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(ids, case("tiktoken", TEXT)["ids"]);
}

#[test]
fn detokenize_prints_reference_text() {
    let c = case("sentencepiece_unigram", TEXT);
    let out = output_ok(
        etllm()
            .args(["detokenize", "--tokenizer"])
            .arg(dir().join("sp_unigram.model"))
            .args(["--ids", &c["ids"].to_string()]),
    );
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        c["decoded"].as_str().unwrap()
    );
}

#[test]
fn tokenize_of_an_unknown_format_fails_listing_what_was_tried() {
    let out = etllm()
        .args(["tokenize", "--tokenizer"])
        .arg(dir().join("README.md"))
        .args(["--text", "x"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains("tried") && err.contains("SentencePiece"),
        "{err}"
    );
}

#[test]
fn unknown_preset_is_refused() {
    let out = etllm()
        .args(["tokenize", "--tokenizer"])
        .arg(dir().join("tiktoken.model"))
        .args(["--text", "x", "--preset", "mistral"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8(out.stderr)
        .unwrap()
        .contains("unknown preset"));
}
