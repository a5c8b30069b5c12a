//! Helpers shared by the integration tests: fixture paths, reference files, and a runner
//! that records what it streamed.

#![allow(dead_code)]

use std::ops::ControlFlow;
use std::path::PathBuf;

use etllm::{GenerationConfig, Runner, RunnerOptions, Stats, TokenPiece};
use serde::Deserialize;

/// Every exported fixture model; each folder holds `model.pte` and `reference.json`.
pub const FIXTURES: &[&str] = &[
    "dyn_xnnpack",
    "static_xnnpack",
    "dyn_portable",
    "no_kv_cache",
    "cache_positions",
    "sdpa_dyn_gqa",
    "sdpa_static_mha",
];

/// The fixtures exported with `use_sdpa_with_kv_cache` (upstream's `llama::` custom ops).
pub const CUSTOM_OP_FIXTURES: &[&str] = &["sdpa_dyn_gqa", "sdpa_static_mha"];

pub fn fixtures_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

pub fn model_path(fixture: &str) -> PathBuf {
    fixtures_dir().join(fixture).join("model.pte")
}

pub fn tokenizer_path() -> PathBuf {
    fixtures_dir().join("tokenizer.json")
}

#[derive(Debug, Deserialize)]
pub struct Reference {
    pub model: String,
    pub config: serde_json::Value,
    pub cases: Vec<Case>,
}

#[derive(Debug, Deserialize)]
pub struct Case {
    pub prompt: String,
    /// BOS followed by the prompt's tokens, as the reference tokenizer encodes them.
    pub prompt_ids: Vec<u32>,
    /// The eager-PyTorch greedy continuation, EOS ignored.
    pub greedy_ids: Vec<u32>,
    /// The ten largest first-step logits as (id, logit), largest first.
    #[serde(default)]
    pub first_logits_top: Vec<(u32, f32)>,
    /// Every first-step logit (after the prompt), rounded to 7 significant digits.
    #[serde(default)]
    pub first_logits: Vec<f32>,
    /// Index in `greedy_ids` of the first EOS, when there is one.
    #[serde(default)]
    pub greedy_first_eos_index: Option<usize>,
    /// The method that runs the steps, when the reference names one (`forward` otherwise).
    #[serde(default)]
    pub method: Option<String>,
    /// Data files (`.ptd`) the case needs, relative to the fixture folder.
    #[serde(default)]
    pub data_files: Vec<String>,
    /// Only in an f16 export's reference (`upstream_static_f16`, whose `greedy_ids` come
    /// from upstream's runtime): the eager-fp32 greedy continuation, a second reference a
    /// run may equal (see [`greedy_references`]).
    #[serde(default)]
    pub fp32_eager_greedy_ids: Option<Vec<u32>>,
}

pub fn reference(fixture: &str) -> Reference {
    read_reference(fixtures_dir().join(fixture).join("reference.json"))
}

/// The demo model that the `etllm` binary bundles as its default, with its own tokenizer
/// and eager-PyTorch reference (made by tools/train_demo/train.py).
pub fn demo_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/demo")
}

pub fn demo_tokenizer_path() -> PathBuf {
    demo_dir().join("tokenizer.json")
}

pub fn demo_reference() -> Reference {
    read_reference(demo_dir().join("reference.json"))
}

pub fn open_demo() -> Runner {
    Runner::open(
        demo_dir().join("model.pte"),
        demo_tokenizer_path(),
        RunnerOptions::default(),
    )
    .unwrap_or_else(|e| panic!("loading the demo model: {e}"))
}

fn read_reference(path: PathBuf) -> Reference {
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let reference: Reference =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    // The second reference is for f16 exports only (see `greedy_references`).
    let has_fp32_eager = reference
        .cases
        .iter()
        .any(|c| c.fp32_eager_greedy_ids.is_some());
    assert!(
        !has_fp32_eager || reference.config["dtype"] == "fp16",
        "{}: fp32_eager_greedy_ids in a reference that is not an fp16 export's",
        path.display()
    );
    reference
}

pub fn open(fixture: &str) -> Runner {
    Runner::open(
        model_path(fixture),
        tokenizer_path(),
        RunnerOptions::default(),
    )
    .unwrap_or_else(|e| panic!("loading {fixture}: {e}"))
}

