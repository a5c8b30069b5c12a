//! `etllm`: stream text from an ExecuTorch LLM and report its stats.

use std::io::{IsTerminal, Write};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

#[path = "etllm/bench.rs"]
mod bench;
use etllm::{
    ChatMessage, ChatTemplate, Conversation, GenerationConfig, GrammarType, Runner, RunnerOptions,
    Stats,
};

/// The model and tokenizer built into this binary, used when no --model is given: the demo
/// model of models/demo, trained on the King James Bible by tools/train_demo/train.py.
const DEFAULT_MODEL: &[u8] = include_bytes!("../../models/demo/model.pte");
const DEFAULT_TOKENIZER: &[u8] = include_bytes!("../../models/demo/tokenizer.json");

#[derive(Parser)]
#[command(
    name = "etllm",
    version,
    about = "Run decoder-only LLMs exported to ExecuTorch .pte files",
    long_about = "Run decoder-only LLMs exported to ExecuTorch .pte files.\n\n\
        Generated text streams to stdout; stats go to stderr (or, with --json, everything \
        goes to stdout as JSON lines). Set ETLLM_LOG=1 to see ExecuTorch's own log on stderr."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text from a prompt, streaming it as it is produced.
    Generate(GenerateArgs),
    /// Chat in the terminal: one user message a line, the reply streamed back. Earlier
    /// turns stay in the KV cache. Commands: /rewind drops the last turn, /reset starts
    /// over, /quit (or end of input) leaves.
    Chat(ChatArgs),
    /// Print the prompt text a chat template makes of a list of messages.
    ApplyChatTemplate(ApplyChatTemplateArgs),
    /// Print the token ids of a text as a JSON array.
    Tokenize(TokenizeArgs),
    /// Print the text of a JSON array of token ids (exactly the text, no newline added).
    Detokenize(DetokenizeArgs),
    /// Measure prompt-processing (ppN) and generation (tgN) rates, like llama-bench: a
    /// markdown table of mean ± standard deviation tokens/s, or --json.
    Bench(bench::BenchArgs),
    /// Serve the model over HTTP with OpenAI's API: /v1/chat/completions, /v1/completions,
    /// /v1/models, /health, /metrics. Prints "listening on http://ADDRESS" to stdout once
    /// it accepts connections; Ctrl-C or SIGTERM stops it.
    #[cfg(feature = "server")]
    Serve(ServeArgs),
    /// Transcribe a WAV file with an encoder-decoder speech model (Whisper exported with
    /// `encoder` and `text_decoder` methods): prints the text, stats to stderr.
    Transcribe(TranscribeArgs),
}

#[derive(Args)]
struct TranscribeArgs {
    /// The audio: a WAV file (PCM 8/16/24/32-bit or float, mono or stereo, any rate;
    /// resampled to the model's).
    #[arg(value_name = "AUDIO.wav")]
    audio: PathBuf,
    /// The .pte speech model.
    #[arg(long, value_name = "M.pte")]
    model: PathBuf,
    /// The tokenizer. Defaults to tokenizer.json next to --model.
    #[arg(long, value_name = "T")]
    tokenizer: Option<PathBuf>,
    /// The feature extractor's preprocessor_config.json. Default: the one next to the
    /// model or the tokenizer, else Whisper's settings.
    #[arg(long, value_name = "FILE")]
    preprocessor_config: Option<PathBuf>,
    /// Threads for ExecuTorch's CPU thread pool.
    #[arg(long, value_name = "N")]
    threads: Option<usize>,
    /// The spoken language, as Whisper's code (en, fr, de...). Default: detected.
    #[arg(long, value_name = "CODE")]
    language: Option<String>,
    /// Translate into English instead of transcribing.
    #[arg(long)]
    translate: bool,
    /// Tokens to generate at most; -1: until the end of text or of the decoder's context.
    #[arg(long, value_name = "N", default_value_t = -1, allow_negative_numbers = true)]
    max_new_tokens: i32,
    /// Sampling temperature; 0 (the default) is greedy.
    #[arg(long, value_name = "X", default_value_t = 0.0)]
    temperature: f32,
    /// Sample only from the smallest set of most likely tokens reaching probability P.
    #[arg(long, value_name = "P", default_value_t = 1.0)]
    top_p: f32,
    /// Seed for sampling. Default: from the clock.
    #[arg(long, value_name = "S")]
    seed: Option<u64>,
    /// Print one JSON object to stdout: {"text", "tokens", "language", "stats"}.
    #[arg(long)]
    json: bool,
}

