//! The runner: loads a model and a tokenizer, and generates text with streaming callbacks.

use std::collections::VecDeque;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crate::chat::{ChatMessage, ChatTemplate, TokenizerTemplate};
use crate::config::GenerationConfig;
use crate::error::{Error, Result};
use crate::grammar::{Compiler, Constraint};
use crate::io_manager::{default_manager_for, IoManager};
use crate::model::{Model, ModelFiles, ModelMetadata};
use crate::sampler::{Sampler, SamplerPlugin};
use crate::stats::{now_us, Stats, StopReason};
use crate::stop::{StopScan, StopStrings};
use crate::tokenizer::{Preset, Tokenizer};

/// Options fixed when the runner is created.
#[derive(Default)]
pub struct RunnerOptions {
    /// Threads of ExecuTorch's CPU thread pool, set when the runner loads. The pool is
    /// shared by the whole process and cannot be resized while any model is loaded (see
    /// [`set_num_threads`](crate::set_num_threads)): a count other than the current one is
    /// then a load error. `None` keeps the current size.
    pub num_threads: Option<usize>,
    /// A KV-cache manager to use instead of the built-in one chosen from the model's
    /// signature.
    pub io_manager: Option<Box<dyn IoManager>>,
    /// Model-family conventions for the tokenizer (BOS/EOS, special tokens), e.g.
    /// [`Preset::Llama`]. With a preset, the EOS ids are the model's and the preset's.
    pub preset: Option<Preset>,
    /// External data files (`.ptd`, ExecuTorch's named data maps) that hold weights the
    /// export kept out of the `.pte` (`export.foundation_weights_file`,
    /// `export.lora_weights_file`). When empty, a file with the model's stem and the
    /// `.ptd` extension beside the model (`model.ptd` for `model.pte`) is used if it
    /// exists. A missing, unreadable or foreign data file is a load error naming it.
    pub data_paths: Vec<PathBuf>,
    /// The method that runs the model's steps, when it is not `forward`: e.g.
    /// `lora_forward` in a multi-method LoRA export (upstream's `method_name`). KV-cache
    /// managers see it under the name `forward` (its [`MethodInfo::name`] keeps the real
    /// name), and the program's own `forward` is then not loaded. A name the program
    /// does not have is an `InvalidArgument` load error.
    ///
    /// [`MethodInfo::name`]: crate::tensor::MethodInfo::name
    pub method_name: Option<String>,
}

impl std::fmt::Debug for RunnerOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunnerOptions")
            .field("num_threads", &self.num_threads)
            .field("io_manager", &self.io_manager.as_ref().map(|_| "custom"))
            .field("preset", &self.preset)
            .field("data_paths", &self.data_paths)
            .field("method_name", &self.method_name)
            .finish()
    }
}

/// One piece of streamed text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct TokenPiece<'a> {
    /// The generated token this piece belongs to; `None` for the echoed prompt and for
    /// the bytes released when generation ends.
    pub token: Option<u32>,
    /// Complete UTF-8 text; empty while a character split across tokens is incomplete.
    pub text: &'a str,
}

/// Stops a running [`Runner::generate`] from any thread. Cheap to clone.
///
/// ```
/// use std::ops::ControlFlow;
/// use etllm::{GenerationConfig, Runner, RunnerOptions, StopReason};
///
/// let mut runner = Runner::open(
///     "tests/fixtures/dyn_xnnpack/model.pte",
///     "tests/fixtures/tokenizer.json",
///     RunnerOptions::default(),
/// )?;
/// let handle = runner.stop_handle(); // Send + Clone: give it to another thread
/// let config = GenerationConfig { max_new_tokens: 50, echo: false, ignore_eos: true, ..Default::default() };
/// let mut pieces = 0;
/// let stats = runner.generate("Once upon a time", &config, |_| {
///     pieces += 1;
///     if pieces == 3 {
///         handle.stop(); // what a UI thread's "stop" button would do
///     }
///     ControlFlow::Continue(())
/// }, |_| {})?;
/// assert_eq!(stats.stop_reason, StopReason::Stopped);
/// assert!(stats.num_generated_tokens < 50);
/// # Ok::<(), etllm::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct StopHandle(Arc<AtomicBool>);

impl StopHandle {
    /// Asks the generation in progress to end before its next model step. The request is
    /// cleared when the next `generate` starts, so it only affects a generation already
    /// running.
    pub fn stop(&self) {
        self.0.store(true, Ordering::Release);
    }
}

struct Loaded {
    model: Model,
    /// Shared with the grammar compiler, which tokenizes forced text with it.
    tokenizer: Arc<Tokenizer>,
    io: Box<dyn IoManager>,
    bos_id: Option<u32>,
    eos_ids: Vec<u32>,
    vocab_size: usize,
    max_context: usize,
    /// The manager's [`IoManager::ring_buffer`], until a step past `max_context` fails.
    ring: bool,
    /// The chat template the tokenizer comes with.
    tokenizer_template: TokenizerTemplate,
    /// The vocabulary as the grammar engine sees it, built by the first constrained
    /// generation.
    grammar: Option<Compiler>,
}

impl Loaded {
    /// The grammar compiler for this vocabulary, built on first use.
    fn compiler(&mut self) -> Result<&Compiler> {
        if self.grammar.is_none() {
            let tokens = self.tokenizer.token_bytes()?;
            let tokenizer = self.tokenizer.clone();
            self.grammar = Some(Compiler::with_tokenizer(
                &tokens,
                self.vocab_size,
                &self.eos_ids,
                move |text| tokenizer.encode(text).ok(),
            )?);
        }
        Ok(self.grammar.as_ref().expect("built"))
    }

