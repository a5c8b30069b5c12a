//! Sessions benchmark: what restoring a saved state, switching between sessions and
//! holding many sessions cost, on one model.
//!
//! ```text
//! cargo build --release --example bench_sessions
//! target/release/examples/bench_sessions --model M.pte --tokenizer T \
//!     [--prompt-tokens 200] [--rounds 15] [--swap-tokens 32] [--sessions 1,4,16] \
//!     [--kv-bytes-per-position 13824] [--threads 1]
//! ```
//!
//! Reports:
//! - the one-time cost of the model's identity (the first save or load of a loaded model
//!   hashes its files): the first `save_state` minus the median of the later ones, and, to
//!   compare, reading the `.pte` and hashing it with XXH3-128 here;
//! - restore against re-prefill: a `--prompt-tokens` prompt (BOS, then fixed
//!   pseudo-random ids) prefilled into a fresh session, against its saved state loaded
//!   into a fresh session from bytes and from a file (written once, so read from the page
//!   cache), interleaved in rotating order for `--rounds` rounds; medians, and the
//!   ratio; also the cost of saving (to bytes, to a file) and the state's size, and for
//!   scale the cost of filling the model's buffers once and of checksumming and copying
//!   the state;
//! - the swap cost: two sessions that each hold the prompt, taking turns at
//!   single-token generations (each turn sets the other's KV cache aside and brings this
//!   one's in), against one session making the same number of single-token calls, and one
//!   call generating them all; per-token medians and ratios;
//! - memory: the resident set (VmRSS) after loading and after each of N sessions has
//!   prefilled its own prompt, for each N of `--sessions`, each N in a fresh process (this
//!   program runs itself with `--rss-child N`); what one more session costs, against the
//!   KV-cache bytes its positions use (`--kv-bytes-per-position`: layers × 2 (K and V) ×
//!   KV heads × head dim × 4 bytes; the default is the stories15M shape, 6 × 2 × 288 × 4).

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use clap::Parser;
use etllm::{GenerationConfig, Runner, RunnerOptions, Session};

#[derive(Parser)]
struct Args {
    #[arg(long)]
    model: PathBuf,
    #[arg(long)]
    tokenizer: PathBuf,
    /// Prompt length in tokens (BOS, then fixed pseudo-random ids).
    #[arg(long, default_value_t = 200)]
    prompt_tokens: usize,
    #[arg(long, default_value_t = 15)]
    rounds: usize,
    /// Single-token generations per session in the swap test.
    #[arg(long, default_value_t = 32)]
    swap_tokens: usize,
    /// Session counts for the memory test, comma-separated.
    #[arg(long, default_value = "1,4,16")]
    sessions: String,
    /// KV-cache bytes per position, for the memory test's comparison.
    #[arg(long, default_value_t = 6 * 2 * 288 * 4)]
    kv_bytes_per_position: usize,
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Internal: hold N sessions and print the resident set after each step as JSON.
    #[arg(long, hide = true)]
    rss_child: Option<usize>,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn ms(start: Instant) -> f64 {
    start.elapsed().as_secs_f64() * 1000.0
}

/// BOS, then `n - 1` pseudo-random ids in [3, vocab) from `seed`.
fn prompt(bos: u32, vocab: usize, n: usize, seed: u64) -> Vec<u32> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    std::iter::once(bos)
        .chain((1..n).map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            3 + ((x >> 33) % (vocab as u64 - 3)) as u32
        }))
        .collect()
}

/// The model's buffer sizes, from a state's header (see src/session/state.rs).
fn arena_sizes(state: &[u8]) -> Vec<usize> {
    let u32_at = |at: usize| u32::from_le_bytes(state[at..at + 4].try_into().unwrap()) as usize;
    let version_len = u16::from_le_bytes(state[12..14].try_into().unwrap()) as usize;
    let at = 14 + version_len + 16 + 16; // identity, stamp
    (0..u32_at(at))
        .map(|i| {
            let at = at + 4 + 8 * i;
            u64::from_le_bytes(state[at..at + 8].try_into().unwrap()) as usize
        })
        .collect()
}

/// The resident set in bytes, from /proc/self/status.
fn rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

fn greedy(max_new_tokens: i32) -> GenerationConfig {
    GenerationConfig {
        echo: false,
        temperature: 0.0,
        ignore_eos: true,
        max_new_tokens,
        ..Default::default()
    }
}