#[cfg(feature = "server")]
#[derive(Args)]
struct ServeArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The address to listen on. The default accepts connections from this machine only.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1")]
    host: String,
    /// The port; 0 picks a free one (printed on the "listening on" line).
    #[arg(long, value_name = "N", default_value_t = 8080)]
    port: u16,
    /// Slots: conversations whose KV caches are kept. Requests run one at a time on the
    /// model; each goes to the slot that shares the longest prefix with its prompt.
    #[arg(long, value_name = "N", default_value_t = 1)]
    parallel: usize,
    /// Requests that may wait for the model; beyond that, 503 with Retry-After.
    #[arg(long, value_name = "N", default_value_t = 64)]
    queue: usize,
    /// Require "Authorization: Bearer KEY" on every route but /health. Default: the
    /// ETLLM_API_KEY environment variable if set, else no key.
    #[arg(
        long,
        value_name = "KEY",
        env = "ETLLM_API_KEY",
        hide_env_values = true
    )]
    api_key: Option<String>,
    /// The most tokens a request may hold, prompt and output (default: the model's context).
    #[arg(long, value_name = "N")]
    ctx: Option<usize>,
    /// The model id /v1/models lists. Default: the model file's name without its extension
    /// ("etllm-demo" for the built-in model).
    #[arg(long, value_name = "NAME")]
    model_name: Option<String>,
    /// The chat template, as for `chat --chat-template`.
    #[arg(long, value_name = "PATH")]
    chat_template: Option<PathBuf>,
    /// Request bodies larger than this many bytes are answered 413.
    #[arg(long, value_name = "BYTES", default_value_t = 8 << 20)]
    max_body: usize,
    /// Seconds that running and queued requests get to finish after Ctrl-C or SIGTERM,
    /// before they are cancelled.
    #[arg(long, value_name = "S", default_value_t = 10.0)]
    shutdown_timeout: f64,
    /// Do not log each request to stderr.
    #[arg(long)]
    quiet: bool,
}

#[derive(Args)]
#[command(group(clap::ArgGroup::new("input").required(true).args(["text", "file"])))]
struct TokenizeArgs {
    /// The tokenizer: HF tokenizer.json or its folder, tiktoken, SentencePiece or llama2.c
    /// (the format is found from the content).
    #[arg(long, value_name = "T")]
    tokenizer: PathBuf,
    /// The text to encode.
    #[arg(long, value_name = "S")]
    text: Option<String>,
    /// A UTF-8 file whose content to encode.
    #[arg(long, value_name = "F")]
    file: Option<PathBuf>,
    /// BOS tokens to put before the text.
    #[arg(long = "bos", value_name = "N", default_value_t = 0)]
    num_bos: usize,
    /// EOS tokens to put after the text.
    #[arg(long = "eos", value_name = "N", default_value_t = 0)]
    num_eos: usize,
    /// Model-family conventions: "llama".
    #[arg(long, value_name = "P")]
    preset: Option<String>,
}

#[derive(Args)]
struct DetokenizeArgs {
    /// The tokenizer, as for `tokenize`.
    #[arg(long, value_name = "T")]
    tokenizer: PathBuf,
    /// The ids, as a JSON array, e.g. '[1, 15043]'.
    #[arg(long, value_name = "JSON")]
    ids: String,
    /// Model-family conventions: "llama".
    #[arg(long, value_name = "P")]
    preset: Option<String>,
}

/// Which model to run.
#[derive(Args)]
struct ModelArgs {
    /// The .pte model. Without it, the small model built into etllm is used.
    #[arg(long, value_name = "M.pte")]
    model: Option<PathBuf>,
    /// The HF tokenizer.json. Defaults to tokenizer.json next to --model, or the built-in
    /// tokenizer when --model is not given either.
    #[arg(long, value_name = "T")]
    tokenizer: Option<PathBuf>,
    /// Threads for ExecuTorch's CPU thread pool. Default: the runtime's choice.
    #[arg(long, value_name = "N")]
    threads: Option<usize>,
    /// Model-family conventions for the tokenizer: "llama" (Llama 2/3 BOS and EOS; Llama 3
    /// also stops on <|eot_id|>).
    #[arg(long, value_name = "P")]
    preset: Option<String>,
    /// An external data file (.ptd) with weights the export kept out of the .pte; repeat
    /// for several. Default: <stem>.ptd next to --model if it exists.
    #[arg(long = "data", value_name = "FILE")]
    data: Vec<PathBuf>,
    /// The method that runs the model's steps, when not `forward` (e.g. lora_forward).
    #[arg(long, value_name = "NAME")]
    method: Option<String>,
}

/// How to pick tokens and when to stop.
#[derive(Args)]
struct SamplingArgs {
    /// Tokens to generate; -1 generates until EOS or the end of the context.
    #[arg(long, value_name = "N", default_value_t = -1, allow_negative_numbers = true)]
    max_new_tokens: i32,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, value_name = "X", default_value_t = 0.8)]
    temperature: f32,
    /// Sample only from the K most likely tokens (0: off).
    #[arg(long, value_name = "K", default_value_t = 0)]
    top_k: i32,
    /// Sample only from the smallest set of most likely tokens reaching probability P (1: off).
    #[arg(long, value_name = "P", default_value_t = 1.0)]
    top_p: f32,
    /// Sample only from tokens at least M times as likely as the best one (0: off).
    #[arg(long, value_name = "M", default_value_t = 0.0)]
    min_p: f32,
    /// Penalize tokens already in the prompt or output (1: off, above 1 discourages repeats).
    #[arg(long, value_name = "R", default_value_t = 1.0)]
    repetition_penalty: f32,
    /// Stop when the generated text contains STR (repeatable); STR itself is not printed.
    #[arg(long = "stop", value_name = "STR")]
    stop_strings: Vec<String>,
    /// Stop when this token id is generated, besides the model's EOS ids (repeatable).
    #[arg(long = "stop-token-id", value_name = "ID")]
    stop_token_ids: Vec<u32>,
    /// Seed for sampling; the same seed gives the same text. Default: from the clock.
    #[arg(long, value_name = "S")]
    seed: Option<u64>,
    /// Keep generating past EOS tokens.
    #[arg(long)]
    ignore_eos: bool,
    #[command(flatten)]
    grammar: GrammarArgs,
}

