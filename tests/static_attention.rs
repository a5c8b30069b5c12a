//! The built-in static-attention manager against the static-attention fixture's eager
//! PyTorch reference.

mod common;

use common::*;
use etllm::StopReason;
use serde::Deserialize;

#[derive(Deserialize)]
struct StaticCase {
    prompt: String,
    prompt_ids: Vec<u32>,
    greedy_ids: Vec<u32>,
    #[serde(default)]
    beyond_cache: bool,
    /// The tokens the reference Python driver produced on the same .pte (sliding window).
    #[serde(default)]
    static_driver_greedy_ids: Vec<u32>,
}

#[derive(Deserialize)]
struct StaticReference {
    cases: Vec<StaticCase>,
}

fn static_reference() -> StaticReference {
    let path = fixtures_dir().join("static_attention/reference.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn greedy_generation_matches_eager_pytorch_within_the_cache() {
    let reference = static_reference();
    let mut runner = open("static_attention");
    let mut checked = 0;
    for case in reference.cases.iter().filter(|c| !c.beyond_cache) {
        runner.reset().unwrap();
        let (t, _) = generate_ids(
            &mut runner,
            &case.prompt_ids,
            &greedy(case.greedy_ids.len() as i32),
        );
        assert_eq!(t.tokens, case.greedy_ids, "prompt {:?}", case.prompt);
        checked += 1;
    }
    assert!(checked >= 3);
}

#[test]
fn generation_continues_past_the_cache_length_as_a_sliding_window() {
    let reference = static_reference();
    let case = reference
        .cases
        .iter()
        .find(|c| c.beyond_cache)
        .expect("a case past the cache");
    let mut runner = open("static_attention");
    let n = case.static_driver_greedy_ids.len();
    assert!(
        case.prompt_ids.len() + n > 64,
        "the case must run past the 64-entry cache"
    );
    let (t, stats) = generate_ids(&mut runner, &case.prompt_ids, &greedy(n as i32));
    assert_eq!(stats.stop_reason, StopReason::Length);
    // The reference driver implements the same sliding window on the same .pte.
    assert_eq!(t.tokens, case.static_driver_greedy_ids);
    // Within the cache the window is exact attention, so the start equals eager PyTorch.
    let exact = 64 - case.prompt_ids.len();
    assert_eq!(t.tokens[..exact], case.greedy_ids[..exact]);
}

#[test]
fn static_attention_model_is_driven_by_the_static_manager() {
    let runner = open("static_attention");
    let info = runner.model_info().unwrap();
    assert!(info.methods.contains_key("prefill"));
    assert_eq!(info.methods["forward"].inputs.len(), 9);
    assert_eq!(runner.max_context(), Some(256));
}

#[test]
fn multi_turn_on_static_attention_equals_one_call() {
    let reference = static_reference();
    let (a, b) = (&reference.cases[0], &reference.cases[1]);
    let mut runner = open("static_attention");
    let (turn1, _) = generate_ids(&mut runner, &a.prompt_ids, &greedy(4));
    let (turn2, _) = generate_ids(&mut runner, &b.prompt_ids[1..], &greedy(5));
    runner.reset().unwrap();
    let mut all = a.prompt_ids.clone();
    all.extend(&turn1.tokens);
    all.extend(&b.prompt_ids[1..]);
    let (once, _) = generate_ids(&mut runner, &all, &greedy(5));
    assert_eq!(turn2.tokens, once.tokens);
}

// ---------------------------------------------------------------------------------------
// Upstream's layout: tools/fixtures/make_upstream_static.py, which exports like upstream's
// examples/apple/coreml/llama/export_static_llm_coreml.py (single method: `forward` with a
// fixed input length and every logits row; `_2m`: `forward` decodes one token and
// `prefill` takes chunks, one logits row chosen by last_valid_token_pos).
// ---------------------------------------------------------------------------------------

use std::sync::{Arc, Mutex};

use etllm::io_manager::{IoManager, StaticAttention, StepInputs};
use etllm::model::{ConstValue, ModelInfo};
use etllm::tensor::{DType, TensorView, ValueSpec};
use etllm::{Error, Runner, RunnerOptions};

const UPSTREAM: &[&str] = &["upstream_static", "upstream_static_2m"];

/// The built-in static-attention manager, with prompts fed one token per prefill call
/// when `one_token` is set, recording the method of every step.
struct Recording {
    inner: StaticAttention,
    one_token: bool,
    methods: Arc<Mutex<Vec<String>>>,
}

impl IoManager for Recording {
    fn load(&mut self, model: &ModelInfo) -> etllm::Result<()> {
        self.inner.load(model)
    }
    fn max_prefill_chunk(&self) -> usize {
        match self.one_token {
            true => 1,
            false => self.inner.max_prefill_chunk(),
        }
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
    fn prepare_prefill(&mut self, tokens: &[u64], start: usize) -> etllm::Result<StepInputs<'_>> {
        let step = self.inner.prepare_prefill(tokens, start)?;
        self.methods.lock().unwrap().push(step.method.to_string());
        Ok(step)
    }
    fn update_prefill<'o>(&mut self, outputs: &[TensorView<'o>]) -> etllm::Result<&'o [f32]> {
        self.inner.update_prefill(outputs)
    }
    fn prepare_decode(&mut self, token: u64, pos: usize) -> etllm::Result<StepInputs<'_>> {
        let step = self.inner.prepare_decode(token, pos)?;
        self.methods.lock().unwrap().push(step.method.to_string());
        Ok(step)
    }
    fn update_decode<'o>(&mut self, outputs: &[TensorView<'o>]) -> etllm::Result<&'o [f32]> {
        self.inner.update_decode(outputs)
    }
}

