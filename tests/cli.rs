//! The `etllm` command line, run as a user runs it.

mod common;

use std::process::Command;

use common::*;

fn etllm() -> Command {
    Command::new(env!("CARGO_BIN_EXE_etllm"))
}

#[test]
fn help_documents_every_generate_option() {
    let out = etllm().args(["generate", "--help"]).output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    for flag in [
        "--model",
        "--tokenizer",
        "--prompt",
        "--max-new-tokens",
        "--temperature",
        "--seed",
        "--bos",
        "--echo",
        "--ignore-eos",
        "--threads",
        "--json",
    ] {
        assert!(help.contains(flag), "{flag} missing from:\n{help}");
    }
    let top = etllm().arg("--help").output().unwrap();
    assert!(String::from_utf8(top.stdout).unwrap().contains("generate"));
}

/// The JSON lines of a run: (ids of token lines, concatenated text, the stats object).
fn parse_json_lines(stdout: &[u8]) -> (Vec<u32>, String, serde_json::Value) {
    let text = String::from_utf8(stdout.to_vec()).unwrap();
    let mut ids = Vec::new();
    let mut all = String::new();
    let mut stats = None;
    for line in text.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{line}: {e}"));
        if let Some(s) = v.get("stats") {
            stats = Some(s.clone());
        } else {
            if let Some(id) = v["id"].as_u64() {
                ids.push(id as u32);
            }
            all.push_str(v["text"].as_str().unwrap());
        }
    }
    (ids, all, stats.expect("a stats line"))
}

#[test]
fn built_in_model_runs_with_an_empty_environment_and_matches_the_reference() {
    // The default model is the dyn_xnnpack fixture; "The" is its reference case 0.
    let case = &reference("dyn_xnnpack").cases[0];
    let n = case.greedy_ids.len().to_string();
    let out = etllm()
        .env_clear()
        .args([
            "generate",
            "--prompt",
            &case.prompt,
            "--temperature",
            "0",
            "--ignore-eos",
        ])
        .args(["--max-new-tokens", &n, "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (ids, _, stats) = parse_json_lines(&out.stdout);
    assert_eq!(ids, case.greedy_ids);
    assert_eq!(stats["generated_tokens"], case.greedy_ids.len());
    assert_eq!(stats["prompt_tokens"], case.prompt_ids.len());
    assert!(
        out.stderr.is_empty(),
        "--json writes nothing to stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn text_goes_to_stdout_and_stats_to_stderr() {
    let model = model_path("static_xnnpack");
    let out = etllm()
        .args([
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--tokenizer",
            tokenizer_path().to_str().unwrap(),
        ])
        .args([
            "--prompt",
            "Hello",
            "--max-new-tokens",
            "8",
            "--seed",
            "3",
            "--echo",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(stdout.starts_with("Hello"), "{stdout:?}");
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(stderr.contains("generated tokens: 8"), "{stderr}");
    assert!(
        stderr.contains("decode:") && stderr.contains("tokens/s"),
        "{stderr}"
    );
}

#[test]
fn the_same_seed_prints_the_same_text() {
    let run = || {
        let out = etllm()
            .args([
                "generate",
                "--prompt",
                "Once upon a time",
                "--max-new-tokens",
                "16",
            ])
            .args([
                "--temperature",
                "1.0",
                "--seed",
                "77",
                "--ignore-eos",
                "--json",
            ])
            .output()
            .unwrap();
        assert!(out.status.success());
        parse_json_lines(&out.stdout).0
    };
    assert_eq!(run(), run());
}

#[test]
fn tokenizer_next_to_the_model_is_found() {
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("cli_pair");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(model_path("dyn_portable"), dir.join("model.pte")).unwrap();
    std::fs::copy(tokenizer_path(), dir.join("tokenizer.json")).unwrap();
    let out = etllm()
        .args([
            "generate",
            "--model",
            dir.join("model.pte").to_str().unwrap(),
            "--prompt",
            "Hi",
        ])
        .args(["--max-new-tokens", "3", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn errors_exit_nonzero_with_a_message_on_stderr() {
    let out = etllm()
        .args([
            "generate",
            "--model",
            "/nonexistent/m.pte",
            "--tokenizer",
            "/nonexistent/t.json",
        ])
        .args(["--prompt", "x"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        stderr.starts_with("error: ") && stderr.contains("/nonexistent"),
        "{stderr}"
    );

    let out = etllm().args(["generate", "--prompt", ""]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8(out.stderr)
        .unwrap()
        .contains("prompt is empty"));

    let out = etllm().args(["generate"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "usage errors exit 2");
}