/// Constrained decoding: the output must match one grammar.
#[derive(Args)]
struct GrammarArgs {
    /// The output must be JSON valid under the JSON schema in FILE.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["grammar", "regex"])]
    json_schema: Option<PathBuf>,
    /// The output must match the grammar in FILE, written in --grammar-type's language
    /// (default: from the file's extension: .lark, .gbnf, .json, .regex).
    #[arg(long, value_name = "FILE")]
    grammar: Option<PathBuf>,
    /// The output must fully match the regular expression PATTERN (Rust regex syntax).
    #[arg(long, value_name = "PATTERN", conflicts_with = "grammar")]
    regex: Option<String>,
    /// With a grammar, sample text the grammar forces token by token instead of feeding it
    /// to the model in one step.
    #[arg(long)]
    no_fast_forward: bool,
    /// The language of --grammar: lark, gbnf, regex or json_schema.
    #[arg(long, value_name = "TYPE", requires = "grammar",
          value_parser = ["lark", "lark_grammar", "gbnf", "regex", "json_schema"])]
    grammar_type: Option<String>,
}

impl GrammarArgs {
    /// The grammar and its type; an empty grammar when none is given.
    fn grammar(&self) -> Result<(String, GrammarType), String> {
        let read = |path: &Path| {
            std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read {}: {e}", path.display()))
        };
        if let Some(path) = &self.json_schema {
            return Ok((read(path)?, GrammarType::JsonSchema));
        }
        if let Some(pattern) = &self.regex {
            return Ok((pattern.clone(), GrammarType::Regex));
        }
        let Some(path) = &self.grammar else {
            return Ok((String::new(), GrammarType::default()));
        };
        let ty = match (
            &self.grammar_type,
            path.extension().and_then(|e| e.to_str()),
        ) {
            (Some(name), _) => name.parse().map_err(|e: etllm::Error| e.to_string())?,
            (None, Some("lark")) => GrammarType::Lark,
            (None, Some("gbnf")) => GrammarType::Gbnf,
            (None, Some("json")) => GrammarType::JsonSchema,
            (None, Some("regex")) => GrammarType::Regex,
            _ => {
                return Err(format!(
                    "give --grammar-type for {} (lark, gbnf, regex or json_schema): its \
                     extension does not say",
                    path.display()
                ))
            }
        };
        Ok((read(path)?, ty))
    }
}

impl SamplingArgs {
    fn config(&self) -> Result<GenerationConfig, String> {
        let (grammar, grammar_type) = self.grammar.grammar()?;
        Ok(GenerationConfig {
            max_new_tokens: self.max_new_tokens,
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repetition_penalty: self.repetition_penalty,
            stop_strings: self.stop_strings.clone(),
            stop_token_ids: self.stop_token_ids.clone(),
            seed: self.seed,
            ignore_eos: self.ignore_eos,
            grammar,
            grammar_type,
            grammar_fast_forward: !self.grammar.no_fast_forward,
            ..Default::default()
        })
    }
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// The prompt.
    #[arg(long, value_name = "TEXT")]
    prompt: String,
    /// BOS tokens to put before the prompt (with --chat the template places them).
    #[arg(long = "bos", value_name = "N", default_value_t = 1)]
    num_bos: i32,
    /// Send the prompt as a user message through the model's chat template.
    #[arg(long)]
    chat: bool,
    /// With --chat: a system message before the prompt.
    #[arg(long, value_name = "TEXT", requires = "chat")]
    system: Option<String>,
    /// Print the prompt before the generated text.
    #[arg(long)]
    echo: bool,
    /// Run a short warm-up generation first (first-call costs are paid before the timed
    /// run).
    #[arg(long)]
    warmup: bool,
    /// Print one JSON object per line to stdout: {"id", "text"} per token ("id" is null for
    /// echoed or trailing text), then {"stats": {...}}.
    #[arg(long)]
    json: bool,
    /// An image for a multimodal model (PNG, JPEG, GIF, BMP, WebP); repeat for several.
    /// Each "<image>" in the prompt marks where the next image goes; without markers the
    /// images come before the prompt.
    #[arg(long = "image", value_name = "FILE")]
    images: Vec<PathBuf>,
    /// The image processor's preprocessor_config.json. Default: the one next to the model
    /// or the tokenizer.
    #[arg(long, value_name = "FILE")]
    preprocessor_config: Option<PathBuf>,
    /// Keep the model's state after the prompt in FILE (as llama.cpp's --prompt-cache).
    /// When FILE holds a state of this model, only the part of the prompt that differs
    /// from the one saved there is fed; when the prompt fed anything new, the state right
    /// after it is written to FILE before generating. A FILE that cannot be used (another
    /// model, truncated, corrupt) gets a warning and is overwritten. The output is that of
    /// a run without the cache.
    #[arg(long, value_name = "FILE")]
    prompt_cache: Option<PathBuf>,
}

