//! Sampling benchmark: microseconds to draw one token from a 32,000-entry vocabulary.
//!
//! ```text
//! cargo run --release --example bench_sampler [-- --vocab 32000 --draws 2000] [--flat]
//! ```
//!
//! Logits are a fixed pseudo-random spread like a language model's (a few tokens well
//! ahead, a long tail). Reports greedy, temperature 0.8, temperature 0.8 with top-p 0.9
//! (upstream's fixed setting), top-k 40, and min-p 0.05, each as the median of batches.

use std::time::Instant;

use clap::Parser;
use etllm::sampler::{Sampler, SamplingParams};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 32000)]
    vocab: usize,
    #[arg(long, default_value_t = 2000)]
    draws: usize,
    /// Flat logits instead, like a random-weight model's: a bell curve of standard
    /// deviation 1 (most tokens share the probability, so the top-p nucleus is large).
    #[arg(long)]
    flat: bool,
}

fn main() {
    let args = Args::parse();
    // xorshift noise shaped into a skewed spread: most logits near 0, a few up to ~15.
    let mut x = 0x9E3779B97F4A7C15u64;
    let logits: Vec<f32> = (0..args.vocab)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let u = (x >> 11) as f64 / (1u64 << 53) as f64;
            if args.flat {
                // Twelve uniforms summed: close to a standard normal.
                let mut sum = u;
                for _ in 0..11 {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    sum += (x >> 11) as f64 / (1u64 << 53) as f64;
                }
                return (sum - 6.0) as f32;
            }
            (-(1.0 - u).ln() * 2.0 - 2.0) as f32
        })
        .collect();
    let cases = [
        ("greedy", SamplingParams::default()),
        (
            "temperature 0.8",
            SamplingParams {
                temperature: 0.8,
                ..Default::default()
            },
        ),
        (
            "temperature 0.8, top-p 0.9",
            SamplingParams {
                temperature: 0.8,
                top_p: 0.9,
                ..Default::default()
            },
        ),
        (
            "temperature 0.8, top-k 40",
            SamplingParams {
                temperature: 0.8,
                top_k: 40,
                ..Default::default()
            },
        ),
        (
            "temperature 0.8, min-p 0.05",
            SamplingParams {
                temperature: 0.8,
                min_p: 0.05,
                ..Default::default()
            },
        ),
    ];
    println!("vocabulary {}, {} draws per case", args.vocab, args.draws);
    for (name, params) in cases {
        let mut sampler = Sampler::with_params(params, 1);
        let mut batches = Vec::new();
        for _ in 0..10 {
            let t0 = Instant::now();
            let mut sink = 0u64;
            for _ in 0..args.draws / 10 {
                sink += sampler.sample(&logits, &[]) as u64;
            }
            std::hint::black_box(sink);
            batches.push(t0.elapsed().as_secs_f64() * 1e6 / (args.draws / 10) as f64);
        }
        batches.sort_by(|a, b| a.partial_cmp(b).unwrap());
        println!("{name:<30} {:8.1} us per token", batches[batches.len() / 2]);
    }
}
