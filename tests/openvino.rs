//! A model lowered to ExecuTorch's OpenVINO backend (`tests/fixtures/backends/openvino/`, made
//! by `tools/fixtures/make_openvino.py`): fp32, KV cache, static shape (prefill goes one token
//! per call), compiled by OpenVINO 2025.4.1's CPU plugin.
//!
//! Running it needs the OpenVINO runtime: `OPENVINO_LIB_PATH` set to the
//! `libopenvino_c.so.<ver>` that `tools/setup-openvino.sh DIR` prints (which also sets the CPU
//! plugin's precision to f32). Without it the test that runs the model fails, unless
//! `ETLLM_SKIP_OPENVINO=1` asks to skip it. What happens without OpenVINO is tested in a child
//! process, so that test always runs.

mod common;

use std::path::PathBuf;
use std::process::{Command, Output};

use common::*;
use etllm::{GenerationConfig, StopReason, Tokenizer};

const FIXTURE: &str = "backends/openvino";

/// `OPENVINO_LIB_PATH`, or `None` (after a line on stderr) when it is unset and
/// `ETLLM_SKIP_OPENVINO=1`. Fails the test in every other case: an OpenVINO test must not pass
/// by not running.
fn openvino_lib() -> Option<PathBuf> {
    match std::env::var_os("OPENVINO_LIB_PATH").filter(|p| !p.is_empty()) {
        Some(path) => {
            let path = PathBuf::from(path);
            assert!(
                path.is_file(),
                "OPENVINO_LIB_PATH={} is not a file: run `tools/setup-openvino.sh DIR` and set \
                 OPENVINO_LIB_PATH to the path it prints",
                path.display()
            );
            Some(path)
        }
        None if std::env::var("ETLLM_SKIP_OPENVINO").as_deref() == Ok("1") => {
            eprintln!(
                "SKIPPED: OpenVINO tests (ETLLM_SKIP_OPENVINO=1 and no OPENVINO_LIB_PATH): \
                 {FIXTURE} was not run"
            );
            None
        }
        None => panic!(
            "OPENVINO_LIB_PATH is not set, so the OpenVINO model cannot run: run \
             `tools/setup-openvino.sh build/openvino` and set OPENVINO_LIB_PATH to the path it \
             prints, or set ETLLM_SKIP_OPENVINO=1 to skip the OpenVINO tests on purpose"
        ),
    }
}

#[test]
fn openvino_greedy_generation_matches_eager_pytorch() {
    let Some(lib) = openvino_lib() else { return };
    let reference = reference(FIXTURE);
    assert_eq!(
        reference.config["openvino"], true,
        "{FIXTURE}: not the OpenVINO reference"
    );
    assert_eq!(reference.cases.len(), 2, "{FIXTURE}: cases");

    let mut runner = open(FIXTURE);
    assert!(runner.is_loaded(), "OpenVINO model from {}", lib.display());
    assert_eq!(runner.bos_id(), Some(1));
    assert_eq!(runner.eos_ids(), &[2]);
    assert_eq!(runner.vocab_size(), Some(512));
    assert_eq!(runner.max_context(), Some(128));

    for case in &reference.cases {
        let n = case.greedy_ids.len();
        assert!(
            (16..=24).contains(&n),
            "{:?}: {n} reference tokens",
            case.prompt
        );
        runner.reset().unwrap();
        let (t, stats) = generate_ids(&mut runner, &case.prompt_ids, &greedy(n as i32));
        assert_eq!(
            t.tokens, case.greedy_ids,
            "{FIXTURE}: prompt {:?} diverged from eager PyTorch",
            case.prompt
        );
        assert_eq!(stats.num_prompt_tokens as usize, case.prompt_ids.len());
        assert_eq!(stats.num_generated_tokens, n as u64);
        assert_eq!(stats.stop_reason, StopReason::Length);
    }
}

