//! A mutation fuzzer for EtLlm that runs on stable Rust.
//!
//! Every case runs in a child process (this same binary, `fuzz exec`), so that an abort or a
//! segfault in C++ code (ExecuTorch, the cxx bridge, SentencePiece) is caught and
//! classified instead of killing the driver. The child exits 0 when the library returns an
//! error and when it succeeds; a signal, an escaping Rust panic, `ETLLM_ERR_PANIC` or a
//! broken C ABI promise is a crash, and a case that outlives its timeout (twice, the second
//! time with three times the timeout) is a hang.
//!
//! ```text
//! cargo build --release --example fuzz
//! target/release/examples/fuzz run --target model --seconds 60 --seed 1 --out build/fuzz
//! target/release/examples/fuzz exec --target model build/fuzz/model/crashes/<kind>/min.bin
//! target/release/examples/fuzz minimize --target model CRASH --base SEED --output MIN
//! ```
//!
//! Targets: `model` (load a `.pte` with `Runner`, generate one token greedily),
//! `tokenizer-hf`, `tokenizer-sentencepiece`, `tokenizer-tiktoken`, `tokenizer-llama2c`
//! (load, encode, decode, stream), `chat-template` (compile and render a template, or a
//! `tokenizer_config.json` holding one) and `c-abi` (the case's bytes are a program of
//! calls into `etllm::ffi`, with versioned structs of every size, NULL pointers, bad
//! lengths, non-UTF-8 strings and out-of-range enum values). See README.md, "Fuzzing".

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::io::Read;
use std::ops::{ControlFlow, Range};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand, ValueEnum};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

#[derive(Parser)]
#[command(about = "Mutation fuzzer for EtLlm (each case runs in a child process)")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Mutate the seeds of a target for a while; save crashes under `--out`.
    Run {
        #[arg(long, value_enum)]
        target: Target,
        /// How long to fuzz (minimization of a new crash kind included).
        #[arg(long, default_value_t = 20.0)]
        seconds: f64,
        /// Seed of the mutation engine: the same seed makes the same cases.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Seed files to use instead of the target's built-in seeds.
        #[arg(long)]
        corpus: Option<PathBuf>,
        /// Where crashes and hangs go (`<out>/<target>/`).
        #[arg(long, default_value = "build/fuzz")]
        out: PathBuf,
        /// Per-case timeout in milliseconds (default: 10000 for `model`, 5000 otherwise).
        #[arg(long)]
        timeout_ms: Option<u64>,
        /// Seconds spent minimizing each new crash kind.
        #[arg(long, default_value_t = 30.0)]
        minimize_secs: f64,
        /// Address-space limit of each child, in MiB (0: none).
        #[arg(long, default_value_t = 4096)]
        memory_mb: u64,
        /// A file of crash-kind substrings (one a line, `#` comments) that are reported
        /// and saved but do not fail the run: known crashes EtLlm cannot prevent.
        #[arg(long)]
        allow: Option<PathBuf>,
    },
    /// Run one case in this process (what `run` spawns).
    Exec {
        #[arg(long, value_enum)]
        target: Target,
        file: PathBuf,
    },
    /// Shrink a crashing input while it crashes the same way.
    Minimize {
        #[arg(long, value_enum)]
        target: Target,
        file: PathBuf,
        /// The seed it was mutated from: differing bytes are reverted first.
        #[arg(long)]
        base: Option<PathBuf>,
        #[arg(long)]
        output: PathBuf,
        #[arg(long, default_value_t = 120.0)]
        seconds: f64,
        #[arg(long)]
        timeout_ms: Option<u64>,
        #[arg(long, default_value_t = 4096)]
        memory_mb: u64,
    },
    /// Write a target's built-in seeds to a folder (to start a corpus).
    Seeds {
        #[arg(long, value_enum)]
        target: Target,
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Target {
    Model,
    /// An external data file (`.ptd`) of `shipped/fp32_ptd/model.pte`.
    DataFile,
    TokenizerHf,
    TokenizerSentencepiece,
    TokenizerTiktoken,
    TokenizerLlama2c,
    ChatTemplate,
    /// A grammar for constrained decoding: the first byte picks the type (GBNF, Lark,
    /// regex, JSON schema), the rest is its text; compiled and driven a few steps.
    Grammar,
    /// A saved session state: the first byte picks the model (KV cache in the model,
    /// static attention, no KV cache) and whether the checksum is fixed up after mutation
    /// (so that the fields behind it are reached); the rest is the state, restored and
    /// then generated from.
    SessionState,
    /// A request to the OpenAI-compatible server: the first byte picks the endpoint (chat
    /// or completions), the rest is the body, sent to the server's router over the demo
    /// model. Any 4xx is a clean refusal; a 5xx other than 503 is a bug.
    ServerRequest,
    /// An image file (PNG, JPEG, GIF, BMP, WebP or anything else): decoded and
    /// preprocessed with the multimodal fixture's CLIP settings.
    Image,
    /// A WAV file: read, downmixed, resampled to 16 kHz and turned into Whisper's log-mel
    /// features.
    Wav,
    CAbi,
}

impl Target {
    fn name(self) -> &'static str {
        match self {
            Target::Model => "model",
            Target::DataFile => "data-file",
            Target::TokenizerHf => "tokenizer-hf",
            Target::TokenizerSentencepiece => "tokenizer-sentencepiece",
            Target::TokenizerTiktoken => "tokenizer-tiktoken",
            Target::TokenizerLlama2c => "tokenizer-llama2c",
            Target::ChatTemplate => "chat-template",
            Target::Grammar => "grammar",
            Target::SessionState => "session-state",
            Target::ServerRequest => "server-request",
            Target::Image => "image",
            Target::Wav => "wav",
            Target::CAbi => "c-abi",
        }
    }

    fn default_timeout(self) -> Duration {
        Duration::from_millis(if matches!(self, Target::Model | Target::DataFile) {
            10_000
        } else {
            5_000
        })
    }

    /// Words the mutator inserts into text-like inputs.
    fn dictionary(self) -> &'static [&'static [u8]] {
        match self {
            Target::ChatTemplate => &[
                b"{{",
                b"}}",
                b"{%",
                b"%}",
                b"{#",
                b"#}",
                b"{%-",
                b"-%}",
                b" for m in messages ",
                b" endfor ",
                b" if ",
                b" endif ",
                b" else ",
                b"loop.index0",
                b"loop.last",
                b"messages[0]",
                b"['content']",
                b".role",
                b"raise_exception('x')",
                b"range(",
                b"|length",
                b"|tojson",
                b"|trim",
                b"namespace(",
                b" set ",
                b" macro ",
                b" endmacro ",
                b"recursive",
                b"loop(",
                b"\"",
                b"'",
                b"\\",
                b"[",
                b"]",
                b"{",
                b"}",
                b"(",
                b")",
                b"|",
                b"~",
                b"\\u0000",
                b"\"chat_template\"",
                b"\"name\"",
                b"\"default\"",
                b"\"template\"",
                b"null",
                b"[]",
                b"{}",
                b"bos_token",
            ],
            Target::TokenizerHf => &[
                b"\"",
                b"{",
                b"}",
                b"[",
                b"]",
                b",",
                b":",
                b"null",
                b"true",
                b"-1",
                b"4294967295",
                b"1e309",
                b"\\u0000",
                b"\\ud800",
                b"\"type\"",
                b"\"BPE\"",
                b"\"WordPiece\"",
                b"\"Unigram\"",
                b"\"ByteLevel\"",
                b"\"Split\"",
                b"\"Sequence\"",
                b"\"Metaspace\"",
                b"\"pattern\"",
                b"\"Regex\"",
                b"(?=",
                b"\\p{L}",
                b"*",
                b"+",
                b"{99999}",
                b"\"special\"",
                b"\"id\"",
            ],
            Target::ServerRequest => &[
                b"\"messages\"",
                b"\"role\"",
                b"\"content\"",
                b"\"prompt\"",
                b"\"stream\": true",
                b"\"max_tokens\"",
                b"\"stop\"",
                b"\"seed\"",
                b"\"n\"",
                b"\"response_format\"",
                b"\"json_schema\"",
                b"\"grammar\"",
                b"\"type\"",
                b"null",
                b"true",
                b"-1",
                b"1e309",
                b"4294967296",
                b"[",
                b"]",
                b"{",
                b"}",
                b"\\u0000",
            ],
            Target::TokenizerTiktoken => &[b"\n", b" ", b"=", b"==", b"0", b"-1", b"4294967295"],
            Target::Grammar => &[
                b"::=",
                b"|",
                b"(",
                b")",
                b"*",
                b"+",
                b"?",
                b"{2,5}",
                b"{0,}",
                b"[",
                b"]",
                b"[^",
                b"\\x7F",
                b"\\u2028",
                b"\"",
                b".",
                b"root",
                b"\n",
                b"<[3]>",
                b"start:",
                b"%json",
                b"/[a-z]+/",
                b"\"type\"",
                b"\"$ref\"",
                b"{",
                b"}",
            ],
            _ => &[],
        }
    }
}

fn manifest() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn fixture(p: &str) -> PathBuf {
    manifest().join("tests/fixtures").join(p)
}

// ---------------------------------------------------------------------------------------
// Seeds
// ---------------------------------------------------------------------------------------

/// The models: every committed fixture kind, plus the small programs (the fuzzer finds
/// more per second in those).
const MODEL_SEEDS: &[&str] = &[
    "dyn_xnnpack/model.pte",
    "dyn_portable/model.pte",
    "sdpa_dyn_gqa/model.pte",
    "static_attention/model.pte",
    "static_xnnpack/model.pte",
    "no_kv_cache/model.pte",
    "cache_positions/model.pte",
    "multi_eos/model.pte",
    "llama_ops/model.pte",
    "no_forward.pte",
    "shipped/q8da4w/model.pte",
    "shipped/bf16/model.pte",
];