    /// Compiles the config's grammar, if any, against this vocabulary; `stop` cancels the
    /// grammar engine's work in progress.
    fn constraint(
        &mut self,
        config: &GenerationConfig,
        stop: &Arc<AtomicBool>,
    ) -> Result<Option<Constraint>> {
        if config.grammar.is_empty() {
            return Ok(None);
        }
        self.compiler()?
            .compile_with_stop(config.grammar_type, &config.grammar, Some(stop.clone()))
            .map(Some)
    }
}

/// Runs a decoder-only LLM exported to an ExecuTorch `.pte` file.
///
/// The KV-cache position persists across [`generate`](Self::generate) calls, so a
/// conversation continues where the last call ended, until [`reset`](Self::reset). The
/// last token a call generates is fed to the model at the start of the next call.
///
/// A runner is used from one thread at a time (it is `Send`); only a [`StopHandle`] may be
/// used from other threads while `generate` runs.
///
/// Continuing, rewinding and regenerating:
///
/// ```
/// use std::ops::ControlFlow;
/// use etllm::{GenerationConfig, Runner, RunnerOptions};
///
/// let mut runner = Runner::open(
///     "tests/fixtures/dyn_xnnpack/model.pte",
///     "tests/fixtures/tokenizer.json",
///     RunnerOptions::default(),
/// )?;
/// let greedy = GenerationConfig { max_new_tokens: 4, temperature: 0.0, echo: false, ..Default::default() };
/// let mut reply = |runner: &mut Runner, prompt: &str| -> etllm::Result<String> {
///     let mut text = String::new();
///     runner.generate(prompt, &greedy, |p| { text.push_str(p.text); ControlFlow::Continue(()) }, |_| {})?;
///     Ok(text)
/// };
///
/// runner.prefill("Once upon a time", &GenerationConfig { num_bos: 1, ..Default::default() })?;
/// let start = runner.position(); // BOS + the prompt's tokens
/// let first = reply(&mut runner, " the")?; // continues the prefilled text
/// assert!(runner.position() > start);
///
/// runner.rewind(start)?; // back to just after the prompt
/// assert_eq!(reply(&mut runner, " the")?, first); // greedy: the same reply again
///
/// runner.reset()?; // a new conversation
/// assert_eq!(runner.position(), 0);
/// # Ok::<(), etllm::Error>(())
/// ```
pub struct Runner {
    model: ModelFiles,
    tokenizer_path: PathBuf,
    num_threads: Option<usize>,
    custom_io: Option<Box<dyn IoManager>>,
    preset: Option<Preset>,
    loaded: Option<Loaded>,
    stop: Arc<AtomicBool>,
    /// Positions held by the KV cache.
    pos: usize,
    /// The last generated token, not yet fed to the model.
    pending: Option<u32>,
    load_start_us: u64,
    load_end_us: u64,
    plugin: Option<Box<dyn SamplerPlugin>>,
    /// A chat template set by the caller; it wins over the tokenizer's.
    chat_template: Option<ChatTemplate>,
}

impl std::fmt::Debug for Runner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runner")
            .field("model_path", &self.model.program)
            .field("tokenizer_path", &self.tokenizer_path)
            .field("loaded", &self.is_loaded())
            .field("position", &self.position())
            .finish()
    }
}

impl Runner {
    /// A runner for `model_path` and `tokenizer_path`; nothing is read until
    /// [`load`](Self::load) (or the first `generate`).
    pub fn new(
        model_path: impl AsRef<Path>,
        tokenizer_path: impl AsRef<Path>,
        options: RunnerOptions,
    ) -> Self {
        Self {
            model: ModelFiles {
                program: model_path.as_ref().to_path_buf(),
                data: options.data_paths,
                method: options.method_name,
            },
            tokenizer_path: tokenizer_path.as_ref().to_path_buf(),
            num_threads: options.num_threads,
            custom_io: options.io_manager,
            preset: options.preset,
            loaded: None,
            stop: Arc::new(AtomicBool::new(false)),
            pos: 0,
            pending: None,
            load_start_us: 0,
            load_end_us: 0,
            plugin: None,
            chat_template: None,
        }
    }

    /// [`new`](Self::new) followed by [`load`](Self::load).
    pub fn open(
        model_path: impl AsRef<Path>,
        tokenizer_path: impl AsRef<Path>,
        options: RunnerOptions,
    ) -> Result<Self> {
        let mut runner = Self::new(model_path, tokenizer_path, options);
        runner.load()?;
        Ok(runner)
    }

