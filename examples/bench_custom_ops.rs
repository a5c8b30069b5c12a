//! Custom-op benchmark: decode speed of a model exported with `use_sdpa_with_kv_cache`
//! (upstream's `llama::custom_sdpa` / `llama::update_cache`, run by EtLlm's kernels)
//! against the same weights exported without custom ops, in the same process.
//!
//! ```text
//! cargo run --release --example bench_custom_ops -- --baseline PLAIN.pte \
//!     --custom CUSTOM_OPS.pte --tokenizer T.json [--prompt-tokens 16] [--tokens 480] \
//!     [--runs 5] [--threads 1]
//! ```
//!
//! Each run opens a fresh runner for each model (in alternating order) and decodes
//! greedily from the same prompt ids, EOS ignored. Reports, as medians over the runs, the
//! decode tokens/s of each, and the ratio custom / baseline; also, as a check that the two
//! exports hold the same weights, the largest difference of their first-step logits and
//! how many of the decoded tokens agree.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use clap::Parser;
use etllm::sampler::SamplerPlugin;
use etllm::{GenerationConfig, Runner, RunnerOptions};

#[derive(Parser)]
struct Args {
    /// The model exported without custom ops.
    #[arg(long)]
    baseline: PathBuf,
    /// The same weights exported with `use_sdpa_with_kv_cache`.
    #[arg(long)]
    custom: PathBuf,
    #[arg(long)]
    tokenizer: PathBuf,
    /// Prompt length in tokens (BOS, then ids 3, 4, ...).
    #[arg(long, default_value_t = 16)]
    prompt_tokens: usize,
    /// Tokens to decode per run.
    #[arg(long, default_value_t = 480)]
    tokens: usize,
    #[arg(long, default_value_t = 5)]
    runs: usize,
    #[arg(long, default_value_t = 1)]
    threads: usize,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// Keeps the first step's logits.
struct FirstLogits(Arc<Mutex<Option<Vec<f32>>>>);

impl SamplerPlugin for FirstLogits {
    fn apply(&mut self, logits: &mut [f32], _: &[u32]) -> etllm::Result<Option<u32>> {
        self.0
            .lock()
            .unwrap()
            .get_or_insert_with(|| logits.to_vec());
        Ok(None)
    }
}

struct Run {
    tokens: Vec<u32>,
    decode_tokens_per_second: f64,
    first_logits: Vec<f32>,
}

fn decode(model: &Path, args: &Args, prompt: &[u32]) -> Result<Run, Box<dyn std::error::Error>> {
    let mut runner = Runner::open(model, &args.tokenizer, RunnerOptions::default())?;
    let first = Arc::new(Mutex::new(None));
    runner.set_sampler_plugin(Some(Box::new(FirstLogits(first.clone()))));
    runner.warmup()?;
    let config = GenerationConfig {
        echo: false,
        temperature: 0.0,
        max_new_tokens: args.tokens as i32,
        ignore_eos: true,
        num_bos: 0,
        ..Default::default()
    };
    let mut tokens = Vec::with_capacity(args.tokens);
    let stats = runner.generate_from_ids(
        prompt,
        &config,
        |piece| {
            tokens.extend(piece.token);
            std::ops::ControlFlow::Continue(())
        },
        |_| {},
    )?;
    let first_logits = first.lock().unwrap().take().unwrap_or_default();
    Ok(Run {
        tokens,
        decode_tokens_per_second: stats.decode_tokens_per_second(),
        first_logits,
    })
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    etllm::set_num_threads(args.threads)?;
    let bos = Runner::open(&args.custom, &args.tokenizer, RunnerOptions::default())?
        .metadata()
        .and_then(|m| m.bos_id)
        .unwrap_or(1);
    let prompt: Vec<u32> = std::iter::once(bos)
        .chain((3..).take(args.prompt_tokens.saturating_sub(1)))
        .collect();
    let (mut base_rates, mut custom_rates) = (Vec::new(), Vec::new());
    let (mut worst_logit, mut agree) = (0f32, usize::MAX);
    for run in 0..args.runs {
        let (base, custom) = if run % 2 == 0 {
            let b = decode(&args.baseline, &args, &prompt)?;
            (b, decode(&args.custom, &args, &prompt)?)
        } else {
            let c = decode(&args.custom, &args, &prompt)?;
            (decode(&args.baseline, &args, &prompt)?, c)
        };
        worst_logit = base
            .first_logits
            .iter()
            .zip(&custom.first_logits)
            .map(|(a, b)| (a - b).abs())
            .fold(worst_logit, f32::max);
        let same = base
            .tokens
            .iter()
            .zip(&custom.tokens)
            .take_while(|(a, b)| a == b)
            .count();
        agree = agree.min(same);
        eprintln!(
            "run {run}: baseline {:.1} tok/s, custom ops {:.1} tok/s",
            base.decode_tokens_per_second, custom.decode_tokens_per_second
        );
        base_rates.push(base.decode_tokens_per_second);
        custom_rates.push(custom.decode_tokens_per_second);
    }
    let (b, c) = (median(base_rates), median(custom_rates));
    println!(
        "prompt {} tokens, {} decoded, {} runs, {} thread(s)",
        args.prompt_tokens, args.tokens, args.runs, args.threads
    );
    println!("baseline (no custom ops)  decode {b:.1} tok/s (median)");
    println!("custom ops (EtLlm kernels) decode {c:.1} tok/s (median)");
    println!("ratio custom / baseline    {:.3}", c / b);
    println!(
        "same weights: first-step logits differ by at most {worst_logit:.2e}; \
         the first {agree} of {} greedy tokens agree in every run",
        args.tokens
    );
    Ok(())
}
