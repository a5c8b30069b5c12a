//! Constrained-decoding benchmark: the grammar's cost per token and what it does to decode
//! speed, on one model and tokenizer.
//!
//! ```text
//! cargo run --release --example bench_grammar -- --model M.pte --tokenizer T \
//!     [--schema schema.json] [--tokens 128] [--runs 5] [--threads 1]
//! ```
//!
//! Reports:
//! - the one-time costs: building the vocabulary's grammar compiler (token bytes and the
//!   token trie; paid by a runner's first constrained call) and compiling the schema
//!   (paid by every constrained call);
//! - decode tokens/s without the constraint, with it, and with it and fast-forward (forced
//!   text fed in one model step), as medians over `--runs` runs that alternate (greedy,
//!   EOS ignored, the same prompt), and the ratios to the unconstrained rate;
//! - the mask cost per token: the tokens of a greedy and of a sampled constrained run
//!   (without fast-forward, so that every token was chosen through a mask) are
//!   replayed through a fresh constraint, timing the computation of the allowed-token set
//!   at each step (median, p99, max), plus the cost of applying it to a vocabulary-sized
//!   logits vector, and the share of steps where only one token is allowed (forced tokens,
//!   which the runner takes without sampling), and the share of the output's bytes the
//!   grammar forced (what feeding forced text without model steps could skip at most).

use std::ops::ControlFlow;
use std::path::PathBuf;
use std::time::Instant;

use clap::Parser;
use etllm::{GenerationConfig, GrammarType, Runner, RunnerOptions, Stats};

#[derive(Parser)]
struct Args {
    #[arg(long)]
    model: PathBuf,
    #[arg(long)]
    tokenizer: PathBuf,
    /// The JSON schema; default: an array of at least 40 records (a string, an integer, an
    /// enum and a bounded array each), long enough that the output never completes within
    /// `--tokens`.
    #[arg(long)]
    schema: Option<PathBuf>,
    /// Tokens to decode per run.
    #[arg(long, default_value_t = 128)]
    tokens: i32,
    #[arg(long, default_value_t = 5)]
    runs: usize,
    #[arg(long, default_value_t = 1)]
    threads: usize,
}

const DEFAULT_SCHEMA: &str = r#"{
  "type": "array",
  "minItems": 40,
  "items": {
    "type": "object",
    "properties": {
      "name": {"type": "string", "maxLength": 12},
      "age": {"type": "integer", "minimum": 0, "maximum": 120},
      "role": {"enum": ["admin", "editor", "viewer"]},
      "scores": {"type": "array", "items": {"type": "number"}, "maxItems": 3}
    },
    "required": ["name", "age", "role"],
    "additionalProperties": false
  }
}"#;

const PROMPT: &str = "Once upon a time, there was a little girl named Lily.";

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn percentile(v: &[f64], p: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i]
}

/// Decode tokens/s of a run (tokens after the first over the time after the first).
fn decode_rate(s: &Stats) -> f64 {
    let span = s.inference_end_us.saturating_sub(s.first_token_us) as f64;
    (s.num_generated_tokens.saturating_sub(1)) as f64 * 1e6 / span.max(1.0)
}

fn generate(runner: &mut Runner, config: &GenerationConfig) -> (Vec<u32>, Stats) {
    runner.reset().expect("reset");
    let mut ids = Vec::new();
    let stats = runner
        .generate(
            PROMPT,
            config,
            |p| {
                ids.extend(p.token);
                ControlFlow::Continue(())
            },
            |_| {},
        )
        .expect("generate");
    (ids, stats)
}

/// What replaying one run measured.
#[derive(Default)]
struct Replay {
    /// Per-step mask computation, µs.
    mask_us: Vec<f64>,
    /// Per-step masking of a logits vector, µs.
    apply_us: Vec<f64>,
    /// Steps where one token only was allowed.
    forced_steps: usize,
    /// Steps that began with at least one byte the grammar forces.
    steps_with_forced_bytes: usize,
    /// Steps whose token lay inside text the grammar had forced.
    steps_inside_forced: usize,
    /// Bytes of the output, and how many of them the grammar forced.
    bytes: usize,
    forced_bytes: usize,
}