fn builtin_seeds(target: Target) -> Vec<(String, Vec<u8>)> {
    let files: Vec<PathBuf> = match target {
        Target::Model => MODEL_SEEDS.iter().map(|p| fixture(p)).collect(),
        Target::DataFile => vec![fixture("shipped/fp32_ptd/model.ptd")],
        Target::TokenizerHf => vec![fixture("tokenizers/hf/tokenizer.json")],
        Target::TokenizerSentencepiece => vec![
            fixture("tokenizers/sp_bpe.model"),
            fixture("tokenizers/sp_unigram.model"),
        ],
        Target::TokenizerTiktoken => vec![fixture("tokenizers/tiktoken.model")],
        Target::TokenizerLlama2c => vec![fixture("tokenizers/llama2c.bin")],
        Target::ChatTemplate => vec![
            fixture("chat/jinja_file/chat_template.jinja"),
            fixture("chat/config_list/tokenizer_config.json"),
            fixture("chat/config_string/tokenizer_config.json"),
            fixture("tokenizers/hf/tokenizer_config.json"),
            manifest().join("examples/data/compact_chat.jinja"),
        ],
        Target::Grammar => Vec::new(),
        Target::SessionState => Vec::new(),
        Target::ServerRequest => Vec::new(),
        Target::Image => [
            "rgb.png",
            "rgba.png",
            "gray.png",
            "palette.png",
            "photo.jpg",
            "image.tiff",
        ]
        .iter()
        .map(|f| fixture(&format!("multimodal/images/{f}")))
        .collect(),
        Target::Wav => std::fs::read_dir(fixture("whisper/audio"))
            .map(|d| {
                let mut v: Vec<PathBuf> = d
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.extension().is_some_and(|e| e == "wav"))
                    .collect();
                v.sort();
                v
            })
            .unwrap_or_default(),
        Target::CAbi => Vec::new(),
    };
    let mut seeds: Vec<(String, Vec<u8>)> = files
        .iter()
        .map(|f| {
            let bytes = std::fs::read(f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
            (
                f.strip_prefix(manifest())
                    .unwrap_or(f)
                    .display()
                    .to_string(),
                bytes,
            )
        })
        .collect();
    match target {
        Target::ChatTemplate => {
            seeds.push((
                "llama3".into(),
                etllm::ChatTemplate::llama3().source().into(),
            ));
            seeds.push((
                "llama2".into(),
                etllm::ChatTemplate::llama2().source().into(),
            ));
        }
        Target::Grammar => {
            let typed = |ty: u8, path: PathBuf| {
                let mut bytes = vec![ty];
                bytes.extend(std::fs::read(&path).unwrap());
                (path.display().to_string(), bytes)
            };
            let dir = fixture("gbnf");
            let mut names: Vec<_> = std::fs::read_dir(&dir)
                .unwrap()
                .map(|e| e.unwrap().path())
                .filter(|p| p.extension().is_some_and(|e| e == "gbnf"))
                .collect();
            names.sort();
            seeds.extend(names.into_iter().map(|p| typed(0, p)));
            seeds.push(typed(1, fixture("grammar/greeting.lark")));
            seeds.push(typed(3, fixture("grammar/person.schema.json")));
            seeds.push(("regex".into(), b"\x02[a-z]{2,5}-[0-9]+(x|y)?".to_vec()));
        }
        Target::SessionState => {
            for (i, _) in STATE_MODELS.iter().enumerate() {
                let mut runner = state_runner(i).expect("opening a fixture");
                let config = etllm::GenerationConfig {
                    temperature: 0.0,
                    max_new_tokens: 3,
                    echo: false,
                    ..Default::default()
                };
                runner
                    .generate(
                        "Once upon a time",
                        &config,
                        |_| std::ops::ControlFlow::Continue(()),
                        |_| {},
                    )
                    .expect("generating");
                let mut bytes = vec![i as u8];
                bytes.extend(runner.save_state_with(b"{}").expect("saving"));
                seeds.push((format!("state-{}", STATE_MODELS[i]), bytes));
            }
        }
        Target::ServerRequest => {
            let requests: [(u8, &str); 6] = [
                (
                    0,
                    r#"{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}"#,
                ),
                (
                    0,
                    r#"{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [{"type": "text", "text": "Hi"}]}], "max_completion_tokens": 3, "stream": true, "stream_options": {"include_usage": true}, "temperature": 0.5, "top_p": 0.9, "seed": 1, "stop": ["a", "b"]}"#,
                ),
                (
                    0,
                    r#"{"messages": [{"role": "user", "content": "x"}], "max_tokens": 6, "response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": {"type": "object", "properties": {"a": {"type": "integer"}}}}}}"#,
                ),
                (
                    0,
                    r#"{"messages": [{"role": "user", "content": "x"}], "max_tokens": 4, "grammar": "root ::= \"yes\" | \"no\"", "top_k": 3, "min_p": 0.1, "repetition_penalty": 1.1}"#,
                ),
                (
                    1,
                    r#"{"prompt": "Once upon a time", "max_tokens": 4, "echo": true}"#,
                ),
                (
                    1,
                    r#"{"prompt": [1, 2, 3], "max_tokens": 2, "stream": true, "ignore_eos": true}"#,
                ),
            ];
            for (i, (endpoint, body)) in requests.iter().enumerate() {
                let mut bytes = vec![*endpoint];
                bytes.extend_from_slice(body.as_bytes());
                seeds.push((format!("request-{i}"), bytes));
            }
        }
        Target::CAbi => {
            // Random programs: the interpreter gives every byte string a meaning.
            let mut rng = ChaCha8Rng::seed_from_u64(0xc0ab1);
            for i in 0..24 {
                let len = rng.random_range(32..400);
                let bytes = (0..len).map(|_| rng.random::<u8>()).collect();
                seeds.push((format!("random-{i}"), bytes));
            }
        }
        _ => {}
    }
    seeds
}

fn load_corpus(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    entries.sort();
    entries
        .into_iter()
        .map(|p| (p.display().to_string(), std::fs::read(&p).unwrap()))
        .collect()
}

// ---------------------------------------------------------------------------------------
// Mutations
// ---------------------------------------------------------------------------------------

/// The flatbuffer part of a `.pte` (before its segments): where the structure is, so where
/// most mutations go. `None` for other files.
fn hot_region(data: &[u8]) -> Option<Range<usize>> {
    if data.len() < 32 || &data[4..8] != b"ET12" || &data[8..12] != b"eh00" {
        return None;
    }
    let program_size = u64::from_le_bytes(data[16..24].try_into().ok()?) as usize;
    (program_size > 32 && program_size <= data.len()).then_some(0..program_size)
}

const INTERESTING_U32: &[u32] = &[
    0,
    1,
    2,
    0x7f,
    0x80,
    0xff,
    0x100,
    0x7fff,
    0xffff,
    0x10000,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
    0xffff_fffe,
    0x4000_0000,
];

struct Mutator<'a> {
    rng: ChaCha8Rng,
    seeds: &'a [(String, Vec<u8>)],
    dictionary: &'static [&'static [u8]],
}