fn open_recording(fixture: &str, one_token: bool) -> (Runner, Arc<Mutex<Vec<String>>>) {
    let methods = Arc::new(Mutex::new(Vec::new()));
    let manager = Recording {
        inner: StaticAttention::new(),
        one_token,
        methods: methods.clone(),
    };
    let options = RunnerOptions {
        io_manager: Some(Box::new(manager)),
        ..Default::default()
    };
    let runner = Runner::open(model_path(fixture), tokenizer_path(), options)
        .unwrap_or_else(|e| panic!("loading {fixture}: {e}"));
    (runner, methods)
}

fn assert_all_cases_match(runner: &mut Runner, fixture: &str) {
    let reference = reference(fixture);
    assert_eq!(reference.cases.len(), 3);
    for case in &reference.cases {
        runner.reset().unwrap();
        assert_matches_reference(runner, case);
    }
}

#[test]
fn upstream_single_method_export_greedy_equals_eager_pytorch() {
    let mut runner = open("upstream_static");
    assert_all_cases_match(&mut runner, "upstream_static");
}

#[test]
fn upstream_two_method_export_greedy_equals_eager_pytorch() {
    let mut runner = open("upstream_static_2m");
    assert_all_cases_match(&mut runner, "upstream_static_2m");
}

#[test]
fn upstream_exports_greedy_equals_eager_pytorch_with_one_prompt_token_per_call() {
    // The f16 export too: its reference (chunked prompts) equals one token per call there
    // (either of its two references: see `greedy_references`).
    for fixture in UPSTREAM.iter().chain(&["upstream_static_f16"]) {
        let (mut runner, methods) = open_recording(fixture, true);
        assert_all_cases_match(&mut runner, fixture);
        // The longest prompt (48 tokens) went in 48 calls, not in chunks.
        let calls = methods.lock().unwrap().len();
        let reference = reference(fixture);
        let expected: usize = reference
            .cases
            .iter()
            .map(|c| c.prompt_ids.len() + c.greedy_ids.len() - 1)
            .sum();
        assert_eq!(calls, expected, "{fixture}");
    }
}

#[test]
fn two_method_export_prefills_with_prefill_and_decodes_with_forward() {
    let (mut runner, methods) = open_recording("upstream_static_2m", false);
    let case = &reference("upstream_static_2m").cases[1];
    assert_eq!(case.prompt_ids.len(), 48);
    let (t, _) = generate_ids(&mut runner, &case.prompt_ids, &greedy(5));
    assert_eq!(t.tokens, case.greedy_ids[..5]);
    // 48 prompt tokens in chunks of 16, then 4 decode steps (the first token comes from
    // the prefill's logits).
    let mut expected = vec!["prefill".to_string(); 3];
    expected.extend(vec!["forward".to_string(); 4]);
    assert_eq!(*methods.lock().unwrap(), expected);
}

#[test]
fn single_method_export_prefills_in_chunks_of_its_input_length() {
    let (mut runner, methods) = open_recording("upstream_static", false);
    let case = &reference("upstream_static").cases[1];
    let (t, _) = generate_ids(&mut runner, &case.prompt_ids, &greedy(5));
    assert_eq!(t.tokens, case.greedy_ids[..5]);
    assert_eq!(
        *methods.lock().unwrap(),
        vec!["forward".to_string(); 48 / 16 + 4]
    );
}

#[test]
fn rewind_on_upstream_exports_hides_the_dropped_positions() {
    for fixture in UPSTREAM.iter().chain(&["upstream_static_f16"]) {
        let reference = reference(fixture);
        let (short, long) = (&reference.cases[0], &reference.cases[2]);
        // "The" is a prefix of "The quick brown fox".
        assert_eq!(long.prompt_ids[..2], short.prompt_ids[..]);
        let mut runner = open(fixture);
        let (before, _) = generate_ids(&mut runner, &long.prompt_ids, &greedy(20));
        assert!(runner.position() > 20);
        // Back to BOS only: the fox's 28 later positions stay in the cache buffers and
        // must no longer be attended to.
        runner.rewind(1).unwrap();
        let n = short.greedy_ids.len();
        let (after, _) = generate_ids(&mut runner, &short.prompt_ids[1..], &greedy(n as i32));
        // Both runs against the same reference (two for the f16 export: see
        // `greedy_references`).
        assert_runs_match_one_reference(
            fixture,
            &[(long, 20, &before.tokens), (short, n, &after.tokens)],
        );
    }
}