#[derive(Args)]
struct ChatArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// A system message for the whole conversation.
    #[arg(long, value_name = "TEXT")]
    system: Option<String>,
    /// The chat template: a Jinja file, a tokenizer_config.json, or a folder holding
    /// chat_template.jinja or tokenizer_config.json. Default: the one beside the
    /// tokenizer, else the built-in Llama 3 template.
    #[arg(long, value_name = "PATH")]
    chat_template: Option<PathBuf>,
    /// After each reply, print its stats to stderr.
    #[arg(long)]
    stats: bool,
    /// Print one JSON object per line to stdout instead of streaming text: {"reply",
    /// "stats"} per turn, {"command", "ok"} per command.
    #[arg(long)]
    json: bool,
    /// Save the conversation to FILE (the model's state, with the messages) after every
    /// turn, /rewind and /reset, for --load-session.
    #[arg(long, value_name = "FILE")]
    save_session: Option<PathBuf>,
    /// Resume the conversation saved in FILE by --save-session (same model): earlier turns
    /// are not fed again. A FILE that does not exist starts a new conversation; one that
    /// cannot be used (another model, corrupt) is an error.
    #[arg(long, value_name = "FILE")]
    load_session: Option<PathBuf>,
}

#[derive(Args)]
struct ApplyChatTemplateArgs {
    /// The messages, as a JSON array of {"role", "content"} objects.
    #[arg(long, value_name = "JSON")]
    messages: String,
    /// The template: a Jinja file, a tokenizer_config.json, or a model folder (as for
    /// `chat --chat-template`).
    #[arg(
        long,
        value_name = "PATH",
        conflicts_with = "builtin",
        required_unless_present = "builtin"
    )]
    chat_template: Option<PathBuf>,
    /// A built-in template instead: llama3 or llama2.
    #[arg(long, value_name = "NAME", value_parser = ["llama3", "llama2"])]
    builtin: Option<String>,
    /// Leave out the header that starts the assistant's reply.
    #[arg(long)]
    no_generation_prompt: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Generate(args) => generate(args),
        Command::Chat(args) => chat(args),
        Command::ApplyChatTemplate(args) => apply_chat_template(args),
        Command::Tokenize(args) => tokenize(args),
        Command::Detokenize(args) => detokenize(args),
        Command::Bench(args) => run_bench(args),
        #[cfg(feature = "server")]
        Command::Serve(args) => serve(args),
        Command::Transcribe(args) => transcribe(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("error: {msg}");
            ExitCode::FAILURE
        }
    }
}

fn parse_preset(name: Option<&str>) -> Result<Option<etllm::Preset>, String> {
    name.map(|n| n.parse().map_err(|e: etllm::Error| e.to_string()))
        .transpose()
}

fn load_tokenizer(path: &Path, preset: Option<&str>) -> Result<etllm::Tokenizer, String> {
    etllm::Tokenizer::load(path, parse_preset(preset)?).map_err(|e| e.to_string())
}

fn tokenize(args: TokenizeArgs) -> Result<(), String> {
    let tokenizer = load_tokenizer(&args.tokenizer, args.preset.as_deref())?;
    let text = match (args.text, &args.file) {
        (Some(text), _) => text,
        (None, Some(file)) => std::fs::read_to_string(file)
            .map_err(|e| format!("cannot read {}: {e}", file.display()))?,
        (None, None) => unreachable!("clap requires --text or --file"),
    };
    let ids = tokenizer
        .encode_with(&text, args.num_bos, args.num_eos)
        .map_err(|e| e.to_string())?;
    println!("{}", serde_json::to_string(&ids).expect("ids serialize"));
    Ok(())
}

fn detokenize(args: DetokenizeArgs) -> Result<(), String> {
    let tokenizer = load_tokenizer(&args.tokenizer, args.preset.as_deref())?;
    let ids: Vec<u32> = serde_json::from_str(&args.ids)
        .map_err(|e| format!("--ids is not a JSON array of token ids: {e}"))?;
    let text = tokenizer.decode(&ids).map_err(|e| e.to_string())?;
    // Exactly the text: no newline is added.
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|_| out.flush())
        .map_err(|e| e.to_string())
}

/// Opens the runner that `args` names.
fn open_runner(args: &ModelArgs) -> Result<Runner, String> {
    open_runner_with(args, None)
}

