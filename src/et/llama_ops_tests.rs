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

/// A case's inputs converted once to each element type they may have, for views.
struct InputBuffers {
    f32s: Vec<Vec<f32>>,
    i64s: Vec<Vec<i64>>,
    i32s: Vec<Vec<i32>>,
}

impl InputBuffers {
    fn new(inputs: &[Tensor]) -> Self {
        Self {
            f32s: inputs
                .iter()
                .map(|t| t.values().map(|x| x as f32).collect())
                .collect(),
            i64s: inputs
                .iter()
                .map(|t| t.values().map(|x| x as i64).collect())
                .collect(),
            i32s: inputs
                .iter()
                .map(|t| t.values().map(|x| x as i32).collect())
                .collect(),
        }
    }

    /// One view per input, in the element type it declares.
    fn views(&self, inputs: &[Tensor]) -> Vec<TensorView<'_>> {
        inputs
            .iter()
            .enumerate()
            .map(|(i, t)| TensorView {
                sizes: t.sizes.clone(),
                data: match t.dtype.as_str() {
                    "f32" => TensorData::F32(&self.f32s[i]),
                    "i64" => TensorData::I64(&self.i64s[i]),
                    "i32" => TensorData::I32(&self.i32s[i]),
                    other => panic!("dtype {other}"),
                },
            })
            .collect()
    }
}

/// Runs every case in order (calls of one method share its caches, as in a model) and
/// checks each output against the eager reference.
fn run_all_cases() -> HashSet<String> {
    let mut program = Program::load(&fixture("model.pte"), &[], |_| false).unwrap();
    let mut covered = HashSet::new();
    for case in cases() {
        let buffers = InputBuffers::new(&case.inputs);
        let inputs = buffers.views(&case.inputs);
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
    Program::load(&fixture("model.pte"), &[], |_| false).unwrap();
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

// ---------------------------------------------------------------------------------------
// `llama::custom_quantized_sdpa` and `update_cache` on int8 caches (tests/fixtures/
// llama_ops_kv8, written by tools/fixtures/make_quantized_sdpa.py). Each case holds the
// outputs of upstream's own kernels (the pybindings with libcustom_ops_aot_lib) and of
// plain eager math (dequantize, then float64 attention) for the same int8 inputs.
//
// Tolerance: the case's `atol`, 1e-5. Outputs are O(1) (per-token quantized randn, head
// dim 16, at most 16 keys); EtLlm dequantizes and attends in float, upstream forms exact
// int32 dot products times the two scales, so the two differ by float rounding only (the
// script saw upstream within 4.8e-7 of eager). Real errors are far larger: a zero point
// or scale of the wrong row moves an output by a quantum (about 1e-2), one key too many
// or too few by about |v| / keys (1e-1).

#[derive(Deserialize)]
struct Kv8Cases {
    cases: Vec<Kv8Case>,
}

#[derive(Deserialize)]
struct Kv8Case {
    method: String,
    note: String,
    atol: f32,
    /// When set, the expected outputs hold only these first rows (dim 1) of each cache
    /// output: the rest of a cache was never written.
    compare_rows: Option<usize>,
    inputs: Vec<Tensor>,
    upstream_outputs: Vec<Tensor>,
    eager_outputs: Vec<Tensor>,
}

fn kv8_cases() -> Vec<Kv8Case> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama_ops_kv8");
    let text = std::fs::read_to_string(path.join("cases.json")).unwrap();
    serde_json::from_str::<Kv8Cases>(&text).unwrap().cases
}

/// An output of EtLlm's kernels: sizes and elements.
type Output = (Vec<usize>, Vec<f32>);

/// Runs every int8 case in order (calls of one method share its caches) and returns each
/// case with EtLlm's outputs.
fn run_kv8_cases() -> Vec<(Kv8Case, Vec<Output>)> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama_ops_kv8");
    let mut program = Program::load(&path.join("model.pte"), &[], |_| false).unwrap();
    let mut results = Vec::new();
    for case in kv8_cases() {
        let buffers = InputBuffers::new(&case.inputs);
        let inputs = buffers.views(&case.inputs);
        let outputs: Vec<Output> = program
            .execute(&case.method, &inputs)
            .unwrap_or_else(|e| panic!("{} ({}): {e}", case.method, case.note))
            .iter()
            .map(|got| {
                (
                    got.sizes.clone(),
                    got.as_f32().expect("f32 output").to_vec(),
                )
            })
            .collect();
        assert_eq!(
            outputs.len(),
            case.upstream_outputs.len(),
            "{}",
            case.method
        );
        results.push((case, outputs));
    }
    results
}

