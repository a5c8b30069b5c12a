//! `etllm bench`: prompt-processing and generation rates, shaped like llama.cpp's
//! `llama-bench` (`-p 64,512 -n 128 -t 1,2 -r 5`; mean ± sample standard deviation; a
//! markdown table, or `--json`).

use std::io::Write;
use std::ops::ControlFlow;
use std::path::PathBuf;

use clap::Args;
use etllm::{GenerationConfig, Runner, Stats};

/// Largest default test sizes; halved until they fit the model's context.
const DEFAULT_PROMPT: usize = 512;
const DEFAULT_GEN: usize = 128;

#[derive(Args)]
pub struct BenchArgs {
    /// The .pte model. Without it, the small model built into etllm is measured.
    #[arg(long, short = 'm', value_name = "M.pte")]
    pub model: Option<PathBuf>,
    /// The tokenizer (only checked against the model: the tests feed token ids). Defaults
    /// to tokenizer.json next to --model.
    #[arg(long, value_name = "T")]
    pub tokenizer: Option<PathBuf>,
    /// An external data file (.ptd) of the model; repeat for several. Default:
    /// <stem>.ptd next to --model if it exists.
    #[arg(long = "data", value_name = "FILE")]
    pub data: Vec<PathBuf>,
    /// The method that runs the model's steps, when not `forward`.
    #[arg(long, value_name = "NAME")]
    pub method: Option<String>,
    /// Prompt lengths to prefill, comma-separated (test `ppN`); 0 skips prefill tests.
    /// Default 512, halved until it fits the model's context.
    #[arg(
        long = "n-prompt",
        short = 'p',
        value_name = "N,..",
        value_delimiter = ','
    )]
    pub n_prompt: Option<Vec<usize>>,
    /// Tokens to generate, comma-separated (test `tgN`: N decode steps after a one-token
    /// prompt); 0 skips generation tests. Default 128, halved until it fits.
    #[arg(
        long = "n-gen",
        short = 'n',
        value_name = "N,..",
        value_delimiter = ','
    )]
    pub n_gen: Option<Vec<usize>>,
    /// Thread counts for ExecuTorch's thread pool, comma-separated. Default: the runtime's
    /// choice.
    #[arg(long, short = 't', value_name = "N,..", value_delimiter = ',')]
    pub threads: Option<Vec<usize>>,
    /// Timed repetitions of each test (after one untimed warm-up run).
    #[arg(
        long = "repetitions",
        short = 'r',
        value_name = "N",
        default_value_t = 5
    )]
    pub repetitions: usize,
    /// Print one JSON object (every sample included) instead of a markdown table.
    #[arg(long)]
    pub json: bool,
}

/// One test's kind and size.
#[derive(Clone, Copy)]
enum Test {
    /// Prefill N tokens from an empty context.
    Prompt(usize),
    /// N decode steps after a one-token prompt.
    Gen(usize),
}

impl Test {
    fn name(self) -> String {
        match self {
            Test::Prompt(n) => format!("pp{n}"),
            Test::Gen(n) => format!("tg{n}"),
        }
    }
}

/// What one timed run measured.
struct Sample {
    tokens_per_second: f64,
    /// Share (0 to 1) of the measured wall time spent outside the model's method calls.
    outside_model: f64,
}

/// Token ids for the tests: a fixed pseudo-random sequence below `vocab` (llama-bench
/// feeds random tokens too), the same in every run.
fn token_ids(n: usize, vocab: usize) -> Vec<u32> {
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % vocab as u64) as u32
        })
        .collect()
}

/// The largest of `start`, `start/2`, ... that passes `fits`, at least 1.
fn halve_until(start: usize, fits: impl Fn(usize) -> bool) -> usize {
    let mut n = start;
    while n > 1 && !fits(n) {
        n /= 2;
    }
    n
}

