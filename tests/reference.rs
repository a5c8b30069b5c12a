//! Generation reproduces the eager-PyTorch references of every fixture model.

mod common;

use common::*;
use etllm::{GenerationConfig, StopReason, Tokenizer};

#[test]
fn greedy_generation_matches_eager_pytorch_for_every_fixture() {
    for fixture in FIXTURES {
        let reference = reference(fixture);
        let mut runner = open(fixture);
        for case in &reference.cases {
            runner.reset().unwrap();
            let n = case.greedy_ids.len() as i32;
            let (t, stats) = generate_ids(&mut runner, &case.prompt_ids, &greedy(n));
            assert_eq!(
                t.tokens, case.greedy_ids,
                "{fixture}: prompt {:?} diverged from the reference",
                case.prompt
            );
            assert_eq!(stats.num_generated_tokens, n as u64, "{fixture}");
            assert_eq!(stats.stop_reason, StopReason::Length, "{fixture}");
        }
    }
}

#[test]
fn the_bundled_demo_model_matches_eager_pytorch() {
    // The trained model etllm runs by default, with its own tokenizer: the prompt text,
    // encoded by our tokenizer with one BOS, gives the reference's ids and continuation.
    let reference = demo_reference();
    let tokenizer = Tokenizer::from_file(demo_tokenizer_path()).unwrap();
    let mut runner = open_demo();
    for case in &reference.cases {
        assert_eq!(
            tokenizer.encode(&case.prompt).unwrap(),
            case.prompt_ids[1..],
            "{:?}",
            case.prompt
        );
        runner.reset().unwrap();
        let n = case.greedy_ids.len() as i32;
        let (t, _) = generate_ids(&mut runner, &case.prompt_ids, &greedy(n));
        assert_eq!(t.tokens, case.greedy_ids, "demo: {:?}", case.prompt);
        runner.reset().unwrap();
        let config = GenerationConfig {
            num_bos: 1,
            ..greedy(n)
        };
        let (t, stats) = generate_text(&mut runner, &case.prompt, &config);
        assert_eq!(stats.num_prompt_tokens as usize, case.prompt_ids.len());
        assert_eq!(t.tokens, case.greedy_ids, "demo: {:?}", case.prompt);
    }
}

#[test]
fn text_prompt_with_one_bos_matches_the_reference_ids() {
    let reference = reference("dyn_xnnpack");
    let mut runner = open("dyn_xnnpack");
    for case in &reference.cases {
        runner.reset().unwrap();
        let config = GenerationConfig {
            num_bos: 1,
            ..greedy(case.greedy_ids.len() as i32)
        };
        let (t, stats) = generate_text(&mut runner, &case.prompt, &config);
        assert_eq!(
            stats.num_prompt_tokens as usize,
            case.prompt_ids.len(),
            "{:?}",
            case.prompt
        );
        assert_eq!(t.tokens, case.greedy_ids, "{:?}", case.prompt);
    }
}

#[test]
fn tokenizer_encodes_prompts_like_the_reference_tokenizer() {
    let tokenizer = Tokenizer::from_file(tokenizer_path()).unwrap();
    for case in &reference("dyn_xnnpack").cases {
        assert_eq!(
            tokenizer.encode(&case.prompt).unwrap(),
            case.prompt_ids[1..],
            "{:?}",
            case.prompt
        );
        assert_eq!(
            tokenizer.decode(&case.prompt_ids[1..]).unwrap(),
            case.prompt
        );
    }
}

#[test]
fn reference_cases_cover_one_token_long_and_non_ascii_prompts() {
    let cases = reference("dyn_xnnpack").cases;
    assert!(
        cases.iter().any(|c| c.prompt_ids.len() == 2),
        "a one-token prompt"
    );
    assert!(
        cases.iter().any(|c| c.prompt_ids.len() > 21),
        "a prompt over 20 tokens"
    );
    assert!(
        cases.iter().any(|c| !c.prompt.is_ascii()),
        "a non-ASCII prompt"
    );
}

/// Sizes of `forward`'s inputs, for checking that each fixture exercises the signature its
/// name promises.
fn forward_input_sizes(fixture: &str) -> Vec<Vec<usize>> {
    let runner = open(fixture);
    let forward = &runner.model_info().unwrap().methods["forward"];
    forward
        .inputs
        .iter()
        .map(|i| i.tensor().expect("tensor input").sizes.clone())
        .collect()
}

#[test]
fn fixtures_cover_every_supported_forward_signature() {
    let dynamic = forward_input_sizes("dyn_xnnpack");
    assert_eq!(dynamic.len(), 2);
    assert!(
        dynamic[0][1] > 1,
        "dynamic shape: prefill takes many tokens: {dynamic:?}"
    );
    assert_eq!(dynamic[1], vec![1], "scalar start position: {dynamic:?}");

    let fixed = forward_input_sizes("static_xnnpack");
    assert_eq!(
        fixed,
        vec![vec![1, 1], vec![1]],
        "static shape: one token per call"
    );

    let no_kv = forward_input_sizes("no_kv_cache");
    assert_eq!(no_kv.len(), 1, "no KV cache: tokens only: {no_kv:?}");

    let vector = forward_input_sizes("cache_positions");
    assert_eq!(vector.len(), 2);
    assert!(
        vector[1][0] > 1,
        "a full cache-positions vector: {vector:?}"
    );
}