impl Mutator<'_> {
    fn pos(&mut self, len: usize, hot: &Option<Range<usize>>) -> usize {
        if len == 0 {
            return 0;
        }
        match hot {
            Some(r) if r.end <= len && self.rng.random_bool(0.95) => {
                self.rng.random_range(r.clone())
            }
            _ => self.rng.random_range(0..len),
        }
    }

    fn chunk_len(&mut self, len: usize) -> usize {
        let max = len.clamp(1, 1 << self.rng.random_range(1..13));
        self.rng.random_range(1..=max)
    }

    /// Applies 1 to 8 stacked mutations to `data`.
    fn mutate(&mut self, data: &mut Vec<u8>) {
        let hot = hot_region(data);
        let rounds = 1 << self.rng.random_range(0..4);
        for _ in 0..rounds {
            let len = data.len();
            // Operations that change the length are rarer for `.pte` files, where they
            // mostly break offsets.
            let op = if hot.is_some() && self.rng.random_bool(0.8) {
                self.rng.random_range(0..5)
            } else {
                self.rng.random_range(0..11)
            };
            match op {
                0 if len > 0 => {
                    let p = self.pos(len, &hot);
                    data[p] ^= 1 << self.rng.random_range(0..8);
                }
                1 if len > 0 => {
                    let p = self.pos(len, &hot);
                    data[p] = match self.rng.random_range(0..6) {
                        0 => 0,
                        1 => 0xff,
                        2 => 0x7f,
                        3 => 0x80,
                        4 => data[p].wrapping_add(self.rng.random_range(1..8)),
                        _ => self.rng.random(),
                    };
                }
                2 if len >= 4 => {
                    let p = self.pos(len - 3, &hot);
                    let old = u32::from_le_bytes(data[p..p + 4].try_into().unwrap());
                    let v = match self.rng.random_range(0..4) {
                        0 => old.wrapping_add(self.rng.random_range(1..17)),
                        1 => old.wrapping_sub(self.rng.random_range(1..17)),
                        2 => self.rng.random_range(0..64),
                        _ => INTERESTING_U32[self.rng.random_range(0..INTERESTING_U32.len())],
                    };
                    data[p..p + 4].copy_from_slice(&v.to_le_bytes());
                }
                3 if len >= 8 => {
                    // A 64-bit overwrite (offsets and sizes in flatbuffers are 32-bit, but
                    // ExecuTorch also stores 64-bit integers).
                    let p = self.pos(len - 7, &hot);
                    let v: u64 = match self.rng.random_range(0..4) {
                        0 => 0,
                        1 => u64::MAX,
                        2 => i64::MAX as u64,
                        _ => 1 << self.rng.random_range(8..63),
                    };
                    data[p..p + 8].copy_from_slice(&v.to_le_bytes());
                }
                4 if len > 0 => {
                    // Overwrite a chunk with the same place in another seed (keeps offsets).
                    let other = &self.seeds[self.rng.random_range(0..self.seeds.len())].1;
                    let p = self.pos(len, &hot);
                    let n = self.chunk_len(len - p).min(other.len().saturating_sub(p));
                    if n > 0 {
                        data[p..p + n].copy_from_slice(&other[p..p + n]);
                    }
                }
                5 if len > 0 => {
                    let p = self.rng.random_range(0..len);
                    data.truncate(p);
                }
                6 if len > 0 => {
                    let a = self.rng.random_range(0..len);
                    let n = self.chunk_len(len - a);
                    let chunk = data[a..a + n].to_vec();
                    let at = self.rng.random_range(0..=len);
                    data.splice(at..at, chunk);
                }
                7 if len > 0 => {
                    let a = self.rng.random_range(0..len);
                    let n = self.chunk_len(len - a);
                    data.drain(a..a + n);
                }
                8 => {
                    // Splice: our head, another seed's tail.
                    let other = &self.seeds[self.rng.random_range(0..self.seeds.len())].1;
                    if !other.is_empty() {
                        let p = self.rng.random_range(0..=len);
                        let q = self.rng.random_range(0..other.len());
                        data.truncate(p);
                        data.extend_from_slice(&other[q..]);
                    }
                }
                9 => {
                    let at = self.rng.random_range(0..=len);
                    let n = self.rng.random_range(1..9);
                    let bytes: Vec<u8> = (0..n).map(|_| self.rng.random()).collect();
                    data.splice(at..at, bytes);
                }
                10 if !self.dictionary.is_empty() => {
                    let word = self.dictionary[self.rng.random_range(0..self.dictionary.len())];
                    let at = self.rng.random_range(0..=len);
                    if self.rng.random_bool(0.5) || at + word.len() > len {
                        data.splice(at..at, word.iter().copied());
                    } else {
                        data[at..at + word.len()].copy_from_slice(word);
                    }
                }
                _ => {
                    if len > 0 {
                        let p = self.rng.random_range(0..len);
                        data[p] = self.rng.random();
                    } else {
                        data.push(self.rng.random());
                    }
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Running one case in a child
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    Ok,
    Crash(String),
    Hang,
}

/// Exit code of a child that found a broken promise (ETLLM_ERR_PANIC, a C ABI contract).
const EXIT_BUG: i32 = 70;
/// Exit code of a child that could not run the case at all (a harness problem).
const EXIT_HARNESS: i32 = 71;

fn signal_name(sig: i32) -> String {
    match sig {
        libc::SIGSEGV => "SIGSEGV".into(),
        libc::SIGABRT => "SIGABRT".into(),
        libc::SIGBUS => "SIGBUS".into(),
        libc::SIGFPE => "SIGFPE".into(),
        libc::SIGILL => "SIGILL".into(),
        libc::SIGKILL => "SIGKILL".into(),
        libc::SIGTRAP => "SIGTRAP".into(),
        s => format!("signal {s}"),
    }
}

/// The stderr line that best names the failure (a panic's location, an uncaught C++
/// exception, ExecuTorch's fatal or last error log line, a broken C ABI promise), with
/// numbers replaced by N so that one bug is one kind.
///
/// Lines in `noise` (what the clean runs of the seeds printed, such as ExecuTorch's
/// messages while EtLlm probes for kernels) are not chosen.
fn first_line(stderr: &str, noise: &std::collections::HashSet<String>) -> String {
    let lines: Vec<&str> = stderr
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !noise.contains(*l))
        .collect();
    let find = |pat: &str| lines.iter().find(|l| l.contains(pat)).copied();
    let line = find("panicked at")
        .or_else(|| find("terminate called"))
        .or_else(|| find("C ABI contract broken"))
        .or_else(|| find("[executorch F"))
        .or_else(|| {
            lines
                .iter()
                .rev()
                .find(|l| l.starts_with("[executorch E"))
                .copied()
        })
        .or_else(|| {
            lines
                .iter()
                .find(|l| !l.starts_with("[executorch") && !l.starts_with("note:"))
                .copied()
        })
        .unwrap_or("");
    let mut out = String::new();
    let mut in_num = false;
    for c in line.chars() {
        if c.is_ascii_digit() {
            if !in_num {
                out.push('N');
            }
            in_num = true;
        } else {
            in_num = false;
            out.push(c);
        }
    }
    out.chars().take(160).collect()
}

struct Runner {
    target: Target,
    exe: PathBuf,
    timeout: Duration,
    memory_mb: u64,
    /// stderr lines of a clean run (see `first_line`).
    noise: std::collections::HashSet<String>,
}

impl Runner {
    fn spawn(&self, file: &Path, timeout: Duration) -> (Outcome, String) {
        let mut cmd = Command::new(&self.exe);
        cmd.arg("exec")
            .arg("--target")
            .arg(self.target.name())
            .arg(file)
            .env("RUST_BACKTRACE", "0")
            // ExecuTorch's log lines name what failed (see first_line).
            .env("ETLLM_LOG", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let limit = self.memory_mb << 20;
        if limit > 0 {
            use std::os::unix::process::CommandExt;
            // Safety: setrlimit is async-signal-safe; nothing else runs before exec.
            unsafe {
                cmd.pre_exec(move || {
                    let rl = libc::rlimit {
                        rlim_cur: limit as libc::rlim_t,
                        rlim_max: limit as libc::rlim_t,
                    };
                    libc::setrlimit(libc::RLIMIT_AS, &rl);
                    Ok(())
                });
            }
        }
        let mut child = cmd.spawn().expect("spawning the fuzz child");
        let mut pipe = child.stderr.take().expect("stderr");
        let reader = std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = (&mut pipe).take(1 << 16).read_to_end(&mut buf);
            // Drain the rest so the child never blocks on a full pipe.
            let _ = std::io::copy(&mut pipe, &mut std::io::sink());
            buf
        });
        let start = Instant::now();
        let mut nap = Duration::from_micros(200);
        let status = loop {
            match child.try_wait().expect("waiting for the fuzz child") {
                Some(s) => break Some(s),
                None if start.elapsed() > timeout => {
                    let _ = child.kill();
                    let _ = child.wait();
                    break None;
                }
                None => {
                    std::thread::sleep(nap);
                    nap = (nap * 2).min(Duration::from_millis(5));
                }
            }
        };
        let stderr = String::from_utf8_lossy(&reader.join().unwrap_or_default()).into_owned();
        let Some(status) = status else {
            return (Outcome::Hang, stderr);
        };
        use std::os::unix::process::ExitStatusExt;
        let outcome = if let Some(sig) = status.signal() {
            Outcome::Crash(
                format!("{} {}", signal_name(sig), first_line(&stderr, &self.noise))
                    .trim()
                    .into(),
            )
        } else {
            match status.code() {
                Some(0) => Outcome::Ok,
                Some(101) => Outcome::Crash(format!("panic {}", first_line(&stderr, &self.noise))),
                Some(EXIT_BUG) => {
                    Outcome::Crash(format!("bug {}", first_line(&stderr, &self.noise)))
                }
                Some(EXIT_HARNESS) => {
                    panic!("the fuzz child could not run the case: {stderr}")
                }
                Some(c) => Outcome::Crash(format!("exit {c} {}", first_line(&stderr, &self.noise))),
                None => Outcome::Crash("unknown".into()),
            }
        };
        (outcome, stderr)
    }

    /// Runs a case; a timeout is confirmed with three times the timeout before it counts.
    fn run(&self, file: &Path) -> (Outcome, String) {
        let (outcome, stderr) = self.spawn(file, self.timeout);
        if outcome == Outcome::Hang {
            return self.spawn(file, self.timeout * 3);
        }
        (outcome, stderr)
    }

    fn run_bytes(&self, scratch: &Path, bytes: &[u8]) -> (Outcome, String) {
        std::fs::write(scratch, bytes).expect("writing the case");
        self.run(scratch)
    }
}

// ---------------------------------------------------------------------------------------
// Minimization
// ---------------------------------------------------------------------------------------

fn minimize(
    r: &Runner,
    scratch: &Path,
    input: &[u8],
    base: Option<&[u8]>,
    want: &Outcome,
    budget: Duration,
) -> (Vec<u8>, usize) {
    let start = Instant::now();
    let mut execs = 0;
    let mut cur = input.to_vec();
    let mut still = |candidate: &[u8], execs: &mut usize| -> bool {
        if start.elapsed() > budget {
            return false;
        }
        *execs += 1;
        &r.run_bytes(scratch, candidate).0 == want
    };
    // 1. Revert the bytes that differ from the seed, in shrinking groups.
    revert(&mut cur, base, &mut still, &mut execs);
    // 2. Cut the tail.
    let mut step = cur.len() / 2;
    while step > 0 && start.elapsed() < budget {
        if cur.len() > step && still(&cur[..cur.len() - step], &mut execs) {
            cur.truncate(cur.len() - step);
        } else {
            step /= 2;
        }
    }
    // 3. Remove chunks, large to small.
    let mut step = cur.len() / 2;
    while step > 0 && start.elapsed() < budget {
        let mut at = 0;
        while at < cur.len() && start.elapsed() < budget {
            let end = (at + step).min(cur.len());
            let mut candidate = cur[..at].to_vec();
            candidate.extend_from_slice(&cur[end..]);
            if still(&candidate, &mut execs) {
                cur = candidate;
            } else {
                at = end;
            }
        }
        step /= 2;
    }
    // 4. Cutting may have brought it back to the seed's length.
    revert(&mut cur, base, &mut still, &mut execs);
    (cur, execs)
}

fn revert(
    cur: &mut Vec<u8>,
    base: Option<&[u8]>,
    still: &mut impl FnMut(&[u8], &mut usize) -> bool,
    execs: &mut usize,
) {
    let Some(base) = base.filter(|b| b.len() == cur.len()) else {
        return;
    };
    let mut diff: Vec<usize> = (0..cur.len()).filter(|&i| cur[i] != base[i]).collect();
    let mut group = diff.len().div_ceil(2).max(1);
    while !diff.is_empty() {
        let mut i = 0;
        let mut progress = false;
        while i < diff.len() {
            let mut candidate = cur.clone();
            let end = (i + group).min(diff.len());
            for &p in &diff[i..end] {
                candidate[p] = base[p];
            }
            if still(&candidate, execs) {
                *cur = candidate;
                diff.drain(i..end);
                progress = true;
            } else {
                i = end;
            }
        }
        if group == 1 && !progress {
            break;
        }
        group = group.div_ceil(2);
    }
}

// ---------------------------------------------------------------------------------------
// The fuzz loop
// ---------------------------------------------------------------------------------------

fn slug(kind: &str) -> String {
    let mut s: String = kind
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    while s.contains("--") {
        s = s.replace("--", "-");
    }
    let s = s.trim_matches('-').to_string();
    let h = kind.bytes().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100000001b3)
    });
    format!(
        "{}-{:08x}",
        s.chars().take(60).collect::<String>(),
        h as u32
    )
}

struct Kind {
    count: usize,
    dir: PathBuf,
}