/// Opens the runner that `args` names, with an image processor config.
fn open_runner_with(args: &ModelArgs, preprocessor: Option<&Path>) -> Result<Runner, String> {
    let (model, tokenizer) = match (&args.model, &args.tokenizer) {
        (Some(model), Some(tok)) => (model.clone(), tok.clone()),
        (Some(model), None) => {
            let tok = model.with_file_name("tokenizer.json");
            if !tok.exists() {
                return Err(format!(
                    "--tokenizer is required: no tokenizer.json next to {}",
                    model.display()
                ));
            }
            (model.clone(), tok)
        }
        (None, Some(_)) => {
            return Err(
                "--tokenizer needs --model (the built-in model has its own tokenizer)".into(),
            )
        }
        (None, None) => default_model()?,
    };
    let options = RunnerOptions {
        num_threads: args.threads,
        preset: parse_preset(args.preset.as_deref())?,
        data_paths: args.data.clone(),
        method_name: args.method.clone(),
        preprocessor_config: preprocessor.map(Path::to_path_buf),
        ..Default::default()
    };
    if args.model.is_none() && (!args.data.is_empty() || args.method.is_some()) {
        return Err("--data and --method need --model".into());
    }
    Runner::open(&model, &tokenizer, options).map_err(|e| e.to_string())
}

/// Reads a chat template from a Jinja file, a tokenizer_config.json or a model folder.
fn read_template(path: &Path) -> Result<ChatTemplate, String> {
    let is_config = path.is_dir() || path.extension().is_some_and(|e| e == "json");
    if is_config {
        ChatTemplate::from_model_dir(path)
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("{} holds no chat template", path.display()))
    } else {
        let source = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        ChatTemplate::new(source).map_err(|e| e.to_string())
    }
}

#[cfg(feature = "server")]
fn serve(args: ServeArgs) -> Result<(), String> {
    use etllm::server::{Server, ServerOptions};
    if !(args.shutdown_timeout >= 0.0 && args.shutdown_timeout.is_finite()) {
        return Err("--shutdown-timeout must be a number of seconds, 0 or more".into());
    }
    let chat_template = args
        .chat_template
        .as_deref()
        .map(read_template)
        .transpose()?;
    let mut runner = open_runner(&args.model)?;
    runner.warmup().map_err(|e| e.to_string())?;
    let model_name = args.model_name.clone().unwrap_or_else(|| {
        args.model
            .model
            .as_deref()
            .and_then(|m| m.file_stem())
            .map_or("etllm-demo".into(), |s| s.to_string_lossy().into_owned())
    });
    let mut options = ServerOptions::default();
    options.parallel = args.parallel;
    options.queue_size = args.queue;
    options.api_key = args.api_key.filter(|k| !k.is_empty());
    options.context_length = args.ctx;
    options.model_name = model_name;
    options.chat_template = chat_template;
    options.max_body_bytes = args.max_body;
    options.shutdown_timeout = std::time::Duration::from_secs_f64(args.shutdown_timeout);
    options.log_requests = !args.quiet;
    let server = Server::new(&mut runner, options).map_err(|e| e.to_string())?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))?;
    runtime.block_on(async move {
        let address = format!("{}:{}", args.host, args.port);
        let listener = tokio::net::TcpListener::bind(&address)
            .await
            .map_err(|e| format!("cannot listen on {address}: {e}"))?;
        let local = listener.local_addr().map_err(|e| e.to_string())?;
        println!("listening on http://{local}");
        let _ = std::io::stdout().flush();
        server
            .serve(listener, etllm::server::shutdown_signal())
            .await
            .map_err(|e| e.to_string())
    })?;
    eprintln!("etllm serve: stopped");
    Ok(())
}

fn run_bench(args: bench::BenchArgs) -> Result<(), String> {
    let model_args = ModelArgs {
        model: args.model.clone(),
        tokenizer: args.tokenizer.clone(),
        threads: None,
        preset: None,
        data: args.data.clone(),
        method: args.method.clone(),
    };
    let (label, bytes) = match &args.model {
        Some(path) => (
            path.display().to_string(),
            std::fs::metadata(path).map(|m| m.len()).unwrap_or(0),
        ),
        None => ("built-in demo".to_string(), DEFAULT_MODEL.len() as u64),
    };
    bench::bench(&args, || open_runner(&model_args), &label, bytes)
}

