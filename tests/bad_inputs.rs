//! Bad inputs give a clear error, never a crash, and leave a loaded runner usable.

mod common;

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use common::*;
use etllm::{Error, GenerationConfig, Runner, RunnerOptions};

fn scratch(name: &str, bytes: &[u8]) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("bad_inputs");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

fn load_error(model: &Path, tokenizer: &Path) -> Error {
    let mut runner = Runner::new(model, tokenizer, RunnerOptions::default());
    let err = runner.load().expect_err("load should fail");
    assert!(!runner.is_loaded());
    err
}

/// Loading `model` fails with an invalid-model error whose message contains `needle`, and
/// the process goes on: a good model still runs.
fn assert_invalid_model(model: &Path, needle: &str) {
    let err = load_error(model, &tokenizer_path());
    assert!(matches!(err, Error::InvalidModel { .. }), "{err}");
    assert!(err.to_string().contains(needle), "{err}");
    assert_good_runner_still_works();
}

/// A runner on a good model still works in this process after the failure.
fn assert_good_runner_still_works() {
    let case = &reference("dyn_xnnpack").cases[0];
    let mut runner = open("dyn_xnnpack");
    assert_matches_reference(&mut runner, case);
}

#[test]
fn missing_model_file_is_a_file_access_error() {
    let err = load_error(Path::new("/nonexistent/model.pte"), &tokenizer_path());
    assert!(matches!(err, Error::FileAccess { .. }), "{err}");
    assert!(err.to_string().contains("/nonexistent/model.pte"), "{err}");
}

#[test]
fn random_bytes_are_an_invalid_model() {
    let bytes: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let err = load_error(&scratch("random.pte", &bytes), &tokenizer_path());
    assert!(matches!(err, Error::InvalidModel { .. }), "{err}");
    assert_good_runner_still_works();
}

#[test]
fn non_utf8_method_name_is_an_invalid_model_not_an_abort() {
    assert_invalid_model(
        &fixtures_dir().join("corrupt/bad_method_name.pte"),
        "not valid UTF-8",
    );
}

#[test]
fn out_of_range_operator_index_is_refused_at_load_not_a_crash_at_execution() {
    assert_invalid_model(
        &fixtures_dir().join("corrupt/op_index_out_of_range.pte"),
        "Op index 1000000 out of range",
    );
}

#[test]
fn missing_operator_name_is_refused_at_load_not_a_crash_at_execution() {
    // The fuzzer's find (tests/fixtures/corrupt/README.md): two bytes of an operator-name
    // offset in dyn_xnnpack zeroed; ExecuTorch logs "Missing operator name" and loads the
    // method with a null kernel.
    let mut bytes = std::fs::read(model_path("dyn_xnnpack")).unwrap();
    assert_eq!(&bytes[7460..7462], &[0x94, 0x02], "the fixture changed");
    bytes[7460] = 0;
    bytes[7461] = 0;
    assert_invalid_model(
        &scratch("missing_op_name.pte", &bytes),
        "Missing operator name",
    );
}

#[test]
fn planned_memory_larger_than_the_machine_is_refused_before_allocation() {
    assert_invalid_model(
        &fixtures_dir().join("corrupt/planned_buffer_too_large.pte"),
        "memory-planned buffers",
    );
}

#[test]
fn outputs_without_memory_planned_buffers_are_refused_when_the_model_is_opened() {
    // forward(tokens, input_pos) -> logits, XNNPACK, exported with
    // MemoryPlanningPass(alloc_graph_output=False) as upstream's static-attention script
    // does (tools/fixtures/make_upstream_static.py --variants unplanned). Run as is, the
    // delegate wrote the logits through a null pointer.
    let model = fixtures_dir().join("corrupt/unplanned_outputs.pte");
    let err = Runner::open(&model, tokenizer_path(), RunnerOptions::default())
        .map(|_| ())
        .expect_err("a program with unplanned outputs was opened");
    assert!(matches!(err, Error::UnsupportedModel(_)), "{err:?}");
    assert!(err.to_string().contains("alloc_graph_output"), "{err}");
    assert_good_runner_still_works();
    // The same program with planned outputs opens and generates: the refusal is the
    // planning's.
    let twin = fixtures_dir().join("corrupt/unplanned_outputs_twin.pte");
    let mut runner = Runner::open(&twin, tokenizer_path(), RunnerOptions::default()).unwrap();
    let config = GenerationConfig {
        max_new_tokens: 3,
        temperature: 0.0,
        ..Default::default()
    };
    let stats = runner
        .generate("Once", &config, |_| ControlFlow::Continue(()), |_| {})
        .unwrap();
    assert_eq!(stats.num_generated_tokens, 3);
}

