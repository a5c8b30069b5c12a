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
//! - decode tokens/s without and with the JSON-schema constraint, as medians over
//!   `--runs` runs that alternate (greedy, EOS ignored, the same prompt), and their ratio;
//! - the mask cost per token: the tokens of a greedy and of a sampled constrained run are
//!   replayed through a fresh constraint, timing the computation of the allowed-token set
//!   at each step (median, p99, max), plus the cost of applying it to a vocabulary-sized
//!   logits vector, and the share of steps where only one token is allowed (forced tokens,
//!   which the runner takes without sampling).

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

/// Per-step mask times (µs) of replaying `tokens`, the apply time (µs) per step, and how
/// many steps allowed one token only.
fn replay(runner: &mut Runner, schema: &str, tokens: &[u32]) -> (Vec<f64>, Vec<f64>, usize) {
    let vocab = runner.vocab_size().expect("loaded");
    let compiler = runner.grammar_compiler().expect("compiler");
    let mut c = compiler
        .compile(GrammarType::JsonSchema, schema)
        .expect("schema");
    let logits: Vec<f32> = (0..vocab).map(|i| (i % 97) as f32 * 0.01).collect();
    let mut out = Vec::with_capacity(vocab);
    let (mut mask_us, mut apply_us, mut forced) = (Vec::new(), Vec::new(), 0);
    for &t in tokens {
        let t0 = Instant::now();
        let n = c.num_allowed().expect("mask");
        mask_us.push(t0.elapsed().as_secs_f64() * 1e6);
        forced += usize::from(n == 1);
        let t1 = Instant::now();
        c.apply(&logits, &mut out).expect("apply");
        apply_us.push(t1.elapsed().as_secs_f64() * 1e6);
        assert!(
            c.allows(t).expect("mask"),
            "token {t} replayed out of grammar"
        );
        c.commit(t).expect("commit");
    }
    (mask_us, apply_us, forced)
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
    let (mut plain_rates, mut json_rates, mut json_tokens) = (Vec::new(), Vec::new(), Vec::new());
    let mut greedy_tokens = Vec::new();
    for _ in 0..args.runs {
        let (_, s) = generate(&mut runner, &plain);
        plain_rates.push(decode_rate(&s));
        let (ids, s) = generate(&mut runner, &constrained);
        json_rates.push(decode_rate(&s));
        json_tokens.push(s.num_generated_tokens as f64);
        greedy_tokens = ids;
    }
    let sampled = GenerationConfig {
        temperature: 1.0,
        seed: Some(1),
        ..constrained.clone()
    };
    let (sampled_tokens, _) = generate(&mut runner, &sampled);

    let (mut mask_us, mut apply_us, mut forced) = (Vec::new(), Vec::new(), 0);
    for tokens in [&greedy_tokens, &sampled_tokens] {
        let (m, a, f) = replay(&mut runner, &schema, tokens);
        mask_us.extend(m);
        apply_us.extend(a);
        forced += f;
    }
    let steps = mask_us.len();
    let (p, j) = (median(&plain_rates), median(&json_rates));
    println!(
        "| model | vocab | compiler build ms | schema compile ms | decode tok/s plain | \
         decode tok/s json | ratio | mask µs median | mask µs p99 | mask µs max | \
         apply µs median | forced steps |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    println!(
        "| {} | {vocab} | {build_ms:.0} | {compile_ms:.1} | {p:.1} | {j:.1} | {:.3} | {:.1} | \
         {:.1} | {:.1} | {:.1} | {forced}/{steps} ({:.0}%) |",
        args.model.display(),
        j / p,
        median(&mask_us),
        percentile(&mask_us, 0.99),
        percentile(&mask_us, 1.0),
        median(&apply_us),
        100.0 * forced as f64 / steps as f64
    );
    eprintln!(
        "runs {}, {} tokens each (constrained runs made {} median), {} replayed steps",
        args.runs,
        args.tokens,
        median(&json_tokens),
        steps
    );
}