fn generate(args: GenerateArgs) -> Result<(), String> {
    let sampling = args.sampling.config()?;
    if !args.images.is_empty() && args.prompt_cache.is_some() {
        return Err("--prompt-cache does not apply with --image".into());
    }
    let mut runner = open_runner_with(&args.model, args.preprocessor_config.as_deref())?;
    if args.warmup {
        runner.warmup().map_err(|e| e.to_string())?;
    }
    let prompt = if args.chat {
        let mut messages = Vec::new();
        messages.extend(args.system.map(ChatMessage::system));
        messages.push(ChatMessage::user(args.prompt));
        runner
            .apply_chat_template(&messages, true)
            .map_err(|e| e.to_string())?
    } else {
        args.prompt
    };
    let config = GenerationConfig {
        echo: args.echo,
        num_bos: if args.chat { 0 } else { args.num_bos },
        ..sampling
    };
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let mut write_error = None;
    let json = args.json;
    let mut on_token = |piece: etllm::TokenPiece<'_>| {
        let result = if json {
            let line = serde_json::json!({ "id": piece.token, "text": piece.text });
            writeln!(out, "{line}")
        } else {
            write!(out, "{}", piece.text).and_then(|_| out.flush())
        };
        stop_on_write_error(result, &mut write_error)
    };
    let stats = match &args.prompt_cache {
        None if !args.images.is_empty() => {
            let inputs = image_prompt(&prompt, &args.images)?;
            runner.generate_inputs(&inputs, &config, &mut on_token, |_| {})
        }
        None => runner.generate(&prompt, &config, &mut on_token, |_| {}),
        Some(path) => generate_with_prompt_cache(&mut runner, path, &prompt, &config, on_token),
    }
    .map_err(|e| e.to_string())?;
    if write_error.is_some() {
        return Ok(());
    }
    if json {
        let line = serde_json::json!({ "stats": stats.to_json() });
        let _ = writeln!(out, "{line}");
    } else {
        let _ = writeln!(out);
        report(&stats);
    }
    Ok(())
}

/// The input list of `generate --image`: the prompt split at each "<image>" marker, with
/// the images in order at the markers; without markers, the images, then the prompt.
fn image_prompt(prompt: &str, images: &[PathBuf]) -> Result<Vec<etllm::Input>, String> {
    const MARKER: &str = "<image>";
    let parts: Vec<&str> = prompt.split(MARKER).collect();
    let markers = parts.len() - 1;
    let mut inputs = Vec::new();
    if markers == 0 {
        inputs.extend(images.iter().map(etllm::Input::image_file));
        if !prompt.is_empty() {
            inputs.push(etllm::Input::text(prompt));
        }
        return Ok(inputs);
    }
    if markers != images.len() {
        return Err(format!(
            "the prompt has {markers} {MARKER} markers but {} --image files were given",
            images.len()
        ));
    }
    for (i, part) in parts.iter().enumerate() {
        if !part.is_empty() {
            inputs.push(etllm::Input::text(*part));
        }
        if let Some(image) = images.get(i) {
            inputs.push(etllm::Input::image_file(image));
        }
    }
    Ok(inputs)
}

fn transcribe(args: TranscribeArgs) -> Result<(), String> {
    use etllm::{AsrOptions, AsrRunner, TranscribeConfig};
    let tokenizer = match &args.tokenizer {
        Some(t) => t.clone(),
        None => {
            let t = args.model.with_file_name("tokenizer.json");
            if !t.exists() {
                return Err(format!(
                    "--tokenizer is required: no tokenizer.json next to {}",
                    args.model.display()
                ));
            }
            t
        }
    };
    let mut options = AsrOptions::default();
    options.num_threads = args.threads;
    options.preprocessor_config = args.preprocessor_config.clone();
    let mut asr = AsrRunner::open(&args.model, &tokenizer, options).map_err(|e| e.to_string())?;
    let mut config = TranscribeConfig::default();
    config.generation.max_new_tokens = args.max_new_tokens;
    config.generation.temperature = args.temperature;
    config.generation.top_p = args.top_p;
    config.generation.seed = args.seed;
    config.language = args.language.clone();
    config.translate = args.translate;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let mut write_error = None;
    let json = args.json;
    let audio = etllm::multimodal::AudioSource::File(args.audio.clone());
    let transcript = asr
        .transcribe(&audio, &config, |piece| {
            if json {
                return ControlFlow::Continue(());
            }
            let result = write!(out, "{}", piece.text).and_then(|_| out.flush());
            stop_on_write_error(result, &mut write_error)
        })
        .map_err(|e| e.to_string())?;
    if write_error.is_some() {
        return Ok(());
    }
    if json {
        let line = serde_json::json!({
            "text": transcript.text,
            "tokens": transcript.tokens,
            "prompt": transcript.prompt,
            "language": transcript.language,
            "stats": transcript.stats.to_json(),
        });
        let _ = writeln!(out, "{line}");
    } else {
        let _ = writeln!(out);
        report(&transcript.stats);
    }
    Ok(())
}