#[test]
fn the_corrupt_fixtures_differ_from_a_loadable_model_only_in_their_defect() {
    // The files above are multi_eos/model.pte with a few bytes patched (by
    // tools/fixtures/make_corrupt.py, or by the fuzzer); the original loads, so the error
    // is the defect's.
    let good = std::fs::read(fixtures_dir().join("multi_eos/model.pte")).unwrap();
    for (name, max_changed) in [
        ("bad_method_name", 1),
        ("op_index_out_of_range", 4),
        ("planned_buffer_too_large", 1),
    ] {
        let bad = std::fs::read(fixtures_dir().join(format!("corrupt/{name}.pte"))).unwrap();
        assert_eq!(bad.len(), good.len(), "{name}");
        let changed = bad.iter().zip(&good).filter(|(a, b)| a != b).count();
        assert!(
            (1..=max_changed).contains(&changed),
            "{name}: {changed} bytes"
        );
    }
    let mut runner = Runner::new(
        fixtures_dir().join("multi_eos/model.pte"),
        tokenizer_path(),
        RunnerOptions::default(),
    );
    runner.load().expect("the uncorrupted model loads");
}

#[test]
fn truncated_model_is_an_invalid_model() {
    let bytes = std::fs::read(model_path("dyn_xnnpack")).unwrap();
    for keep in [16, 1000, bytes.len() / 2, bytes.len() - 100] {
        let path = scratch(&format!("truncated_{keep}.pte"), &bytes[..keep]);
        let err = load_error(&path, &tokenizer_path());
        assert!(
            matches!(err, Error::InvalidModel { .. }),
            "{keep} bytes: {err}"
        );
    }
    assert_good_runner_still_works();
}

#[test]
fn model_without_forward_is_rejected_by_name() {
    let err = load_error(&fixtures_dir().join("no_forward.pte"), &tokenizer_path());
    assert!(matches!(err, Error::UnsupportedModel(_)), "{err}");
    assert!(err.to_string().contains("forward"), "{err}");
}

#[test]
fn missing_tokenizer_is_a_file_access_error() {
    let err = load_error(
        &model_path("dyn_xnnpack"),
        Path::new("/nonexistent/tokenizer.json"),
    );
    assert!(matches!(err, Error::FileAccess { .. }), "{err}");
}

#[test]
fn corrupt_tokenizer_is_an_invalid_tokenizer() {
    let mut text = std::fs::read(tokenizer_path()).unwrap();
    text.truncate(text.len() / 2);
    let err = load_error(
        &model_path("dyn_xnnpack"),
        &scratch("half_tokenizer.json", &text),
    );
    assert!(matches!(err, Error::InvalidTokenizer { .. }), "{err}");
    let err = load_error(
        &model_path("dyn_xnnpack"),
        &scratch("not_json.json", b"\x00\xffnot json"),
    );
    assert!(matches!(err, Error::InvalidTokenizer { .. }), "{err}");
}

#[test]
fn tokenizer_larger_than_the_model_vocabulary_is_rejected() {
    let err = load_error(
        &model_path("dyn_xnnpack"),
        &fixtures_dir().join("tokenizer_big.json"),
    );
    assert!(matches!(err, Error::InvalidTokenizer { .. }), "{err}");
    assert!(err.to_string().contains("512"), "{err}");
}

#[test]
fn empty_prompt_is_an_invalid_argument_and_the_runner_stays_usable() {
    let mut runner = open("dyn_xnnpack");
    let err = runner
        .generate("", &greedy(4), |_| ControlFlow::Continue(()), |_| {})
        .expect_err("empty prompt");
    assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
    assert_eq!(runner.position(), 0);
    let case = &reference("dyn_xnnpack").cases[0];
    assert_matches_reference(&mut runner, case);
}