/// The model info of `fixture`, as the runner hands it to the manager.
fn model_info(fixture: &str) -> ModelInfo {
    open(fixture).model_info().unwrap().clone()
}

fn load_error(info: &ModelInfo) -> String {
    match StaticAttention::new().load(info) {
        Err(Error::UnsupportedModel(m)) => m,
        Err(other) => panic!("expected UnsupportedModel, got {other:?}"),
        Ok(()) => panic!("the corrupt layout was accepted"),
    }
}

fn int_tensor(sizes: Vec<usize>, data: Vec<i64>) -> ConstValue {
    ConstValue::IntTensor { sizes, data }
}

#[test]
fn out_of_range_cache_index_in_upstream_specs_is_a_clear_error() {
    let mut info = model_info("upstream_static_2m");
    StaticAttention::new().load(&info).unwrap();
    // Layer 1's v cache input index 7 -> 9 (forward has 9 inputs: 0..=8).
    info.constants.insert(
        "decode_kv_cache_specs".into(),
        int_tensor(vec![2, 5], vec![4, 1, 6, 3, 127, 5, 2, 9, 4, 127]),
    );
    let msg = load_error(&info);
    assert!(
        msg.contains("v cache 1") && msg.contains("out of range"),
        "{msg}"
    );
}

#[test]
fn rope_index_naming_a_cache_input_is_a_clear_error() {
    let mut info = model_info("upstream_static");
    StaticAttention::new().load(&info).unwrap();
    info.constants
        .insert("freqs_sin_input_index".into(), int_tensor(vec![1], vec![4]));
    let msg = load_error(&info);
    assert!(msg.contains("input 4") && msg.contains("both"), "{msg}");
}

#[test]
fn mask_spec_with_another_cache_length_is_a_clear_error() {
    let mut info = model_info("upstream_static_2m");
    info.constants.insert(
        "prefill_mask_specs".into(),
        int_tensor(vec![1, 2], vec![1, 100]),
    );
    let msg = load_error(&info);
    assert!(
        msg.contains("prefill_mask_specs") && msg.contains("100"),
        "{msg}"
    );
}

#[test]
fn f64_cache_input_is_refused_by_name() {
    let mut info = model_info("upstream_static_2m");
    let forward = info.methods.get_mut("forward").unwrap();
    match &mut forward.inputs[4] {
        ValueSpec::Tensor(t) => t.dtype = DType::F64,
        other => panic!("input 4 is {other:?}"),
    }
    let msg = load_error(&info);
    assert!(
        msg.contains("k cache input 4") && msg.contains("F64") && msg.contains("f16"),
        "{msg}"
    );
}

// ---------------------------------------------------------------------------------------
// Upstream's default dtype: `upstream_static_f16` (make_upstream_static.py, `--dtype fp16`,
// single method). Its reference is the .pte itself run by upstream's runtime (pybindings
// driven by upstream's StaticAttentionIOManager in f16), every step with a top-1/top-2
// margin >= 1e-3 in those f16 logits. On CPUs where XNNPACK has no native f16 arithmetic
// the export computes like fp32 and its tokens equal the reference's eager-fp32 ones
// instead; both are accepted (`greedy_references` in tests/common/mod.rs).
// ---------------------------------------------------------------------------------------

#[test]
fn upstream_f16_export_greedy_equals_upstreams_runtime() {
    let mut runner = open("upstream_static_f16");
    assert_all_cases_match(&mut runner, "upstream_static_f16");
}

#[test]
fn upstream_f16_export_has_f16_masks_rope_rows_and_caches_and_the_manager_builds_them_so() {
    let info = model_info("upstream_static_f16");
    let forward = &info.methods["forward"];
    let dtypes = |specs: &[ValueSpec]| -> Vec<DType> {
        specs.iter().map(|s| s.tensor().unwrap().dtype).collect()
    };
    // Tokens, then the mask, the rope rows and the four caches.
    let mut want = vec![DType::I32];
    want.extend([DType::F16; 7]);
    assert_eq!(dtypes(&forward.inputs), want);
    assert_eq!(dtypes(&forward.outputs), vec![DType::F16; 5]);
    let mut manager = StaticAttention::new();
    manager.load(&info).unwrap();
    let step = manager.prepare_prefill(&[1, 2, 3], 0).unwrap();
    let built: Vec<DType> = step.inputs.iter().map(TensorView::dtype).collect();
    assert_eq!(built, want);
}
