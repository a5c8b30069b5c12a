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
    let top = String::from_utf8(top.stdout).unwrap();
    for command in ["generate", "chat", "apply-chat-template"] {
        assert!(top.contains(command), "{command} missing from:\n{top}");
    }
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
    // The default model is the demo model of models/demo; its reference case 0 is the
    // README's prompt.
    let case = &demo_reference().cases[0];
    let n = case.greedy_ids.len().to_string();
    let out = output_ok(
        etllm()
            .env_clear()
            .args([
                "generate",
                "--prompt",
                &case.prompt,
                "--temperature",
                "0",
                "--ignore-eos",
            ])
            .args(["--max-new-tokens", &n, "--json"]),
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
    let out = output_ok(
        etllm()
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
            ]),
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
    output_ok(
        etllm()
            .args([
                "generate",
                "--model",
                dir.join("model.pte").to_str().unwrap(),
                "--prompt",
                "Hi",
            ])
            .args(["--max-new-tokens", "3", "--json"]),
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

/// Runs `etllm chat --json` (greedy, 4 tokens a reply) on `input`; returns its JSON lines.
fn chat_json(input: &str) -> Vec<serde_json::Value> {
    let template = write_compact_template(
        std::env::temp_dir().join(format!("etllm-cli-chat-{}.jinja", std::process::id())),
    );
    let mut cmd = etllm();
    cmd.args([
        "chat",
        "--json",
        "--temperature",
        "0",
        "--max-new-tokens",
        "4",
    ])
    .arg("--ignore-eos")
    .arg("--chat-template")
    .arg(&template);
    json_lines(output_with_stdin(&mut cmd, input))
}

#[test]
fn chat_rewind_regenerates_the_last_reply_from_the_kept_cache() {
    let lines = chat_json("hi\nhello\n/rewind\nhello\n");
    assert_eq!(lines.len(), 4, "{lines:?}");
    assert_eq!(lines[2]["command"], "/rewind");
    assert_eq!(lines[2]["ok"], true);
    assert_eq!(lines[1]["reply"], lines[3]["reply"]);
    // The second turn fed only its own text, not the first turn again.
    let fed = |i: usize| lines[i]["stats"]["prompt_tokens"].as_u64().unwrap();
    assert_eq!(fed(1), fed(3));
    let ids = |text: &str| {
        etllm::Tokenizer::from_file(demo_tokenizer_path())
            .unwrap()
            .encode(text)
            .unwrap()
            .len() as u64
    };
    assert_eq!(fed(1), ids("<user>hello<assistant>"));
}

#[test]
fn chat_reset_starts_over_and_rewind_with_no_turn_says_so() {
    let lines = chat_json("hi\n/reset\n/rewind\nhi\n");
    assert_eq!(lines.len(), 4, "{lines:?}");
    assert_eq!(lines[1]["ok"], true);
    assert_eq!(lines[2]["ok"], false);
    assert_eq!(lines[0]["reply"], lines[3]["reply"]);
}

#[derive(serde::Deserialize)]
struct ChatFolderCase {
    folder: String,
    conversation: String,
    text: String,
}

#[test]
fn apply_chat_template_prints_what_hf_transformers_renders() {
    let chat = fixtures_dir().join("chat");
    let cases: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(chat.join("cases.json")).unwrap()).unwrap();
    let folders: Vec<ChatFolderCase> =
        serde_json::from_str(&std::fs::read_to_string(chat.join("folders.json")).unwrap()).unwrap();
    for f in folders {
        let messages = cases["conversations"][&f.conversation].to_string();
        let out = output_ok(
            etllm()
                .args(["apply-chat-template", "--messages", &messages])
                .arg("--chat-template")
                .arg(chat.join(&f.folder)),
        );
        assert_eq!(
            String::from_utf8(out.stdout).unwrap(),
            f.text,
            "{}",
            f.folder
        );
    }
}

#[test]
fn apply_chat_template_reports_the_templates_exception() {
    let out = etllm()
        .args(["apply-chat-template", "--builtin", "llama2", "--messages"])
        .arg(r#"[{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]"#)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(out.stdout.is_empty());
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("Conversation roles must alternate"), "{err}");
    let bad = etllm()
        .args([
            "apply-chat-template",
            "--builtin",
            "llama3",
            "--messages",
            "[1]",
        ])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8(bad.stderr)
        .unwrap()
        .contains("--messages"));
}