    /// Loads the tokenizer and the model and prepares the KV-cache manager. Does nothing
    /// when already loaded. On failure the runner stays unloaded and can be loaded again.
    pub fn load(&mut self) -> Result<()> {
        if self.loaded.is_some() {
            return Ok(());
        }
        let start = now_us();
        if let Some(n) = self.num_threads {
            crate::et::set_num_threads(n)?;
        }
        let (tokenizer, tokenizer_template, model) = self.load_parts()?;
        let info = model.info();
        let meta = &info.metadata;
        let logits_vocab = info
            .methods
            .get("forward")
            .and_then(|m| m.outputs.first())
            .and_then(|o| o.tensor())
            .and_then(|t| t.sizes.last().copied());
        let vocab_size = meta.vocab_size.or(logits_vocab).ok_or_else(|| {
            Error::UnsupportedModel("the model's vocabulary size is unknown".into())
        })?;
        if tokenizer.vocab_size() > vocab_size {
            return Err(Error::InvalidTokenizer {
                path: self.tokenizer_path.clone(),
                message: format!(
                    "it has {} tokens but the model's vocabulary has only {vocab_size}; \
                     they do not belong together",
                    tokenizer.vocab_size()
                ),
            });
        }
        let bos_id = meta.bos_id.or(tokenizer.bos_id());
        let mut eos_ids = if meta.eos_ids.is_empty() {
            tokenizer.eos_ids().to_vec()
        } else {
            meta.eos_ids.clone()
        };
        if self.preset.is_some() {
            for &id in tokenizer.eos_ids() {
                if !eos_ids.contains(&id) {
                    eos_ids.push(id);
                }
            }
        }
        let (mut io, custom) = match self.custom_io.take() {
            Some(io) => (io, true),
            None => (default_manager_for(info)?, false),
        };
        if let Err(e) = io.load(info) {
            if custom {
                // Keep a caller's manager for the next attempt.
                self.custom_io = Some(io);
            }
            return Err(e);
        }
        // The manager knows its layout: the built-in ones take the model's
        // get_max_context_len, a static-attention export's rope tables may say more when
        // the export records no context (upstream's static exports do not).
        let max_context = io.max_context();
        let ring = io.ring_buffer();
        self.loaded = Some(Loaded {
            model,
            tokenizer: Arc::new(tokenizer),
            io,
            bos_id,
            eos_ids,
            vocab_size,
            max_context,
            ring,
            tokenizer_template,
            grammar: None,
        });
        self.pos = 0;
        self.pending = None;
        self.load_start_us = start;
        self.load_end_us = now_us();
        Ok(())
    }

    /// Loads the tokenizer (and finds its chat template) on a second thread while this one
    /// loads the model: the two are independent, and a real-size tokenizer takes about as
    /// long to read as a small model (100 ms for a 128k tiktoken file, a second for a 152k
    /// `tokenizer.json`). A tokenizer error wins over a model error, as when they were
    /// loaded one after the other. Without a second thread they load in turn.
    fn load_parts(&self) -> Result<(Tokenizer, TokenizerTemplate, Model)> {
        let (path, preset) = (&self.tokenizer_path, self.preset);
        let load_tokenizer = move || -> Result<(Tokenizer, TokenizerTemplate)> {
            let tokenizer = Tokenizer::load(path, preset)?;
            let template = TokenizerTemplate::find(path, &tokenizer);
            Ok((tokenizer, template))
        };
        let (tokenizer, model) = std::thread::scope(|scope| {
            let thread = std::thread::Builder::new()
                .name("etllm-tokenizer-load".into())
                .spawn_scoped(scope, load_tokenizer);
            match thread {
                Ok(handle) => {
                    let model = Model::load(&self.model);
                    let tokenizer = handle.join().unwrap_or_else(|_| {
                        Err(Error::Tokenizer("loading the tokenizer panicked".into()))
                    });
                    (tokenizer, model)
                }
                Err(_) => {
                    let tokenizer = load_tokenizer();
                    (tokenizer, Model::load(&self.model))
                }
            }
        });
        let (tokenizer, template) = tokenizer?;
        Ok((tokenizer, template, model?))
    }

    /// Whether [`load`](Self::load) has succeeded.
    pub fn is_loaded(&self) -> bool {
        self.loaded.is_some()
    }

    /// The model's metadata, once loaded.
    pub fn metadata(&self) -> Option<&ModelMetadata> {
        self.loaded.as_ref().map(|l| &l.model.info().metadata)
    }

    /// The model's methods and metadata, once loaded.
    pub fn model_info(&self) -> Option<&crate::model::ModelInfo> {
        self.loaded.as_ref().map(|l| l.model.info())
    }

    /// The tokenizer, once loaded.
    pub fn tokenizer(&self) -> Option<&Tokenizer> {
        self.loaded.as_ref().map(|l| &*l.tokenizer)
    }

    /// The BOS id in use: the model's `get_bos_id`, else the tokenizer's.
    pub fn bos_id(&self) -> Option<u32> {
        self.loaded.as_ref().and_then(|l| l.bos_id)
    }

    /// The EOS ids in use: the model's `get_eos_ids`, else the tokenizer's.
    pub fn eos_ids(&self) -> &[u32] {
        self.loaded.as_ref().map_or(&[], |l| &l.eos_ids)
    }

    /// The model's vocabulary size: `get_vocab_size`, else the logits' size.
    pub fn vocab_size(&self) -> Option<usize> {
        self.loaded.as_ref().map(|l| l.vocab_size)
    }

    /// The most positions a conversation can hold; for a ring-buffer model (see
    /// [`IoManager::ring_buffer`]), the most prompt and new tokens one call takes.
    pub fn max_context(&self) -> Option<usize> {
        self.loaded.as_ref().map(|l| l.max_context)
    }

    /// Tokens in the conversation so far: prompts and generated tokens since the last
    /// reset.
    pub fn position(&self) -> usize {
        self.pos + self.pending.is_some() as usize
    }

    /// A handle that stops a running `generate` from any thread.
    pub fn stop_handle(&self) -> StopHandle {
        StopHandle(self.stop.clone())
    }

