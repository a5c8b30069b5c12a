//! Custom KV-cache managers from Rust: overriding the built-in choice, and failures in
//! each manager function ending generate cleanly with the manager's message.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use common::*;
use etllm::io_manager::{KvCacheInModel, StaticAttention, StepInputs};
use etllm::tensor::TensorView;
use etllm::{Error, IoManager, ModelInfo, Runner, RunnerOptions};

/// Which manager function fails.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Fail {
    Never,
    Load,
    PreparePrefill,
    UpdatePrefill,
    PrepareDecode,
    UpdateDecode,
}

/// The built-in manager, counting calls and failing on command.
struct Wrapped {
    inner: Box<dyn IoManager>,
    fail: Arc<std::sync::Mutex<Fail>>,
    calls: Arc<AtomicUsize>,
}

impl Wrapped {
    fn check(&self, at: Fail) -> etllm::Result<()> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        if *self.fail.lock().unwrap() == at {
            Err(Error::IoManager(format!("injected failure in {at:?}")))
        } else {
            Ok(())
        }
    }
}

impl IoManager for Wrapped {
    fn load(&mut self, model: &ModelInfo) -> etllm::Result<()> {
        self.check(Fail::Load)?;
        self.inner.load(model)
    }
    fn max_prefill_chunk(&self) -> usize {
        self.inner.max_prefill_chunk()
    }
    fn max_context(&self) -> usize {
        self.inner.max_context()
    }
    fn reset(&mut self) -> etllm::Result<()> {
        self.inner.reset()
    }
    fn rewind(&mut self, pos: usize) -> etllm::Result<()> {
        self.inner.rewind(pos)
    }
    fn prepare_prefill(
        &mut self,
        tokens: &[u64],
        start_pos: usize,
    ) -> etllm::Result<StepInputs<'_>> {
        self.check(Fail::PreparePrefill)?;
        self.inner.prepare_prefill(tokens, start_pos)
    }
    fn update_prefill<'o>(&mut self, outputs: &[TensorView<'o>]) -> etllm::Result<&'o [f32]> {
        self.check(Fail::UpdatePrefill)?;
        self.inner.update_prefill(outputs)
    }
    fn prepare_decode(&mut self, token: u64, pos: usize) -> etllm::Result<StepInputs<'_>> {
        self.check(Fail::PrepareDecode)?;
        self.inner.prepare_decode(token, pos)
    }
    fn update_decode<'o>(&mut self, outputs: &[TensorView<'o>]) -> etllm::Result<&'o [f32]> {
        self.check(Fail::UpdateDecode)?;
        self.inner.update_decode(outputs)
    }
}

fn runner_with(fail: Fail) -> (Runner, Arc<std::sync::Mutex<Fail>>, Arc<AtomicUsize>) {
    wrapped_runner("dyn_xnnpack", Box::new(KvCacheInModel::new()), fail)
}

fn wrapped_runner(
    fixture: &str,
    inner: Box<dyn IoManager>,
    fail: Fail,
) -> (Runner, Arc<std::sync::Mutex<Fail>>, Arc<AtomicUsize>) {
    let fail = Arc::new(std::sync::Mutex::new(fail));
    let calls = Arc::new(AtomicUsize::new(0));
    let manager = Wrapped {
        inner,
        fail: fail.clone(),
        calls: calls.clone(),
    };
    let options = RunnerOptions {
        io_manager: Some(Box::new(manager)),
        ..Default::default()
    };
    (
        Runner::new(model_path(fixture), tokenizer_path(), options),
        fail,
        calls,
    )
}

#[test]
fn a_custom_manager_replaces_the_built_in_one() {
    let (mut runner, _, calls) = runner_with(Fail::Never);
    let case = &reference("dyn_xnnpack").cases[1];
    assert_matches_reference(&mut runner, case);
    // One load, one prefill step (prepare + update), then 2 calls per decode step.
    let steps = 1 + 2 + 2 * (case.greedy_ids.len() - 1);
    assert_eq!(calls.load(Ordering::Relaxed), steps);
}

#[test]
fn a_failing_load_is_reported_and_loading_can_be_retried() {
    let (mut runner, fail, _) = runner_with(Fail::Load);
    let err = runner.load().expect_err("load fails");
    assert!(
        err.to_string().contains("injected failure in Load"),
        "{err}"
    );
    assert!(!runner.is_loaded());
    *fail.lock().unwrap() = Fail::Never;
    runner
        .load()
        .expect("the same manager loads on the second try");
    assert_matches_reference(&mut runner, &reference("dyn_xnnpack").cases[0]);
}

#[test]
fn a_failure_in_each_step_function_ends_generate_and_rolls_back() {
    let case = &reference("dyn_xnnpack").cases[3];
    for at in [
        Fail::PreparePrefill,
        Fail::UpdatePrefill,
        Fail::PrepareDecode,
        Fail::UpdateDecode,
    ] {
        let (mut runner, fail, _) = runner_with(Fail::Never);
        runner.load().unwrap();
        *fail.lock().unwrap() = at;
        let err = runner
            .generate_from_ids(
                &case.prompt_ids,
                &greedy(6),
                |_| std::ops::ControlFlow::Continue(()),
                |_| {},
            )
            .expect_err("generate fails");
        assert!(matches!(err, Error::IoManager(_)), "{at:?}: {err}");
        assert!(
            err.to_string()
                .contains(&format!("injected failure in {at:?}")),
            "{err}"
        );
        assert_eq!(
            runner.position(),
            0,
            "{at:?}: the conversation is rolled back"
        );
        *fail.lock().unwrap() = Fail::Never;
        runner.reset().unwrap();
        assert_matches_reference(&mut runner, case);
    }
}

#[test]
fn a_manager_that_does_not_fit_the_model_is_refused_at_load() {
    let options = RunnerOptions {
        io_manager: Some(Box::new(StaticAttention::new())),
        ..Default::default()
    };
    let mut runner = Runner::new(model_path("dyn_xnnpack"), tokenizer_path(), options);
    let err = runner.load().expect_err("no static-attention layout");
    assert!(matches!(err, Error::UnsupportedModel(_)), "{err}");

    let options = RunnerOptions {
        io_manager: Some(Box::new(KvCacheInModel::new())),
        ..Default::default()
    };
    let mut runner = Runner::new(model_path("static_attention"), tokenizer_path(), options);
    let err = runner
        .load()
        .expect_err("9 inputs are not (tokens, input_pos)");
    assert!(matches!(err, Error::UnsupportedModel(_)), "{err}");
}

#[test]
fn a_failure_that_cannot_be_rolled_back_resets_the_conversation() {
    // Past its 64-entry cache a static-attention window cannot rewind, so a failed turn
    // there leaves an empty conversation rather than a broken one.
    let case = &reference("dyn_xnnpack").cases[3];
    let (mut runner, fail, _) = wrapped_runner(
        "static_attention",
        Box::new(StaticAttention::new()),
        Fail::Never,
    );
    generate_ids(&mut runner, &case.prompt_ids, &greedy(70));
    assert!(runner.position() > 64);
    *fail.lock().unwrap() = Fail::PrepareDecode;
    let err = runner
        .generate_from_ids(
            &[5, 6],
            &greedy(4),
            |_| std::ops::ControlFlow::Continue(()),
            |_| {},
        )
        .expect_err("generate fails");
    assert!(matches!(err, Error::IoManager(_)), "{err}");
    assert_eq!(runner.position(), 0, "the conversation starts over");
    *fail.lock().unwrap() = Fail::Never;
    assert_matches_reference(&mut runner, case);
}
