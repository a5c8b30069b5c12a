//! Models exported with upstream's recommended `use_sdpa_with_kv_cache=True` run on
//! EtLlm's own kernels for the `llama::` custom ops, and match eager PyTorch.
//! (Greedy generation of these fixtures is also checked, with every other fixture, in
//! `reference.rs`.)

mod common;

use common::*;
use etllm::{Runner, RunnerOptions};

#[test]
fn custom_op_fixtures_are_custom_op_exports_of_both_shapes_and_head_layouts() {
    let mut seen = Vec::new();
    for fixture in CUSTOM_OP_FIXTURES {
        let runner = open(fixture);
        let info = runner.model_info().unwrap();
        assert_eq!(
            info.constants["use_sdpa_with_kv_cache"].as_int(),
            Some(1),
            "{fixture}: {:?}",
            info.constants["use_sdpa_with_kv_cache"]
        );
        let config = reference(fixture).config;
        let dynamic = info.constants["enable_dynamic_shape"].as_int() == Some(1);
        let grouped = config["n_heads"] != config["n_kv_heads"];
        seen.push((dynamic, grouped));
    }
    assert!(
        seen.contains(&(true, true)),
        "dynamic shape with GQA: {seen:?}"
    );
    assert!(
        seen.contains(&(false, false)),
        "static shape with MHA: {seen:?}"
    );
}

#[test]
fn first_logits_of_custom_op_exports_match_eager_pytorch_within_1e_4() {
    for fixture in CUSTOM_OP_FIXTURES {
        let mut runner = open(fixture);
        for case in reference(fixture).cases {
            let got = first_step_logits(&mut runner, &case.prompt_ids);
            let worst = max_abs_diff(&got, &case.first_logits);
            assert!(
                worst <= 1e-4,
                "{fixture}: {:?}: first logits differ from eager by {worst}",
                case.prompt
            );
        }
    }
}

/// Prefills the first half of `case`'s prompt in one call and generates from the second half
/// in the next: the second part attends to cache rows the first call wrote.
fn assert_split_prompt_continues(fixture: &str, case: &Case) {
    let mut runner = open(fixture);
    let split = case.prompt_ids.len() / 2;
    runner
        .prefill_ids(&case.prompt_ids[..split], &greedy(1))
        .unwrap();
    let (t, _) = generate_ids(
        &mut runner,
        &case.prompt_ids[split..],
        &greedy(case.greedy_ids.len() as i32),
    );
    assert_eq!(t.tokens, case.greedy_ids, "{fixture}: {:?}", case.prompt);
}

#[test]
fn a_conversation_continues_in_the_custom_op_kv_cache() {
    // Prefill the prompt in two parts across two generate calls: the second part attends
    // to cache rows the first call's update_cache wrote.
    for fixture in CUSTOM_OP_FIXTURES {
        assert_split_prompt_continues(fixture, &reference(fixture).cases[1]);
    }
}

#[test]
fn a_model_with_an_unsupported_op_fails_to_load_naming_the_operator() {
    let Err(err) = Runner::open(
        fixtures_dir().join("unsupported_op/model.pte"),
        tokenizer_path(),
        RunnerOptions::default(),
    ) else {
        panic!("loading must fail");
    };
    assert!(matches!(err, etllm::Error::UnsupportedModel(_)), "{err:?}");
    let message = err.to_string();
    assert!(
        message.contains(
            "operators that no kernel library in this process provides: \
                          llama::fast_hadamard_transform.out ("
        ),
        "{message}"
    );
}

/// An `export_llm` model with `quantize_kv_cache: true`: int8 KV caches with f32 scales
/// and int8 zero points written by `llama::update_cache`, read by
/// `llama::custom_quantized_sdpa` (tests/fixtures/sdpa_kv8, from
/// tools/fixtures/make_quantized_sdpa.py). Its reference is upstream's runtime (the
/// pybindings with upstream's kernels), not eager PyTorch: the int8 cache changes the logits.
const KV8_FIXTURE: &str = "sdpa_kv8";

/// The reference's cases, after checking that each greedy step had a top-1/top-2 margin of
/// at least 1e-3 in upstream's runtime (so that equal tokens are a meaningful check).
fn kv8_cases() -> Vec<Case> {
    let text =
        std::fs::read_to_string(fixtures_dir().join(KV8_FIXTURE).join("reference.json")).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(json["config"]["quantize_kv_cache"], true);
    let margins: Vec<f64> = json["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["greedy_min_top2_margin"].as_f64().unwrap())
        .collect();
    assert!(margins.len() >= 2, "{} cases", margins.len());
    for m in &margins {
        assert!(*m >= 1e-3, "a reference step has a top-2 margin of {m}");
    }
    reference(KV8_FIXTURE).cases
}

#[test]
fn int8_kv_cache_export_gives_upstreams_greedy_tokens() {
    let mut runner = open(KV8_FIXTURE);
    for case in kv8_cases() {
        runner.reset().unwrap();
        let (t, _) = generate_ids(
            &mut runner,
            &case.prompt_ids,
            &greedy(case.greedy_ids.len() as i32),
        );
        assert_eq!(t.tokens, case.greedy_ids, "{:?}", case.prompt);
    }
}

#[test]
fn a_conversation_continues_in_the_int8_kv_cache() {
    // The second part of the prompt attends to int8 rows, scales and zero points that the
    // first call wrote.
    for case in kv8_cases().iter().filter(|c| c.prompt_ids.len() >= 6) {
        assert_split_prompt_continues(KV8_FIXTURE, case);
    }
}

#[test]
fn int8_kv_cache_export_first_logits_match_upstreams_runtime_within_1e_4() {
    // The reference logits are rounded to 7 significant digits (about 1e-6 at |logit| ~ 10)
    // and EtLlm's attention differs from upstream's by float rounding (it dequantizes
    // first; upstream multiplies int32 dot products by the scales): 1e-5 at most was seen.
    // A kernel error (a wrong zero point, scale or key range) moves logits by 1e-2 or more.
    let mut runner = open(KV8_FIXTURE);
    for case in kv8_cases() {
        let got = first_step_logits(&mut runner, &case.prompt_ids);
        let worst = max_abs_diff(&got, &case.first_logits);
        assert!(
            worst <= 1e-4,
            "{:?}: first logits differ from upstream's runtime by {worst}",
            case.prompt
        );
    }
}