#[test]
fn generate_chat_sends_the_prompt_through_the_template_without_an_extra_bos() {
    let out = output_ok(
        etllm()
            .args([
                "generate",
                "--chat",
                "--prompt",
                "Hi",
                "--json",
                "--temperature",
                "0",
            ])
            .args(["--max-new-tokens", "2"]),
    );
    let (_, _, stats) = parse_json_lines(&out.stdout);
    let rendered = etllm::ChatTemplate::llama3()
        .apply(&[etllm::ChatMessage::user("Hi")], true)
        .unwrap();
    let ids = etllm::Tokenizer::from_file(demo_tokenizer_path())
        .unwrap()
        .encode(&rendered)
        .unwrap();
    assert_eq!(stats["prompt_tokens"].as_u64().unwrap() as usize, ids.len());
}

#[test]
fn stop_token_id_ends_generation_at_that_token() {
    let case = &demo_reference().cases[0];
    // The first greedy token after the first that was not generated before it (so
    // generation stops exactly there).
    let k = (1..case.greedy_ids.len())
        .find(|&i| !case.greedy_ids[..i].contains(&case.greedy_ids[i]))
        .unwrap();
    let stop = case.greedy_ids[k];
    let out = output_ok(
        etllm()
            .args(["generate", "--prompt", &case.prompt, "--temperature", "0"])
            .args(["--ignore-eos", "--max-new-tokens", "20", "--json"])
            .args(["--stop-token-id", &stop.to_string()]),
    );
    let (ids, _, stats) = parse_json_lines(&out.stdout);
    assert_eq!(ids, case.greedy_ids[..k]);
    assert_eq!(stats["generated_tokens"], k + 1);
    assert_eq!(stats["stop_reason"], "eos");
}

#[test]
fn warmup_leaves_the_output_unchanged() {
    let case = &demo_reference().cases[0];
    let run = |warmup: bool| {
        let mut cmd = etllm();
        cmd.args(["generate", "--prompt", &case.prompt, "--temperature", "0"])
            .args(["--ignore-eos", "--max-new-tokens", "8", "--json"]);
        if warmup {
            cmd.arg("--warmup");
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        parse_json_lines(&out.stdout).0
    };
    assert_eq!(run(true), run(false));
    assert_eq!(run(true), case.greedy_ids[..8]);
}

/// `etllm bench` measures each requested test at each thread count, with every sample in
/// its JSON, and the table has one row per (threads, test).
#[test]
fn bench_reports_each_test_at_each_thread_count() {
    let out = etllm()
        .args([
            "bench", "-p", "16,32", "-n", "8", "-t", "1,2", "-r", "2", "--json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["model"], "built-in demo");
    assert_eq!(report["vocab_size"], 2048);
    let results = report["results"].as_array().unwrap();
    let cells: Vec<(String, u64)> = results
        .iter()
        .map(|r| {
            (
                r["test"].as_str().unwrap().to_string(),
                r["threads"].as_u64().unwrap(),
            )
        })
        .collect();
    let expected: Vec<(String, u64)> = [1, 2]
        .iter()
        .flat_map(|&t| ["pp16", "pp32", "tg8"].map(|name| (name.to_string(), t)))
        .collect();
    assert_eq!(cells, expected);
    for r in results {
        let samples = r["tokens_per_second_samples"].as_array().unwrap();
        assert_eq!(samples.len(), 2);
        assert!(samples.iter().all(|s| s.as_f64().unwrap() > 0.0), "{r}");
        let share = r["outside_model_share_mean"].as_f64().unwrap();
        assert!((0.0..1.0).contains(&share), "{r}");
    }

    let table = etllm()
        .args(["bench", "-p", "16", "-n", "4", "-t", "1", "-r", "1"])
        .output()
        .unwrap();
    assert!(table.status.success());
    let table = String::from_utf8(table.stdout).unwrap();
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 4, "{table}");
    assert!(lines[0].starts_with("| model | size | vocab | threads | test | t/s |"));
    assert!(
        lines[2].contains("| pp16 |") && lines[3].contains("| tg4 |"),
        "{table}"
    );
}

/// Sizes that do not fit the model's context are refused before anything runs.
#[test]
fn bench_refuses_tests_longer_than_the_context() {
    let out = etllm()
        .args(["bench", "-p", "256", "-n", "0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        stderr.contains("pp256") && stderr.contains("context is 256"),
        "{stderr}"
    );
    let out = etllm()
        .args(["bench", "-p", "0", "-n", "0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
}
