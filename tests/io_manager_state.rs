//! The built-in managers' saved states, on the fixture models through a runner: a state
//! saved at some point and restored after the manager was driven elsewhere continues
//! token for token like the run that never left; bad states are refused and leave the
//! manager as it was.
//!
//! The runner owns its manager, so the tests hand it [`Shared`], which drives a manager
//! the test holds too. What sessions will do around a restore (the model's own buffers,
//! the runner's position) is done here by hand: the managers whose whole conversation
//! lives in the manager (static attention, no KV cache) are restored after another
//! conversation took the model over, and the runner is rewound to the saved position.

mod common;

use std::sync::{Arc, Mutex};

use common::*;
use etllm::io_manager::{KvCacheInModel, NoKvCache, StaticAttention, StepInputs};
use etllm::tensor::{HostData, HostTensor, TensorData, TensorView};
use etllm::{Error, IoManager, ModelInfo, Runner, RunnerOptions};

/// Drives a manager that the test shares. The step inputs are copied out of it, so that
/// the test can reach the manager between the runner's calls.
struct Shared<M> {
    inner: Arc<Mutex<M>>,
    method: String,
    inputs: Vec<HostTensor>,
}

fn owned(v: &TensorView<'_>) -> HostTensor {
    let data = match v.data {
        TensorData::F32(x) => HostData::F32(x.to_vec()),
        TensorData::I64(x) => HostData::I64(x.to_vec()),
        TensorData::I32(x) => HostData::I32(x.to_vec()),
        TensorData::F16(x) => HostData::F16(x.to_vec()),
        TensorData::BF16(x) => HostData::BF16(x.to_vec()),
        other => panic!("a manager built an input of {other:?}"),
    };
    HostTensor::new(v.sizes.clone(), data).unwrap()
}

impl<M: IoManager> Shared<M> {
    fn step(
        &mut self,
        f: impl FnOnce(&mut M) -> etllm::Result<(String, Vec<HostTensor>)>,
    ) -> etllm::Result<StepInputs<'_>> {
        let (method, inputs) = f(&mut self.inner.lock().unwrap())?;
        self.method = method;
        self.inputs = inputs;
        Ok(StepInputs::of(&self.method, &self.inputs))
    }
}

fn copied(step: StepInputs<'_>) -> (String, Vec<HostTensor>) {
    (
        step.method.to_string(),
        step.inputs.iter().map(owned).collect(),
    )
}

impl<M: IoManager> IoManager for Shared<M> {
    fn load(&mut self, model: &ModelInfo) -> etllm::Result<()> {
        self.inner.lock().unwrap().load(model)
    }
    fn max_prefill_chunk(&self) -> usize {
        self.inner.lock().unwrap().max_prefill_chunk()
    }
    fn max_context(&self) -> usize {
        self.inner.lock().unwrap().max_context()
    }
    fn ring_buffer(&self) -> bool {
        self.inner.lock().unwrap().ring_buffer()
    }
    fn reset(&mut self) -> etllm::Result<()> {
        self.inner.lock().unwrap().reset()
    }
    fn rewind(&mut self, pos: usize) -> etllm::Result<()> {
        self.inner.lock().unwrap().rewind(pos)
    }
    fn prepare_prefill(&mut self, tokens: &[u64], start: usize) -> etllm::Result<StepInputs<'_>> {
        self.step(|m| m.prepare_prefill(tokens, start).map(copied))
    }
    fn update_prefill<'o>(&mut self, outputs: &[TensorView<'o>]) -> etllm::Result<&'o [f32]> {
        self.inner.lock().unwrap().update_prefill(outputs)
    }
    fn prepare_decode(&mut self, token: u64, pos: usize) -> etllm::Result<StepInputs<'_>> {
        self.step(|m| m.prepare_decode(token, pos).map(copied))
    }
    fn update_decode<'o>(&mut self, outputs: &[TensorView<'o>]) -> etllm::Result<&'o [f32]> {
        self.inner.lock().unwrap().update_decode(outputs)
    }
}

/// A runner on `fixture` driving `manager`, and the manager.
fn open_shared<M: IoManager + 'static>(fixture: &str, manager: M) -> (Runner, Arc<Mutex<M>>) {
    let inner = Arc::new(Mutex::new(manager));
    let shared = Shared {
        inner: inner.clone(),
        method: String::new(),
        inputs: Vec::new(),
    };
    let options = RunnerOptions {
        io_manager: Some(Box::new(shared)),
        ..Default::default()
    };
    let runner = Runner::open(model_path(fixture), tokenizer_path(), options)
        .unwrap_or_else(|e| panic!("loading {fixture}: {e}"));
    (runner, inner)
}

fn save<M: IoManager>(manager: &Mutex<M>) -> Vec<u8> {
    let mut state = Vec::new();
    manager.lock().unwrap().save_state(&mut state).unwrap();
    state
}