#[test]
fn prompt_longer_than_the_remaining_context_changes_nothing() {
    let cases = reference("dyn_xnnpack").cases;
    let mut runner = open("dyn_xnnpack");
    generate_ids(&mut runner, &cases[1].prompt_ids, &greedy(10));
    let position = runner.position();
    let too_long: Vec<u32> = std::iter::repeat_n(cases[1].prompt_ids[1..].to_vec(), 4)
        .flatten()
        .collect();
    assert!(position + too_long.len() > 128);
    let mut called = false;
    let err = runner
        .generate_from_ids(
            &too_long,
            &greedy(4),
            |_| {
                called = true;
                ControlFlow::Continue(())
            },
            |_| {},
        )
        .expect_err("prompt past the context");
    assert!(matches!(err, Error::ContextFull { .. }), "{err}");
    assert!(!called, "nothing may be generated");
    assert_eq!(runner.position(), position);
    // The conversation goes on exactly as if the failed call had not happened.
    let (t, _) = generate_ids(&mut runner, &cases[0].prompt_ids[1..], &greedy(5));
    runner.reset().unwrap();
    let mut all = cases[1].prompt_ids.clone();
    all.extend(
        &generate_ids(&mut runner, &cases[1].prompt_ids, &greedy(10))
            .0
            .tokens,
    );
    runner.reset().unwrap();
    all.extend(&cases[0].prompt_ids[1..]);
    assert_eq!(
        t.tokens,
        generate_ids(&mut runner, &all, &greedy(5)).0.tokens
    );
}

#[test]
fn max_new_tokens_past_the_context_is_clamped() {
    let case = &reference("dyn_xnnpack").cases[0];
    let mut runner = open("dyn_xnnpack");
    let (t, stats) = generate_ids(&mut runner, &case.prompt_ids, &greedy(1000));
    assert_eq!(t.tokens.len(), 128 - case.prompt_ids.len());
    assert_eq!(stats.stop_reason, etllm::StopReason::ContextFull);
    assert_eq!(runner.position(), 128);
    // A further prompt no longer fits.
    let err = runner
        .generate_from_ids(&[5], &greedy(1), |_| ControlFlow::Continue(()), |_| {})
        .expect_err("context is full");
    assert!(matches!(err, Error::ContextFull { .. }), "{err}");
}

#[test]
fn out_of_vocabulary_prompt_ids_are_rejected() {
    let mut runner = open("dyn_xnnpack");
    let err = runner
        .generate_from_ids(&[1, 512], &greedy(1), |_| ControlFlow::Continue(()), |_| {})
        .expect_err("id 512 is outside a 512-token vocabulary");
    assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
}

#[test]
fn invalid_config_is_rejected_before_anything_runs() {
    let mut runner = open("dyn_xnnpack");
    let config = GenerationConfig {
        temperature: -1.0,
        ..greedy(3)
    };
    let err = runner
        .generate("Hello", &config, |_| ControlFlow::Continue(()), |_| {})
        .expect_err("negative temperature");
    assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
    assert!(err.to_string().contains("temperature"), "{err}");
}

#[test]
fn num_bos_prepends_that_many_bos_tokens() {
    let mut runner = open("dyn_xnnpack");
    let config = GenerationConfig {
        num_bos: 2,
        ..greedy(1)
    };
    let (_, stats) = generate_text(&mut runner, "The", &config);
    // "The" is one token of the fixture tokenizer.
    assert_eq!(stats.num_prompt_tokens, 3);
}

#[test]
fn every_eos_id_of_a_multi_eos_model_is_read() {
    // The export stores `get_eos_ids: [2, 3]` as two outputs of one constant method.
    let runner = Runner::open(
        fixtures_dir().join("multi_eos/model.pte"),
        tokenizer_path(),
        RunnerOptions::default(),
    )
    .unwrap();
    assert_eq!(runner.eos_ids(), &[2, 3]);
    assert_eq!(runner.metadata().unwrap().eos_ids, vec![2, 3]);
}