/// Generates `n` greedy tokens continuing `session`'s conversation, in one call.
fn continue_with(session: &mut Session, n: i32) -> etllm::Result<Vec<u32>> {
    let mut out = Vec::new();
    session.generate_from_ids(
        &[],
        &greedy(n),
        |p| {
            out.extend(p.token);
            ControlFlow::Continue(())
        },
        |_| {},
    )?;
    Ok(out)
}

fn open(args: &Args) -> etllm::Result<(Runner, Vec<u32>, u32, usize)> {
    let runner = Runner::open(&args.model, &args.tokenizer, RunnerOptions::default())?;
    let bos = runner.bos_id().unwrap_or(1);
    let vocab = runner.vocab_size().unwrap_or(32000);
    let p = prompt(bos, vocab, args.prompt_tokens, 1);
    Ok((runner, p, bos, vocab))
}

/// `--rss-child N`: the resident set after loading, then after each session's prefill.
fn rss_child(args: &Args, n: usize) -> Result<(), Box<dyn std::error::Error>> {
    let before_load = rss();
    let (mut runner, _, bos, vocab) = open(args)?;
    let after_load = rss();
    runner.session()?.warmup()?;
    let after_warmup = rss();
    let mut sessions = Vec::new();
    let mut steps = Vec::new();
    let mut state_bytes = 0;
    for i in 0..n {
        let mut s = runner.session()?;
        s.prefill_ids(
            &prompt(bos, vocab, args.prompt_tokens, 100 + i as u64),
            &greedy(1),
        )?;
        if i == 0 {
            state_bytes = s.save_state()?.len();
        }
        sessions.push(s);
        steps.push(rss());
    }
    println!(
        "{}",
        serde_json::json!({
            "before_load": before_load,
            "after_load": after_load,
            "after_warmup": after_warmup,
            "steps": steps,
            "state_bytes": state_bytes,
        })
    );
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    etllm::set_num_threads(args.threads)?;
    if let Some(n) = args.rss_child {
        return rss_child(&args, n);
    }
    let dir = std::env::temp_dir().join(format!("etllm-bench-sessions-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = run(&args, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn run(args: &Args, dir: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let t = Instant::now();
    let (mut runner, p, bos, vocab) = open(args)?;
    let load_ms = ms(t);
    runner.session()?.warmup()?;
    let n = args.prompt_tokens;
    let rounds = args.rounds;
    println!("model: {}", args.model.display());
    println!(
        "threads {}  prompt {n} tokens  rounds {rounds}  load {load_ms:.0} ms",
        args.threads
    );

    // The model's identity: hashed by the first save (or load) of this loaded model.
    let mut s = runner.session()?;
    s.prefill_ids(&p, &greedy(1))?;
    let t = Instant::now();
    let bytes = s.save_state()?;
    let first_save = ms(t);
    let later_save = median(
        (0..rounds)
            .map(|_| {
                let t = Instant::now();
                s.save_state().map(|_| ms(t))
            })
            .collect::<etllm::Result<_>>()?,
    );
    let t = Instant::now();
    let pte = std::fs::read(&args.model)?;
    let hash = xxhash_rust::xxh3::xxh3_128(&pte);
    let hash_here = ms(t);
    std::hint::black_box(hash);
    let path = dir.join("prompt.state");
    s.save_state_file(&path, &[])?;
    let want = continue_with(&mut s, 4)?;
    drop(s);

    // Restore against re-prefill, each into a fresh session (the previous one dropped, so
    // no other session's cache is set aside inside the timing). The order rotates each
    // round, so that each measurement follows each other one equally often.
    let (mut prefill, mut load, mut load_file, mut save, mut save_file) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut drops = Vec::new();
    for round in 0..rounds {
        for what in (0..4).map(|i| (i + round) % 4) {
            let mut s = runner.session()?;
            let t = Instant::now();
            match what {
                0 => {
                    s.prefill_ids(&p, &greedy(1))?;
                    prefill.push(ms(t));
                }
                1 => {
                    s.load_state(&bytes)?;
                    load.push(ms(t));
                }
                2 => {
                    s.load_state_file(&path)?;
                    load_file.push(ms(t));
                }
                _ => {
                    s.load_state(&bytes)?;
                    let t = Instant::now();
                    let b = s.save_state()?;
                    save.push(ms(t));
                    assert_eq!(b, bytes);
                    let t = Instant::now();
                    s.save_state_file(dir.join("again.state"), &[])?;
                    save_file.push(ms(t));
                }
            }
            assert_eq!(s.tokens(), p);
            if round == 0 {
                assert_eq!(continue_with(&mut s, 4)?, want, "restored state diverges");
            }
            // Dropping the resident session cleans the model's buffers for the next one.
            let t = Instant::now();
            drop(s);
            drops.push(ms(t));
        }
    }
    let (prefill, load, load_file) = (median(prefill), median(load), median(load_file));

    // The same in a freshly opened runner each time (opened, warmed up and its identity
    // computed outside the timing), as a new process restoring a prompt cache sees it:
    // its buffers hold nothing yet, so a restore writes only the state's own chunks.
    let (mut fresh_prefill, mut fresh_load) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        for what in (0..2).map(|i| (i + round) % 2) {
            let (mut r, _, _, _) = open(args)?;
            r.warmup()?;
            r.session()?.save_state()?; // the model's identity, computed once per runner
            let mut s = r.session()?;
            let t = Instant::now();
            if what == 0 {
                s.prefill_ids(&p, &greedy(1))?;
                fresh_prefill.push(ms(t));
            } else {
                s.load_state(&bytes)?;
                fresh_load.push(ms(t));
            }
            assert_eq!(s.tokens(), p);
            if round == 0 {
                assert_eq!(continue_with(&mut s, 4)?, want, "restored state diverges");
            }
        }
    }
    let (fresh_prefill, fresh_load) = (median(fresh_prefill), median(fresh_load));
    println!();
    println!("| | median ms | vs prefill |");
    println!("|---|---|---|");
    println!("| prefill {n} tokens, fresh runner | {fresh_prefill:.2} | 1 |");
    println!(
        "| load_state (bytes), fresh runner | {fresh_load:.2} | {:.1}x faster |",
        fresh_prefill / fresh_load
    );
    println!("| prefill {n} tokens, new session of a used runner | {prefill:.2} | 1 |");
    println!(
        "| load_state (bytes), new session of a used runner | {load:.2} | {:.1}x faster |",
        prefill / load
    );
    println!(
        "| load_state_file (page cache), new session of a used runner | {load_file:.2} | {:.1}x faster |",
        prefill / load_file
    );
    println!(
        "| dropping the resident session (cleans the buffers) | {:.2} | |",
        median(drops)
    );
    println!("| save_state (bytes) | {:.2} | |", median(save));
    println!("| save_state_file | {:.2} | |", median(save_file));
    println!();
    println!(
        "state: {} bytes ({:.2} MB) for {n} tokens",
        bytes.len(),
        bytes.len() as f64 / 1e6
    );
    println!(
        "identity (once per loaded model): first save {first_save:.1} ms - later saves \
         {later_save:.2} ms = {:.1} ms; reading and hashing the {:.1} MB .pte here: \
         {hash_here:.1} ms",
        first_save - later_save,
        pte.len() as f64 / 1e6
    );
    drop(pte);
    // What a restore must at least do: write every byte of the model's buffers (absent
    // chunks are zeros), and check the state's checksum.
    let arenas = arena_sizes(&bytes);
    let total: usize = arenas.iter().sum();
    let mut buf = vec![1u8; total];
    let fill = median(
        (0..rounds)
            .map(|i| {
                let t = Instant::now();
                buf.fill(i as u8);
                std::hint::black_box(&buf);
                ms(t)
            })
            .collect(),
    );
    let sum = median(
        (0..rounds)
            .map(|_| {
                let t = Instant::now();
                std::hint::black_box(xxhash_rust::xxh3::xxh3_64(&bytes));
                ms(t)
            })
            .collect(),
    );
    let copy = median(
        (0..rounds)
            .map(|_| {
                let t = Instant::now();
                std::hint::black_box(bytes.to_vec());
                ms(t)
            })
            .collect(),
    );
    drop(buf);
    println!(
        "model buffers: {arenas:?} bytes ({:.1} MB); for scale, here: filling them {fill:.2} \
         ms, checksumming the state {sum:.2} ms, copying it into a new buffer {copy:.2} ms",
        total as f64 / 1e6
    );

    // The swap cost: two sessions taking turns, against one.
    let k = args.swap_tokens;
    let p2 = prompt(bos, vocab, n, 2);
    let mut a = runner.session()?;
    let mut b = runner.session()?;
    b.prefill_ids(&p2, &greedy(1))?;
    let state_b = b.save_state()?;
    let (mut turns, mut single, mut one_call) = (Vec::new(), Vec::new(), Vec::new());
    let mut reference = None;
    for round in 0..rounds {
        for what in (0..3).map(|i| (i + round) % 3) {
            a.load_state(&bytes)?;
            b.load_state(&state_b)?;
            let mut got = Vec::new();
            let t = Instant::now();
            match what {
                0 => {
                    for _ in 0..k {
                        got.extend(continue_with(&mut a, 1)?);
                        continue_with(&mut b, 1)?;
                    }
                    turns.push(ms(t) / (2 * k) as f64);
                }
                1 => {
                    for _ in 0..2 * k {
                        got.extend(continue_with(&mut a, 1)?);
                    }
                    single.push(ms(t) / (2 * k) as f64);
                }
                _ => {
                    got = continue_with(&mut a, 2 * k as i32)?;
                    one_call.push(ms(t) / (2 * k) as f64);
                }
            }
            let reference = reference.get_or_insert_with(|| got.clone());
            assert_eq!(got[..k], reference[..k], "taking turns changed the tokens");
        }
    }
    drop((a, b));
    let (turns, single, one_call) = (median(turns), median(single), median(one_call));
    println!();
    println!("| {k} tokens each, after a {n}-token prompt | ms per token | ratio |");
    println!("|---|---|---|");
    println!(
        "| one session, one call of {} tokens | {one_call:.3} | |",
        2 * k
    );
    println!(
        "| one session, {} single-token calls | {single:.3} | 1 |",
        2 * k
    );
    println!(
        "| two sessions taking turns, single-token calls | {turns:.3} | {:.2} |",
        turns / single
    );
    println!(
        "swap: {:.3} ms per switch (a switch sets one cache aside and brings the other in)",
        turns - single
    );
    drop(runner);

    // Memory, each session count in a fresh process.
    let exe = std::env::current_exe()?;
    let counts: Vec<usize> = args
        .sessions
        .split(',')
        .map(|c| c.trim().parse())
        .collect::<Result<_, _>>()?;
    let mut rows = Vec::new();
    for &count in &counts {
        let out = Command::new(&exe)
            .arg("--model")
            .arg(&args.model)
            .arg("--tokenizer")
            .arg(&args.tokenizer)
            .args(["--threads", &args.threads.to_string()])
            .args(["--prompt-tokens", &n.to_string()])
            .args(["--rss-child", &count.to_string()])
            .output()?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned().into());
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        rows.push((count, v));
    }
    let mb = |b: u64| b as f64 / 1e6;
    let kv = (n * args.kv_bytes_per_position) as f64;
    println!();
    println!(
        "| sessions | RSS after load MB | RSS with the sessions MB | per session after the first MB |"
    );
    println!("|---|---|---|---|");
    let mut first: Option<u64> = None;
    for (count, v) in &rows {
        let steps: Vec<u64> = v["steps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap())
            .collect();
        let last = *steps.last().unwrap();
        let after_load = v["after_load"].as_u64().unwrap();
        let one = *first.get_or_insert(steps[0]);
        let per = if *count > 1 {
            format!(
                "{:.2} ({:.2}x the KV cache in use)",
                mb((last - one) / (*count as u64 - 1)),
                (last - one) as f64 / (*count as u64 - 1) as f64 / kv
            )
        } else {
            String::new()
        };
        println!(
            "| {count} | {:.1} | {:.1} | {per} |",
            mb(after_load),
            mb(last)
        );
    }
    if let Some((_, v)) = rows.last() {
        let steps: Vec<String> = v["steps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| format!("{:.1}", mb(x.as_u64().unwrap())))
            .collect();
        println!(
            "RSS MB after each session's prefill ({} sessions): {}",
            steps.len(),
            steps.join(" ")
        );
    }
    println!(
        "KV cache in use per session: {n} positions x {} bytes = {:.2} MB; a state: {:.2} MB",
        args.kv_bytes_per_position,
        kv / 1e6,
        mb(rows
            .first()
            .map_or(0, |(_, v)| v["state_bytes"].as_u64().unwrap()))
    );
    Ok(())
}
