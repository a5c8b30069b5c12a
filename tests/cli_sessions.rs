//! The `etllm` command line's saved state, run as a user runs it: `generate
//! --prompt-cache` and `chat --save-session` / `--load-session`, on the built-in demo model.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::*;

fn etllm() -> Command {
    Command::new(env!("CARGO_BIN_EXE_etllm"))
}

/// A fresh folder for one test's files (the target folder is shared between checkouts).
fn scratch(test: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("cli_sessions-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

const PROMPT: &str = "And God said, Let there be light";

/// `etllm generate` on the built-in model with `extra` arguments.
fn generate(prompt: &str, extra: &[&str], cache: Option<&Path>) -> Output {
    let mut cmd = etllm();
    cmd.args(["generate", "--prompt", prompt, "--ignore-eos"])
        .args(["--max-new-tokens", "12"])
        .args(extra);
    if let Some(path) = cache {
        cmd.arg("--prompt-cache").arg(path);
    }
    output_ok(&mut cmd)
}

/// A `--json` run: (generated ids, all text including the echo, the stats object).
fn generate_json(
    prompt: &str,
    extra: &[&str],
    cache: Option<&Path>,
) -> (Vec<u32>, String, serde_json::Value) {
    let mut args = vec!["--json", "--echo"];
    args.extend(extra);
    let out = generate(prompt, &args, cache);
    let text = String::from_utf8(out.stdout).unwrap();
    let (mut ids, mut all, mut stats) = (Vec::new(), String::new(), None);
    for line in text.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{line}: {e}"));
        if let Some(s) = v.get("stats") {
            stats = Some(s.clone());
        } else {
            ids.extend(v["id"].as_u64().map(|id| id as u32));
            all.push_str(v["text"].as_str().unwrap());
        }
    }
    (ids, all, stats.expect("a stats line"))
}

fn count(stats: &serde_json::Value, key: &str) -> u64 {
    stats[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} in {stats}"))
}

/// The prompt's ids as the runner frames them (one BOS).
fn prompt_ids(prompt: &str) -> Vec<u32> {
    etllm::Tokenizer::from_file(demo_tokenizer_path())
        .unwrap()
        .encode_with(prompt, 1, 0)
        .unwrap()
}

#[test]
fn help_documents_the_session_flags() {
    let help = |cmd: &str| {
        let out = output_ok(etllm().args([cmd, "--help"]));
        String::from_utf8(out.stdout).unwrap()
    };
    assert!(help("generate").contains("--prompt-cache"));
    let chat = help("chat");
    assert!(chat.contains("--save-session") && chat.contains("--load-session"));
}

#[test]
fn a_prompt_cache_is_made_then_reused_and_the_output_stays_the_same() {
    let dir = scratch("reuse");
    let cache = dir.join("prompt.cache");
    for extra in [
        &["--temperature", "0"][..],
        // Sampled, and with the repetition penalty (which must see the reused prompt).
        &["--temperature", "0.8", "--seed", "11"][..],
        &["--temperature", "0", "--repetition-penalty", "1.5"][..],
    ] {
        let _ = std::fs::remove_file(&cache);
        let (want_ids, want_text, plain) = generate_json(PROMPT, extra, None);
        assert_eq!(count(&plain, "reused_prompt_tokens"), 0);
        let n = count(&plain, "prompt_tokens");

        // First run: no file yet; it is made, and the output is the same.
        let (ids, text, stats) = generate_json(PROMPT, extra, Some(&cache));
        assert!(cache.exists(), "{extra:?}: the cache was not written");
        assert_eq!(
            (&ids, &text),
            (&want_ids, &want_text),
            "{extra:?}: first run"
        );
        assert_eq!(count(&stats, "reused_prompt_tokens"), 0);
        assert_eq!(count(&stats, "prompt_tokens"), n);

        // Second run: the whole prompt but its last token comes from the file, which is
        // not written again (nothing new was fed).
        let modified = std::fs::metadata(&cache).unwrap().modified().unwrap();
        let (ids, text, stats) = generate_json(PROMPT, extra, Some(&cache));
        assert_eq!(
            (&ids, &text),
            (&want_ids, &want_text),
            "{extra:?}: second run"
        );
        assert_eq!(count(&stats, "reused_prompt_tokens"), n - 1, "{stats}");
        assert_eq!(count(&stats, "prompt_tokens"), n);
        assert_eq!(count(&stats, "generated_tokens"), want_ids.len() as u64);
        assert_eq!(
            std::fs::metadata(&cache).unwrap().modified().unwrap(),
            modified,
            "an unchanged prompt rewrote the cache"
        );
    }
    // The plain text (echo included) and the stats summary.
    let plain = generate(PROMPT, &["--temperature", "0", "--echo"], None);
    let cached = generate(PROMPT, &["--temperature", "0", "--echo"], Some(&cache));
    let text = String::from_utf8(cached.stdout).unwrap();
    assert!(text.starts_with(PROMPT), "{text:?}");
    assert_eq!(text, String::from_utf8(plain.stdout).unwrap());
    let stderr = String::from_utf8(cached.stderr).unwrap();
    let n = prompt_ids(PROMPT).len();
    assert!(
        stderr.contains(&format!("prompt tokens: {n} ({} reused)", n - 1)),
        "{stderr}"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_changed_prompt_reuses_the_beginning_it_shares_with_the_cached_one() {
    let dir = scratch("changed");
    let cache = dir.join("prompt.cache");
    let greedy = ["--temperature", "0"];
    generate_json(PROMPT, &greedy, Some(&cache));
    for (prompt, kept) in [
        // Longer: everything cached is kept.
        (format!("{PROMPT}: and there was light."), PROMPT),
        // Another ending: the shared beginning is kept, the rest fed again.
        (
            "And God said, Let the waters be gathered".to_string(),
            PROMPT,
        ),
    ] {
        let (cached_ids, new_ids) = (prompt_ids(kept), prompt_ids(&prompt));
        let common = cached_ids
            .iter()
            .zip(&new_ids)
            .take_while(|(a, b)| a == b)
            .count();
        // The cache holds the prompt's tokens but its last (held back for generation).
        let want_reused = common.min(cached_ids.len() - 1) as u64;
        assert!(
            want_reused >= 4,
            "{prompt}: too little in common to show reuse"
        );

        // The file holds `kept`'s state again for each case.
        let _ = std::fs::remove_file(&cache);
        generate_json(kept, &greedy, Some(&cache));
        let (want_ids, want_text, _) = generate_json(&prompt, &greedy, None);
        let (ids, text, stats) = generate_json(&prompt, &greedy, Some(&cache));
        assert_eq!((ids, text), (want_ids, want_text), "{prompt}");
        assert_eq!(
            count(&stats, "reused_prompt_tokens"),
            want_reused,
            "{prompt}"
        );
        assert_eq!(count(&stats, "prompt_tokens"), new_ids.len() as u64);
        // The file now holds the new prompt.
        let (_, _, again) = generate_json(&prompt, &greedy, Some(&cache));
        assert_eq!(
            count(&again, "reused_prompt_tokens"),
            new_ids.len() as u64 - 1,
            "{prompt}"
        );
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn an_unusable_prompt_cache_gets_a_warning_and_is_overwritten() {
    let dir = scratch("unusable");
    let cache = dir.join("prompt.cache");
    let greedy = ["--temperature", "0"];
    let (want_ids, want_text, _) = generate_json(PROMPT, &greedy, None);
    generate_json(PROMPT, &greedy, Some(&cache));
    let good = std::fs::read(&cache).unwrap();
    let mut flipped = good.clone();
    let middle = flipped.len() / 2;
    flipped[middle] ^= 0x40;
    // A state of another model: a fixture model with its own tokenizer.
    let other = dir.join("other.cache");
    output_ok(
        etllm()
            .args(["generate", "--prompt", "Hello", "--max-new-tokens", "2"])
            .arg("--model")
            .arg(model_path("dyn_xnnpack"))
            .arg("--tokenizer")
            .arg(tokenizer_path())
            .arg("--prompt-cache")
            .arg(&other),
    );
    let foreign = std::fs::read(&other).unwrap();
    for (what, bytes, message) in [
        ("corrupt", &flipped[..], "corrupt"),
        ("truncated", &good[..good.len() / 2], "truncated"),
        (
            "not a state",
            &b"hello, world\n"[..],
            "not an EtLlm session state",
        ),
        ("empty", &[][..], "not an EtLlm session state"),
        ("another model", &foreign[..], "another model"),
    ] {
        std::fs::write(&cache, bytes).unwrap();
        let mut cmd = etllm();
        cmd.args(["generate", "--prompt", PROMPT, "--ignore-eos", "--echo"])
            .args(["--max-new-tokens", "12", "--json"])
            .args(greedy)
            .arg("--prompt-cache")
            .arg(&cache);
        let out = output_ok(&mut cmd);
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert!(
            stderr.starts_with("warning: not using the prompt cache")
                && stderr.contains(message)
                && stderr.contains("overwritten"),
            "{what}: {stderr}"
        );
        let text = String::from_utf8(out.stdout).unwrap();
        let ids: Vec<u32> = text
            .lines()
            .filter_map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                v.get("id").and_then(|id| id.as_u64()).map(|id| id as u32)
            })
            .collect();
        assert_eq!(ids, want_ids, "{what}");
        assert!(
            text.contains("\"reused_prompt_tokens\":0"),
            "{what}: {text}"
        );
        // Overwritten with a good state: the next run uses it.
        let (ids, all, stats) = generate_json(PROMPT, &greedy, Some(&cache));
        assert_eq!((ids, all), (want_ids.clone(), want_text.clone()), "{what}");
        assert!(count(&stats, "reused_prompt_tokens") > 0, "{what}");
    }
    // A cache that cannot be written is a warning too.
    let out = generate(
        PROMPT,
        &greedy,
        Some(&dir.join("no such folder").join("prompt.cache")),
    );
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        stderr.starts_with("warning: cannot write the prompt cache"),
        "{stderr}"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

/// Runs `etllm chat --json` (greedy, 6 tokens a reply) on `input` with `extra` arguments;
/// returns its output.
fn chat(dir: &Path, input: &str, extra: &[&std::ffi::OsStr]) -> Output {
    let mut cmd = etllm();
    cmd.args(["chat", "--json", "--temperature", "0", "--ignore-eos"])
        .args(["--max-new-tokens", "6", "--system", "Answer briefly."])
        .arg("--chat-template")
        .arg(write_compact_template(dir.join("compact.jinja")))
        .args(extra);
    output_with_stdin(&mut cmd, input)
}

fn chat_lines(dir: &Path, input: &str, extra: &[&std::ffi::OsStr]) -> Vec<serde_json::Value> {
    json_lines(chat(dir, input, extra))
}

#[test]
fn a_saved_chat_resumes_with_the_replies_of_an_uninterrupted_one() {
    let dir = scratch("chat");
    let session = dir.join("chat.session");
    let both = [
        "--save-session".as_ref(),
        session.as_os_str(),
        "--load-session".as_ref(),
        session.as_os_str(),
    ];
    let whole = chat_lines(&dir, "hi\nhello\nwho art thou\n", &[]);
    assert_eq!(whole.len(), 3);

    // One turn, saved; the file does not exist yet, so the chat starts new.
    let first = chat_lines(&dir, "hi\n", &both);
    assert_eq!(first[0]["reply"], whole[0]["reply"]);
    assert!(session.exists());
    // Resumed in another process: the same replies, and each turn feeds only its own text.
    let rest = chat_lines(&dir, "hello\nwho art thou\n", &both);
    assert_eq!(rest.len(), 2);
    for (got, want) in rest.iter().zip(&whole[1..]) {
        assert_eq!(got["reply"], want["reply"]);
        assert_eq!(
            got["stats"]["prompt_tokens"], want["stats"]["prompt_tokens"],
            "the resumed turn fed more than its own text"
        );
    }
    // Saved after every turn: three turns now; /rewind drops the third (a saved turn's
    // position is kept), and saying it again gives its reply again.
    let again = chat_lines(&dir, "/rewind\nwho art thou\n", &both);
    assert_eq!(again[0]["ok"], true);
    assert_eq!(again[1]["reply"], whole[2]["reply"]);
    // Loading without saving leaves the file as it was.
    let before = std::fs::read(&session).unwrap();
    let load = ["--load-session".as_ref(), session.as_os_str()];
    let more = chat_lines(&dir, "/reset\nhi\n", &load);
    assert_eq!(more[1]["reply"], whole[0]["reply"]);
    assert_eq!(std::fs::read(&session).unwrap(), before);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_session_file_that_cannot_be_used_is_an_error() {
    let dir = scratch("chat_bad");
    let session = dir.join("chat.session");
    std::fs::write(&session, b"not a session").unwrap();
    let out = chat(
        &dir,
        "hi\n",
        &["--load-session".as_ref(), session.as_os_str()],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        stderr.starts_with("error: ") && stderr.contains("not an EtLlm session state"),
        "{stderr}"
    );
    // A prompt cache holds a state but no chat: a new conversation starts over its
    // tokens, and replies as a fresh chat does.
    let cache = dir.join("prompt.cache");
    generate_json(PROMPT, &["--temperature", "0"], Some(&cache));
    let fresh = chat_lines(&dir, "hi\n", &[]);
    let over_cache = chat_lines(
        &dir,
        "hi\n",
        &["--load-session".as_ref(), cache.as_os_str()],
    );
    assert_eq!(over_cache[0]["reply"], fresh[0]["reply"]);
    std::fs::remove_dir_all(dir).unwrap();
}