#[test]
fn openvino_text_prompt_with_one_bos_matches_the_reference() {
    let Some(_) = openvino_lib() else { return };
    let reference = reference(FIXTURE);
    let tokenizer = Tokenizer::from_file(tokenizer_path()).unwrap();
    let mut runner = open(FIXTURE);
    for case in &reference.cases {
        assert_eq!(
            tokenizer.encode(&case.prompt).unwrap(),
            case.prompt_ids[1..],
            "{:?}",
            case.prompt
        );
        runner.reset().unwrap();
        let config = GenerationConfig {
            num_bos: 1,
            ..greedy(case.greedy_ids.len() as i32)
        };
        let (t, _) = generate_text(&mut runner, &case.prompt, &config);
        assert_eq!(t.tokens, case.greedy_ids, "{:?}", case.prompt);
    }
}

#[test]
fn openvino_first_logits_match_eager_pytorch_within_1e_4() {
    // f32 at export and at run time gives about 7e-7; a runtime left at the CPU's bf16 default
    // (no plugins.xml from tools/setup-openvino.sh) drifts by about 1e-2 while its greedy ids
    // may still agree.
    let Some(_) = openvino_lib() else { return };
    let mut runner = open(FIXTURE);
    for case in reference(FIXTURE).cases {
        assert_eq!(case.first_logits.len(), 512, "{:?}", case.prompt);
        let got = first_step_logits(&mut runner, &case.prompt_ids);
        let worst = max_abs_diff(&got, &case.first_logits);
        assert!(
            worst < 1e-4,
            "{:?}: first-step logits differ from eager PyTorch by up to {worst} (is \
             OpenVINO's CPU INFERENCE_PRECISION_HINT f32? see tools/setup-openvino.sh)",
            case.prompt
        );
    }
}

/// A path that does not exist (short: the backend's message is cut at about 256 bytes).
const MISSING_LIB: &str = "/nonexistent/etllm-test/libopenvino_c.so.2541";

/// Runs `etllm generate` on `model` with `OPENVINO_LIB_PATH` naming a file that does not exist.
fn generate_without_openvino(model: PathBuf) -> Output {
    Command::new(env!("CARGO_BIN_EXE_etllm"))
        .env("OPENVINO_LIB_PATH", MISSING_LIB)
        .args(["generate", "--temperature", "0", "--max-new-tokens", "4"])
        .arg("--model")
        .arg(model)
        .arg("--tokenizer")
        .arg(tokenizer_path())
        .args(["--prompt", "x"])
        .output()
        .expect("running the etllm CLI")
}

#[test]
fn without_openvino_the_openvino_model_fails_cleanly_and_xnnpack_still_runs() {
    // Independent of OPENVINO_LIB_PATH in this process: the child gets a path that does not
    // exist, so the backend's dlopen fails.
    let out = generate_without_openvino(model_path(FIXTURE));
    let stderr = String::from_utf8_lossy(&out.stderr);
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(
            out.status.signal(),
            None,
            "killed by a signal (abort?): {stderr}"
        );
    }
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert!(out.stdout.is_empty(), "stdout: {:?}", out.stdout);
    let error = stderr
        .lines()
        .find(|l| l.starts_with("error: "))
        .unwrap_or_else(|| panic!("no `error:` line on stderr: {stderr}"));
    for needle in [
        "forward",
        "NotFound",
        "OpenVINO runtime not found",
        MISSING_LIB,
        "OpenvinoBackend is not available",
    ] {
        assert!(error.contains(needle), "{needle:?} not in {error:?}");
    }

    // The OpenVINO delegate is linked in, but an XNNPACK model never touches it.
    let out = generate_without_openvino(model_path("static_xnnpack"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "static_xnnpack: {stderr}");
    assert!(!out.stdout.is_empty(), "static_xnnpack printed nothing");
    assert!(
        stderr.contains("generated tokens: 4"),
        "static_xnnpack: {stderr}"
    );
    assert!(!stderr.contains("OpenVINO"), "static_xnnpack: {stderr}");
}