/// Greedy, EOS ignored, no echo, no BOS added: the settings the references were made with
/// (their prompt ids already start with BOS).
pub fn greedy(max_new_tokens: i32) -> GenerationConfig {
    GenerationConfig {
        echo: false,
        temperature: 0.0,
        max_new_tokens,
        ignore_eos: true,
        num_bos: 0,
        ..Default::default()
    }
}

/// What one generation streamed.
#[derive(Debug, Default)]
pub struct Transcript {
    pub tokens: Vec<u32>,
    pub text: String,
    pub pieces: Vec<(Option<u32>, String)>,
}

fn recorder(t: &mut Transcript) -> impl FnMut(TokenPiece<'_>) -> ControlFlow<()> + '_ {
    |piece| {
        if let Some(id) = piece.token {
            t.tokens.push(id);
        }
        t.text.push_str(piece.text);
        t.pieces.push((piece.token, piece.text.to_string()));
        ControlFlow::Continue(())
    }
}

pub fn generate_ids(
    runner: &mut Runner,
    ids: &[u32],
    config: &GenerationConfig,
) -> (Transcript, Stats) {
    let mut t = Transcript::default();
    let stats = runner
        .generate_from_ids(ids, config, recorder(&mut t), |_| {})
        .expect("generate_from_ids");
    (t, stats)
}

pub fn generate_text(
    runner: &mut Runner,
    prompt: &str,
    config: &GenerationConfig,
) -> (Transcript, Stats) {
    let mut t = Transcript::default();
    let stats = runner
        .generate(prompt, config, recorder(&mut t), |_| {})
        .expect("generate");
    (t, stats)
}

/// The greedy continuations of `case` that a correct run may reproduce, named after their
/// field in reference.json: always `greedy_ids`; for an f16 export whose reference also
/// carries `fp32_eager_greedy_ids`, that one too.
///
/// Why two for f16: that fixture's `greedy_ids` come from upstream's runtime (pybindings,
/// XNNPACK) on the machine that made it. XNNPACK chooses its f16 microkernels by CPU: where
/// the CPU has native f16 arithmetic the export computes in f16; on CPUs without it (e.g.
/// x86 without AVX512-FP16) it computes like fp32, and its greedy tokens then equal eager
/// fp32's. Where a step's top-2 margin is within f16 rounding (7.8e-3 for "The quick brown
/// fox") the two diverge. EtLlm links the same XNNPACK, so upstream's runtime would give
/// the same tokens as EtLlm on the same CPU. Both outside references are accepted; a runner
/// bug matches neither. Every other fixture has the single reference, compared exactly.
pub fn greedy_references(case: &Case) -> Vec<(&'static str, &[u32])> {
    let mut refs = vec![("greedy_ids", case.greedy_ids.as_slice())];
    if let Some(ids) = &case.fp32_eager_greedy_ids {
        refs.push(("fp32_eager_greedy_ids", ids.as_slice()));
    }
    refs
}

/// Asserts that every run `(case, n, tokens)` generated exactly the first `n` tokens of one
/// and the same reference of [`greedy_references`] (the same one for all runs: they come
/// from one machine). With a single reference this is plain equality. `what` names the
/// comparison in the failure message.
pub fn assert_runs_match_one_reference(what: &str, runs: &[(&Case, usize, &[u32])]) {
    let names: Vec<&str> = runs
        .first()
        .map(|(case, _, _)| {
            greedy_references(case)
                .into_iter()
                .map(|(name, _)| name)
                .collect()
        })
        .unwrap_or_default();
    let equals = |name: &str, (case, n, tokens): &(&Case, usize, &[u32])| {
        greedy_references(case)
            .into_iter()
            .find(|(k, _)| *k == name)
            .and_then(|(_, ids)| ids.get(..*n))
            .is_some_and(|want| want == *tokens)
    };
    if names
        .iter()
        .any(|name| runs.iter().all(|run| equals(name, run)))
    {
        return;
    }
    let mut msg = format!("{what}: no reference (the same for every run) equals the tokens:");
    for (case, n, tokens) in runs {
        msg.push_str(&format!("\n  prompt {:?}: got {tokens:?}", case.prompt));
        for (name, ids) in greedy_references(case) {
            msg.push_str(&format!(
                "\n    {name}[..{n}]: {:?}",
                &ids[..(*n).min(ids.len())]
            ));
        }
    }
    panic!("{msg}");
}

/// Greedy generation from `case`'s prompt ids reproduces its reference continuation (see
/// [`greedy_references`]).
pub fn assert_matches_reference(runner: &mut Runner, case: &Case) {
    let n = case.greedy_ids.len();
    let (t, _) = generate_ids(runner, &case.prompt_ids, &greedy(n as i32));
    assert_runs_match_one_reference("greedy generation", &[(case, n, &t.tokens)]);
}

/// Runs `cmd` and returns its output; fails the test, showing its stderr, unless it exits 0.
pub fn output_ok(cmd: &mut std::process::Command) -> std::process::Output {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs `cmd` with `input` on its stdin; returns its output.
pub fn output_with_stdin(cmd: &mut std::process::Command, input: &str) -> std::process::Output {
    use std::io::Write;
    use std::process::Stdio;
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

/// The JSON lines a successful command printed on stdout.
pub fn json_lines(out: std::process::Output) -> Vec<serde_json::Value> {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect()
}

/// A chat template short enough for the fixture models' 128-token context.
pub const COMPACT_TEMPLATE: &str =
    "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}\
     {% if add_generation_prompt %}<assistant>{% endif %}";

/// [`COMPACT_TEMPLATE`] written to `path`, which is returned.
pub fn write_compact_template(path: PathBuf) -> PathBuf {
    std::fs::write(&path, COMPACT_TEMPLATE).unwrap();
    path
}

/// Records the logits of every sampling step.
pub struct Record(pub std::sync::Arc<std::sync::Mutex<Vec<Vec<f32>>>>);

impl etllm::sampler::SamplerPlugin for Record {
    fn apply(&mut self, logits: &mut [f32], _: &[u32]) -> etllm::Result<Option<u32>> {
        self.0.lock().unwrap().push(logits.to_vec());
        Ok(None)
    }
}

/// The logits the runner samples its first token from, after a reset and `prompt_ids`
/// (the runner's sampler plugin is replaced, then removed).
pub fn first_step_logits(runner: &mut Runner, prompt_ids: &[u32]) -> Vec<f32> {
    let steps = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    runner.set_sampler_plugin(Some(Box::new(Record(steps.clone()))));
    runner.reset().unwrap();
    generate_ids(runner, prompt_ids, &greedy(1));
    runner.set_sampler_plugin(None);
    let mut steps = steps.lock().unwrap();
    assert_eq!(steps.len(), 1, "one sampling step");
    steps.pop().unwrap()
}

/// The largest absolute difference between two equally long logit vectors.
pub fn max_abs_diff(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len(), "logit counts differ");
    got.iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max)
}

/// The formats of `tests/fixtures/tokenizers/reference.json`.
pub const TOKENIZER_FORMATS: [&str; 5] = [
    "sentencepiece_bpe",
    "sentencepiece_unigram",
    "llama2c",
    "tiktoken",
    "hf",
];

/// `tests/fixtures/tokenizers/`.
pub fn tokenizers_dir() -> PathBuf {
    fixtures_dir().join("tokenizers")
}

/// One format's entry of `tests/fixtures/tokenizers/reference.json`, read as `T`.
pub fn tokenizer_reference<T: serde::de::DeserializeOwned>(format: &str) -> T {
    let text = std::fs::read_to_string(tokenizers_dir().join("reference.json")).unwrap();
    let mut all: serde_json::Map<String, serde_json::Value> = serde_json::from_str(&text).unwrap();
    serde_json::from_value(all.remove(format).unwrap()).unwrap()
}

/// The tokenizer of a format of `reference.json`, from its `file`: an HF tokenizer is
/// loaded as its folder, to read `tokenizer_config.json` too.
pub fn load_tokenizer_fixture(format: &str, file: &str) -> etllm::Tokenizer {
    let path = tokenizers_dir().join(file);
    let path = if format == "hf" {
        path.parent().unwrap().to_path_buf()
    } else {
        path
    };
    etllm::Tokenizer::from_file(&path).unwrap_or_else(|e| panic!("{format}: {e}"))
}
