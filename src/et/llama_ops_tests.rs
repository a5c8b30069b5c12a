//! EtLlm's kernels for the `llama::` custom ops against plain eager-PyTorch math, op by op
//! (tests/fixtures/llama_ops: one method per op variant, cases written by
//! tools/fixtures/make_custom_ops.py).

use std::collections::HashSet;
use std::path::PathBuf;

use serde::Deserialize;

use super::{register_llama_ops, OpProvider, Program};
use crate::tensor::{TensorData, TensorView};

#[derive(Deserialize)]
struct Cases {
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    method: String,
    note: String,
    atol: f32,
    /// Compare only the first rows (dim 1) of each cache output: the rest of a cache was
    /// never written and holds whatever the runtime's memory plan left there.
    compare_rows: Option<usize>,
    inputs: Vec<Tensor>,
    outputs: Vec<Tensor>,
}

#[derive(Deserialize)]
struct Tensor {
    dtype: String,
    sizes: Vec<usize>,
    /// Elements; JSON has no infinity, so `null` stands for -inf (a masked-out score).
    data: Vec<Option<f64>>,
}

impl Tensor {
    fn values(&self) -> impl Iterator<Item = f64> + '_ {
        self.data.iter().map(|x| x.unwrap_or(f64::NEG_INFINITY))
    }
}

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/llama_ops")
        .join(name)
}

fn cases() -> Vec<Case> {
    let text = std::fs::read_to_string(fixture("cases.json")).unwrap();
    serde_json::from_str::<Cases>(&text).unwrap().cases
}

/// Indices (flattened) of the elements to compare in an output of `sizes`.
fn compared(case: &Case, sizes: &[usize]) -> Vec<usize> {
    let row: usize = sizes[2..].iter().product();
    let rows: Vec<usize> = if case.method == "update_cache_with_indices" {
        case.inputs[1].values().map(|r| r as usize).collect()
    } else {
        (0..case.compare_rows.unwrap_or(sizes[1]).min(sizes[1])).collect()
    };
    rows.iter().flat_map(|r| r * row..(r + 1) * row).collect()
}

/// Runs every case in order (calls of one method share its caches, as in a model) and
/// checks each output against the eager reference.
fn run_all_cases() -> HashSet<String> {
    let mut program = Program::load(&fixture("model.pte"), &[]).unwrap();
    let mut covered = HashSet::new();
    for case in cases() {
        let f32s: Vec<Vec<f32>> = case
            .inputs
            .iter()
            .map(|t| t.values().map(|x| x as f32).collect())
            .collect();
        let i64s: Vec<Vec<i64>> = case
            .inputs
            .iter()
            .map(|t| t.values().map(|x| x as i64).collect())
            .collect();
        let inputs: Vec<TensorView<'_>> = case
            .inputs
            .iter()
            .enumerate()
            .map(|(i, t)| TensorView {
                sizes: t.sizes.clone(),
                data: match t.dtype.as_str() {
                    "f32" => TensorData::F32(&f32s[i]),
                    "i64" => TensorData::I64(&i64s[i]),
                    other => panic!("dtype {other}"),
                },
            })
            .collect();
        let outputs = program
            .execute(&case.method, &inputs)
            .unwrap_or_else(|e| panic!("{} ({}): {e}", case.method, case.note));
        assert_eq!(outputs.len(), case.outputs.len(), "{}", case.method);
        for (k, (got, want)) in outputs.iter().zip(&case.outputs).enumerate() {
            assert_eq!(got.sizes, want.sizes, "{} output {k}", case.method);
            let got = got.as_f32().expect("f32 output");
            let want: Vec<f64> = want.values().collect();
            let worst = compared(&case, &case.outputs[k].sizes)
                .into_iter()
                .map(|i| (got[i] - want[i] as f32).abs())
                .fold(0f32, f32::max);
            assert!(
                worst <= case.atol.max(1e-6),
                "{} output {k} ({}): differs from eager PyTorch by {worst}",
                case.method,
                case.note
            );
        }
        covered.insert(case.method);
    }
    covered
}

#[test]
fn every_kernel_matches_eager_pytorch_on_every_op_variant() {
    let covered = run_all_cases();
    for method in [
        "sdpa_causal_gqa",
        "sdpa_noncausal_scale",
        "sdpa_causal_mha",
        "sdpa_causal_bf16",
        "sdpa_causal_f16",
        "sdpa_mask",
        "sdpa_with_kv_cache",
        "update_cache",
        "update_cache_with_indices",
    ] {
        assert!(covered.contains(method), "no case for {method}");
    }
}

#[test]
fn registering_again_keeps_the_registered_kernels_and_still_runs() {
    // Loading a program initialises the runtime, which registers EtLlm's kernels.
    Program::load(&fixture("model.pte"), &[]).unwrap();
    let again = register_llama_ops();
    let names: Vec<&str> = again.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "llama::custom_sdpa.out",
            "llama::update_cache.out",
            "llama::sdpa_with_kv_cache.out",
            "llama::update_cache_with_indices.out",
            "llama::custom_quantized_sdpa.out"
        ]
    );
    for (name, provider) in &again {
        assert_eq!(*provider, OpProvider::AlreadyRegistered, "{name}");
    }
    run_all_cases();
}
