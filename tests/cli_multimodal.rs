//! `etllm generate --image` and `etllm transcribe`, run as a user runs them, against the
//! fixtures' eager-transformers references.

use std::path::PathBuf;
use std::process::Command;

fn etllm() -> Command {
    Command::new(env!("CARGO_BIN_EXE_etllm"))
}

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn json(path: PathBuf) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

fn ids(v: &serde_json::Value) -> Vec<u64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect()
}

/// The generated ids of a `generate --json` run.
fn generated_ids(stdout: &[u8]) -> Vec<u64> {
    String::from_utf8(stdout.to_vec())
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["id"].as_u64())
        .collect()
}

#[test]
fn generate_with_an_image_marker_matches_eager_transformers() {
    let dir = fixtures().join("multimodal");
    let reference = json(dir.join("reference.json"));
    let case = &reference["cases"][0];
    assert_eq!(case["name"], "one_image");
    let out = etllm()
        .args([
            "generate",
            "--json",
            "--temperature",
            "0",
            "--max-new-tokens",
            "16",
        ])
        .arg("--model")
        .arg(dir.join("model.pte"))
        .arg("--image")
        .arg(dir.join("images/rgb.png"))
        .args(["--prompt", "USER: <image>\nDescribe.ASSISTANT:"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(generated_ids(&out.stdout), ids(&case["greedy_ids"]));
}

#[test]
fn generate_with_more_markers_than_images_is_an_error() {
    let dir = fixtures().join("multimodal");
    let out = etllm()
        .args(["generate", "--max-new-tokens", "2"])
        .arg("--model")
        .arg(dir.join("model.pte"))
        .arg("--image")
        .arg(dir.join("images/rgb.png"))
        .args(["--prompt", "<image> and <image>"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("2 <image> markers"), "{err}");
}

#[test]
fn generate_with_a_corrupt_image_fails_with_a_clear_message() {
    let dir = fixtures().join("multimodal");
    let out = etllm()
        .args(["generate", "--max-new-tokens", "2", "--prompt", "hi"])
        .arg("--model")
        .arg(dir.join("model.pte"))
        .arg("--image")
        .arg(dir.join("images/corrupt.jpg"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("invalid media"), "{err}");
}

#[test]
fn transcribe_prints_the_eager_transcription() {
    let dir = fixtures().join("whisper");
    let reference = json(dir.join("reference.json"));
    let case = reference["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| {
            c["audio"] == "audio/speech16k.wav" && c["prompt"] == "sot_en_transcribe_notimestamps"
        })
        .unwrap()
        .clone();
    let out = etllm()
        .args(["transcribe", "--language", "en", "--max-new-tokens", "20"])
        .arg(dir.join("audio/speech16k.wav"))
        .arg("--model")
        .arg(dir.join("model.pte"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        format!("{}\n", case["text"].as_str().unwrap())
    );
    let json_out = etllm()
        .args([
            "transcribe",
            "--json",
            "--language",
            "en",
            "--max-new-tokens",
            "20",
        ])
        .arg(dir.join("audio/speech16k.wav"))
        .arg("--model")
        .arg(dir.join("model.pte"))
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&json_out.stdout).unwrap();
    assert_eq!(ids(&v["tokens"]), ids(&case["greedy_ids"]));
    assert_eq!(v["language"], "en");
}

#[test]
fn transcribe_refuses_a_corrupt_wav_with_a_clear_message() {
    let dir = fixtures().join("whisper");
    let out = etllm()
        .arg("transcribe")
        .arg(dir.join("audio/not_a_wav.wav"))
        .arg("--model")
        .arg(dir.join("model.pte"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("invalid media") && err.contains("WAV"),
        "{err}"
    );
}