#[allow(clippy::too_many_arguments)]
fn run(
    target: Target,
    seconds: f64,
    seed: u64,
    corpus: Option<PathBuf>,
    out: PathBuf,
    timeout: Duration,
    minimize_secs: f64,
    memory_mb: u64,
    allow: Vec<String>,
) -> ExitCode {
    let seeds = match &corpus {
        Some(dir) => load_corpus(dir),
        None => builtin_seeds(target),
    };
    assert!(!seeds.is_empty(), "no seeds");
    let dir = out.join(target.name());
    std::fs::create_dir_all(&dir).unwrap();
    let scratch = dir.join(format!(".case-{}", std::process::id()));
    let min_scratch = dir.join(format!(".min-{}", std::process::id()));
    let r = Runner {
        target,
        exe: std::env::current_exe().unwrap(),
        timeout,
        memory_mb,
        noise: Default::default(),
    };
    let mut r = r;
    let mut m = Mutator {
        rng: ChaCha8Rng::seed_from_u64(seed),
        seeds: &seeds,
        dictionary: target.dictionary(),
    };
    let start = Instant::now();
    let deadline = Duration::from_secs_f64(seconds);
    let (mut execs, mut crashes, mut hangs) = (0usize, 0usize, 0usize);
    let mut kinds: BTreeMap<String, Kind> = BTreeMap::new();
    // The seeds themselves first: each must run clean.
    let mut queue: Vec<(usize, Vec<u8>)> = seeds
        .iter()
        .enumerate()
        .map(|(i, (_, b))| (i, b.clone()))
        .collect();
    queue.reverse();
    while start.elapsed() < deadline {
        let is_seed = !queue.is_empty();
        let (from, case) = match queue.pop() {
            Some(c) => c,
            None => {
                let i = m.rng.random_range(0..seeds.len());
                let mut case = seeds[i].1.clone();
                m.mutate(&mut case);
                (i, case)
            }
        };
        let (outcome, stderr) = r.run_bytes(&scratch, &case);
        execs += 1;
        match outcome {
            Outcome::Ok if is_seed => r.noise.extend(stderr.lines().map(|l| l.trim().to_string())),
            Outcome::Ok => {}
            Outcome::Hang => {
                hangs += 1;
                let hdir = dir.join("hangs");
                std::fs::create_dir_all(&hdir).unwrap();
                if hangs <= 20 {
                    std::fs::write(hdir.join(format!("hang-{hangs}.bin")), &case).unwrap();
                }
                eprintln!("[{}] hang from seed {}", target.name(), seeds[from].0);
            }
            Outcome::Crash(kind) => {
                crashes += 1;
                let entry = kinds.entry(kind.clone()).or_insert_with(|| Kind {
                    count: 0,
                    dir: dir.join("crashes").join(slug(&kind)),
                });
                entry.count += 1;
                std::fs::create_dir_all(&entry.dir).unwrap();
                if entry.count <= 5 {
                    std::fs::write(entry.dir.join(format!("input-{}.bin", entry.count)), &case)
                        .unwrap();
                }
                if entry.count == 1 {
                    eprintln!(
                        "[{}] new crash kind after {execs} execs: {kind} (from seed {})",
                        target.name(),
                        seeds[from].0
                    );
                    std::fs::write(
                        entry.dir.join("stderr.txt"),
                        format!("{kind}\nseed: {}\n\n{stderr}", seeds[from].0),
                    )
                    .unwrap();
                    let budget = Duration::from_secs_f64(minimize_secs)
                        .min(deadline.saturating_sub(start.elapsed()));
                    let (min, n) = minimize(
                        &r,
                        &min_scratch,
                        &case,
                        Some(&seeds[from].1),
                        &Outcome::Crash(kind.clone()),
                        budget,
                    );
                    execs += n;
                    std::fs::write(entry.dir.join("min.bin"), &min).unwrap();
                    let ndiff = if min.len() == seeds[from].1.len() {
                        (0..min.len())
                            .filter(|&i| min[i] != seeds[from].1[i])
                            .count()
                    } else {
                        usize::MAX
                    };
                    if ndiff <= 64 {
                        let diff: Vec<String> = (0..min.len())
                            .filter(|&i| min[i] != seeds[from].1[i])
                            .map(|i| format!("{i}: {:#04x} -> {:#04x}", seeds[from].1[i], min[i]))
                            .collect();
                        std::fs::write(
                            entry.dir.join("min-diff.txt"),
                            format!("seed {}\n{}\n", seeds[from].0, diff.join("\n")),
                        )
                        .unwrap();
                    }
                    eprintln!(
                        "[{}]   minimized {} -> {} bytes in {n} execs",
                        target.name(),
                        case.len(),
                        min.len()
                    );
                }
            }
        }
    }
    let _ = std::fs::remove_file(&scratch);
    let _ = std::fs::remove_file(&min_scratch);
    let secs = start.elapsed().as_secs_f64();
    let allowed = |kind: &str| allow.iter().any(|a| kind.contains(a.as_str()));
    let known: usize = kinds
        .iter()
        .filter(|(kind, _)| allowed(kind))
        .map(|(_, k)| k.count)
        .sum();
    println!(
        "fuzz {}: {execs} execs in {secs:.0} s ({:.1}/s), {crashes} crashes ({known} of allowed kinds), {hangs} hangs, {} distinct crash kinds",
        target.name(),
        execs as f64 / secs,
        kinds.len()
    );
    for (kind, k) in &kinds {
        let tag = if allowed(kind) { " (allowed)" } else { "" };
        println!("  {} x{}{tag}: {kind}", k.dir.display(), k.count);
    }
    if crashes > known || hangs > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

// ---------------------------------------------------------------------------------------
// The children: one case each
// ---------------------------------------------------------------------------------------

fn exec_model(path: &Path) -> etllm::Result<()> {
    one_step(path, Vec::new())
}

/// Opens the program of `shipped/fp32_ptd` with `path` as its data file, then runs a step.
fn exec_data_file(path: &Path) -> etllm::Result<()> {
    one_step(
        &fixture("shipped/fp32_ptd/model.pte"),
        vec![path.to_path_buf()],
    )
}

/// Opens `model` (with `data_paths`) and generates one greedy token from a short prompt.
fn one_step(model: &Path, data_paths: Vec<PathBuf>) -> etllm::Result<()> {
    let mut runner = etllm::Runner::open(
        model,
        fixture("tokenizer.json"),
        etllm::RunnerOptions {
            num_threads: Some(1),
            data_paths,
            ..Default::default()
        },
    )?;
    let config = etllm::GenerationConfig {
        echo: false,
        temperature: 0.0,
        max_new_tokens: 1,
        ignore_eos: true,
        num_bos: 0,
        ..Default::default()
    };
    runner.generate_from_ids(&[1, 5, 9], &config, |_| ControlFlow::Continue(()), |_| {})?;
    Ok(())
}

const TEXT: &str = "Hello, world! Once upon a time 123 4567 <s></s> <|begin_of_text|> \
                    ünïcödé 日本語 🦀\t\n  end";

fn exec_tokenizer(path: &Path) -> etllm::Result<()> {
    use etllm::tokenizer::{Preset, Tokenizer};
    let len = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    // Half of the cases also apply the Llama preset (its token lookups).
    let t = Tokenizer::load(path, (len % 2 == 1).then_some(Preset::Llama))?;
    let vocab = t.vocab_size() as u32;
    let _ = (t.bos_id(), t.eos_ids(), t.bos_token(), t.eos_token());
    let ids = t.encode(TEXT)?;
    let _ = t.encode_with(TEXT, 1, 1);
    let _ = t.encode("");
    let _ = t.decode(&ids);
    let mut stream = t.stream();
    for &id in &ids {
        let _ = stream.push(id);
    }
    let _ = stream.flush();
    for id in [0, 1, vocab.saturating_sub(1), vocab, vocab + 1, u32::MAX] {
        let _ = t.token_to_piece(id);
        let _ = t.decode(&[id, 0]);
        let _ = t.stream().push(id);
    }
    Ok(())
}

/// Compiles the grammar against a vocabulary of single bytes and takes up to 64 steps,
/// each time the lowest allowed byte.
fn exec_image(path: &Path) -> etllm::Result<()> {
    use etllm::media::image::{decode, ImagePreprocessor};
    let bytes = std::fs::read(path).map_err(|e| etllm::Error::InvalidArgument(e.to_string()))?;
    let pixels = decode(&bytes, "case")?;
    let pre = ImagePreprocessor::from_file(&fixture("multimodal/preprocessor_config.json"))?;
    let (values, _, _) = pre.pixel_values(&pixels);
    assert!(values.iter().all(|v| v.is_finite()));
    Ok(())
}

fn exec_wav(path: &Path) -> etllm::Result<()> {
    use etllm::media::audio::{Audio, LogMel, LogMelConfig};
    let bytes = std::fs::read(path).map_err(|e| etllm::Error::InvalidArgument(e.to_string()))?;
    let audio = Audio::from_wav(&bytes, "case")?;
    // At most 60 s of input are resampled: the features use 30.
    let limit = audio.sample_rate as usize * 60;
    let audio = Audio {
        samples: audio.samples.into_iter().take(limit).collect(),
        ..audio
    }
    .resampled(16_000)?;
    let features = LogMel::new(LogMelConfig::default())?.compute(&audio.samples);
    assert!(features.iter().all(|v| v.is_finite()));
    Ok(())
}

fn exec_grammar(path: &Path) -> etllm::Result<()> {
    use etllm::grammar::Compiler;
    use etllm::tokenizer::TokenBytes;
    use etllm::GrammarType;
    let bytes = std::fs::read(path).map_err(|e| etllm::Error::InvalidArgument(e.to_string()))?;
    let Some((&ty, text)) = bytes.split_first() else {
        return Ok(());
    };
    let ty = [
        GrammarType::Gbnf,
        GrammarType::Lark,
        GrammarType::Regex,
        GrammarType::JsonSchema,
    ][ty as usize % 4];
    let mut tokens: Vec<TokenBytes> = (0..=255u8).map(|b| TokenBytes::Text(vec![b])).collect();
    tokens.push(TokenBytes::Special("</s>".into()));
    let compiler = Compiler::new(&tokens, 257, &[256])?;
    let mut c = compiler.compile(ty, &String::from_utf8_lossy(text))?;
    for _ in 0..64 {
        if c.is_complete() {
            break;
        }
        let token = c.first_allowed()?;
        if token == 256 {
            break;
        }
        c.commit(token)?;
        let _ = c.forced_tokens(4)?;
    }
    Ok(())
}

/// The fixtures whose states the session-state target restores.
const STATE_MODELS: &[&str] = &["dyn_xnnpack", "static_attention", "no_kv_cache"];

fn state_runner(index: usize) -> etllm::Result<etllm::Runner> {
    let name = STATE_MODELS[index % STATE_MODELS.len()];
    etllm::Runner::open(
        fixture(&format!("{name}/model.pte")),
        fixture("tokenizer.json"),
        etllm::RunnerOptions::default(),
    )
}

fn exec_session_state(path: &Path) -> etllm::Result<()> {
    let bytes = std::fs::read(path).map_err(|e| etllm::Error::InvalidArgument(e.to_string()))?;
    let Some((&head, state)) = bytes.split_first() else {
        return Ok(());
    };
    let mut state = state.to_vec();
    if head & 0x80 == 0 && state.len() >= 16 {
        // Keep the checksum valid, so that mutations reach the fields it covers.
        let n = state.len() - 8;
        let sum = xxhash_rust::xxh3::xxh3_64(&state[..n]);
        state[n..].copy_from_slice(&sum.to_le_bytes());
    }
    let mut runner = state_runner((head & 0x7f) as usize)?;
    runner.load_state(&state)?;
    let config = etllm::GenerationConfig {
        temperature: 0.0,
        max_new_tokens: 2,
        echo: false,
        ..Default::default()
    };
    let prompt = if runner.position() > 0 { "" } else { "a" };
    runner.generate(
        prompt,
        &config,
        |_| std::ops::ControlFlow::Continue(()),
        |_| {},
    )?;
    Ok(())
}

/// Without the `server` feature there is no server to fuzz: every case is a clean refusal.
#[cfg(not(feature = "server"))]
fn exec_server_request(_path: &Path) -> etllm::Result<()> {
    Err(etllm::Error::InvalidArgument(
        "built without the `server` feature".into(),
    ))
}

/// Sends one request to the server's router (a fresh server over the demo model) and reads
/// the whole answer, streamed or not.
#[cfg(feature = "server")]
fn exec_server_request(path: &Path) -> etllm::Result<()> {
    use etllm::server::{Server, ServerOptions};
    use tower::ServiceExt;
    let bytes = std::fs::read(path).map_err(|e| etllm::Error::InvalidArgument(e.to_string()))?;
    let Some((&head, body)) = bytes.split_first() else {
        return Ok(());
    };
    let mut runner = etllm::Runner::open(
        manifest().join("models/demo/model.pte"),
        manifest().join("models/demo/tokenizer.json"),
        etllm::RunnerOptions::default(),
    )?;
    let mut options = ServerOptions::default();
    // Short generations: the fuzzer looks for crashes, not long answers.
    options.context_length = Some(96);
    options.max_body_bytes = 1 << 16;
    let server = Server::new(&mut runner, options)?;
    let path = if head & 1 == 0 {
        "/v1/chat/completions"
    } else {
        "/v1/completions"
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| etllm::Error::InvalidArgument(e.to_string()))?;
    let (status, answer) = runtime.block_on(async {
        let request = axum::http::Request::post(path)
            .header("content-type", "application/json")
            .body(axum::body::Body::from(body.to_vec()))
            .expect("a request");
        let response = server.router().oneshot(request).await.expect("infallible");
        let status = response.status();
        let answer = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .expect("the answer");
        (status, answer)
    });
    if status.is_server_error() && status.as_u16() != 503 {
        panic!(
            "status {status} for a request: {}",
            String::from_utf8_lossy(&answer)
        );
    }
    Ok(())
}

fn exec_chat(path: &Path) -> etllm::Result<()> {
    use etllm::{ChatMessage, ChatTemplate};
    let bytes = std::fs::read(path).map_err(|e| etllm::Error::InvalidArgument(e.to_string()))?;
    let template = if bytes.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{')
        && bytes.windows(15).any(|w| w == b"\"chat_template\"")
    {
        // A tokenizer_config.json: read through the model-folder loader.
        let dir = path.with_extension("dir");
        std::fs::create_dir_all(&dir).map_err(|e| etllm::Error::InvalidArgument(e.to_string()))?;
        std::fs::write(dir.join("tokenizer_config.json"), &bytes)
            .map_err(|e| etllm::Error::InvalidArgument(e.to_string()))?;
        let t = ChatTemplate::from_model_dir(&dir);
        let _ = std::fs::remove_dir_all(&dir);
        match t? {
            Some(t) => t,
            None => return Ok(()),
        }
    } else {
        ChatTemplate::new(String::from_utf8_lossy(&bytes).into_owned())?
    }
    .with_token("bos_token", "<s>")
    .with_token("eos_token", "</s>");
    let convs: [&[ChatMessage]; 4] = [
        &[],
        &[ChatMessage::user("Hi")],
        &[
            ChatMessage::system("Be brief."),
            ChatMessage::user("Hi {{ there }}"),
            ChatMessage::assistant("Hello! {% raw %}"),
            ChatMessage::user("ünï 🦀 \u{0}"),
        ],
        &[
            ChatMessage::assistant("first"),
            ChatMessage::new("tool", "x"),
            ChatMessage::new("", ""),
        ],
    ];
    for messages in convs {
        for gen in [true, false] {
            let _ = template.apply(messages, gen);
        }
    }
    Ok(())
}

fn exec(target: Target, file: &Path) -> ExitCode {
    if !file.is_file() {
        eprintln!("{}: not a file", file.display());
        return ExitCode::from(EXIT_HARNESS as u8);
    }
    let result = match target {
        Target::Model => exec_model(file),
        Target::DataFile => exec_data_file(file),
        Target::TokenizerHf
        | Target::TokenizerSentencepiece
        | Target::TokenizerTiktoken
        | Target::TokenizerLlama2c => exec_tokenizer(file),
        Target::ChatTemplate => exec_chat(file),
        Target::Grammar => exec_grammar(file),
        Target::SessionState => exec_session_state(file),
        Target::ServerRequest => exec_server_request(file),
        Target::Image => exec_image(file),
        Target::Wav => exec_wav(file),
        Target::CAbi => {
            let bytes = std::fs::read(file).expect("reading the case");
            cabi::run(&bytes);
            Ok(())
        }
    };
    // A clean error is a pass: the library refused the input.
    if std::env::var_os("FUZZ_VERBOSE").is_some() {
        eprintln!("result: {result:?}");
    }
    ExitCode::SUCCESS
}

fn main() -> ExitCode {
    match Cli::parse().cmd {
        Cmd::Run {
            target,
            seconds,
            seed,
            corpus,
            out,
            timeout_ms,
            minimize_secs,
            memory_mb,
            allow,
        } => run(
            target,
            seconds,
            seed,
            corpus,
            out,
            timeout_ms.map_or(target.default_timeout(), Duration::from_millis),
            minimize_secs,
            memory_mb,
            allow
                .map(|f| {
                    std::fs::read_to_string(&f)
                        .unwrap_or_else(|e| panic!("{}: {e}", f.display()))
                        .lines()
                        .map(str::trim)
                        .filter(|l| !l.is_empty() && !l.starts_with('#'))
                        .map(String::from)
                        .collect()
                })
                .unwrap_or_default(),
        ),
        Cmd::Exec { target, file } => exec(target, &file),
        Cmd::Minimize {
            target,
            file,
            base,
            output,
            seconds,
            timeout_ms,
            memory_mb,
        } => {
            let r = Runner {
                target,
                exe: std::env::current_exe().unwrap(),
                timeout: timeout_ms.map_or(target.default_timeout(), Duration::from_millis),
                memory_mb,
                noise: Default::default(),
            };
            let input = std::fs::read(&file).unwrap();
            let base = base.map(|b| std::fs::read(b).unwrap());
            let scratch = output.with_extension("scratch");
            let (want, stderr) = r.run_bytes(&scratch, &input);
            if want == Outcome::Ok {
                eprintln!("{} does not crash", file.display());
                return ExitCode::FAILURE;
            }
            eprintln!("want: {want:?}\n{stderr}");
            let budget = Duration::from_secs_f64(seconds);
            let (min, n) = minimize(&r, &scratch, &input, base.as_deref(), &want, budget);
            let _ = std::fs::remove_file(&scratch);
            std::fs::write(&output, &min).unwrap();
            println!(
                "{} -> {} bytes in {n} execs: {}",
                input.len(),
                min.len(),
                output.display()
            );
            ExitCode::SUCCESS
        }
        Cmd::Seeds { target, out } => {
            std::fs::create_dir_all(&out).unwrap();
            for (i, (name, bytes)) in builtin_seeds(target).iter().enumerate() {
                let file = Path::new(name)
                    .file_name()
                    .unwrap()
                    .to_string_lossy()
                    .into_owned();
                std::fs::write(out.join(format!("{i:02}-{file}")), bytes).unwrap();
            }
            ExitCode::SUCCESS
        }
    }
}

// ---------------------------------------------------------------------------------------
// The c-abi target: an interpreter of byte programs
// ---------------------------------------------------------------------------------------

mod cabi {
    //! Each case is a program: one byte picks a C function, the bytes after it its
    //! arguments. Only calls a C caller may legally make are generated: every pointer is
    //! NULL or points to a live object of the right size, struct buffers are really
    //! `struct_size` bytes (or larger), `bool`s are 0 or 1 and strings are NUL-terminated;
    //! everything else (sizes, lengths, enum values, UTF-8, handle states) is fuzzed.

    use super::*;
    use etllm::ffi::chat::*;
    use etllm::ffi::config::*;
    use etllm::ffi::error::*;
    use etllm::ffi::io_manager::*;
    use etllm::ffi::runner::*;
    use etllm::ffi::stats::*;
    use etllm::ffi::tokenizer::*;
    use etllm::ffi::*;
    use std::ffi::{c_char, c_void, CStr};
    use std::mem::{offset_of, size_of};

    struct Input {
        bytes: Vec<u8>,
        at: usize,
    }

    thread_local! {
        static INPUT: RefCell<Input> = const { RefCell::new(Input { bytes: Vec::new(), at: 0 }) };
        /// Memory that must outlive the calls it is passed to (until the case ends).
        static ARENA: RefCell<Vec<Box<[u64]>>> = const { RefCell::new(Vec::new()) };
    }

    fn u8_() -> u8 {
        INPUT.with(|i| {
            let mut i = i.borrow_mut();
            let b = i.bytes.get(i.at).copied().unwrap_or(0);
            i.at += 1;
            b
        })
    }
    fn done() -> bool {
        INPUT.with(|i| {
            let i = i.borrow();
            i.at >= i.bytes.len()
        })
    }
    fn u32_() -> u32 {
        u32::from_le_bytes([u8_(), u8_(), u8_(), u8_()])
    }
    fn bool_() -> bool {
        u8_() & 1 == 1
    }
    fn pick<T: Copy>(xs: &[T]) -> T {
        xs[u8_() as usize % xs.len()]
    }
    fn small() -> usize {
        (u8_() % 8) as usize
    }
    fn int_i32() -> i32 {
        match u8_() % 4 {
            0 => u32_() as i32,
            _ => pick(&[0, 1, 2, 3, 4, -1, -2, 8, 100, i32::MAX, i32::MIN, 1 << 20]),
        }
    }
    fn int_u32() -> u32 {
        match u8_() % 4 {
            0 => u32_(),
            _ => pick(&[0, 1, 2, 3, 5, 255, 599, 600, 1000, u32::MAX, 1 << 16]),
        }
    }
    fn float() -> f32 {
        pick(&[
            0.0,
            0.8,
            1.0,
            0.5,
            -1.0,
            2.0,
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            1e-30,
            1e30,
            -0.0,
            f32::MIN_POSITIVE,
        ])
    }

    /// A zeroed, 8-byte aligned buffer of at least `bytes` bytes that lives until the
    /// case ends.
    fn alloc(bytes: usize) -> *mut u8 {
        let mut b = vec![0u64; bytes.div_ceil(8).max(1)].into_boxed_slice();
        let p = b.as_mut_ptr() as *mut u8;
        ARENA.with(|a| a.borrow_mut().push(b));
        p
    }
    /// A copy of plain-old-data `items` in the arena.
    fn keep<T>(items: &[T]) -> *mut T {
        let p = alloc(size_of_val(items)) as *mut T;
        // Safety: `p` has room for the items and is 8-byte aligned.
        unsafe { std::ptr::copy_nonoverlapping(items.as_ptr(), p, items.len()) };
        p
    }
    fn keep_str(bytes: &[u8]) -> *const c_char {
        let mut v = bytes.to_vec();
        v.push(0);
        keep(&v) as *const c_char
    }

    fn paths() -> Vec<String> {
        let f = |p: &str| fixture(p).display().to_string();
        vec![
            f("tokenizer.json"),
            f("tokenizers/sp_bpe.model"),
            f("tokenizers/tiktoken.model"),
            f("tokenizers/llama2c.bin"),
            f("tokenizers/hf"),
            f("chat/jinja_file"),
            f("chat/config_list"),
            f("dyn_portable/model.pte"),
            f("multi_eos/model.pte"),
            f("multimodal/model.pte"),
            f("multimodal/images/rgb.png"),
            f("multimodal/images/truncated.png"),
            f("whisper/audio/speech16k.wav"),
            f("no_forward.pte"),
            f(""),
            "/nonexistent/file".into(),
        ]
    }

    /// A method name: mostly one the fixture models have, else any string argument.
    fn method_name() -> *const c_char {
        if u8_().is_multiple_of(4) {
            return cstr();
        }
        keep_str(pick(&[
            &b"forward"[..],
            b"forward",
            b"get_max_seq_len",
            b"get_max_context_len",
            b"get_vocab_size",
            b"get_eos_ids",
            b"get_bos_id",
            b"use_kv_cache",
            b"enable_dynamic_shape",
        ]))
    }

    /// A NUL-terminated string argument: NULL, text, a path, non-UTF-8 or a long string.
    fn cstr() -> *const c_char {
        match u8_() % 10 {
            0 => std::ptr::null(),
            1 => keep_str(b""),
            2 | 3 => keep_str(pick(&paths().iter().map(|s| s.as_str()).collect::<Vec<_>>()).as_bytes()),
            4 => keep_str(pick(&[
                &b"user"[..],
                b"assistant",
                b"system",
                b"bos_token",
                b"eos_token",
                b"forward",
                b"get_max_seq_len",
                b"get_vocab_size",
                b"get_eos_ids",
                b"get_bos_id",
                b"use_kv_cache",
                b"<s>",
                b"Once upon a time",
                b"{{ bos_token }}{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}{% if add_generation_prompt %}<a>{% endif %}",
                b"{{ raise_exception('no') }}",
                b"{% for m in messages %}",
                b"{{ messages[99].content }}",
            ])),
            5 => keep_str(pick(&[
                &b"\xff\xfe"[..],
                b"caf\xc3",
                b"\xed\xa0\x80",
                b"\xc0\x80x",
                b"ok\x80",
                b"\xf4\x90\x80\x80",
            ])),
            6 => {
                let n = small() * 4;
                let bytes: Vec<u8> = (0..n).map(|_| u8_()).collect();
                // Stops at the first NUL, as a C string does.
                keep_str(bytes.split(|&b| b == 0).next().unwrap_or(&[]))
            }
            7 => keep_str("日本語 ünï 🦀".as_bytes()),
            8 => keep_str(&vec![b'a'; 5000]),
            _ => keep_str(b"Hello, world!"),
        }
    }

    fn out<T>() -> *mut T {
        if u8_().is_multiple_of(8) {
            std::ptr::null_mut()
        } else {
            alloc(size_of::<T>().max(16)) as *mut T
        }
    }

    /// A u32 array of up to 16 ids, and a length no larger than it (or NULL).
    fn ids() -> (*const u32, usize) {
        match u8_() % 6 {
            0 => (std::ptr::null(), 0),
            1 => (std::ptr::null(), 1 + small()),
            _ => {
                let n = small() * 2;
                let v: Vec<u32> = (0..n).map(|_| int_u32()).collect();
                let len = if n > 0 && bool_() {
                    u8_() as usize % (n + 1)
                } else {
                    n
                };
                (keep(&v) as *const u32, len)
            }
        }
    }

    /// A list of multimodal inputs: kinds and fields fuzzed, every pointer NULL or valid
    /// for the length given with it; `struct_size` the full size, or now and then one the
    /// library must refuse (an array's stride is its elements' `struct_size`).
    fn media_inputs() -> (*const etllm::ffi::input::etllm_input, usize) {
        use etllm::ffi::input::{etllm_input, etllm_input_default};
        let n = small();
        if n == 0 && bool_() {
            return (std::ptr::null(), 0);
        }
        let mut v: Vec<etllm_input> = Vec::with_capacity(n);
        for _ in 0..n {
            let mut i = etllm_input_default();
            if u8_().is_multiple_of(16) {
                i.struct_size = pick(&[0, 3, 7, 9, 1000]);
            }
            i.kind = if u8_().is_multiple_of(8) {
                int_i32()
            } else {
                (u8_() % 8) as i32
            };
            i.text = cstr();
            i.path = cstr();
            let (ids, k) = ids();
            i.tokens = ids;
            i.num_tokens = k;
            let nbytes = match u8_() % 4 {
                0 => 0,
                1 => small(),
                2 => 3 * 32 * 32,
                _ => std::fs::read(fixture("multimodal/images/rgb.png")).map_or(0, |b| b.len()),
            };
            let bytes: Vec<u8> = if nbytes > 100 && bool_() {
                let mut b = std::fs::read(fixture("multimodal/images/rgb.png")).unwrap_or_default();
                b.resize(nbytes, 0);
                let at = u8_() as usize % nbytes.max(1);
                b[at] ^= u8_();
                b
            } else {
                (0..nbytes).map(|_| u8_()).collect()
            };
            i.bytes = if nbytes == 0 && bool_() {
                std::ptr::null()
            } else {
                keep(&bytes) as *const u8
            };
            i.num_bytes = nbytes;
            i.width = pick(&[0, 1, 32, 61, 40, u32::MAX, 1 << 16]);
            i.height = pick(&[0, 1, 32, 40, u32::MAX]);
            i.channels = pick(&[0, 1, 2, 3, 4, 5, u32::MAX]);
            i.sample_rate = int_u32();
            let nf = pick(&[0usize, 1, 3, 768, 3072, 16_000]);
            let floats: Vec<f32> = (0..nf)
                .map(|k| if k < 64 { float() } else { 0.1 })
                .collect();
            i.floats = if nf == 0 && bool_() {
                std::ptr::null()
            } else {
                keep(&floats) as *const f32
            };
            i.num_floats = nf;
            let sizes: Vec<usize> = (0..small())
                .map(|_| pick(&[0, 1, 3, 32, 16, usize::MAX]))
                .collect();
            i.sizes = keep(&sizes) as *const usize;
            i.num_sizes = sizes.len();
            v.push(i);
        }
        (keep(&v) as *const etllm_input, n)
    }

    /// A struct_size to try for a struct of `full` bytes whose field offsets are `fields`.
    fn struct_size(full: usize, fields: &[usize]) -> usize {
        match u8_() % 8 {
            0 => 0,
            1 => u8_() as usize % full.max(1),
            2 => pick(fields),
            3 => full + 8 * (1 + small()),
            4 => (u32_() % 4096) as usize,
            _ => full,
        }
    }

    /// A caller's versioned struct: `value`'s first bytes in a buffer as large as the
    /// struct_size says (or larger), with struct_size set; random bytes past the struct.
    fn versioned<T: Copy>(value: T, fields: &[usize]) -> *mut T {
        let full = size_of::<T>();
        let size = struct_size(full, fields);
        let p = alloc(size.max(full).max(4));
        // Safety: `p` holds at least max(size, full) bytes.
        unsafe {
            std::ptr::copy_nonoverlapping(&value as *const T as *const u8, p, full.min(size));
            for i in full..size {
                *p.add(i) = u8_();
            }
            *(p as *mut u32) = size as u32;
        }
        p as *mut T
    }

    fn maybe_null<T>(p: *mut T) -> *mut T {
        if u8_().is_multiple_of(10) {
            std::ptr::null_mut()
        } else {
            p
        }
    }

    fn config() -> *const etllm_generation_config {
        let mut c = etllm_generation_config_default();
        if bool_() {
            c.echo = bool_();
            c.warming = u8_().is_multiple_of(8);
            c.ignore_eos = bool_();
            c.has_seed = bool_();
            c.max_new_tokens = pick(&[-1, 0, 1, 2, 4, 8, i32::MAX, i32::MIN, -2]);
            c.seq_len = pick(&[-1, 0, 1, 2, 5, 16, 64, 127, 128, 129, i32::MAX, i32::MIN]);
            c.temperature = float();
            c.num_bos = pick(&[0, 1, 2, -1, 1000, i32::MAX]);
            c.num_eos = pick(&[0, 1, 2, -1, 1000, i32::MAX]);
            c.seed = u32_() as u64;
            let (ids, n) = ids();
            c.stop_token_ids = ids;
            c.num_stop_token_ids = n;
            c.top_k = pick(&[0, 1, 2, -1, 5, 600, 601, i32::MAX, i32::MIN]);
            c.top_p = float();
            c.min_p = float();
            c.repetition_penalty = float();
            match u8_() % 4 {
                0 => {}
                1 => c.num_stop_strings = 1 + small(),
                _ => {
                    let v: Vec<*const c_char> = (0..1 + small()).map(|_| cstr()).collect();
                    c.stop_strings = keep(&v);
                    c.num_stop_strings = v.len() - small().min(v.len());
                }
            }
        }
        type C = etllm_generation_config;
        let fields = [
            offset_of!(C, warming),
            offset_of!(C, max_new_tokens),
            offset_of!(C, seed),
            offset_of!(C, stop_token_ids),
            offset_of!(C, top_k),
            offset_of!(C, stop_strings),
            offset_of!(C, num_stop_strings),
        ];
        maybe_null(versioned(c, &fields))
    }

    fn stats_out() -> *mut etllm_stats {
        type S = etllm_stats;
        let fields = [
            offset_of!(S, model_load_start_us),
            offset_of!(S, first_token_us),
            offset_of!(S, num_generated_tokens),
        ];
        maybe_null(versioned(etllm_stats_default(), &fields))
    }

    // ---- callbacks ------------------------------------------------------------------

    /// Aborts with a message: a promise of the C ABI was broken.
    fn broken(what: &str) -> ! {
        eprintln!("C ABI contract broken: {what}");
        std::process::exit(EXIT_BUG);
    }

    #[repr(C)]
    struct Calls {
        count: u32,
        stop_after: u32,
    }

    unsafe extern "C" fn on_token(
        ud: *mut c_void,
        piece: *const c_char,
        len: usize,
        id: i64,
    ) -> i32 {
        if piece.is_null() {
            broken("token piece is NULL");
        }
        // Safety: the library promises `len` bytes of UTF-8 followed by a NUL.
        let bytes = unsafe { std::slice::from_raw_parts(piece as *const u8, len + 1) };
        if bytes[len] != 0 {
            broken("token piece not NUL-terminated");
        }
        if std::str::from_utf8(&bytes[..len]).is_err() {
            broken("token piece is not UTF-8");
        }
        if id < -1 {
            broken("token id below -1");
        }
        if ud.is_null() {
            return 0;
        }
        // Safety: our own user data.
        let c = unsafe { &mut *(ud as *mut Calls) };
        c.count += 1;
        i32::from(c.count >= c.stop_after)
    }

    unsafe extern "C" fn on_stats(_ud: *mut c_void, stats: *const etllm_stats) {
        // Safety: valid during the call.
        if unsafe { (*stats).struct_size } as usize != size_of::<etllm_stats>() {
            broken("stats callback struct_size");
        }
    }

    fn callbacks() -> (etllm_token_callback, etllm_stats_callback, *mut c_void) {
        let t: etllm_token_callback = if u8_().is_multiple_of(4) {
            None
        } else {
            Some(on_token)
        };
        let s: etllm_stats_callback = if bool_() { None } else { Some(on_stats) };
        let ud = if u8_().is_multiple_of(4) {
            std::ptr::null_mut()
        } else {
            keep(&[Calls {
                count: 0,
                stop_after: pick(&[1, 2, 5, u32::MAX]),
            }]) as *mut c_void
        };
        (t, s, ud)
    }

    // ---- a KV-cache manager written "in C" ------------------------------------------

    struct Manager {
        destroyed: u32,
        /// Whether the library owns it (so must destroy it exactly once).
        expect_destroy: bool,
        logits: Vec<f32>,
    }

    thread_local! {
        static MANAGERS: RefCell<Vec<*mut Manager>> = const { RefCell::new(Vec::new()) };
    }

    fn status() -> etllm_status {
        pick(&[
            etllm_status::ETLLM_OK,
            etllm_status::ETLLM_OK,
            etllm_status::ETLLM_OK,
            etllm_status::ETLLM_ERR_INVALID_ARGUMENT,
            etllm_status::ETLLM_ERR_IO_MANAGER,
            etllm_status::ETLLM_ERR_PANIC,
        ])
    }

    unsafe extern "C" fn m_load(
        _ud: *mut c_void,
        model: *const etllm_model_info,
        chunk: *mut i64,
        context: *mut i64,
    ) -> etllm_status {
        for _ in 0..small() {
            model_info_call(model);
        }
        if bool_() {
            etllm_set_error_message(cstr());
        }
        // Safety: the library passes valid out pointers.
        unsafe {
            *chunk = pick(&[1, 2, 8, 0, -1, i64::MAX, 128]);
            *context = pick(&[128, 1, 8, 0, -1, i64::MAX, 64]);
        }
        status()
    }
    unsafe extern "C" fn m_reset(_ud: *mut c_void) -> etllm_status {
        status()
    }
    unsafe extern "C" fn m_rewind(_ud: *mut c_void, _pos: i64) -> etllm_status {
        status()
    }
    fn step(out: *mut etllm_step) -> etllm_status {
        let n = small() % 4;
        let views: Vec<etllm_tensor_view> = (0..n).map(|_| view()).collect();
        // NULL inputs (with a count of 0 or 1), or views with a count no larger.
        let s = if n == 0 && bool_() {
            etllm_step {
                method: method_name(),
                inputs: std::ptr::null(),
                num_inputs: small() % 2,
            }
        } else {
            etllm_step {
                method: method_name(),
                inputs: keep(&views),
                num_inputs: if u8_().is_multiple_of(8) { n / 2 } else { n },
            }
        };
        // Safety: the library passes a valid out pointer.
        unsafe { *out = s };
        status()
    }
    fn view() -> etllm_tensor_view {
        let ndim = pick(&[0u32, 1, 2, 2, 3, 8, 9]);
        let mut sizes = [0i64; ETLLM_MAX_DIMS];
        for s in sizes.iter_mut() {
            *s = pick(&[1, 1, 2, 3, 8, 0, -1, 512, i64::MAX]);
        }
        let dtype = pick(&[
            etllm_dtype::ETLLM_DTYPE_I64,
            etllm_dtype::ETLLM_DTYPE_I64,
            etllm_dtype::ETLLM_DTYPE_F32,
            etllm_dtype::ETLLM_DTYPE_I32,
            etllm_dtype::ETLLM_DTYPE_OTHER,
        ]);
        let elem = if dtype == etllm_dtype::ETLLM_DTYPE_I64 {
            8
        } else {
            4
        };
        let numel = sizes[..(ndim as usize).min(ETLLM_MAX_DIMS)]
            .iter()
            .try_fold(1usize, |a, &s| {
                usize::try_from(s).ok().and_then(|s| a.checked_mul(s))
            });
        let nbytes = match numel.and_then(|n| n.checked_mul(elem)) {
            Some(n) if !u8_().is_multiple_of(8) => n,
            _ => pick(&[0, 8, 16, 64]),
        };
        // The data really holds `nbytes` bytes, or is NULL, or misaligned within a buffer
        // large enough.
        let data = if nbytes > (1 << 20) || u8_().is_multiple_of(10) {
            std::ptr::null_mut()
        } else if u8_().is_multiple_of(10) {
            // Safety: one byte in, inside a buffer of nbytes + 8.
            unsafe { alloc(nbytes + 8).add(1) as *mut c_void }
        } else {
            alloc(nbytes) as *mut c_void
        };
        let data = if data.is_null() && nbytes <= (1 << 20) && u8_().is_multiple_of(2) {
            alloc(nbytes) as *mut c_void
        } else {
            data
        };
        etllm_tensor_view {
            dtype,
            ndim,
            sizes,
            data,
            nbytes: if data.is_null() { 0 } else { nbytes },
        }
    }
    unsafe extern "C" fn m_prepare_prefill(
        _ud: *mut c_void,
        _tokens: *const u64,
        _n: usize,
        _pos: i64,
        out: *mut etllm_step,
    ) -> etllm_status {
        step(out)
    }
    unsafe extern "C" fn m_prepare_decode(
        _ud: *mut c_void,
        _token: u64,
        _pos: i64,
        out: *mut etllm_step,
    ) -> etllm_status {
        step(out)
    }
    unsafe extern "C" fn m_update(
        ud: *mut c_void,
        outputs: *const etllm_tensor_view,
        n: usize,
        out_logits: *mut *const f32,
        out_vocab: *mut usize,
    ) -> etllm_status {
        // Safety: the library passes `n` valid views; check what they promise.
        for v in unsafe { std::slice::from_raw_parts(outputs, n) } {
            if v.ndim as usize > ETLLM_MAX_DIMS {
                broken("output view ndim");
            }
        }
        if ud.is_null() {
            broken("update called without the manager's user data");
        }
        // Safety: our own user data.
        let m = unsafe { &mut *(ud as *mut Manager) };
        for l in m.logits.iter_mut() {
            *l = float();
        }
        // Safety: valid out pointers.
        unsafe {
            if !u8_().is_multiple_of(8) {
                *out_logits = m.logits.as_ptr();
                *out_vocab = pick(&[1, 2, 512, 600, m.logits.len(), 0]);
            }
        }
        status()
    }
    unsafe extern "C" fn m_destroy(ud: *mut c_void) {
        // Safety: our own user data (never freed before the case ends).
        let m = unsafe { &mut *(ud as *mut Manager) };
        m.destroyed += 1;
        if m.destroyed > 1 {
            broken("io_manager destroy called twice");
        }
    }

    /// A new manager (kept in MANAGERS until the case ends) and its complete vtable.
    fn manager_vtable(expect_destroy: bool) -> (etllm_io_manager, *mut Manager) {
        let m = Box::into_raw(Box::new(Manager {
            destroyed: 0,
            expect_destroy,
            logits: vec![0.0; 600],
        }));
        MANAGERS.with(|v| v.borrow_mut().push(m));
        let vt = etllm_io_manager {
            struct_size: size_of::<etllm_io_manager>() as u32,
            user_data: m as *mut c_void,
            load: Some(m_load),
            reset: Some(m_reset),
            rewind: Some(m_rewind),
            prepare_prefill: Some(m_prepare_prefill),
            update_prefill: Some(m_update),
            prepare_decode: Some(m_prepare_decode),
            update_decode: Some(m_update),
            destroy: Some(m_destroy),
            save_state: None,
            restore_state: None,
        };
        (vt, m)
    }

    fn io_manager() -> (*const etllm_io_manager, *mut Manager) {
        let (mut vt, m) = manager_vtable(false);
        match u8_() % 8 {
            0 => vt.load = None,
            1 => vt.update_decode = None,
            2 => vt.destroy = None,
            _ => {}
        }
        type M = etllm_io_manager;
        let fields = [
            offset_of!(M, user_data),
            offset_of!(M, load),
            offset_of!(M, update_decode),
            offset_of!(M, destroy),
        ];
        (versioned(vt, &fields), m)
    }

    fn options() -> *const etllm_runner_options {
        let mut o = etllm_runner_options_default();
        let mut manager: *const etllm_io_manager = std::ptr::null();
        let mut state: *mut Manager = std::ptr::null_mut();
        if bool_() {
            o.num_threads = pick(&[0, 1, 2, 3]);
            o.preset = pick(&[0, 1, 2, -1, i32::MAX]);
            if u8_().is_multiple_of(3) {
                (manager, state) = io_manager();
                o.io_manager = manager;
            }
        }
        type O = etllm_runner_options;
        let fields = [offset_of!(O, io_manager), offset_of!(O, preset)];
        let p = maybe_null(versioned(o, &fields));
        if !manager.is_null() && !p.is_null() {
            // Safety: both are our live buffers.
            let osize = unsafe { (*p).struct_size } as usize;
            let msize = unsafe { (*manager).struct_size } as usize;
            let destroy = unsafe { (*manager).destroy.is_some() };
            let owned = osize >= offset_of!(O, preset)
                && osize <= size_of::<O>()
                && [offset_of!(O, preset), size_of::<O>()].contains(&osize)
                && msize == size_of::<etllm_io_manager>()
                && destroy;
            // Safety: our own user data.
            let m = unsafe { &mut *state };
            m.expect_destroy = owned;
        }
        p
    }

    // ---- model info (inside the manager's load) --------------------------------------

    fn model_info(model: *const etllm_model_info) -> *const etllm_model_info {
        if u8_().is_multiple_of(10) {
            std::ptr::null()
        } else {
            model
        }
    }

    fn model_info_call(model: *const etllm_model_info) {
        let m = model_info(model);
        match u8_() % 9 {
            0 => {
                etllm_model_info_num_methods(m, out());
            }
            1 => {
                let o: *mut *const c_char = out();
                if etllm_model_info_method_name(m, small(), o) == etllm_status::ETLLM_OK {
                    // Safety: a valid string until the load callback returns.
                    let _ = unsafe { CStr::from_ptr(*o) };
                }
            }
            2 => {
                etllm_model_info_method(m, method_name(), out(), out());
            }
            3 => {
                etllm_model_info_input(m, method_name(), small(), out());
            }
            4 => {
                etllm_model_info_output(m, method_name(), small(), out());
            }
            5 | 6 => {
                let cap = small();
                let buf = if cap == 0 && bool_() {
                    std::ptr::null_mut()
                } else {
                    alloc(cap * 8)
                };
                if u8_().is_multiple_of(2) {
                    etllm_model_info_constant_ints(m, method_name(), buf as *mut i64, cap, out());
                } else {
                    etllm_model_info_constant_floats(m, method_name(), buf as *mut f32, cap, out());
                }
            }
            7 => {
                let sizes = if u8_().is_multiple_of(6) {
                    std::ptr::null_mut()
                } else {
                    alloc(8 * ETLLM_MAX_DIMS) as *mut i64
                };
                etllm_model_info_constant_shape(m, method_name(), sizes, out());
            }
            _ => {
                type D = etllm_model_metadata;
                let value = D {
                    struct_size: 0,
                    max_seq_len: 0,
                    max_context_len: 0,
                    vocab_size: 0,
                    bos_id: 0,
                    use_kv_cache: false,
                    enable_dynamic_shape: false,
                };
                let fields = [
                    offset_of!(D, max_context_len),
                    offset_of!(D, bos_id),
                    offset_of!(D, enable_dynamic_shape),
                ];
                let p = maybe_null(versioned(value, &fields));
                if etllm_model_info_metadata(m, p) == etllm_status::ETLLM_OK {
                    // Safety: our buffer; bools must have been written as 0 or 1.
                    let size = unsafe { (*p).struct_size } as usize;
                    let bytes = unsafe { std::slice::from_raw_parts(p as *const u8, size) };
                    for off in [
                        offset_of!(D, use_kv_cache),
                        offset_of!(D, enable_dynamic_shape),
                    ] {
                        if off < size && bytes[off] > 1 {
                            broken("metadata bool is not 0 or 1");
                        }
                    }
                }
            }
        }
    }

    // ---- the interpreter -------------------------------------------------------------

    #[derive(Default)]
    struct Handles {
        tokenizers: Vec<*mut etllm_tokenizer>,
        streams: Vec<*mut etllm_text_stream>,
        templates: Vec<*mut etllm_chat_template>,
        runners: Vec<*mut etllm_runner>,
        conversations: Vec<*mut etllm_conversation>,
    }

    /// One of the live handles, or NULL.
    fn handle<T>(v: &[*mut T]) -> *mut T {
        if v.is_empty() || u8_().is_multiple_of(6) {
            std::ptr::null_mut()
        } else {
            v[u8_() as usize % v.len()]
        }
    }

    fn take<T>(v: &mut Vec<*mut T>, out: *mut *mut T, status: etllm_status) {
        if status == etllm_status::ETLLM_OK && !out.is_null() {
            // Safety: our out buffer.
            let p = unsafe { *out };
            if p.is_null() {
                broken("ETLLM_OK with a NULL handle");
            }
            v.push(p);
        } else if !out.is_null() && !unsafe { *out }.is_null() {
            broken("an error left a handle in the out pointer");
        }
    }

    fn check_text(status: etllm_status, text: *mut c_char, len: Option<usize>) {
        if status != etllm_status::ETLLM_OK || text.is_null() {
            return;
        }
        // Safety: the library returned a NUL-terminated string.
        let s = unsafe { CStr::from_ptr(text) };
        if let Some(len) = len {
            // Safety: the library promises `len` bytes and a NUL.
            let b = unsafe { std::slice::from_raw_parts(text as *const u8, len + 1) };
            if b[len] != 0 || std::str::from_utf8(&b[..len]).is_err() {
                broken("returned text not UTF-8 + NUL");
            }
        } else if s.to_str().is_err() {
            broken("returned string not UTF-8");
        }
    }

    fn check_status(status: etllm_status) {
        if status == etllm_status::ETLLM_ERR_PANIC {
            // Safety: the library's own static/thread-local string.
            let m = unsafe { CStr::from_ptr(etllm_last_error_message()) };
            broken(&format!("ETLLM_ERR_PANIC: {}", m.to_string_lossy()));
        }
        let m = etllm_last_error_message();
        if m.is_null() {
            broken("last error message is NULL");
        }
        // Safety: non-null NUL-terminated.
        let m = unsafe { CStr::from_ptr(m) };
        if (status == etllm_status::ETLLM_OK) != m.to_bytes().is_empty() {
            broken(&format!("status {status:?} with message {m:?}"));
        }
    }

    fn step_once(h: &mut Handles) {
        let op = u8_() % 32;
        let s = match op {
            0 | 1 => {
                let path = if u8_().is_multiple_of(4) {
                    cstr()
                } else {
                    keep_str(paths()[u8_() as usize % 6].as_bytes())
                };
                let o = out::<*mut etllm_tokenizer>();
                let s = etllm_tokenizer_load(path, pick(&[0, 0, 1, 2, -1]), o);
                take(&mut h.tokenizers, o, s);
                s
            }
            2 => {
                let (ids, len) = (out::<*mut u32>(), out::<usize>());
                let s = etllm_tokenizer_encode(
                    handle(&h.tokenizers),
                    cstr(),
                    pick(&[0, 1, 2, 100, 1 << 20, u32::MAX]),
                    pick(&[0, 1, 3]),
                    ids,
                    len,
                );
                if s == etllm_status::ETLLM_OK {
                    // Safety: returned by the library.
                    etllm_buffer_free(unsafe { *ids } as *mut c_void);
                }
                s
            }
            3 => {
                let (ids, n) = ids();
                let (text, len) = (out::<*mut c_char>(), out::<usize>());
                let s = etllm_tokenizer_decode(handle(&h.tokenizers), ids, n, text, len);
                if s == etllm_status::ETLLM_OK {
                    // Safety: returned by the library.
                    unsafe {
                        check_text(s, *text, Some(*len));
                        etllm_buffer_free(*text as *mut c_void);
                    }
                }
                s
            }
            4 => {
                let (p, len) = (out::<*mut c_char>(), out::<usize>());
                let s = etllm_tokenizer_token_to_piece(handle(&h.tokenizers), int_u32(), p, len);
                if s == etllm_status::ETLLM_OK {
                    // Safety: returned by the library (a piece may be any bytes).
                    unsafe { etllm_buffer_free(*p as *mut c_void) };
                }
                s
            }
            5 => match u8_() % 3 {
                0 => etllm_tokenizer_vocab_size(handle(&h.tokenizers), out()),
                1 => etllm_tokenizer_bos_id(handle(&h.tokenizers), out()),
                _ => etllm_tokenizer_eos_ids(handle(&h.tokenizers), out(), out()),
            },
            6 => {
                let o = out::<*mut etllm_text_stream>();
                let s = etllm_text_stream_new(handle(&h.tokenizers), o);
                take(&mut h.streams, o, s);
                s
            }
            7 | 8 => {
                let (t, len) = (out::<*const c_char>(), out::<usize>());
                let s = if op == 7 {
                    etllm_text_stream_push(handle(&h.streams), int_u32(), t, len)
                } else {
                    etllm_text_stream_flush(handle(&h.streams), t, len)
                };
                if s == etllm_status::ETLLM_OK {
                    // Safety: returned by the library.
                    unsafe { check_text(s, *t as *mut c_char, Some(*len)) };
                }
                s
            }
            9 => {
                // Frees one handle (streams may outlive their tokenizer).
                match u8_() % 5 {
                    0 if !h.tokenizers.is_empty() => {
                        let i = u8_() as usize % h.tokenizers.len();
                        etllm_tokenizer_free(h.tokenizers.swap_remove(i));
                    }
                    1 if !h.streams.is_empty() => {
                        let i = u8_() as usize % h.streams.len();
                        etllm_text_stream_free(h.streams.swap_remove(i));
                    }
                    2 if !h.templates.is_empty() => {
                        let i = u8_() as usize % h.templates.len();
                        etllm_chat_template_free(h.templates.swap_remove(i));
                    }
                    3 if !h.conversations.is_empty() => {
                        let i = u8_() as usize % h.conversations.len();
                        etllm_conversation_free(h.conversations.swap_remove(i));
                    }
                    4 if !h.runners.is_empty() && h.conversations.is_empty() => {
                        let i = u8_() as usize % h.runners.len();
                        etllm_runner_free(h.runners.swap_remove(i));
                    }
                    _ => {
                        etllm_tokenizer_free(std::ptr::null_mut());
                        etllm_runner_free(std::ptr::null_mut());
                        etllm_string_free(std::ptr::null_mut());
                        etllm_buffer_free(std::ptr::null_mut());
                    }
                }
                return;
            }
            10 | 11 => {
                let o = out::<*mut etllm_chat_template>();
                let s = match u8_() % 5 {
                    0 => etllm_chat_template_llama3(o),
                    1 => etllm_chat_template_llama2(o),
                    2 => etllm_chat_template_from_model_dir(cstr(), o),
                    _ => etllm_chat_template_new(cstr(), o),
                };
                take(&mut h.templates, o, s);
                s
            }
            12 => etllm_chat_template_set_token(handle(&h.templates), cstr(), cstr()),
            13 | 14 => {
                let n = small();
                let msgs: Vec<etllm_chat_message> = (0..n)
                    .map(|_| etllm_chat_message {
                        role: cstr(),
                        content: cstr(),
                    })
                    .collect();
                let (ptr, num) = match u8_() % 6 {
                    0 => (std::ptr::null(), n + 1),
                    1 => (keep(&msgs) as *const _, n / 2),
                    _ => (keep(&msgs) as *const _, n),
                };
                let o = out::<*mut c_char>();
                let s = if op == 13 {
                    etllm_chat_template_apply(handle(&h.templates), ptr, num, bool_(), o)
                } else {
                    etllm_runner_apply_chat_template(handle(&h.runners), ptr, num, bool_(), o)
                };
                if s == etllm_status::ETLLM_OK {
                    // Safety: returned by the library.
                    unsafe {
                        check_text(s, *o, None);
                        etllm_string_free(*o);
                    }
                }
                s
            }
            15 | 16 => {
                let model = if u8_().is_multiple_of(4) {
                    cstr()
                } else {
                    keep_str(paths()[pick(&[7, 7, 7, 8, 9, 10, 11])].as_bytes())
                };
                let tok = match u8_() % 8 {
                    0 => cstr(),
                    1 | 2 => keep_str(paths()[u8_() as usize % 5].as_bytes()),
                    _ => keep_str(paths()[0].as_bytes()),
                };
                let opts = options();
                let o = out::<*mut etllm_runner>();
                let s = if op == 15 {
                    etllm_runner_new(model, tok, opts, o)
                } else {
                    etllm_runner_open(model, tok, opts, o)
                };
                take(&mut h.runners, o, s);
                s
            }
            17 => {
                let r = handle(&h.runners);
                match u8_() % 9 {
                    0 => etllm_runner_load(r),
                    1 => etllm_runner_is_loaded(r, out()),
                    2 => etllm_runner_max_context_len(r, out()),
                    3 => etllm_runner_max_seq_len(r, out()),
                    4 => etllm_runner_vocab_size(r, out()),
                    5 => etllm_runner_bos_id(r, out()),
                    6 => {
                        let cap = small();
                        let ids = if cap == 0 && bool_() {
                            std::ptr::null_mut()
                        } else {
                            alloc(cap * 4) as *mut u32
                        };
                        etllm_runner_eos_ids(r, ids, cap, out())
                    }
                    7 => etllm_runner_position(r, out()),
                    _ => etllm_runner_stop(r),
                }
            }
            18..=20 => {
                let r = handle(&h.runners);
                let (t, st, ud) = callbacks();
                let cfg = config();
                let so = stats_out();
                match op {
                    18 => etllm_runner_generate(r, cstr(), cfg, t, st, ud, so),
                    19 => {
                        let (ids, n) = ids();
                        etllm_runner_generate_tokens(r, ids, n, cfg, t, st, ud, so)
                    }
                    _ => match u8_() % 4 {
                        0 => etllm_runner_prefill(r, cstr(), cfg, so),
                        1 => {
                            let (ids, n) = ids();
                            etllm_runner_prefill_tokens(r, ids, n, cfg, so)
                        }
                        2 => {
                            let (inputs, n) = media_inputs();
                            etllm::ffi::input::etllm_runner_generate_inputs(
                                r, inputs, n, cfg, t, st, ud, so,
                            )
                        }
                        _ => {
                            let (inputs, n) = media_inputs();
                            etllm::ffi::input::etllm_runner_prefill_inputs(r, inputs, n, cfg, so)
                        }
                    },
                }
            }
            21 => {
                let r = handle(&h.runners);
                match u8_() % 4 {
                    0 => etllm_runner_rewind(
                        r,
                        pick(&[0, 1, 2, 3, -1, i64::MAX, i64::MIN, 127, 128]),
                    ),
                    1 => etllm_runner_warmup(r),
                    2 => etllm_runner_reset(r),
                    _ => etllm_runner_set_chat_template(r, handle(&h.templates)),
                }
            }
            22 => {
                let o = out::<*mut etllm_conversation>();
                let s = etllm_conversation_new(handle(&h.runners), handle(&h.templates), o);
                take(&mut h.conversations, o, s);
                s
            }
            23 => {
                let c = handle(&h.conversations);
                match u8_() % 5 {
                    0 => etllm_conversation_set_system(c, cstr()),
                    1 => etllm_conversation_rewind(c, handle(&h.runners), out()),
                    2 => etllm_conversation_reset(c, handle(&h.runners)),
                    3 => etllm_conversation_num_messages(c, out()),
                    _ => {
                        let (role, content) = (out::<*mut c_char>(), out::<*mut c_char>());
                        let s = etllm_conversation_message(c, small(), role, content);
                        if s == etllm_status::ETLLM_OK {
                            // Safety: returned by the library.
                            unsafe {
                                check_text(s, *role, None);
                                check_text(s, *content, None);
                                etllm_string_free(*role);
                                etllm_string_free(*content);
                            }
                        }
                        s
                    }
                }
            }
            24 => {
                let (t, st, ud) = callbacks();
                etllm_conversation_send(
                    handle(&h.conversations),
                    handle(&h.runners),
                    cstr(),
                    config(),
                    t,
                    st,
                    ud,
                    stats_out(),
                )
            }
            25 | 26 => {
                // Stats with any struct_size and any stop_reason value (a C enum field
                // may hold any int).
                let p = stats_out();
                if !p.is_null() && bool_() {
                    // Safety: our buffer of at least size_of::<etllm_stats>() bytes.
                    unsafe { *(p as *mut u32).add(1) = int_u32() };
                }
                let o = out::<*mut c_char>();
                let s = etllm_stats_to_json(p, o);
                if s == etllm_status::ETLLM_OK {
                    // Safety: returned by the library.
                    unsafe {
                        check_text(s, *o, None);
                        etllm_string_free(*o);
                    }
                }
                s
            }
            27 => {
                // Safety: static strings.
                let name = unsafe { CStr::from_ptr(etllm_status_name(int_i32())) };
                if name.to_str().is_err() {
                    broken("status name");
                }
                let _ = unsafe { CStr::from_ptr(etllm_version()) };
                let _ = unsafe { CStr::from_ptr(etllm_executorch_version()) };
                let _ = (
                    etllm_generation_config_default(),
                    etllm_runner_options_default(),
                    etllm_stats_default(),
                );
                return;
            }
            28 => {
                etllm_set_error_message(cstr());
                return;
            }
            _ => {
                // A tokenizer then a stream over it, freed in either order.
                let o = out::<*mut etllm_tokenizer>();
                let s =
                    etllm_tokenizer_load(keep_str(paths()[u8_() as usize % 4].as_bytes()), 0, o);
                take(&mut h.tokenizers, o, s);
                s
            }
        };
        check_status(s);
    }

    /// Live handles every program starts with, so that its calls reach past the argument
    /// checks: a tokenizer, the Llama 3 template, a loaded runner (dyn_portable) and a
    /// runner over the same model driven by the fuzzed KV-cache manager (loaded by its first
    /// call; its callbacks read the program's bytes).
    fn start_handles(h: &mut Handles) {
        let tok = keep_str(paths()[0].as_bytes());
        let model = keep_str(paths()[7].as_bytes());
        let mut t = std::ptr::null_mut();
        if etllm_tokenizer_load(tok, 0, &mut t) == etllm_status::ETLLM_OK {
            h.tokenizers.push(t);
        }
        let mut c = std::ptr::null_mut();
        if etllm_chat_template_llama3(&mut c) == etllm_status::ETLLM_OK {
            h.templates.push(c);
        }
        let mut r = std::ptr::null_mut();
        if etllm_runner_open(model, tok, std::ptr::null(), &mut r) == etllm_status::ETLLM_OK {
            h.runners.push(r);
        }
        let (vt, _) = manager_vtable(true);
        let o = etllm_runner_options {
            io_manager: &vt,
            ..etllm_runner_options_default()
        };
        let mut r = std::ptr::null_mut();
        if etllm_runner_new(model, tok, &o, &mut r) == etllm_status::ETLLM_OK {
            h.runners.push(r);
        }
    }

    pub fn run(bytes: &[u8]) {
        INPUT.with(|i| {
            *i.borrow_mut() = Input {
                bytes: bytes.to_vec(),
                at: 0,
            }
        });
        let mut h = Handles::default();
        start_handles(&mut h);
        let mut steps = 0;
        while !done() && steps < 64 {
            step_once(&mut h);
            steps += 1;
        }
        for c in h.conversations.drain(..) {
            etllm_conversation_free(c);
        }
        for r in h.runners.drain(..) {
            etllm_runner_free(r);
        }
        for s in h.streams.drain(..) {
            etllm_text_stream_free(s);
        }
        for t in h.tokenizers.drain(..) {
            etllm_tokenizer_free(t);
        }
        for t in h.templates.drain(..) {
            etllm_chat_template_free(t);
        }
        MANAGERS.with(|v| {
            for &m in v.borrow().iter() {
                // Safety: our own boxes, alive until here.
                let m = unsafe { &*m };
                if m.expect_destroy && m.destroyed != 1 {
                    broken("an owned io_manager was not destroyed");
                }
                if !m.expect_destroy && m.destroyed != 0 {
                    broken("an io_manager the library did not own was destroyed");
                }
            }
        });
    }
}