/// The largest difference between `got` and `want` (NaN if any element differs by NaN).
/// With `compare_rows`, `want` holds the first rows (dim 1) of `got` only.
fn kv8_worst(case: &Kv8Case, got: &Output, want: &Tensor) -> f32 {
    let (sizes, got) = got;
    let what = format!("{} ({})", case.method, case.note);
    assert_eq!(sizes.len(), want.sizes.len(), "{what}");
    assert_eq!(sizes[0], want.sizes[0], "{what}");
    assert_eq!(sizes[2..], want.sizes[2..], "{what}");
    match case.compare_rows {
        Some(rows) => assert!(want.sizes[1] == rows && rows <= sizes[1], "{what}"),
        None => assert_eq!(sizes[1], want.sizes[1], "{what}"),
    }
    let row: usize = want.sizes[2..].iter().product();
    let (want_batch, got_batch) = (want.sizes[1] * row, sizes[1] * row);
    want.values()
        .enumerate()
        .map(|(n, w)| (got[n / want_batch * got_batch + n % want_batch] - w as f32).abs())
        .fold(0f32, |a, b| {
            if b.is_nan() || a.is_nan() {
                f32::NAN
            } else {
                a.max(b)
            }
        })
}

const KV8_METHODS: [&str; 8] = [
    "qsdpa_prefill_gqa",
    "qsdpa_decode_gqa",
    "qsdpa_prefill_mha",
    "qsdpa_decode_mha",
    "qsdpa_noncausal_scale",
    "qsdpa_mask",
    "qsdpa_seq_at_dim_2",
    "update_cache_kv8",
];

#[test]
fn quantized_sdpa_and_int8_cache_updates_match_upstreams_kernels() {
    let mut covered = HashSet::new();
    for (case, outputs) in run_kv8_cases() {
        for (k, (got, want)) in outputs.iter().zip(&case.upstream_outputs).enumerate() {
            let worst = kv8_worst(&case, got, want);
            assert!(
                worst <= case.atol,
                "{} output {k} ({}): differs from upstream's kernel by {worst}",
                case.method,
                case.note
            );
        }
        covered.insert(case.method);
    }
    for method in KV8_METHODS {
        assert!(covered.contains(method), "no case for {method}");
    }
}

#[test]
fn quantized_sdpa_matches_eager_dequantize_then_attend() {
    let mut compared = 0;
    for (case, outputs) in run_kv8_cases() {
        for (k, (got, want)) in outputs.iter().zip(&case.eager_outputs).enumerate() {
            let worst = kv8_worst(&case, got, want);
            assert!(
                worst <= case.atol,
                "{} output {k} ({}): differs from eager dequantize-then-attend by {worst}",
                case.method,
                case.note
            );
            compared += 1;
        }
    }
    assert!(compared >= KV8_METHODS.len(), "{compared} outputs compared");
}

#[test]
fn start_pos_selects_the_keys_of_int8_decode_and_prefill() {
    // The same method at three start positions gives three different outputs, each the
    // expected one: start_pos is read at run time, not baked in.
    let mut seen: Vec<(String, usize)> = Vec::new();
    for (case, outputs) in run_kv8_cases() {
        if !case.method.starts_with("qsdpa_prefill") && !case.method.starts_with("qsdpa_decode") {
            continue;
        }
        let start_pos = case.inputs.last().unwrap().values().next().unwrap() as usize;
        let worst = kv8_worst(&case, &outputs[0], &case.upstream_outputs[0]);
        assert!(
            worst <= case.atol,
            "{} ({}): {worst}",
            case.method,
            case.note
        );
        seen.push((case.method.clone(), start_pos));
    }
    for method in [
        "qsdpa_prefill_gqa",
        "qsdpa_prefill_mha",
        "qsdpa_decode_gqa",
        "qsdpa_decode_mha",
    ] {
        let positions: Vec<usize> = seen
            .iter()
            .filter(|(m, _)| m == method)
            .map(|&(_, p)| p)
            .collect();
        assert!(positions.contains(&0), "{method}: no case at start_pos 0");
        assert!(
            positions.iter().any(|&p| p > 0),
            "{method}: no case at start_pos > 0"
        );
    }
}