fn refusal<M: IoManager>(manager: &Mutex<M>, state: &[u8]) -> String {
    match manager.lock().unwrap().restore_state(state) {
        Err(Error::IoManager(msg)) => msg,
        other => panic!("restoring {} bytes: {other:?}", state.len()),
    }
}

/// The continuation of a prefilled prompt (the runner holds its last token back).
fn continuation(runner: &mut Runner, n: i32) -> Vec<u32> {
    generate_text(runner, "", &greedy(n)).0.tokens
}

/// The prompt of reference case `index` of `fixture`, extended with `extra` of its greedy
/// ids.
fn prompt(fixture: &str, index: usize, extra: usize) -> Vec<u32> {
    let case = &reference(fixture).cases[index];
    let mut ids = case.prompt_ids.clone();
    ids.extend(&case.greedy_ids[..extra]);
    ids
}

/// Another conversation as long as `prompt`: its tokens reversed and shifted.
fn other_than(prompt: &[u32]) -> Vec<u32> {
    prompt.iter().rev().map(|&t| 3 + (t * 7) % 500).collect()
}

/// Prefills `prompt`, saves the manager's state and generates `n` tokens (the reference);
/// then another conversation of the same length takes the manager (and the model) over,
/// the runner is rewound to the saved position and the state restored: the next `n`
/// tokens equal the reference. Returns the reference.
fn continues_after_another_conversation<M: IoManager + 'static>(
    fixture: &str,
    manager: M,
    prompt: &[u32],
    n: i32,
) -> Vec<u32> {
    let (mut runner, manager) = open_shared(fixture, manager);
    runner.prefill_ids(prompt, &greedy(n)).unwrap();
    let state = save(&manager);
    let reference = continuation(&mut runner, n);
    assert_eq!(reference.len(), n as usize);

    let saved_pos = prompt.len() - 1; // the last prompt token is held back, not fed
    let other = other_than(prompt);
    runner.reset().unwrap();
    runner.prefill_ids(&other, &greedy(n)).unwrap();
    let elsewhere = continuation(&mut runner, n);
    assert_ne!(
        elsewhere, reference,
        "the other conversation must continue differently"
    );

    runner.reset().unwrap();
    runner.prefill_ids(&other, &greedy(n)).unwrap();
    runner.rewind(saved_pos).unwrap(); // drops the held token of the other conversation
    manager.lock().unwrap().restore_state(&state).unwrap();
    let last = &prompt[saved_pos..];
    let (again, _) = generate_ids(&mut runner, last, &greedy(n));
    assert_eq!(again.tokens, reference, "{fixture}");
    reference
}

#[test]
fn static_attention_state_continues_like_the_uninterrupted_run() {
    for fixture in [
        "static_attention",
        "upstream_static",
        "upstream_static_2m",
        "upstream_static_f16",
    ] {
        continues_after_another_conversation(
            fixture,
            StaticAttention::new(),
            &prompt(fixture, 2, 0),
            12,
        );
    }
}

#[test]
fn static_attention_state_of_a_window_past_the_cache_continues_like_the_uninterrupted_run() {
    // The long case (48 prompt tokens) plus 30 of its tokens: 77 positions in a 64-slot
    // cache, so the window has slid and the whole ring is the state.
    let prompt = prompt("static_attention", 5, 30);
    assert!(prompt.len() - 1 > 64);
    continues_after_another_conversation("static_attention", StaticAttention::new(), &prompt, 12);
}

#[test]
fn no_kv_cache_state_continues_like_the_uninterrupted_run() {
    continues_after_another_conversation(
        "no_kv_cache",
        NoKvCache::new(),
        &prompt("no_kv_cache", 3, 0),
        12,
    );
}

#[test]
fn kv_in_model_state_restored_after_further_steps_continues_like_the_uninterrupted_run() {
    // The cache is the model's, which a restore of the manager alone does not bring back:
    // the manager is driven further, then rewound (the model masks what came after).
    let prompt = prompt("dyn_xnnpack", 3, 0);
    let (mut runner, manager) = open_shared("dyn_xnnpack", KvCacheInModel::new());
    runner.prefill_ids(&prompt, &greedy(12)).unwrap();
    let state = save(&manager);
    let reference = continuation(&mut runner, 12);
    let saved_pos = prompt.len() - 1;
    runner.rewind(saved_pos).unwrap();
    manager.lock().unwrap().restore_state(&state).unwrap();
    let (again, _) = generate_ids(&mut runner, &prompt[saved_pos..], &greedy(12));
    assert_eq!(again.tokens, reference);
}

#[test]
fn kv_in_model_state_is_the_header_alone() {
    let mut state = Vec::new();
    KvCacheInModel::new().save_state(&mut state).unwrap();
    assert_eq!(state, b"KVIM\x01\x00\x00\x00");
}

