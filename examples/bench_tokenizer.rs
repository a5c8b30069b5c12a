//! Tokenizer benchmark: `Tokenizer::encode` and per-token decoding, timed in-process.
//!
//! ```text
//! cargo run --release --example bench_tokenizer -- --tokenizer sp32k.model \
//!     --text bench.txt [--prompts prompts.json] [--rounds 7] [--json]
//! ```
//!
//! Times are the thread's CPU time (`CLOCK_THREAD_CPUTIME_ID`, so that other work on a
//! shared machine does not count; `--wall` for wall-clock time). Measures, each as the
//! median over `--rounds` (after one untimed warm-up):
//! - `text`: one `encode` of the whole `--text` file (MB/s);
//! - `prompts`: one `encode` per prompt of `--prompts` (a JSON list of strings), as the
//!   mean microseconds per prompt and MB/s;
//! - `decode2`: `decode` of each 2-token window of the text's first 20,000 ids, as a text
//!   stream does for every generated token (microseconds per call);
//! - `stream`: `TextStream::push` of those ids (microseconds per token).
//!
//! For a SentencePiece `.model` it times the same encode and decode through the
//! `sentencepiece` crate's own `SentencePieceProcessor::encode` (pieces, spans and ids,
//! from which the ids are kept) and `decode_piece_ids` too, interleaved with EtLlm's
//! rounds, and checks that both give the same ids. `tools/bench/sp_encode_vs_python.py`
//! runs this with `--json` against the `sentencepiece` Python package.

use std::path::PathBuf;
use std::time::Instant;

use clap::Parser;
use etllm::Tokenizer;

#[derive(Parser)]
struct Args {
    #[arg(long)]
    tokenizer: PathBuf,
    #[arg(long)]
    text: PathBuf,
    #[arg(long)]
    prompts: Option<PathBuf>,
    #[arg(long, default_value_t = 7)]
    rounds: usize,
    /// Print one JSON object (the medians) instead of a table.
    #[arg(long)]
    json: bool,
    /// Wall-clock time instead of the thread's CPU time.
    #[arg(long)]
    wall: bool,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Seconds this thread has run on a CPU (`CLOCK_THREAD_CPUTIME_ID`; the schedstat file
/// would count in whole scheduler ticks).
fn thread_cpu_seconds() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the duration of the call.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID)");
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

/// How long `f` takes: CPU time of this thread, or wall-clock time with `wall`.
fn time(wall: bool, f: impl FnOnce()) -> f64 {
    if wall {
        let t0 = Instant::now();
        f();
        return t0.elapsed().as_secs_f64();
    }
    let t0 = thread_cpu_seconds();
    f();
    thread_cpu_seconds() - t0
}

type EncodeFn<'a> = Box<dyn Fn(&str) -> Vec<u32> + 'a>;
type DecodeFn<'a> = Box<dyn Fn(&[u32]) -> String + 'a>;

/// One implementation's encode and decode.
struct Imp<'a> {
    name: &'static str,
    encode: EncodeFn<'a>,
    decode: DecodeFn<'a>,
}

#[derive(Default)]
struct Times {
    text: Vec<f64>,
    prompts: Vec<f64>,
    decode2: Vec<f64>,
    stream: Vec<f64>,
}