    /// Asks a running `generate` to stop (see [`StopHandle::stop`]).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
    }

    /// Rolls the conversation back to its first `pos` tokens (see [`position`](Self::position)),
    /// to regenerate a reply or drop a turn: the next `generate` continues after them and
    /// needs a non-empty prompt. `pos` equal to the position changes nothing; a larger one
    /// is an error. A static-attention model can only rewind while the conversation still
    /// fits in its cache (older entries of a sliding window are gone).
    pub fn rewind(&mut self, pos: usize) -> Result<()> {
        let current = self.position();
        if pos > current {
            return Err(Error::InvalidArgument(format!(
                "cannot rewind to {pos}: the conversation holds {current} tokens"
            )));
        }
        if pos == current {
            return Ok(());
        }
        let loaded = self
            .loaded
            .as_mut()
            .ok_or_else(|| Error::NotLoaded("nothing to rewind".into()))?;
        if loaded.ring && pos != 0 {
            return Err(Error::InvalidArgument(format!(
                "cannot rewind to {pos}: the model keeps a ring-buffer KV cache (attention \
                 sink or sliding window), whose older positions may be overwritten; rewind \
                 to 0 (reset) instead"
            )));
        }
        // Positions past `pos` stay in the cache but are overwritten before they are read.
        loaded.io.rewind(pos)?;
        self.pos = pos;
        self.pending = None;
        Ok(())
    }

    /// The chat template in use: the one set with
    /// [`set_chat_template`](Self::set_chat_template); else the model's, from a
    /// `chat_template.jinja` or `tokenizer_config.json` beside the tokenizer file (or in
    /// the tokenizer folder); else the built-in Llama 2 template when the `llama` preset
    /// recognised a Llama 2 tokenizer; else the built-in Llama 3 template
    /// ([`ChatTemplate::llama3`]). Fails when the runner is not
    /// loaded and no template was set, or when the model's template files are unreadable
    /// or the template does not compile.
    pub fn chat_template(&self) -> Result<&ChatTemplate> {
        let tokenizer = self.loaded.as_ref().map(|l| &l.tokenizer_template);
        ChatTemplate::for_tokenizer(self.chat_template.as_ref(), tokenizer).unwrap_or_else(|| {
            Err(Error::NotLoaded(
                "load the runner (or set a chat template) first".into(),
            ))
        })
    }

    /// Sets the chat template (or with `None` goes back to the model's own).
    pub fn set_chat_template(&mut self, template: Option<ChatTemplate>) {
        self.chat_template = template;
    }

    /// Renders `messages` with the [chat template](Self::chat_template) into prompt text
    /// (see [`ChatTemplate::apply`]); generate from it with `num_bos = 0`, since the
    /// template writes its own BOS.
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        self.chat_template()?.apply(messages, add_generation_prompt)
    }

    /// The grammar compiler for this runner's vocabulary (its tokenizer's token bytes, the
    /// model's vocabulary size and EOS ids), built on first use: what `generate` uses for
    /// [`GenerationConfig::grammar`], for callers that drive a
    /// [`Constraint`] themselves. Loads the runner if needed.
    pub fn grammar_compiler(&mut self) -> Result<&Compiler> {
        self.load()?;
        self.loaded.as_mut().expect("loaded").compiler()
    }

    /// Sets (or with `None` removes) a sampling plugin that runs before the built-in
    /// sampler for every generated token; it replaces any previous one (which is dropped).
    pub fn set_sampler_plugin(&mut self, plugin: Option<Box<dyn SamplerPlugin>>) {
        self.plugin = plugin;
    }

    /// Loads if needed, then runs a short greedy generation (a few model steps, no
    /// callbacks) so that first-call costs (delegate setup, allocations, caches) are paid
    /// before the first real request, and resets the runner: the conversation is empty
    /// afterwards.
    pub fn warmup(&mut self) -> Result<()> {
        self.load()?;
        let first = self.bos_id().unwrap_or(0);
        let config = GenerationConfig {
            warming: true,
            echo: false,
            temperature: 0.0,
            max_new_tokens: 4,
            ignore_eos: true,
            ..Default::default()
        };
        self.reset()?;
        let ok = ControlFlow::Continue(());
        let result = self.generate_from_ids(&[first, first], &config, |_| ok, |_| {});
        self.reset()?;
        result.map(|_| ())
    }

    /// Forgets the conversation: the next `generate` starts at position 0. Fails only if
    /// a custom KV-cache manager's reset fails; the position is 0 either way.
    pub fn reset(&mut self) -> Result<()> {
        self.pos = 0;
        self.pending = None;
        match self.loaded.as_mut() {
            Some(l) => l.io.reset(),
            None => Ok(()),
        }
    }

    /// Tokenizes `prompt` (adding `config.num_bos` BOS and `config.num_eos` EOS tokens),
    /// feeds it to the model and streams the generated text to `on_token`. `on_stats`
    /// receives the stats at the end, which are also returned.
    ///
    /// `on_token` returns [`ControlFlow::Break`] to end generation early. The prompt must
    /// not be empty, except to continue after a previous call (an empty prompt then
    /// generates from where that call stopped). A prompt that does not fit in the context
    /// left is an error and changes nothing. If the model or manager fails midway, the
    /// conversation is rolled back to where it was before the call (or, when the manager
    /// cannot roll back, as a static-attention sliding window past its cache, reset).
    pub fn generate(
        &mut self,
        prompt: &str,
        config: &GenerationConfig,
        on_token: impl FnMut(TokenPiece<'_>) -> ControlFlow<()>,
        on_stats: impl FnMut(&Stats),
    ) -> Result<Stats> {
        self.start(Prompt::Text(prompt), false, config, on_token, on_stats)
    }

    /// Like [`generate`](Self::generate), from token ids instead of text (`num_bos` and
    /// `num_eos` still apply). Every id must be below the model's vocabulary size.
    pub fn generate_from_ids(
        &mut self,
        prompt_ids: &[u32],
        config: &GenerationConfig,
        on_token: impl FnMut(TokenPiece<'_>) -> ControlFlow<()>,
        on_stats: impl FnMut(&Stats),
    ) -> Result<Stats> {
        self.start(Prompt::Ids(prompt_ids), false, config, on_token, on_stats)
    }

    /// Feeds `prompt` (with `config.num_bos` BOS and `config.num_eos` EOS tokens) into the
    /// conversation without generating, for example to restore chat history. The next
    /// `generate` continues after it; it may then be called with an empty prompt to
    /// generate the continuation of this text. Only the token-count fields of `config`
    /// are used. Returns the stats of the prefill.
    pub fn prefill(&mut self, prompt: &str, config: &GenerationConfig) -> Result<Stats> {
        let (no_token, no_stats) = (
            |_: TokenPiece<'_>| ControlFlow::Continue(()),
            |_: &Stats| {},
        );
        self.start(Prompt::Text(prompt), true, config, no_token, no_stats)
    }

    /// Like [`prefill`](Self::prefill), from token ids.
    pub fn prefill_ids(&mut self, prompt_ids: &[u32], config: &GenerationConfig) -> Result<Stats> {
        let (no_token, no_stats) = (
            |_: TokenPiece<'_>| ControlFlow::Continue(()),
            |_: &Stats| {},
        );
        self.start(Prompt::Ids(prompt_ids), true, config, no_token, no_stats)
    }

    /// Checks the arguments, loads if needed, turns the prompt into ids and runs.
    fn start(
        &mut self,
        prompt: Prompt<'_>,
        prefill_only: bool,
        config: &GenerationConfig,
        on_token: impl FnMut(TokenPiece<'_>) -> ControlFlow<()>,
        on_stats: impl FnMut(&Stats),
    ) -> Result<Stats> {
        let start = now_us();
        config.validate()?;
        self.load()?;
        let loaded = self.loaded.as_ref().expect("loaded");
        let ids = match prompt {
            Prompt::Text("") => Vec::new(),
            Prompt::Text(text) => loaded.tokenizer.encode(text)?,
            Prompt::Ids(ids) => {
                if let Some(bad) = ids.iter().find(|&&id| id as usize >= loaded.vocab_size) {
                    return Err(Error::InvalidArgument(format!(
                        "token id {bad} is outside the model's vocabulary of {}",
                        loaded.vocab_size
                    )));
                }
                ids.to_vec()
            }
        };
        // An empty text prompt only continues a previous turn; empty ids are also fine
        // when BOS/EOS tokens are added.
        let nothing_to_feed = match prompt {
            Prompt::Text(text) => text.is_empty(),
            Prompt::Ids(_) => ids.is_empty() && config.num_bos == 0 && config.num_eos == 0,
        };
        if nothing_to_feed && (prefill_only || self.pending.is_none()) {
            return Err(Error::InvalidArgument(if prefill_only {
                "the prompt to prefill is empty".into()
            } else {
                "the prompt is empty and there is no previous turn to continue".into()
            }));
        }
        // The grammar compiles before any model step: a bad one changes nothing. A stop
        // request from before this call is cleared first (it would cancel the compile).
        self.stop.store(false, Ordering::Release);
        let constraint = if prefill_only {
            None
        } else {
            let stop = self.stop.clone();
            self.loaded
                .as_mut()
                .expect("loaded")
                .constraint(config, &stop)?
        };
        let mode = match (prefill_only, prompt) {
            (true, _) => Mode::Prefill,
            (false, Prompt::Text(text)) => Mode::Generate(Some(text)),
            (false, Prompt::Ids(_)) => Mode::Generate(None),
        };
        self.run(start, mode, ids, config, constraint, on_token, on_stats)
    }

    #[allow(clippy::too_many_arguments)]
    fn run(
        &mut self,
        start: u64,
        mode: Mode<'_>,
        ids: Vec<u32>,
        config: &GenerationConfig,
        constraint: Option<Constraint>,
        mut on_token: impl FnMut(TokenPiece<'_>) -> ControlFlow<()>,
        mut on_stats: impl FnMut(&Stats),
    ) -> Result<Stats> {
        self.stop.store(false, Ordering::Release);
        let loaded = self.loaded.as_mut().expect("loaded");
        // A prompt that cannot fit is refused before it is built: `num_bos` and `num_eos`
        // go up to i32::MAX, and building such a prompt first would take gigabytes.
        let prompt_len =
            config.num_bos.max(0) as usize + ids.len() + config.num_eos.max(0) as usize;
        // A ring-buffer model bounds each call, not the conversation.
        let available = if loaded.ring {
            loaded.max_context
        } else {
            loaded.max_context.saturating_sub(self.pos)
        };
        let pending = usize::from(self.pending.is_some());
        if prompt_len + pending > available {
            return Err(Error::ContextFull {
                prompt_tokens: prompt_len,
                available: available.saturating_sub(pending),
                max_context: loaded.max_context,
                position: self.position(),
            });
        }
        let mut prompt: Vec<u32> = Vec::with_capacity(prompt_len);
        if config.num_bos > 0 {
            let bos = loaded.bos_id.ok_or_else(|| {
                Error::InvalidArgument(
                    "num_bos > 0 but neither the model nor the tokenizer defines a BOS token"
                        .into(),
                )
            })?;
            prompt.extend(std::iter::repeat_n(bos, config.num_bos as usize));
        }
        prompt.extend_from_slice(&ids);
        if config.num_eos > 0 {
            let eos = *loaded.eos_ids.first().ok_or_else(|| {
                Error::InvalidArgument(
                    "num_eos > 0 but neither the model nor the tokenizer defines an EOS token"
                        .into(),
                )
            })?;
            prompt.extend(std::iter::repeat_n(eos, config.num_eos as usize));
        }
        let mut stats = Stats {
            model_load_start_us: self.load_start_us,
            model_load_end_us: self.load_end_us,
            inference_start_us: start,
            token_encode_end_us: now_us(),
            num_prompt_tokens: prompt.len() as u64,
            ..Default::default()
        };

        let orig_pos = self.pos;
        let orig_pending = self.pending;
        let feed: Vec<u64> = orig_pending
            .iter()
            .chain(prompt.iter())
            .map(|&t| t as u64)
            .collect();
        // `feed` fits: checked above, before the prompt was built.
        let context_left = (available - orig_pending.is_some() as usize) as i64;
        let (n_new, prompt_text) = match mode {
            // A ring-buffer model: at most max_context new tokens a call (upstream's rule).
            Mode::Generate(text) if loaded.ring => (
                config.resolve_max_new_tokens(loaded.max_context as i64, 0) as usize,
                text,
            ),
            Mode::Generate(text) => (
                config.resolve_max_new_tokens(context_left, prompt.len() as i64) as usize,
                text,
            ),
            Mode::Prefill => (0, None),
        };
        let callbacks = !config.warming && matches!(mode, Mode::Generate(_));

        if config.echo && callbacks {
            if let Some(text) = prompt_text {
                if on_token(TokenPiece { token: None, text }).is_break() {
                    stats.stop_reason = StopReason::Callback;
                    stats.inference_end_us = now_us();
                    on_stats(&stats);
                    return Ok(stats);
                }
            }
        }

        let seed = config.seed.unwrap_or_else(clock_seed);
        let mut picker = Picker {
            sampler: Sampler::with_params(config.sampling(), seed),
            plugin: self.plugin.as_deref_mut(),
            constraint,
            scratch: Vec::new(),
            vocab: loaded.vocab_size,
            elapsed_ns: 0,
        };
        if let Some(p) = picker.plugin.as_mut() {
            p.reset()?;
        }
        // A prefill keeps the last token back, so that a following `generate` can start
        // from it even without a prompt of its own.
        let (feed, held) = match mode {
            Mode::Prefill => (&feed[..feed.len() - 1], feed.last().map(|&t| t as u32)),
            Mode::Generate(_) => (&feed[..], None),
        };
        // Whether the context, not the caller's limits, decides how many tokens this call
        // makes: reaching `n_new` then ends with ContextFull.
        let context_bound = n_new < config.resolve_max_new_tokens(i64::MAX / 4, 0) as usize;
        let outcome = generate_loop(
            loaded,
            &self.stop,
            feed,
            orig_pos,
            (n_new, context_bound),
            config,
            &mut picker,
            &mut stats,
            |piece| {
                if callbacks {
                    on_token(piece)
                } else {
                    ControlFlow::Continue(())
                }
            },
        );
        match outcome {
            Ok((pos, pending)) => {
                self.pos = pos;
                self.pending = pending.or(held);
                if matches!(mode, Mode::Prefill) {
                    stats.stop_reason = StopReason::None;
                }
            }
            Err(e) => {
                // Roll the conversation back to where it was before this call; a manager
                // that cannot (a sliding window past its cache) starts over instead, and
                // so does a ring-buffer model, whose older positions may be overwritten.
                if !loaded.ring && loaded.io.rewind(orig_pos).is_ok() {
                    self.pos = orig_pos;
                    self.pending = orig_pending;
                } else {
                    let _ = loaded.io.reset();
                    self.pos = 0;
                    self.pending = None;
                }
                return Err(e);
            }
        }
        stats.inference_end_us = now_us();
        if config.warming {
            self.reset()?;
        } else if callbacks {
            on_stats(&stats);
        }
        Ok(stats)
    }
}

/// A prompt as text or as token ids.
#[derive(Clone, Copy)]
enum Prompt<'a> {
    Text(&'a str),
    Ids(&'a [u32]),
}

/// What [`Runner::run`] does with the prompt.
#[derive(Clone, Copy)]
enum Mode<'a> {
    /// Prefill, then generate; the prompt text, if any, is echoed.
    Generate(Option<&'a str>),
    /// Prefill only.
    Prefill,
}

/// Prefills `feed` at `pos`, then samples up to `n_new` tokens. Returns the new cache
/// position and the last generated token not yet fed.
#[allow(clippy::too_many_arguments)]
fn generate_loop(
    loaded: &mut Loaded,
    stop: &AtomicBool,
    feed: &[u64],
    mut pos: usize,
    (n_new, context_bound): (usize, bool),
    config: &GenerationConfig,
    picker: &mut Picker<'_>,
    stats: &mut Stats,
    mut emit: impl FnMut(TokenPiece<'_>) -> ControlFlow<()>,
) -> Result<(usize, Option<u32>)> {
    let Loaded {
        model,
        tokenizer,
        io,
        eos_ids,
        max_context,
        ring,
        ..
    } = loaded;
    let stopped = || stop.load(Ordering::Acquire);
    // This call's tokens, for the repetition penalty.
    let mut history: Vec<u32> = Vec::new();
    let keep_history = config.repetition_penalty != 1.0 || picker.plugin.is_some();
    if keep_history {
        history.extend(feed.iter().map(|&t| t as u32));
    }
    // Summed in nanoseconds: a single step can take less than a microsecond.
    let mut model_ns = 0u128;
    // The part of `model_ns` spent in decode steps (after prefill).
    let mut decode_model_ns = 0u128;
    let mut token = None;
    if !feed.is_empty() {
        let t0 = Instant::now();
        let logits = feed_tokens(model, io, feed, pos, *ring, *max_context, false)?;
        model_ns += t0.elapsed().as_nanos();
        let Some(logits) = logits else {
            *ring = false;
            return Err(past_ring_context(feed.len(), pos, *max_context));
        };
        pos += feed.len();
        if n_new > 0 {
            token = match picker.pick(logits, &history) {
                Ok(t) => Some(t),
                Err(_) if picker.grammar_stopped() => None,
                Err(e) => return Err(e),
            };
        }
    }
    stats.prompt_eval_end_us = now_us();
    let Some(mut token) = token else {
        stats.aggregate_model_execution_time_us = (model_ns / 1000) as u64;
        if picker.grammar_stopped() {
            // `stop()` came while the grammar engine worked on the first token.
            stats.stop_reason = StopReason::Stopped;
            return Ok((pos, None));
        }
        let incomplete = picker
            .constraint
            .as_mut()
            .is_some_and(|c| !c.is_accepting());
        stats.stop_reason = if incomplete {
            StopReason::GrammarIncomplete
        } else if pos >= *max_context {
            StopReason::ContextFull
        } else {
            StopReason::Length
        };
        return Ok((pos, None));
    };

    let mut stream = tokenizer.stream();
    let mut stop_strings = StopStrings::new(&config.stop_strings);
    let mut generated = 0usize;
    // Fast-forward: tokens the grammar forces, already fed to the grammar, waiting to be
    // emitted; and emitted tokens not yet fed to the model (the current one excluded),
    // which go to the model together in one step.
    let mut forced: VecDeque<u32> = VecDeque::new();
    let mut unfed: Vec<u64> = Vec::new();
    let mut is_forced = false;
    // The last token, not fed to the model: the next call starts with it.
    let mut pending;
    let reason = loop {
        pending = Some(token);
        generated += 1;
        stats.num_generated_tokens = generated as u64;
        if generated == 1 {
            stats.first_token_us = now_us();
        }
        if let (Some(c), false) = (picker.constraint.as_mut(), is_forced) {
            // The grammar allows its EOS tokens only where the output is complete, and
            // then they end it, `ignore_eos` or not.
            if c.is_eos(token) {
                break StopReason::GrammarComplete;
            }
        }
        if (!config.ignore_eos && eos_ids.contains(&token))
            || config.stop_token_ids.contains(&token)
        {
            break StopReason::Eos;
        }
        if let (Some(c), false) = (picker.constraint.as_mut(), is_forced) {
            c.commit(token)?;
        }
        let (piece, found) = match stop_strings.push(&stream.push(token)?) {
            StopScan::Continue(text) => (text, false),
            StopScan::Stop(text) => (text, true),
        };
        if emit(TokenPiece {
            token: Some(token),
            text: &piece,
        })
        .is_break()
        {
            break StopReason::Callback;
        }
        if found {
            break StopReason::StopString;
        }
        if forced.is_empty()
            && picker
                .constraint
                .as_ref()
                .is_some_and(Constraint::is_complete)
        {
            break StopReason::GrammarComplete;
        }
        if generated == n_new {
            if picker
                .constraint
                .as_mut()
                .is_some_and(|c| !c.is_accepting())
            {
                break StopReason::GrammarIncomplete;
            }
            let full = if *ring {
                context_bound
            } else {
                pos + unfed.len() + 1 >= *max_context
            };
            break if full {
                StopReason::ContextFull
            } else {
                StopReason::Length
            };
        }
        if stopped() {
            break StopReason::Stopped;
        }
        unfed.push(token as u64);
        if forced.is_empty() && config.grammar_fast_forward {
            if let Some(c) = picker.constraint.as_mut() {
                forced.extend(c.forced_tokens(n_new - generated)?);
            }
        }
        if let Some(next) = forced.pop_front() {
            token = next;
            is_forced = true;
            continue;
        }
        let t0 = Instant::now();
        let Some(logits) = feed_tokens(model, io, &unfed, pos, *ring, *max_context, true)? else {
            // Past the context, a model that fails is not a ring buffer after all: the
            // conversation is full, as for any bounded model.
            *ring = false;
            unfed.pop();
            break StopReason::ContextFull;
        };
        let step_ns = t0.elapsed().as_nanos();
        model_ns += step_ns;
        decode_model_ns += step_ns;
        pos += unfed.len();
        if keep_history {
            history.extend(unfed.iter().map(|&t| t as u32));
        }
        unfed.clear();
        token = match picker.pick(logits, &history) {
            Ok(t) => t,
            Err(_) if picker.grammar_stopped() => {
                // `stop()` came while the grammar engine worked: every token so far is
                // fed, none is pending.
                pending = None;
                break StopReason::Stopped;
            }
            Err(e) => return Err(e),
        };
        is_forced = false;
    };
    if !unfed.is_empty() {
        // Forced tokens emitted before the last one: the runner keeps one pending token,
        // so the model takes them now.
        let t0 = Instant::now();
        if feed_tokens(model, io, &unfed, pos, *ring, *max_context, true)?.is_none() {
            *ring = false;
            return Err(past_ring_context(unfed.len(), pos, *max_context));
        }
        let step_ns = t0.elapsed().as_nanos();
        model_ns += step_ns;
        decode_model_ns += step_ns;
        pos += unfed.len();
    }
    stats.aggregate_model_execution_time_us = (model_ns / 1000) as u64;
    stats.decode_model_execution_time_us = (decode_model_ns / 1000) as u64;
    stats.aggregate_sampling_time_us = (picker.elapsed_ns / 1000) as u64;
    stats.stop_reason = reason;
    let rest = match reason {
        // The rest of the text is (or follows) the stop string.
        StopReason::StopString => String::new(),
        _ => match stop_strings.push(&stream.flush()?) {
            StopScan::Continue(text) => text + &stop_strings.flush(),
            StopScan::Stop(text) => text,
        },
    };
    if !rest.is_empty() && reason != StopReason::Callback {
        let _ = emit(TokenPiece {
            token: None,
            text: &rest,
        });
    }
    Ok((pos, pending))
}

/// Feeds `tokens` at `pos` (a prompt, a generated token, or tokens a grammar forced) and
/// returns the logits after the last; `None` when a ring-buffer model fails past its
/// context. Prompts go through `prepare_prefill` in chunks; with `decode`, a single token
/// goes through `prepare_decode`.
fn feed_tokens<'a>(
    model: &'a mut Model,
    io: &'a mut Box<dyn IoManager>,
    tokens: &[u64],
    pos: usize,
    ring: bool,
    max_context: usize,
    decode: bool,
) -> Result<Option<&'a [f32]>> {
    let past_context = |n: usize| ring && pos + n > max_context;
    if let ([token], true) = (tokens, decode) {
        let step = io.prepare_decode(*token, pos)?;
        return match model.execute(step.method, &step.inputs) {
            Ok(outputs) => io.update_decode(&outputs).map(Some),
            Err(_) if past_context(1) => Ok(None),
            Err(e) => Err(e),
        };
    }
    let chunk = io.max_prefill_chunk().max(1);
    let (last, rest) = match tokens.len().checked_sub(1) {
        Some(n) => (&tokens[n / chunk * chunk..], &tokens[..n / chunk * chunk]),
        None => return Err(Error::InvalidArgument("no tokens to feed".into())),
    };
    let mut at = pos;
    for part in rest.chunks(chunk) {
        let step = io.prepare_prefill(part, at)?;
        match model.execute(step.method, &step.inputs) {
            Ok(outputs) => {
                io.update_prefill(&outputs)?;
            }
            Err(_) if past_context(at - pos + part.len()) => return Ok(None),
            Err(e) => return Err(e),
        }
        at += part.len();
    }
    let step = io.prepare_prefill(last, at)?;
    match model.execute(step.method, &step.inputs) {
        Ok(outputs) => io.update_prefill(&outputs).map(Some),
        Err(_) if past_context(tokens.len()) => Ok(None),
        Err(e) => Err(e),
    }
}

/// The error when a model taken for a ring buffer fails on `tokens` fed at `pos`, past its
/// context: it is not a ring buffer after all, and the conversation is full.
fn past_ring_context(tokens: usize, pos: usize, max_context: usize) -> Error {
    Error::ContextFull {
        prompt_tokens: tokens,
        available: max_context.saturating_sub(pos),
        max_context,
        position: pos,
    }
}

/// Picks each generated token: the grammar's mask first, if any, then the caller's plugin,
/// if any, then the sampler.
struct Picker<'p> {
    sampler: Sampler,
    plugin: Option<&'p mut (dyn SamplerPlugin + 'static)>,
    /// Constrained decoding: the tokens the grammar allows.
    constraint: Option<Constraint>,
    /// The logits copy the grammar masks and a plugin may edit.
    scratch: Vec<f32>,
    vocab: usize,
    /// Time spent picking, summed.
    elapsed_ns: u128,
}

impl Picker<'_> {
    /// Whether the grammar's last step was cancelled by `stop()`.
    fn grammar_stopped(&self) -> bool {
        self.constraint
            .as_ref()
            .is_some_and(Constraint::was_stopped)
    }

    fn pick(&mut self, logits: &[f32], history: &[u32]) -> Result<u32> {
        let t0 = Instant::now();
        let token = self.choose(logits, history);
        self.elapsed_ns += t0.elapsed().as_nanos();
        token
    }

    fn choose(&mut self, logits: &[f32], history: &[u32]) -> Result<u32> {
        let Some(constraint) = self.constraint.as_mut() else {
            return self.sample(logits, false, history);
        };
        if constraint.num_allowed()? == 1 {
            // A forced token: nothing to sample (nor for a plugin to choose).
            return constraint.first_allowed();
        }
        constraint.apply(logits, &mut self.scratch)?;
        let token = self.sample(&[], true, history)?;
        let constraint = self.constraint.as_mut().expect("constrained");
        if constraint.allows(token)? {
            return Ok(token);
        }
        if self.plugin.is_some() {
            return Err(Error::Sampler(format!(
                "the plugin chose token {token}, which the grammar does not allow here"
            )));
        }
        // The model gave no allowed token a finite logit (NaN or minus infinity
        // everywhere): the lowest allowed id, as greedy's tie rule would.
        constraint.first_allowed()
    }

    /// The plugin (if any), then the sampler, on `logits` (or on the already filled
    /// `scratch` when `in_scratch`).
    fn sample(&mut self, logits: &[f32], in_scratch: bool, history: &[u32]) -> Result<u32> {
        let token = match self.plugin.as_mut() {
            None if in_scratch => self.sampler.sample(&self.scratch, history),
            None => self.sampler.sample(logits, history),
            Some(plugin) => {
                if !in_scratch {
                    self.scratch.clear();
                    self.scratch.extend_from_slice(logits);
                }
                let vocab = self.vocab.min(self.scratch.len());
                match plugin.apply(&mut self.scratch, history)? {
                    Some(t) if (t as usize) < vocab => t,
                    Some(t) => {
                        return Err(Error::Sampler(format!(
                            "the plugin chose token {t}, outside the vocabulary of {vocab}"
                        )))
                    }
                    None => self.sampler.sample(&self.scratch, history),
                }
            }
        };
        Ok(token)
    }
}

/// A seed for runs that did not ask for one.
fn clock_seed() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos() as u64;
    nanos ^ (std::process::id() as u64).rotate_left(32)
}