/// `generate --prompt-cache FILE`: restores FILE's state (when it is one of this model),
/// feeds only the part of the prompt that differs from the tokens it holds (prefix reuse),
/// writes the state after the prompt to FILE when the prompt fed anything new, then
/// generates. The prompt's last token is held back by the prefill and fed by the
/// generation, and the generation is given the whole prompt again (all of it in place), so
/// the echo, the repetition penalty and the token count are those of a run without the
/// cache. The stats are the whole run's: from the prefill's start (writing FILE included)
/// to the end, with `reused_prompt_tokens` what FILE spared.
fn generate_with_prompt_cache(
    runner: &mut Runner,
    path: &Path,
    prompt: &str,
    config: &GenerationConfig,
    on_token: impl FnMut(etllm::TokenPiece<'_>) -> ControlFlow<()>,
) -> etllm::Result<Stats> {
    // A missing FILE is the first run; any other failure is only a warning: the run goes
    // on as without the cache and then overwrites FILE.
    if path.exists() {
        if let Err(e) = runner.load_state_file(path) {
            eprintln!(
                "warning: not using the prompt cache {}: {e}; it will be overwritten",
                path.display()
            );
        }
    }
    let before = runner.tokens();
    let reuse = GenerationConfig {
        reuse_prefix: true,
        ..config.clone()
    };
    let prefill = runner.prefill(prompt, &reuse)?;
    if runner.tokens() != before {
        if let Err(e) = runner.save_state_file(path, &[]) {
            eprintln!(
                "warning: cannot write the prompt cache {}: {e}",
                path.display()
            );
        }
    }
    let mut stats = runner.generate(prompt, &reuse, on_token, |_| {})?;
    stats.inference_start_us = prefill.inference_start_us;
    stats.token_encode_end_us = prefill.token_encode_end_us;
    stats.aggregate_model_execution_time_us += prefill.aggregate_model_execution_time_us;
    stats.reused_prompt_tokens = prefill.reused_prompt_tokens;
    Ok(stats)
}

/// Continues while stdout takes the text; stops quietly once it is closed (e.g. piped
/// into `head`), remembering the error.
fn stop_on_write_error(
    result: std::io::Result<()>,
    error: &mut Option<std::io::Error>,
) -> ControlFlow<()> {
    match result {
        Ok(()) => ControlFlow::Continue(()),
        Err(e) => {
            *error = Some(e);
            ControlFlow::Break(())
        }
    }
}

fn chat(args: ChatArgs) -> Result<(), String> {
    let sampling = args.sampling.config()?;
    let mut runner = open_runner(&args.model)?;
    let template = match &args.chat_template {
        Some(path) => read_template(path)?,
        None => runner.chat_template().map_err(|e| e.to_string())?.clone(),
    };
    let mut conversation = match &args.load_session {
        Some(path) => load_session(&mut runner, path, template)?,
        None => Conversation::new(template),
    };
    if let Some(system) = &args.system {
        if conversation.turns() > 0 {
            eprintln!("warning: --system is ignored: the loaded conversation has begun");
        } else {
            conversation
                .set_system(system.as_str())
                .map_err(|e| e.to_string())?;
        }
    }
    let save = |runner: &mut Runner, conversation: &Conversation| {
        if let Some(path) = &args.save_session {
            if let Err(e) = runner.save_state_file(path, conversation.to_json().as_bytes()) {
                eprintln!(
                    "warning: cannot save the session to {}: {e}",
                    path.display()
                );
            }
        }
    };
    let config = GenerationConfig {
        echo: false,
        ..sampling
    };
    let interactive = std::io::stdin().is_terminal();
    if interactive {
        eprintln!(
            "Chatting with {}. /rewind drops the last turn, /reset starts over, /quit leaves.",
            runner_name(&args.model)
        );
        if conversation.turns() > 0 {
            eprintln!(
                "(resumed a conversation of {} turns, {} tokens)",
                conversation.turns(),
                runner.position()
            );
        }
    }
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let mut line = String::new();
    loop {
        if interactive {
            eprint!("> ");
        }
        line.clear();
        match std::io::stdin().read_line(&mut line) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) => return Err(format!("cannot read stdin: {e}")),
        }
        let input = line.trim_end_matches(['\n', '\r']);
        if input.trim().is_empty() {
            continue;
        }
        let command = match input.trim() {
            "/quit" | "/exit" => break,
            "/reset" => Some(conversation.reset(&mut runner).map(|()| true)),
            "/rewind" => Some(conversation.rewind(&mut runner)),
            "/help" => {
                eprintln!("/rewind: drop the last turn  /reset: start over  /quit: leave");
                continue;
            }
            other if other.starts_with('/') => {
                eprintln!("unknown command {other}; /help lists them");
                continue;
            }
            _ => None,
        };
        if let Some(result) = command {
            let ok = result.map_err(|e| e.to_string())?;
            if ok {
                save(&mut runner, &conversation);
            }
            if args.json {
                let _ = writeln!(
                    out,
                    "{}",
                    serde_json::json!({ "command": input.trim(), "ok": ok })
                );
            } else {
                eprintln!(
                    "{}",
                    match (input.trim(), ok) {
                        ("/reset", _) => "(the conversation starts over)",
                        (_, true) => "(dropped the last turn)",
                        (_, false) => "(nothing to rewind)",
                    }
                );
            }
            continue;
        }
        let mut write_error = None;
        let json = args.json;
        let result = conversation.send(&mut runner, input, &config, |piece| {
            if json {
                return ControlFlow::Continue(());
            }
            let result = write!(out, "{}", piece.text).and_then(|_| out.flush());
            stop_on_write_error(result, &mut write_error)
        });
        if write_error.is_some() {
            return Ok(());
        }
        match result {
            Ok((reply, stats)) => {
                save(&mut runner, &conversation);
                if json {
                    let line = serde_json::json!({ "reply": reply, "stats": stats.to_json() });
                    let _ = writeln!(out, "{line}");
                } else {
                    let _ = writeln!(out);
                }
                if args.stats {
                    report(&stats);
                }
            }
            // The turn was not taken; the conversation is as before it.
            Err(etllm::Error::ContextFull { .. }) if !json => {
                eprintln!("the conversation no longer fits in the context: /rewind or /reset");
            }
            Err(e) => {
                if json {
                    let _ = writeln!(out, "{}", serde_json::json!({ "error": e.to_string() }));
                } else {
                    eprintln!("error: {e}");
                }
            }
        }
    }
    Ok(())
}