fn main() {
    let args = Args::parse();
    let text = std::fs::read_to_string(&args.text).expect("read --text");
    let prompts: Vec<String> = match &args.prompts {
        Some(p) => serde_json::from_str(&std::fs::read_to_string(p).expect("read --prompts"))
            .expect("--prompts is a JSON list of strings"),
        None => Vec::new(),
    };
    let tok = Tokenizer::load(&args.tokenizer, None).expect("load the tokenizer");
    let sp = (tok.format() == etllm::tokenizer::TokenizerFormat::SentencePiece)
        .then(|| sentencepiece::SentencePieceProcessor::open(&args.tokenizer).expect("crate open"));

    let mut imps = vec![Imp {
        name: "etllm",
        encode: Box::new(|t| tok.encode(t).expect("encode")),
        decode: Box::new(|ids| tok.decode(ids).expect("decode")),
    }];
    if let Some(sp) = &sp {
        imps.push(Imp {
            name: "crate",
            encode: Box::new(move |t| {
                sp.encode(t)
                    .expect("crate encode")
                    .into_iter()
                    .map(|p| p.id)
                    .collect()
            }),
            decode: Box::new(move |ids| sp.decode_piece_ids(ids).expect("crate decode")),
        });
    }

    let ids = (imps[0].encode)(&text);
    for imp in &imps[1..] {
        assert_eq!(
            (imp.encode)(&text),
            ids,
            "{} ids differ on the text",
            imp.name
        );
        for p in &prompts {
            assert_eq!(
                (imp.encode)(p),
                (imps[0].encode)(p),
                "{} ids differ",
                imp.name
            );
        }
    }
    let window: Vec<u32> = ids.iter().copied().take(20_000).collect();
    let prompt_bytes: usize = prompts.iter().map(|p| p.len()).sum();

    let mut times: Vec<Times> = imps.iter().map(|_| Times::default()).collect();
    for round in 0..=args.rounds {
        // Alternate which implementation goes first.
        let order: Vec<usize> = if round % 2 == 0 {
            (0..imps.len()).collect()
        } else {
            (0..imps.len()).rev().collect()
        };
        for &i in &order {
            let imp = &imps[i];
            let t_text = time(args.wall, || {
                std::hint::black_box((imp.encode)(&text));
            });
            let t_prompts = time(args.wall, || {
                for p in &prompts {
                    std::hint::black_box((imp.encode)(p));
                }
            });
            let t_decode2 = time(args.wall, || {
                for w in window.windows(2) {
                    std::hint::black_box((imp.decode)(w));
                }
            });
            let t_stream = if i == 0 {
                time(args.wall, || {
                    let mut stream = tok.stream();
                    for &id in &window {
                        std::hint::black_box(stream.push(id).expect("push"));
                    }
                })
            } else {
                0.0
            };
            if round > 0 {
                let t = &mut times[i];
                t.text.push(t_text);
                t.prompts.push(t_prompts);
                t.decode2.push(t_decode2);
                t.stream.push(t_stream);
            }
        }
    }

    let mb = text.len() as f64 / 1e6;
    let mut json = serde_json::Map::new();
    json.insert("text_bytes".into(), text.len().into());
    json.insert("text_tokens".into(), ids.len().into());
    json.insert("prompts".into(), prompts.len().into());
    if !args.json {
        println!(
            "text: {:.2} MB, {} tokens; {} prompts ({:.0} bytes each); {} rounds, medians",
            mb,
            ids.len(),
            prompts.len(),
            prompt_bytes as f64 / prompts.len().max(1) as f64,
            args.rounds
        );
        println!(
            "{:8} {:>12} {:>14} {:>14} {:>14} {:>14}",
            "", "text MB/s", "prompt us", "prompts MB/s", "decode2 us", "stream us/tok"
        );
    }
    for (imp, t) in imps.iter().zip(times) {
        let text_s = median(t.text);
        let prompts_s = median(t.prompts);
        let decode2_us = median(t.decode2) * 1e6 / (window.len().max(2) - 1) as f64;
        let stream_us = median(t.stream) * 1e6 / window.len().max(1) as f64;
        let prompt_us = prompts_s * 1e6 / prompts.len().max(1) as f64;
        let prompts_mbs = prompt_bytes as f64 / 1e6 / prompts_s.max(1e-12);
        if args.json {
            json.insert(
                imp.name.into(),
                serde_json::json!({
                    "text_mbs": mb / text_s,
                    "prompt_us": prompt_us,
                    "prompts_mbs": prompts_mbs,
                    "decode2_us": decode2_us,
                    "stream_us": stream_us,
                }),
            );
        } else {
            println!(
                "{:8} {:12.2} {:14.2} {:14.2} {:14.3} {:14.3}",
                imp.name,
                mb / text_s,
                prompt_us,
                prompts_mbs,
                decode2_us,
                stream_us
            );
        }
    }
    if args.json {
        println!("{}", serde_json::Value::Object(json));
    }
}
