//! Models exported with upstream's recommended `use_sdpa_with_kv_cache=True` run on
//! EtLlm's own kernels for the `llama::` custom ops, and match eager PyTorch.
//! (Greedy generation of these fixtures is also checked, with every other fixture, in
//! `reference.rs`.)

mod common;

use std::sync::{Arc, Mutex};

use common::*;
use etllm::sampler::SamplerPlugin;
use etllm::{Runner, RunnerOptions};

/// Records the logits of every sampling step.
struct Record(Arc<Mutex<Vec<Vec<f32>>>>);

impl SamplerPlugin for Record {
    fn apply(&mut self, logits: &mut [f32], _: &[u32]) -> etllm::Result<Option<u32>> {
        self.0.lock().unwrap().push(logits.to_vec());
        Ok(None)
    }
}

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
        let steps = Arc::new(Mutex::new(Vec::new()));
        runner.set_sampler_plugin(Some(Box::new(Record(steps.clone()))));
        for case in reference(fixture).cases {
            runner.reset().unwrap();
            steps.lock().unwrap().clear();
            generate_ids(&mut runner, &case.prompt_ids, &greedy(1));
            let got = steps.lock().unwrap()[0].clone();
            assert_eq!(got.len(), case.first_logits.len(), "{fixture}");
            let worst = got
                .iter()
                .zip(&case.first_logits)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(
                worst <= 1e-4,
                "{fixture}: {:?}: first logits differ from eager by {worst}",
                case.prompt
            );
        }
    }
}

#[test]
fn a_conversation_continues_in_the_custom_op_kv_cache() {
    // Prefill the prompt in two parts across two generate calls: the second part attends
    // to cache rows the first call's update_cache wrote.
    for fixture in CUSTOM_OP_FIXTURES {
        let case = &reference(fixture).cases[1];
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
        assert_eq!(t.tokens, case.greedy_ids, "{fixture}");
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