fn run_once(runner: &mut Runner, test: Test, vocab: usize) -> Result<Sample, String> {
    runner.reset().map_err(|e| e.to_string())?;
    let (ids, max_new) = match test {
        Test::Prompt(n) => (token_ids(n, vocab), 1),
        Test::Gen(n) => (token_ids(1, vocab), n as i32 + 1),
    };
    let config = GenerationConfig {
        max_new_tokens: max_new,
        temperature: 0.0,
        ignore_eos: true,
        num_bos: 0,
        echo: false,
        seed: Some(0),
        ..Default::default()
    };
    let stats: Stats = runner
        .generate_from_ids(&ids, &config, |_| ControlFlow::Continue(()), |_| {})
        .map_err(|e| e.to_string())?;
    let share = |wall: u64, model: u64| {
        if wall == 0 {
            0.0
        } else {
            wall.saturating_sub(model) as f64 / wall as f64
        }
    };
    match test {
        Test::Prompt(n) => {
            let wall = stats
                .prompt_eval_end_us
                .saturating_sub(stats.token_encode_end_us);
            Ok(Sample {
                tokens_per_second: n as f64 * 1e6 / wall.max(1) as f64,
                outside_model: share(wall, stats.aggregate_model_execution_time_us),
            })
        }
        Test::Gen(n) => {
            if stats.num_generated_tokens != n as u64 + 1 {
                return Err(format!(
                    "tg{n} stopped after {} tokens ({})",
                    stats.num_generated_tokens,
                    stats.stop_reason.as_str()
                ));
            }
            let wall = stats
                .inference_end_us
                .saturating_sub(stats.prompt_eval_end_us);
            Ok(Sample {
                tokens_per_second: n as f64 * 1e6 / wall.max(1) as f64,
                outside_model: stats.decode_outside_model_share(),
            })
        }
    }
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

/// Sample standard deviation (n - 1), as llama-bench reports; 0 for one sample.
fn stddev(v: &[f64]) -> f64 {
    if v.len() < 2 {
        return 0.0;
    }
    let m = mean(v);
    (v.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / (v.len() - 1) as f64).sqrt()
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

/// Runs the benchmark. `open` opens and loads the runner; it is called again for each
/// thread count, because ExecuTorch's thread pool can only be resized while no model is
/// loaded. `label` names the model in the table.
pub fn bench(
    args: &BenchArgs,
    open: impl Fn() -> Result<Runner, String>,
    label: &str,
    model_bytes: u64,
) -> Result<(), String> {
    if args.repetitions == 0 {
        return Err("-r must be at least 1".into());
    }
    let threads = match &args.threads {
        Some(v) if v.contains(&0) => return Err("-t values must be at least 1".into()),
        Some(v) => v.clone(),
        None => vec![etllm::num_threads()],
    };
    let mut runner = open()?;
    let max_context = runner.max_context().unwrap_or(0);
    let vocab = runner
        .vocab_size()
        .unwrap_or(1)
        .min(runner.tokenizer().map_or(usize::MAX, |t| t.vocab_size()))
        .max(1);
    // ppN feeds N positions; tgN feeds 1 + N (the last generated token is not fed).
    let prompt_fits = |n: usize| n < max_context;
    let gen_fits = |n: usize| n + 1 < max_context;
    let prompts = match &args.n_prompt {
        Some(v) => v.clone(),
        None => vec![halve_until(DEFAULT_PROMPT, prompt_fits)],
    };
    let gens = match &args.n_gen {
        Some(v) => v.clone(),
        None => vec![halve_until(DEFAULT_GEN, gen_fits)],
    };
    let mut tests: Vec<Test> = Vec::new();
    for &n in prompts.iter().filter(|&&n| n > 0) {
        if !prompt_fits(n) {
            return Err(format!(
                "pp{n} needs {n} positions plus one for the sampled token, but the model's \
                 context is {max_context}; pass a smaller -p"
            ));
        }
        tests.push(Test::Prompt(n));
    }
    for &n in gens.iter().filter(|&&n| n > 0) {
        if !gen_fits(n) {
            return Err(format!(
                "tg{n} needs {} positions, but the model's context is {max_context}; pass a \
                 smaller -n",
                n + 2
            ));
        }
        tests.push(Test::Gen(n));
    }
    if tests.is_empty() {
        return Err("nothing to measure: every -p and -n value is 0".into());
    }

    let mut rows = Vec::new();
    let mut table = String::new();
    table.push_str("| model | size | vocab | threads | test | t/s | outside model |\n");
    table.push_str("| --- | ---: | ---: | ---: | --- | ---: | ---: |\n");
    for &t in &threads {
        if t != etllm::num_threads() {
            drop(runner);
            etllm::set_num_threads(t).map_err(|e| e.to_string())?;
            runner = open()?;
        }
        for &test in &tests {
            // One untimed run pays first-call costs (allocations, caches, thread start-up).
            run_once(&mut runner, test, vocab)?;
            let mut samples = Vec::with_capacity(args.repetitions);
            for _ in 0..args.repetitions {
                samples.push(run_once(&mut runner, test, vocab)?);
            }
            let rates: Vec<f64> = samples.iter().map(|s| s.tokens_per_second).collect();
            let outside: Vec<f64> = samples.iter().map(|s| s.outside_model).collect();
            let (m, sd, out) = (mean(&rates), stddev(&rates), mean(&outside));
            table.push_str(&format!(
                "| {label} | {} | {vocab} | {t} | {} | {m:.2} ± {sd:.2} | {:.2}% |\n",
                mib(model_bytes),
                test.name(),
                out * 100.0
            ));
            let (n_prompt, n_gen) = match test {
                Test::Prompt(n) => (n, 0),
                Test::Gen(n) => (1, n),
            };
            rows.push(serde_json::json!({
                "test": test.name(),
                "n_prompt": n_prompt,
                "n_gen": n_gen,
                "threads": t,
                "repetitions": args.repetitions,
                "tokens_per_second_mean": m,
                "tokens_per_second_stddev": sd,
                "tokens_per_second_samples": rates,
                "outside_model_share_mean": out,
            }));
            if !args.json {
                eprintln!("{} at {t} thread(s): {m:.2} ± {sd:.2} t/s", test.name());
            }
        }
    }
    let mut out = std::io::stdout().lock();
    let written = if args.json {
        let report = serde_json::json!({
            "etllm_version": env!("CARGO_PKG_VERSION"),
            "model": label,
            "model_size_bytes": model_bytes,
            "vocab_size": vocab,
            "max_context": max_context,
            "results": rows,
        });
        writeln!(out, "{report}")
    } else {
        write!(out, "{table}")
    };
    written.map_err(|e| format!("cannot write to stdout: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_halve_until_they_fit() {
        assert_eq!(halve_until(512, |n| n < 256), 128);
        assert_eq!(halve_until(512, |n| n < 2048), 512);
        assert_eq!(halve_until(128, |_| false), 1);
    }

    #[test]
    fn stddev_is_the_sample_standard_deviation() {
        assert_eq!(stddev(&[3.0]), 0.0);
        assert!((stddev(&[1.0, 2.0, 3.0, 4.0]) - 1.290_994_4).abs() < 1e-6);
    }

    #[test]
    fn token_ids_are_fixed_and_below_the_vocabulary() {
        let a = token_ids(1000, 37);
        assert_eq!(a, token_ids(1000, 37));
        assert!(a.iter().all(|&id| id < 37));
        assert!(a.iter().collect::<std::collections::HashSet<_>>().len() > 30);
    }
}
