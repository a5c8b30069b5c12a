//! Exports made with upstream's own `export_llm` recipes, as users ship them
//! (`tests/fixtures/shipped/`, made by `tools/fixtures/make_shipped.py`): 8da4w weights with
//! 4-bit embeddings, an int8 KV cache, bf16, weights in an external `.ptd`, and LoRA. Greedy
//! tokens must equal the reference exactly: upstream's runtime (the pybindings with its
//! kernel libraries) for the quantized and bf16 exports, eager PyTorch for the others.

mod common;

use std::path::PathBuf;

use common::*;
use etllm::io_manager::{IoManager, KvCacheInModel, StepInputs};
use etllm::model::ModelInfo;
use etllm::tensor::{DType, TensorView};
use etllm::{Error, Runner, RunnerOptions};

fn shipped(name: &str) -> PathBuf {
    fixtures_dir().join("shipped").join(name)
}

fn shipped_reference(name: &str) -> Reference {
    let path = shipped(name).join("reference.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn options_for(name: &str, case: &Case) -> RunnerOptions {
    RunnerOptions {
        data_paths: case
            .data_files
            .iter()
            .map(|f| shipped(name).join(f))
            .collect(),
        method_name: case.method.clone().filter(|m| m != "forward"),
        ..Default::default()
    }
}

/// Every case of the fixture, each on a fresh runner with its data files and method.
fn assert_every_case_matches(name: &str) {
    let reference = shipped_reference(name);
    assert!(!reference.cases.is_empty(), "{name} has no cases");
    for case in &reference.cases {
        let mut runner = Runner::open(
            shipped(name).join("model.pte"),
            tokenizer_path(),
            options_for(name, case),
        )
        .unwrap_or_else(|e| panic!("loading {name}: {e}"));
        assert_matches_reference(&mut runner, case);
    }
}

#[test]
fn an_8da4w_export_with_4bit_embeddings_matches_upstreams_runtime() {
    assert_every_case_matches("q8da4w");
}

#[test]
fn an_8da4w_export_with_an_int8_kv_cache_matches_upstreams_runtime() {
    assert_every_case_matches("q8da4w_kv8");
}

#[test]
fn a_bf16_export_matches_upstreams_runtime() {
    assert_every_case_matches("bf16");
}

#[test]
fn a_bf16_exports_logits_are_bf16_in_the_program() {
    let runner = Runner::open(
        shipped("bf16").join("model.pte"),
        tokenizer_path(),
        RunnerOptions::default(),
    )
    .unwrap();
    let forward = &runner.model_info().unwrap().methods["forward"];
    assert_eq!(forward.outputs[0].tensor().unwrap().dtype, DType::BF16);
}

#[test]
fn an_export_with_external_weights_matches_eager_with_the_ptd_found_beside_it() {
    // The reference lists model.ptd; the search beside the model must find it unasked.
    let reference = shipped_reference("fp32_ptd");
    for case in &reference.cases {
        assert_eq!(case.data_files, ["model.ptd"]);
        let mut runner = Runner::open(
            shipped("fp32_ptd").join("model.pte"),
            tokenizer_path(),
            RunnerOptions::default(),
        )
        .unwrap();
        assert_matches_reference(&mut runner, case);
    }
}

/// A scratch folder holding a copy of the fp32_ptd program (and nothing else).
fn lone_program(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("etllm-shipped-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(shipped("fp32_ptd").join("model.pte"), dir.join("model.pte")).unwrap();
    dir
}

fn open_with_data(program: PathBuf, data: Vec<PathBuf>) -> etllm::Result<Runner> {
    Runner::open(
        program,
        tokenizer_path(),
        RunnerOptions {
            data_paths: data,
            ..Default::default()
        },
    )
}

#[test]
fn external_weights_given_as_a_data_path_elsewhere_match_eager() {
    let dir = lone_program("given");
    let weights = dir.join("weights-elsewhere.ptd");
    std::fs::copy(shipped("fp32_ptd").join("model.ptd"), &weights).unwrap();
    let case = &shipped_reference("fp32_ptd").cases[0];
    let mut runner = open_with_data(dir.join("model.pte"), vec![weights]).unwrap();
    assert_matches_reference(&mut runner, case);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_program_without_its_data_file_is_an_invalid_model_saying_so() {
    let dir = lone_program("missing");
    let err = open_with_data(dir.join("model.pte"), vec![]).unwrap_err();
    assert!(matches!(err, Error::InvalidModel { .. }), "{err}");
    assert!(err.to_string().contains("external data file"), "{err}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_missing_data_file_is_a_file_access_error_naming_it() {
    let dir = lone_program("absent");
    let absent = dir.join("absent.ptd");
    let err = open_with_data(dir.join("model.pte"), vec![absent.clone()]).unwrap_err();
    assert!(
        matches!(&err, Error::FileAccess { path, .. } if *path == absent),
        "{err}"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_file_that_is_not_a_ptd_is_an_invalid_model_naming_it() {
    let dir = lone_program("foreign");
    let err = open_with_data(dir.join("model.pte"), vec![tokenizer_path()]).unwrap_err();
    assert!(
        matches!(&err, Error::InvalidModel { path, .. } if *path == tokenizer_path()),
        "{err}"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_truncated_data_file_is_an_error_naming_it_not_a_crash() {
    let dir = lone_program("truncated");
    let bytes = std::fs::read(shipped("fp32_ptd").join("model.ptd")).unwrap();
    for keep in [16, 64, bytes.len() / 2, bytes.len() - 1] {
        let cut = dir.join(format!("cut{keep}.ptd"));
        std::fs::write(&cut, &bytes[..keep]).unwrap();
        let err = open_with_data(dir.join("model.pte"), vec![cut.clone()]).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains(&format!("cut{keep}.ptd")),
            "cut to {keep} bytes: {text}"
        );
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_data_file_without_the_programs_weights_is_an_error_naming_it() {
    // lora.ptd holds only a LoRA adapter's weights. (A data file of another program with
    // the same weight names and shapes, such as the LoRA export's foundation.ptd, loads:
    // nothing in the files tells the two apart.)
    let dir = lone_program("other");
    let other = shipped("lora").join("lora.ptd");
    let err = open_with_data(dir.join("model.pte"), vec![other]).unwrap_err();
    assert!(err.to_string().contains("lora.ptd"), "{err}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_lora_export_with_foundation_and_adapter_data_files_matches_eager() {
    let reference = shipped_reference("lora");
    assert!(reference.cases.iter().all(|c| c.data_files.len() == 2));
    assert_every_case_matches("lora");
}

#[test]
fn an_unknown_method_name_is_an_invalid_argument() {
    let err = Runner::open(
        model_path("dyn_xnnpack"),
        tokenizer_path(),
        RunnerOptions {
            method_name: Some("no_such_method".into()),
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
    assert!(err.to_string().contains("no_such_method"), "{err}");
}

/// The built-in manager, made to prefill one token per call.
struct OneTokenPerCall(KvCacheInModel);

impl IoManager for OneTokenPerCall {
    fn load(&mut self, model: &ModelInfo) -> etllm::Result<()> {
        self.0.load(model)
    }
    fn max_prefill_chunk(&self) -> usize {
        1
    }
    fn max_context(&self) -> usize {
        self.0.max_context()
    }
    fn reset(&mut self) -> etllm::Result<()> {
        self.0.reset()
    }
    fn rewind(&mut self, pos: usize) -> etllm::Result<()> {
        self.0.rewind(pos)
    }
    fn prepare_prefill(&mut self, tokens: &[u64], start: usize) -> etllm::Result<StepInputs<'_>> {
        self.0.prepare_prefill(tokens, start)
    }
    fn update_prefill<'o>(&mut self, outputs: &[TensorView<'o>]) -> etllm::Result<&'o [f32]> {
        self.0.update_prefill(outputs)
    }
    fn prepare_decode(&mut self, token: u64, pos: usize) -> etllm::Result<StepInputs<'_>> {
        self.0.prepare_decode(token, pos)
    }
    fn update_decode<'o>(&mut self, outputs: &[TensorView<'o>]) -> etllm::Result<&'o [f32]> {
        self.0.update_decode(outputs)
    }
}

#[test]
fn quantized_and_bf16_exports_give_the_same_tokens_when_prefilled_one_token_per_call() {
    for name in ["q8da4w", "q8da4w_kv8", "bf16"] {
        for case in &shipped_reference(name).cases {
            let mut options = options_for(name, case);
            options.io_manager = Some(Box::new(OneTokenPerCall(KvCacheInModel::new())));
            let mut runner =
                Runner::open(shipped(name).join("model.pte"), tokenizer_path(), options).unwrap();
            assert_matches_reference(&mut runner, case);
        }
    }
}

#[test]
fn a_multi_method_lora_export_runs_each_method_by_name_and_matches_eager() {
    let reference = shipped_reference("lora_multimethod");
    let methods: Vec<_> = reference.cases.iter().map(|c| c.method.clone()).collect();
    assert!(
        methods.contains(&Some("lora_forward".into())),
        "{methods:?}"
    );
    assert!(methods.contains(&Some("forward".into())), "{methods:?}");
    assert_every_case_matches("lora_multimethod");
}

#[test]
fn the_adapter_method_and_forward_give_different_tokens() {
    // Otherwise the test above could not tell whether the method name was honoured.
    let reference = shipped_reference("lora_multimethod");
    let by_method = |m: &str| -> Vec<&Case> {
        reference
            .cases
            .iter()
            .filter(|c| c.method.as_deref() == Some(m))
            .collect()
    };
    for (base, lora) in by_method("forward").iter().zip(by_method("lora_forward")) {
        assert_eq!(base.prompt_ids, lora.prompt_ids);
        assert_ne!(base.greedy_ids, lora.greedy_ids, "{:?}", base.prompt);
    }
}

// ---- Upstream's layouts (tools/fixtures/make_layouts.py; rules in shipped/LAYOUTS.md) ----

#[test]
fn an_export_with_logits_for_every_position_matches_eager() {
    assert_every_case_matches("full_logits");
}

#[test]
fn export_llms_prefill_and_decode_program_matches_eager() {
    // export_llm's `multimethod` recipe with share_mutable_buffers: two identical
    // dynamic-shape methods. (Upstream's runner gives wrong tokens here: it does not share
    // the memory arenas, so decode starts from an empty cache.)
    assert_every_case_matches("two_method");
}

#[test]
fn a_prefill_and_decode_program_sharing_its_cache_matches_eager() {
    let runner = Runner::open(
        shipped("two_method_static").join("model.pte"),
        tokenizer_path(),
        RunnerOptions::default(),
    )
    .unwrap();
    let methods = &runner.model_info().unwrap().methods;
    assert!(methods.contains_key("prefill") && methods.contains_key("decode"));
    assert!(!methods.contains_key("forward"));
    assert_every_case_matches("two_method_static");
}

#[test]
fn an_attention_sink_export_generates_past_its_context_as_upstream() {
    let reference = shipped_reference("attention_sink_sdpa");
    let mut runner = Runner::open(
        shipped("attention_sink_sdpa").join("model.pte"),
        tokenizer_path(),
        RunnerOptions::default(),
    )
    .unwrap();
    let context = runner.max_context().unwrap();
    for case in &reference.cases {
        runner.reset().unwrap();
        let (t, stats) = generate_ids(
            &mut runner,
            &case.prompt_ids,
            &greedy(case.greedy_ids.len() as i32),
        );
        assert_eq!(t.tokens, case.greedy_ids, "prompt {:?}", case.prompt);
        // The caller's limit ended it (it equals the context here), not the context.
        assert_eq!(stats.stop_reason, etllm::StopReason::Length);
        // Every token of the conversation (the last one is not fed yet).
        assert_eq!(
            runner.position(),
            case.prompt_ids.len() + case.greedy_ids.len()
        );
    }
    assert!(
        reference
            .cases
            .iter()
            .any(|c| c.prompt_ids.len() + c.greedy_ids.len() > context + 1),
        "no case goes past the context of {context}"
    );
}

#[test]
fn a_ring_buffer_conversation_rewinds_only_to_its_start() {
    let case = &shipped_reference("attention_sink_sdpa").cases[0];
    let mut runner = Runner::open(
        shipped("attention_sink_sdpa").join("model.pte"),
        tokenizer_path(),
        RunnerOptions::default(),
    )
    .unwrap();
    generate_ids(&mut runner, &case.prompt_ids, &greedy(8));
    let err = runner.rewind(2).unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
    runner.rewind(0).unwrap();
    assert_matches_reference(&mut runner, case);
}

#[test]
fn a_model_that_fails_past_its_context_ends_with_context_full_not_an_error() {
    // local_global has get_max_seq_len < get_max_context_len (so it runs as a ring
    // buffer, as upstream's runner would), but its global layer cannot go past the
    // context: the step there fails, and the generation ends as for any full context.
    let case = &shipped_reference("local_global_sdpa").cases[0];
    let mut runner = Runner::open(
        shipped("local_global_sdpa").join("model.pte"),
        tokenizer_path(),
        RunnerOptions::default(),
    )
    .unwrap();
    let context = runner.max_context().unwrap();
    let (t, stats) = generate_ids(&mut runner, &case.prompt_ids, &greedy(-1));
    assert_eq!(stats.stop_reason, etllm::StopReason::ContextFull);
    assert_eq!(&t.tokens[..case.greedy_ids.len()], &case.greedy_ids[..]);
    // The cache holds `context` positions; the last token, sampled from the logits of
    // the last position, could not be fed.
    assert_eq!(runner.position(), context + 1);
    let err = runner
        .generate_from_ids(
            &[5],
            &greedy(4),
            |_| std::ops::ControlFlow::Continue(()),
            |_| {},
        )
        .unwrap_err();
    assert!(matches!(err, Error::ContextFull { .. }), "{err}");
}

#[test]
fn local_global_attention_matches_eager_within_its_context() {
    assert_every_case_matches("local_global_sdpa");
}

#[test]
fn a_prefill_and_decode_program_without_a_shared_cache_is_refused() {
    // Exported without share_mutable_buffers: each method keeps its own KV cache, so decode
    // would start from an empty one (upstream's runner then gives wrong tokens silently).
    let err = Runner::open(
        fixtures_dir().join("corrupt/two_method_unshared.pte"),
        tokenizer_path(),
        RunnerOptions::default(),
    )
    .unwrap_err();
    assert!(matches!(err, Error::UnsupportedModel(_)), "{err}");
    assert!(err.to_string().contains("share mutable buffers"), "{err}");
}
