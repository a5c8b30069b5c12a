//! The runner: loads a model and a tokenizer, and generates text with streaming callbacks.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::chat::{ChatMessage, ChatTemplate, TokenizerTemplate};
use crate::config::GenerationConfig;
use crate::error::{Error, Result};
use crate::grammar::Compiler;
use crate::io_manager::{default_manager_for, IoManager};
use crate::model::{Model, ModelFiles, ModelKind, ModelMetadata};
use crate::multimodal::{Input, Media};
use crate::sampler::SamplerPlugin;
use crate::session::{Session, Shared};
use crate::stats::{now_us, Stats};
use crate::tokenizer::{Preset, Tokenizer};

pub use crate::generate::{StopHandle, TokenPiece};

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
    /// The image processor's settings (Hugging Face `preprocessor_config.json`) for a
    /// multimodal model whose `vision_encoder` takes preprocessed pixel values. When
    /// `None`, `preprocessor_config.json` beside the model, else beside the tokenizer, is
    /// used if there is one. Given for a model without a `vision_encoder`, it is a load
    /// error.
    pub preprocessor_config: Option<PathBuf>,
}

impl std::fmt::Debug for RunnerOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunnerOptions")
            .field("num_threads", &self.num_threads)
            .field("io_manager", &self.io_manager.as_ref().map(|_| "custom"))
            .field("preset", &self.preset)
            .field("data_paths", &self.data_paths)
            .field("method_name", &self.method_name)
            .field("preprocessor_config", &self.preprocessor_config)
            .finish()
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
    preprocessor_config: Option<PathBuf>,
    stop: Arc<AtomicBool>,
    /// Until the runner loads: the plugin and chat template its session will take.
    plugin: Option<Box<dyn SamplerPlugin>>,
    chat_template: Option<ChatTemplate>,
    /// The runner's own conversation, once loaded.
    session: Option<Session>,
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
            preprocessor_config: options.preprocessor_config,
            stop: Arc::new(AtomicBool::new(false)),
            plugin: None,
            chat_template: None,
            session: None,
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
        if self.session.is_some() {
            return Ok(());
        }
        let start = now_us();
        if let Some(n) = self.num_threads {
            crate::et::set_num_threads(n)?;
        }
        let (tokenizer, tokenizer_template, model) = self.load_parts()?;
        if model.kind() == ModelKind::Seq2Seq {
            return Err(Error::UnsupportedModel(format!(
                "{} is an encoder-decoder (speech-to-text) export, with `encoder` and \
                 `text_decoder` methods: run it with AsrRunner (`etllm transcribe`)",
                self.model.program.display()
            )));
        }
        let info = model.info();
        let media = Media::find(
            info,
            self.preprocessor_config.as_deref(),
            &self.model.program,
            &self.tokenizer_path,
        )?;
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
        let shared = Shared::new(
            model,
            io,
            tokenizer,
            tokenizer_template,
            (bos_id, eos_ids, vocab_size),
            self.model.clone(),
            media,
            (start, now_us()),
        );
        self.session = Some(Session::new(
            Arc::new(shared),
            self.stop.clone(),
            self.chat_template.take(),
            self.plugin.take(),
        ));
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
        self.session.is_some()
    }

    /// The runner's own conversation, loading the runner if needed.
    fn own(&mut self) -> Result<&mut Session> {
        self.load()?;
        Ok(self.session.as_mut().expect("loaded"))
    }

    /// A new conversation over this runner's model (loading it if needed): see
    /// [`Session`]. It shares the loaded model (weights, delegates, tokenizer) and has its
    /// own KV cache, position, sampler plugin (none at first) and chat template (the
    /// runner's at first). The runner's own conversation is not affected; the session
    /// stays usable after the runner is dropped.
    pub fn session(&mut self) -> Result<Session> {
        Ok(self.own()?.new_session())
    }

    /// The model's metadata, once loaded.
    pub fn metadata(&self) -> Option<&ModelMetadata> {
        self.session.as_ref().map(Session::metadata)
    }

    /// The model's methods and metadata, once loaded.
    pub fn model_info(&self) -> Option<&crate::model::ModelInfo> {
        self.session.as_ref().map(Session::model_info)
    }

    /// The tokenizer, once loaded.
    pub fn tokenizer(&self) -> Option<&Tokenizer> {
        self.session.as_ref().map(Session::tokenizer)
    }

    /// The BOS id in use: the model's `get_bos_id`, else the tokenizer's.
    pub fn bos_id(&self) -> Option<u32> {
        self.session.as_ref().and_then(Session::bos_id)
    }

    /// The EOS ids in use: the model's `get_eos_ids`, else the tokenizer's.
    pub fn eos_ids(&self) -> &[u32] {
        self.session.as_ref().map_or(&[], Session::eos_ids)
    }

    /// The model's vocabulary size: `get_vocab_size`, else the logits' size.
    pub fn vocab_size(&self) -> Option<usize> {
        self.session.as_ref().map(Session::vocab_size)
    }

    /// The most positions a conversation can hold; for a ring-buffer model (see
    /// [`IoManager::ring_buffer`]), the most prompt and new tokens one call takes.
    pub fn max_context(&self) -> Option<usize> {
        self.session.as_ref().map(Session::max_context)
    }

    /// Tokens in the conversation so far: prompts and generated tokens since the last
    /// reset.
    pub fn position(&self) -> usize {
        self.session.as_ref().map_or(0, Session::position)
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
        match self.session.as_mut() {
            Some(session) => session.rewind(pos),
            None if pos == 0 => Ok(()),
            None => Err(Error::InvalidArgument(format!(
                "cannot rewind to {pos}: the conversation holds 0 tokens"
            ))),
        }
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
        match self.session.as_ref() {
            Some(session) => session.chat_template(),
            None => {
                ChatTemplate::for_tokenizer(self.chat_template.as_ref(), None::<&TokenizerTemplate>)
                    .unwrap_or_else(|| {
                        Err(Error::NotLoaded(
                            "load the runner (or set a chat template) first".into(),
                        ))
                    })
            }
        }
    }

    /// Sets the chat template (or with `None` goes back to the model's own).
    pub fn set_chat_template(&mut self, template: Option<ChatTemplate>) {
        match self.session.as_mut() {
            Some(session) => session.set_chat_template(template),
            None => self.chat_template = template,
        }
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
    /// [`Constraint`](crate::grammar::Constraint) themselves. Loads the runner if needed.
    pub fn grammar_compiler(&mut self) -> Result<&Compiler> {
        self.load()?;
        self.session.as_ref().expect("loaded").grammar_compiler()
    }

    /// Sets (or with `None` removes) a sampling plugin that runs before the built-in
    /// sampler for every generated token; it replaces any previous one (which is dropped).
    pub fn set_sampler_plugin(&mut self, plugin: Option<Box<dyn SamplerPlugin>>) {
        match self.session.as_mut() {
            Some(session) => session.set_sampler_plugin(plugin),
            None => self.plugin = plugin,
        }
    }

    /// Loads if needed, then runs a short greedy generation (a few model steps, no
    /// callbacks) so that first-call costs (delegate setup, allocations, caches) are paid
    /// before the first real request, and resets the runner: the conversation is empty
    /// afterwards.
    pub fn warmup(&mut self) -> Result<()> {
        self.own()?.warmup()
    }

    /// Forgets the conversation: the next `generate` starts at position 0. Fails only if
    /// a custom KV-cache manager's reset fails; the position is 0 either way.
    pub fn reset(&mut self) -> Result<()> {
        match self.session.as_mut() {
            Some(session) => session.reset(),
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
    /// With [`GenerationConfig::reuse_prefix`], the prompt is the whole conversation
    /// instead, and only what differs from the conversation so far is fed.
    pub fn generate(
        &mut self,
        prompt: &str,
        config: &GenerationConfig,
        on_token: impl FnMut(TokenPiece<'_>) -> ControlFlow<()>,
        on_stats: impl FnMut(&Stats),
    ) -> Result<Stats> {
        config.validate()?;
        self.own()?.generate(prompt, config, on_token, on_stats)
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
        config.validate()?;
        self.own()?
            .generate_from_ids(prompt_ids, config, on_token, on_stats)
    }

    /// Generates from a list of inputs (text, token ids, images, features) on the runner's
    /// own conversation: see [`Session::generate_inputs`] and [`multimodal`](crate::multimodal).
    pub fn generate_inputs(
        &mut self,
        inputs: &[Input],
        config: &GenerationConfig,
        on_token: impl FnMut(TokenPiece<'_>) -> ControlFlow<()>,
        on_stats: impl FnMut(&Stats),
    ) -> Result<Stats> {
        self.own()?
            .generate_inputs(inputs, config, on_token, on_stats)
    }

    /// Feeds a list of inputs without generating: see [`Session::prefill_inputs`].
    pub fn prefill_inputs(&mut self, inputs: &[Input], config: &GenerationConfig) -> Result<Stats> {
        self.own()?.prefill_inputs(inputs, config)
    }

    /// Feeds `prompt` (with `config.num_bos` BOS and `config.num_eos` EOS tokens) into the
    /// conversation without generating, for example to restore chat history. The next
    /// `generate` continues after it; it may then be called with an empty prompt to
    /// generate the continuation of this text. Only the token-count fields of `config`
    /// (and `reuse_prefix`) are used. Returns the stats of the prefill.
    pub fn prefill(&mut self, prompt: &str, config: &GenerationConfig) -> Result<Stats> {
        config.validate()?;
        self.own()?.prefill(prompt, config)
    }

    /// Like [`prefill`](Self::prefill), from token ids.
    pub fn prefill_ids(&mut self, prompt_ids: &[u32], config: &GenerationConfig) -> Result<Stats> {
        config.validate()?;
        self.own()?.prefill_ids(prompt_ids, config)
    }

    /// The conversation's state as bytes (see [`Session::save_state_with`]).
    pub fn save_state_with(&mut self, user_data: &[u8]) -> Result<Vec<u8>> {
        self.own()?.save_state_with(user_data)
    }

    /// Writes the conversation's state to `path` (see [`Session::save_state_file`]).
    pub fn save_state_file(&mut self, path: impl AsRef<Path>, user_data: &[u8]) -> Result<()> {
        self.own()?.save_state_file(path, user_data)
    }

    /// Restores a saved state (see [`Session::load_state`]); returns its user data.
    pub fn load_state(&mut self, bytes: &[u8]) -> Result<Vec<u8>> {
        self.own()?.load_state(bytes)
    }

    /// Restores a saved state from a file (see [`Session::load_state_file`]).
    pub fn load_state_file(&mut self, path: impl AsRef<Path>) -> Result<Vec<u8>> {
        self.own()?.load_state_file(path)
    }

    /// The conversation's tokens (see [`Session::tokens`]).
    pub fn tokens(&self) -> Vec<u32> {
        self.session.as_ref().map_or_else(Vec::new, Session::tokens)
    }

    /// The runner's own conversation, once loaded: what its `generate` runs on.
    pub fn as_session(&mut self) -> Result<&mut Session> {
        self.own()
    }
}
