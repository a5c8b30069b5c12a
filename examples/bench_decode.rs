//! Decode benchmark: EtLlm's runner against a raw forward loop on the same model, in the
//! same process, alternating runs.
//!
//! ```text
//! cargo run --release --example bench_decode -- --model M.pte --tokenizer T.json \
//!     [--prompt-tokens 16] [--tokens 100] [--runs 5] [--threads 1]
//! ```
//!
//! Reports, as medians over the runs: EtLlm's decode tokens/s, the raw loop's decode
//! tokens/s (the `executorch` crate's `Module::forward` plus argmax, nothing else), their
//! ratio, and the share of EtLlm's generation wall time spent inside the model's forward
//! calls (the rest is runner overhead: tokenizer, sampling, streaming, bookkeeping). Both
//! loops decode greedily from the same prompt ids, and their tokens are checked equal.

use std::ops::ControlFlow;
use std::path::PathBuf;
use std::time::Instant;

use clap::Parser;
use etllm::{GenerationConfig, Runner, RunnerOptions};
use executorch::evalue::IntoEValue;
use executorch::module::Module;
use executorch::tensor::TensorPtr;
use ndarray::{Array1, Array2};

#[derive(Parser)]
struct Args {
    #[arg(long)]
    model: PathBuf,
    #[arg(long)]
    tokenizer: PathBuf,
    /// Prompt length in tokens (BOS, then ids 3, 4, ...).
    #[arg(long, default_value_t = 16)]
    prompt_tokens: usize,
    /// Tokens to decode per run.
    #[arg(long, default_value_t = 100)]
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

fn argmax(v: &[f32]) -> i64 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as i64
}

/// Greedy decoding with nothing but `Module::forward` and argmax. Returns the decoded
/// tokens and the decode tokens/s (after the first token, like EtLlm's decode rate).
fn raw_loop(module: &mut Module, prompt: &[i64], n: usize, dynamic: bool) -> (Vec<i64>, f64) {
    let mut forward = |tokens: &[i64], pos: i64| -> i64 {
        let t = TensorPtr::from_array(
            Array2::from_shape_vec((1, tokens.len()), tokens.to_vec()).unwrap(),
        )
        .unwrap();
        let p = TensorPtr::from_array(Array1::from_vec(vec![pos])).unwrap();
        let inputs = [t.into_evalue(), p.into_evalue()];
        let out = module.forward(&inputs).expect("forward");
        let logits = out[0].as_tensor().into_typed::<f32>();
        let logits = logits.as_array_dyn();
        let flat: Vec<f32> = logits.iter().copied().collect();
        let vocab = *logits.shape().last().unwrap();
        argmax(&flat[flat.len() - vocab..])
    };
    let mut pos = 0i64;
    let mut next = 0;
    if dynamic {
        next = forward(prompt, 0);
        pos = prompt.len() as i64;
    } else {
        for &t in prompt {
            next = forward(&[t], pos);
            pos += 1;
        }
    }
    let mut out = vec![next];
    let t0 = Instant::now();
    for _ in 1..n {
        next = forward(&[next], pos);
        pos += 1;
        out.push(next);
    }
    let secs = t0.elapsed().as_secs_f64();
    (out, (n - 1) as f64 / secs)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    etllm::set_num_threads(args.threads)?;
    let config = GenerationConfig {
        echo: false,
        temperature: 0.0,
        max_new_tokens: args.tokens as i32,
        ignore_eos: true,
        ..Default::default()
    };
    let (mut ours, mut raw, mut share) = (Vec::new(), Vec::new(), Vec::new());
    for run in 0..args.runs {
        // A fresh runner and module every run, opened in alternating order: on a large
        // model the instance opened first is measurably slower (memory placement), which
        // would otherwise bias the ratio.
        let open_runner = || Runner::open(&args.model, &args.tokenizer, RunnerOptions::default());
        let open_module = || -> Result<Module<'static>, String> {
            let mut module = Module::new(&args.model);
            module.load(None, None).map_err(|e| format!("{e:?}"))?;
            Ok(module)
        };
        let (mut runner, mut module) = if run % 2 == 0 {
            let r = open_runner()?;
            (r, open_module()?)
        } else {
            let m = open_module()?;
            (open_runner()?, m)
        };
        let meta = runner.metadata().unwrap().clone();
        let prompt: Vec<u32> = std::iter::once(meta.bos_id.unwrap_or(1))
            .chain((3..).take(args.prompt_tokens.saturating_sub(1)))
            .collect();
        let prompt_i64: Vec<i64> = prompt.iter().map(|&t| t as i64).collect();
        // Warm both up (first-call costs), then measure.
        runner.warmup()?;
        raw_loop(
            &mut module,
            &prompt_i64,
            args.tokens.min(8),
            meta.enable_dynamic_shape,
        );
        let mut tokens = Vec::new();
        let stats = runner.generate_from_ids(
            &prompt,
            &config,
            |p| {
                tokens.extend(p.token.map(|t| t as i64));
                ControlFlow::Continue(())
            },
            |_| {},
        )?;
        ours.push(stats.decode_tokens_per_second());
        let wall = (stats.inference_end_us - stats.inference_start_us) as f64;
        share.push(stats.aggregate_model_execution_time_us as f64 / wall);
        let (raw_tokens, raw_rate) = raw_loop(
            &mut module,
            &prompt_i64,
            args.tokens,
            meta.enable_dynamic_shape,
        );
        assert_eq!(
            raw_tokens, tokens,
            "the raw loop and EtLlm must decode the same tokens"
        );
        raw.push(raw_rate);
    }
    let (ours, raw, share) = (median(ours), median(raw), median(share));
    println!("model: {}", args.model.display());
    println!(
        "threads {}  prompt {} tokens  decode {} tokens  runs {}",
        args.threads, args.prompt_tokens, args.tokens, args.runs
    );
    println!("etllm decode:        {ours:10.1} tokens/s");
    println!("raw forward loop:    {raw:10.1} tokens/s");
    println!("etllm / raw:         {:10.3}", ours / raw);
    println!(
        "time inside forward: {:10.1} % of etllm's generation wall time",
        share * 100.0
    );
    Ok(())
}