/// `chat --load-session FILE`: the conversation saved in FILE, its state restored into
/// the runner. A FILE that does not exist starts a new conversation (so that one FILE can
/// be given to both --load-session and --save-session from the first run on); a state
/// without a chat in it (from `generate --prompt-cache`) starts a new conversation over its
/// tokens, which the first turn reuses as far as they match.
fn load_session(
    runner: &mut Runner,
    path: &Path,
    template: ChatTemplate,
) -> Result<Conversation, String> {
    if !path.exists() {
        eprintln!(
            "(no session in {} yet: a new conversation starts)",
            path.display()
        );
        return Ok(Conversation::new(template));
    }
    let json = runner.load_state_file(path).map_err(|e| e.to_string())?;
    if json.is_empty() {
        return Ok(Conversation::new(template));
    }
    let json = std::str::from_utf8(&json)
        .map_err(|_| format!("{}: its chat is not UTF-8 text", path.display()))?;
    Conversation::from_json(template, json).map_err(|e| format!("{}: {e}", path.display()))
}

/// What the banner calls the model.
fn runner_name(args: &ModelArgs) -> String {
    match &args.model {
        Some(m) => m.display().to_string(),
        None => "the built-in model".into(),
    }
}

fn apply_chat_template(args: ApplyChatTemplateArgs) -> Result<(), String> {
    let template = match (&args.chat_template, args.builtin.as_deref()) {
        (Some(path), _) => read_template(path)?,
        (None, Some("llama2")) => ChatTemplate::llama2(),
        _ => ChatTemplate::llama3(),
    };
    let messages: Vec<ChatMessage> = serde_json::from_str(&args.messages).map_err(|e| {
        format!("--messages must be a JSON array of {{\"role\", \"content\"}} objects: {e}")
    })?;
    let text = template
        .apply(&messages, !args.no_generation_prompt)
        .map_err(|e| e.to_string())?;
    print!("{text}");
    Ok(())
}

/// A human-readable summary of `stats` on stderr.
fn report(s: &Stats) {
    let ms = |us: u64| us as f64 / 1000.0;
    let generation_us = s.inference_end_us.saturating_sub(s.inference_start_us);
    let model_share = if generation_us == 0 {
        0.0
    } else {
        100.0 * s.aggregate_model_execution_time_us as f64 / generation_us as f64
    };
    let reused = if s.reused_prompt_tokens > 0 {
        format!(" ({} reused)", s.reused_prompt_tokens)
    } else {
        String::new()
    };
    eprintln!(
        "prompt tokens: {}{reused}  generated tokens: {}  stop: {}",
        s.num_prompt_tokens,
        s.num_generated_tokens,
        s.stop_reason.as_str()
    );
    eprintln!(
        "load: {:.1} ms  time to first token: {:.1} ms  total: {:.1} ms",
        ms(s.model_load_end_us.saturating_sub(s.model_load_start_us)),
        ms(s.time_to_first_token_us()),
        ms(generation_us)
    );
    eprintln!(
        "prefill: {:.1} tokens/s  decode: {:.1} tokens/s  in model: {:.1}% (decode: {:.1}%)  \
         sampling: {:.2} ms",
        s.prefill_tokens_per_second(),
        s.decode_tokens_per_second(),
        model_share,
        100.0 * (1.0 - s.decode_outside_model_share()),
        ms(s.aggregate_sampling_time_us)
    );
}

/// Writes the built-in model and tokenizer to a cache folder (once per content) and
/// returns their paths: ExecuTorch loads models from files.
fn default_model() -> Result<(PathBuf, PathBuf), String> {
    let hash = fnv1a(DEFAULT_MODEL) ^ fnv1a(DEFAULT_TOKENIZER).rotate_left(1);
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .filter(|p| p.is_absolute())
        .unwrap_or_else(std::env::temp_dir);
    let dir = base
        .join("etllm")
        .join(format!("default-model-{hash:016x}"));
    let model = dir.join("model.pte");
    let tokenizer = dir.join("tokenizer.json");
    if !is_file_with(&model, DEFAULT_MODEL) || !is_file_with(&tokenizer, DEFAULT_TOKENIZER) {
        std::fs::create_dir_all(&dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        write_atomically(&model, DEFAULT_MODEL)?;
        write_atomically(&tokenizer, DEFAULT_TOKENIZER)?;
    }
    Ok((model, tokenizer))
}

fn is_file_with(path: &Path, bytes: &[u8]) -> bool {
    std::fs::read(path).is_ok_and(|b| b == bytes)
}

fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), String> {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, bytes)
        .and_then(|_| std::fs::rename(&tmp, path))
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf29ce484222325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x100000001b3)
    })
}