#[test]
fn no_kv_cache_state_is_its_token_history() {
    let prompt = prompt("no_kv_cache", 3, 0);
    let (mut runner, manager) = open_shared("no_kv_cache", NoKvCache::new());
    runner.prefill_ids(&prompt, &greedy(1)).unwrap();
    let state = save(&manager);
    let mut want = b"NOKV\x01\x00\x00\x00".to_vec();
    want.extend_from_slice(&(prompt.len() as u64 - 1).to_le_bytes());
    for &t in &prompt[..prompt.len() - 1] {
        want.extend_from_slice(&u64::from(t).to_le_bytes());
    }
    assert_eq!(state, want);
}

/// States every manager must refuse: truncations of `state` at every length, `state` with
/// a byte more, garbage, and the states of the other built-in kinds.
fn bad_states(state: &[u8], others: &[Vec<u8>]) -> Vec<Vec<u8>> {
    let mut bad: Vec<Vec<u8>> = (0..state.len()).map(|n| state[..n].to_vec()).collect();
    let mut longer = state.to_vec();
    longer.push(0);
    bad.push(longer);
    bad.push(b"garbage, not a saved state at all".to_vec());
    bad.push(vec![0xff; 64]);
    bad.extend(others.iter().cloned());
    bad
}

/// Refuses every bad state of `bad_states`, each with an IoManager error, and still
/// continues the conversation exactly as without them.
fn refuses_bad_states_and_continues<M: IoManager + 'static>(
    fixture: &str,
    make: impl Fn() -> M,
    prompt: &[u32],
    others: &[Vec<u8>],
) {
    let (mut runner, manager) = open_shared(fixture, make());
    runner.prefill_ids(prompt, &greedy(8)).unwrap();
    let want = continuation(&mut runner, 8);
    runner.reset().unwrap();
    runner.prefill_ids(prompt, &greedy(8)).unwrap();
    let state = save(&manager);
    for bad in bad_states(&state, others) {
        let msg = refusal(&manager, &bad);
        assert!(!msg.is_empty());
    }
    assert_eq!(continuation(&mut runner, 8), want, "{fixture}");
}

fn state_of(manager: &mut dyn IoManager) -> Vec<u8> {
    let mut out = Vec::new();
    manager.save_state(&mut out).unwrap();
    out
}

/// A loaded static-attention manager's state, for the other managers to refuse.
fn static_attention_state() -> Vec<u8> {
    let (_, manager) = open_shared("static_attention", StaticAttention::new());
    save(&manager)
}

#[test]
fn static_attention_refuses_truncated_foreign_and_garbage_states_and_keeps_its_own() {
    let others = [state_of(&mut KvCacheInModel::new())];
    refuses_bad_states_and_continues(
        "static_attention",
        StaticAttention::new,
        &prompt("static_attention", 2, 0),
        &others,
    );
}

#[test]
fn no_kv_cache_refuses_truncated_foreign_and_garbage_states_and_keeps_its_own() {
    let others = [
        state_of(&mut KvCacheInModel::new()),
        static_attention_state(),
    ];
    refuses_bad_states_and_continues(
        "no_kv_cache",
        NoKvCache::new,
        &prompt("no_kv_cache", 3, 0),
        &others,
    );
}

#[test]
fn kv_in_model_refuses_truncated_foreign_and_garbage_states_and_keeps_its_own() {
    refuses_bad_states_and_continues(
        "dyn_xnnpack",
        KvCacheInModel::new,
        &prompt("dyn_xnnpack", 3, 0),
        &[static_attention_state()],
    );
}

#[test]
fn a_state_of_another_static_attention_layout_is_refused_by_its_shape() {
    // static_attention has 64-slot caches, upstream_static 112-slot ones.
    let (_, upstream) = open_shared("upstream_static", StaticAttention::new());
    let msg = refusal(&upstream, &static_attention_state());
    assert!(msg.contains("[1, 2, 64, 16]"), "{msg}");
    assert!(
        msg.contains("this model has 2 layers of [1, 2, 112, 16]"),
        "{msg}"
    );
}

#[test]
fn a_state_from_another_kind_of_manager_is_refused_by_name() {
    let (_, no_kv) = open_shared("no_kv_cache", NoKvCache::new());
    let msg = refusal(&no_kv, &static_attention_state());
    assert!(msg.contains("saved by a StaticAttention manager"), "{msg}");
    assert!(msg.contains("this is a NoKvCache manager"), "{msg}");
}

#[test]
fn no_kv_cache_refuses_more_tokens_than_the_model_takes() {
    let (_, manager) = open_shared("no_kv_cache", NoKvCache::new());
    let mut state = b"NOKV\x01\x00\x00\x00".to_vec();
    state.extend_from_slice(&1000u64.to_le_bytes());
    state.extend(std::iter::repeat_n(0u8, 8000));
    let msg = refusal(&manager, &state);
    assert!(
        msg.contains("holds 1000 tokens; this model takes at most 127"),
        "{msg}"
    );
}
