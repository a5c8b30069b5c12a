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