/// Replays `tokens` through a fresh constraint, timing each step.
fn replay(runner: &mut Runner, schema: &str, tokens: &[u32], r: &mut Replay) {
    let vocab = runner.vocab_size().expect("loaded");
    let tokenizer_bytes = runner.tokenizer().unwrap().token_bytes().unwrap();
    let compiler = runner.grammar_compiler().expect("compiler");
    let mut c = compiler
        .compile(GrammarType::JsonSchema, schema)
        .expect("schema");
    let logits: Vec<f32> = (0..vocab).map(|i| (i % 97) as f32 * 0.01).collect();
    let mut out = Vec::with_capacity(vocab);
    // Forced bytes not yet covered by the tokens consumed since they were forced.
    let mut pending_forced = 0usize;
    for &t in tokens {
        if pending_forced == 0 {
            let f = c.forced_bytes().len();
            r.steps_with_forced_bytes += usize::from(f > 0);
            pending_forced = f;
            r.forced_bytes += f;
        }
        let t0 = Instant::now();
        let n = c.num_allowed().expect("mask");
        r.mask_us.push(t0.elapsed().as_secs_f64() * 1e6);
        r.forced_steps += usize::from(n == 1);
        let t1 = Instant::now();
        c.apply(&logits, &mut out).expect("apply");
        r.apply_us.push(t1.elapsed().as_secs_f64() * 1e6);
        assert!(
            c.allows(t).expect("mask"),
            "token {t} replayed out of grammar"
        );
        c.commit(t).expect("commit");
        let len = match tokenizer_bytes.get(t as usize) {
            Some(etllm::tokenizer::TokenBytes::Text(b)) => b.len(),
            _ => 0,
        };
        r.bytes += len;
        r.steps_inside_forced += usize::from(pending_forced > 0);
        pending_forced = pending_forced.saturating_sub(len);
    }
}

fn main() {
    let args = Args::parse();
    let schema = match &args.schema {
        Some(p) => std::fs::read_to_string(p).expect("schema file"),
        None => DEFAULT_SCHEMA.to_string(),
    };
    let options = RunnerOptions {
        num_threads: Some(args.threads),
        ..Default::default()
    };
    let mut runner = Runner::open(&args.model, &args.tokenizer, options).expect("open");
    runner.warmup().expect("warmup");
    let vocab = runner.vocab_size().unwrap();

    let t0 = Instant::now();
    runner.grammar_compiler().expect("compiler");
    let build_ms = t0.elapsed().as_secs_f64() * 1e3;
    let t0 = Instant::now();
    runner
        .grammar_compiler()
        .unwrap()
        .compile(GrammarType::JsonSchema, &schema)
        .expect("schema");
    let compile_ms = t0.elapsed().as_secs_f64() * 1e3;

    let plain = GenerationConfig {
        echo: false,
        temperature: 0.0,
        max_new_tokens: args.tokens,
        ignore_eos: true,
        num_bos: 1,
        ..Default::default()
    };
    let constrained = GenerationConfig {
        grammar: schema.clone(),
        grammar_type: GrammarType::JsonSchema,
        ..plain.clone()
    };
    let no_ff = GenerationConfig {
        grammar_fast_forward: false,
        ..constrained.clone()
    };
    let (mut plain_rates, mut json_rates, mut json_tokens) = (Vec::new(), Vec::new(), Vec::new());
    let mut no_ff_rates = Vec::new();
    let mut greedy_tokens = Vec::new();
    for _ in 0..args.runs {
        let (_, s) = generate(&mut runner, &plain);
        plain_rates.push(decode_rate(&s));
        let (ids, s) = generate(&mut runner, &no_ff);
        no_ff_rates.push(decode_rate(&s));
        json_tokens.push(s.num_generated_tokens as f64);
        greedy_tokens = ids;
        let (_, s) = generate(&mut runner, &constrained);
        json_rates.push(decode_rate(&s));
    }
    let sampled = GenerationConfig {
        temperature: 1.0,
        seed: Some(1),
        ..no_ff.clone()
    };
    let (sampled_tokens, _) = generate(&mut runner, &sampled);

    let mut r = Replay::default();
    for tokens in [&greedy_tokens, &sampled_tokens] {
        replay(&mut runner, &schema, tokens, &mut r);
    }
    let (mask_us, apply_us, forced) = (&r.mask_us, &r.apply_us, r.forced_steps);
    let steps = mask_us.len();
    let (p, n, j) = (
        median(&plain_rates),
        median(&no_ff_rates),
        median(&json_rates),
    );
    println!(
        "| model | vocab | compiler build ms | schema compile ms | decode tok/s plain | \
         json, no fast-forward | ratio | json, fast-forward | ratio | mask µs median | \
         mask µs mean | mask µs p99 | mask µs max | apply µs median | single-token steps |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    println!(
        "| {} | {vocab} | {build_ms:.0} | {compile_ms:.1} | {p:.1} | {n:.1} | {:.3} | {j:.1} | \
         {:.3} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {forced}/{steps} ({:.0}%) |",
        args.model.display(),
        n / p,
        j / p,
        median(mask_us),
        mask_us.iter().sum::<f64>() / steps as f64,
        percentile(mask_us, 0.99),
        percentile(mask_us, 1.0),
        median(apply_us),
        100.0 * forced as f64 / steps as f64
    );
    eprintln!(
        "runs {}, {} tokens each (constrained runs made {} median), {} replayed steps",
        args.runs,
        args.tokens,
        median(&json_tokens),
        steps
    );
    println!(
        "forced by the grammar: {} of {} output bytes ({:.0}%), in {} runs covering {} of {} \
         steps ({:.0}%)",
        r.forced_bytes,
        r.bytes,
        100.0 * r.forced_bytes as f64 / r.bytes.max(1) as f64,
        r.steps_with_forced_bytes,
        r.steps_inside_forced,
        steps,
        100.0 * r.steps_inside_forced as f64 / steps as f64
    );
}
