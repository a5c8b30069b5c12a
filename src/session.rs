//! Sessions: conversations over one loaded model.
//!
//! A [`Runner`](crate::Runner) loads a model once; [`Runner::session`](crate::Runner::session)
//! opens any number of [`Session`]s over it. Each session is a conversation of its own: its
//! KV cache, position, tokens, sampler plugin and chat template. The model's weights (and
//! the packed weights of its delegates) exist once.
//!
//! The model has one set of memory-planned buffers, which hold the KV cache of the
//! session that ran last (the *resident* one). When another session runs, the resident
//! session's state (those buffers, without their all-zero parts, and its KV-cache
//! manager's state) is copied aside and the new session's is copied in. So an extra
//! session costs about the part of its KV cache in use, and switching costs a copy of
//! it; a session that keeps running pays nothing.
//!
//! Calls on one model run one at a time: two sessions used from two threads at once
//! take turns, each call waiting until the other's call has ended (a whole `generate`).
//!
//! A session's state can also be saved ([`Session::save_state`]) and restored into a
//! session of the same model ([`Session::load_state`]), to resume a conversation in
//! another process without feeding its prompt again.

use std::borrow::Cow;
use std::collections::HashMap;
use std::ops::ControlFlow;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use crate::chat::{ChatMessage, ChatTemplate, TokenizerTemplate};
use crate::config::GenerationConfig;
use crate::error::{Error, Result};
use crate::generate::{
    clock_seed, generate_loop, Mode, Parts, Picker, Prompt, StopHandle, TokenPiece,
};
use crate::grammar::{Compiler, Constraint};
use crate::io_manager::IoManager;
use crate::model::{Model, ModelFiles, ModelInfo, ModelKind, ModelMetadata};
use crate::multimodal::{self, feed_segments, Input, Media, Segment};
use crate::sampler::{Sampler, SamplerPlugin};
use crate::stats::{now_us, Stats, StopReason};
use crate::tokenizer::Tokenizer;

pub(crate) mod state;

use state::{ArenaImage, SavedState};

/// What every session of one loaded model shares.
pub(crate) struct Shared {
    core: Mutex<Core>,
    /// Shared with the grammar compiler, which tokenizes forced text with it.
    pub(crate) tokenizer: Arc<Tokenizer>,
    pub(crate) info: ModelInfo,
    pub(crate) bos_id: Option<u32>,
    pub(crate) eos_ids: Vec<u32>,
    pub(crate) vocab_size: usize,
    pub(crate) max_context: usize,
    /// The chat template the tokenizer comes with.
    pub(crate) tokenizer_template: TokenizerTemplate,
    /// How the program is driven, and how images are prepared for it.
    pub(crate) kind: ModelKind,
    pub(crate) media: Media,
    /// The vocabulary as the grammar engine sees it, built by the first constrained
    /// generation.
    grammar: OnceLock<Compiler>,
    pub(crate) load_start_us: u64,
    pub(crate) load_end_us: u64,
    files: ModelFiles,
    /// The model's identity in saved states, computed on first use.
    identity: OnceLock<u128>,
    /// Sessions dropped while the model was locked on their thread: forgotten at the next
    /// lock.
    orphans: Mutex<Vec<u64>>,
}

/// The model and the manager, used by one call at a time.
///
/// The model's buffers hold the resident session's state. When no session is resident
/// they may be `clean` (equal to `baseline`, what they held after loading): a session then
/// comes in by writing its own chunks alone, so bringing in or restoring a session costs
/// about its size, not the buffers'.
struct Core {
    model: Model,
    io: Box<dyn IoManager>,
    /// The manager's [`IoManager::ring_buffer`], until a step past `max_context` fails.
    ring: bool,
    /// The session whose state is in the model's buffers and the manager.
    resident: Option<u64>,
    /// The state of every other session that has one.
    parked: HashMap<u64, Parked>,
    /// The buffers right after loading (zeros, unless the program gives its mutable
    /// buffers initial values): a new conversation's state.
    baseline: ArenaImage<'static>,
    /// Whether the buffers hold `baseline`, exactly.
    clean: bool,
}

/// A session's state while another session is resident.
struct Parked {
    arenas: ArenaImage<'static>,
    io: Vec<u8>,
}

impl Core {
    fn new(model: Model, io: Box<dyn IoManager>) -> Self {
        let ring = io.ring_buffer();
        let baseline = ArenaImage::capture(&model.state_arenas());
        Core {
            model,
            io,
            ring,
            resident: None,
            parked: HashMap::new(),
            baseline,
            clean: true,
        }
    }

    /// The resident session's state (the buffers read whole, the manager's state).
    fn capture(&mut self) -> Result<Parked> {
        let mut io = Vec::new();
        self.io.save_state(&mut io)?;
        Ok(Parked {
            arenas: ArenaImage::capture(&self.model.state_arenas()),
            io,
        })
    }

    fn arena_sizes(&self) -> Vec<usize> {
        self.model.state_arenas().iter().map(|a| a.len()).collect()
    }

    /// Sets the resident session's state aside (its buffers go back to the baseline).
    fn park_resident(&mut self) -> Result<()> {
        let Some(other) = self.resident else {
            return Ok(());
        };
        let parked = self.capture().map_err(|e| {
            Error::IoManager(format!(
                "another session needs the model, and the state of the one that ran last \
                 cannot be set aside: {e}"
            ))
        })?;
        parked
            .arenas
            .clear(&self.baseline, &mut self.model.state_arenas_mut());
        self.clean = true;
        self.parked.insert(other, parked);
        self.resident = None;
        Ok(())
    }

    /// Brings the buffers back to the baseline when they may hold anything else.
    fn make_clean(&mut self) {
        if !self.clean {
            self.baseline.reset(&mut self.model.state_arenas_mut());
            self.clean = true;
        }
    }

    /// Checks a state's layout and gives the manager its part: on error nothing has
    /// changed.
    fn accept(&mut self, arenas: &ArenaImage<'_>, io: &[u8]) -> Result<()> {
        if !arenas.fits(&self.arena_sizes()) {
            return Err(Error::InvalidState(format!(
                "its model buffers have sizes {:?}, the model's are {:?}",
                arenas.sizes,
                self.arena_sizes()
            )));
        }
        self.io.restore_state(io).map_err(|e| match e {
            Error::InvalidState(_) => e,
            other => {
                Error::InvalidState(format!("the KV-cache manager refused its state: {other}"))
            }
        })
    }

    /// Brings a state into the model and the manager, over clean buffers, for session
    /// `id`. The manager goes first: on its error nothing has changed.
    fn bring_in(&mut self, id: u64, arenas: &ArenaImage<'_>, io: &[u8]) -> Result<()> {
        self.accept(arenas, io)?;
        self.make_clean();
        arenas.write_over(&self.baseline, &mut self.model.state_arenas_mut());
        self.clean = false;
        self.resident = Some(id);
        Ok(())
    }

    /// Makes session `id` the resident one: sets the resident session's state aside and
    /// brings `id`'s in (a session without a state starts from the baseline).
    fn make_resident(&mut self, id: u64) -> Result<()> {
        if self.resident == Some(id) {
            return Ok(());
        }
        self.park_resident()?;
        match self.parked.remove(&id) {
            Some(parked) => {
                if let Err(e) = self.bring_in(id, &parked.arenas, &parked.io) {
                    self.parked.insert(id, parked);
                    return Err(e);
                }
            }
            None => {
                self.io.reset()?;
                self.make_clean();
                self.resident = Some(id);
            }
        }
        Ok(())
    }

    /// Replaces session `id`'s state with a saved one; on error the session keeps its own.
    fn restore(&mut self, id: u64, arenas: &ArenaImage<'_>, io: &[u8]) -> Result<()> {
        if self.resident != Some(id) {
            self.park_resident()?;
        }
        // Over its own state when resident (`clean` says whether the buffers need
        // cleaning first).
        self.bring_in(id, arenas, io)?;
        self.parked.remove(&id);
        Ok(())
    }

    /// Drops what is kept for session `id`.
    fn forget(&mut self, id: u64) {
        self.parked.remove(&id);
        if self.resident == Some(id) {
            self.resident = None;
            // Cleaned now rather than when the next session comes in: the next call (a
            // restore, a new conversation) starts without that cost.
            self.make_clean();
        }
    }
}

thread_local! {
    /// The models (their `Shared`'s address) whose lock this thread holds.
    static HELD: std::cell::RefCell<Vec<usize>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The model locked for one call; see [`Shared::lock`].
struct CoreGuard<'a> {
    guard: MutexGuard<'a, Core>,
    key: usize,
}

impl std::ops::Deref for CoreGuard<'_> {
    type Target = Core;
    fn deref(&self) -> &Core {
        &self.guard
    }
}

impl std::ops::DerefMut for CoreGuard<'_> {
    fn deref_mut(&mut self) -> &mut Core {
        &mut self.guard
    }
}

impl Drop for CoreGuard<'_> {
    fn drop(&mut self) {
        let _ = HELD.try_with(|held| {
            let mut held = held.borrow_mut();
            if let Some(i) = held.iter().rposition(|&k| k == self.key) {
                held.remove(i);
            }
        });
    }
}

/// Unique session ids within the process.
static NEXT_SESSION: AtomicU64 = AtomicU64::new(1);

impl Shared {
    /// Builds the shared part of a loaded model.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        model: Model,
        io: Box<dyn IoManager>,
        tokenizer: Tokenizer,
        tokenizer_template: TokenizerTemplate,
        (bos_id, eos_ids, vocab_size): (Option<u32>, Vec<u32>, usize),
        files: ModelFiles,
        media: Media,
        (load_start_us, load_end_us): (u64, u64),
    ) -> Self {
        let max_context = io.max_context();
        let info = model.info().clone();
        let kind = model.kind();
        Shared {
            core: Mutex::new(Core::new(model, io)),
            tokenizer: Arc::new(tokenizer),
            info,
            bos_id,
            eos_ids,
            vocab_size,
            max_context,
            tokenizer_template,
            kind,
            media,
            grammar: OnceLock::new(),
            load_start_us,
            load_end_us,
            files,
            identity: OnceLock::new(),
            orphans: Mutex::new(Vec::new()),
        }
    }

    /// Locks the model for one call. A call made on this thread while it already holds
    /// the model (from inside a callback of a running call on another session of the same
    /// model) is refused with [`Error::Busy`]: waiting would never end.
    fn lock(&self) -> Result<CoreGuard<'_>> {
        let key = self as *const Shared as usize;
        if HELD.with(|held| held.borrow().contains(&key)) {
            return Err(Error::Busy(
                "a call on a session of this model is already running on this thread (this \
                 call comes from inside one of its callbacks); sessions of one model take \
                 turns"
                    .into(),
            ));
        }
        // A panic in a call (caught at the C boundary) leaves the state as it was then.
        let mut guard = self.core.lock().unwrap_or_else(|e| e.into_inner());
        HELD.with(|held| held.borrow_mut().push(key));
        let orphans = std::mem::take(&mut *self.orphans.lock().unwrap_or_else(|e| e.into_inner()));
        for id in orphans {
            guard.forget(id);
        }
        Ok(CoreGuard { guard, key })
    }

    /// The grammar compiler for this vocabulary, built on first use.
    pub(crate) fn compiler(&self) -> Result<&Compiler> {
        if let Some(c) = self.grammar.get() {
            return Ok(c);
        }
        let tokens = self.tokenizer.token_bytes()?;
        let tokenizer = self.tokenizer.clone();
        let compiler =
            Compiler::with_tokenizer(&tokens, self.vocab_size, &self.eos_ids, move |text| {
                tokenizer.encode(text).ok()
            })?;
        let _ = self.grammar.set(compiler);
        Ok(self.grammar.get().expect("set"))
    }

    /// The model files' stamp: XXH3-128 of each file's device, inode, size, modification
    /// and change times (the change time moves with any write and cannot be set back), and
    /// of the method that runs the steps. Equal stamps mean the same files, unchanged; 0
    /// when a file cannot be read.
    fn stamp(&self) -> u128 {
        use std::os::unix::fs::MetadataExt;
        let mut hasher = xxhash_rust::xxh3::Xxh3::new();
        hasher.update(b"etllm model stamp 1\0");
        for path in &self.files.all_paths() {
            let Ok(m) = std::fs::metadata(path) else {
                return 0;
            };
            for v in [
                m.dev(),
                m.ino(),
                m.size(),
                m.mtime() as u64,
                m.mtime_nsec() as u64,
                m.ctime() as u64,
                m.ctime_nsec() as u64,
            ] {
                hasher.update(&v.to_le_bytes());
            }
        }
        hasher.update(self.files.step_method().as_bytes());
        hasher.digest128().max(1)
    }

    /// The model's identity in saved states: XXH3-128 of the program and its data files,
    /// the method that runs the steps, and every method's signature.
    fn identity(&self) -> Result<u128> {
        if let Some(&id) = self.identity.get() {
            return Ok(id);
        }
        let mut hasher = xxhash_rust::xxh3::Xxh3::new();
        hasher.update(b"etllm model identity 1\0");
        for path in &self.files.all_paths() {
            // Mapped, as ExecuTorch maps the program: hashed from the page cache.
            let file = crate::et::MappedFile::open(path).map_err(|e| Error::FileAccess {
                path: path.clone(),
                message: e.to_string(),
            })?;
            hasher.update(&file);
            hasher.update(b"\0file\0");
        }
        hasher.update(self.files.step_method().as_bytes());
        for (name, method) in &self.info.methods {
            hasher.update(format!("\0{name}:{method:?}").as_bytes());
        }
        let id = hasher.digest128();
        let _ = self.identity.set(id);
        Ok(id)
    }
}

/// A conversation over a loaded model. See the [module documentation](self).
///
/// Made by [`Runner::session`](crate::Runner::session). A session is used from one thread
/// at a time (it is `Send`); sessions of one model may be used from different threads,
/// and their calls then take turns. A session keeps the model loaded: it stays usable
/// after its runner is dropped.
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
/// let (mut a, mut b) = (runner.session()?, runner.session()?);
/// let greedy = GenerationConfig { max_new_tokens: 4, temperature: 0.0, echo: false, ..Default::default() };
/// let ignore = |_: etllm::TokenPiece<'_>| ControlFlow::Continue(());
/// a.generate("Once upon a time", &greedy, ignore, |_| {})?;
/// b.generate("The cat", &greedy, ignore, |_| {})?; // a's cache is set aside
/// let saved = a.save_state()?; // a's conversation as bytes
/// let before = a.position();
/// a.generate(" and", &greedy, ignore, |_| {})?; // a continues where it was
/// a.load_state(&saved)?; // and goes back
/// assert_eq!(a.position(), before);
/// # Ok::<(), etllm::Error>(())
/// ```
pub struct Session {
    shared: Arc<Shared>,
    id: u64,
    stop: Arc<AtomicBool>,
    /// Positions held by the KV cache.
    pos: usize,
    /// The last generated token, not yet fed to the model.
    pending: Option<u32>,
    /// The tokens in the KV cache, in order (`pos` of them).
    tokens: Vec<u32>,
    plugin: Option<Box<dyn SamplerPlugin>>,
    /// A chat template set by the caller; it wins over the tokenizer's.
    chat_template: Option<ChatTemplate>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("id", &self.id)
            .field("position", &self.position())
            .finish()
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        match self.shared.lock() {
            Ok(mut core) => core.forget(self.id),
            // Dropped inside a callback of a call on the same model: forgotten later.
            Err(_) => self
                .shared
                .orphans
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(self.id),
        }
    }
}

impl Session {
    /// A new, empty session over `shared`.
    pub(crate) fn new(
        shared: Arc<Shared>,
        stop: Arc<AtomicBool>,
        chat_template: Option<ChatTemplate>,
        plugin: Option<Box<dyn SamplerPlugin>>,
    ) -> Self {
        Session {
            shared,
            id: NEXT_SESSION.fetch_add(1, Ordering::Relaxed),
            stop,
            pos: 0,
            pending: None,
            tokens: Vec::new(),
            plugin,
            chat_template,
        }
    }

    /// Another empty session over the same model, with this one's chat template.
    pub fn new_session(&self) -> Session {
        Session::new(
            self.shared.clone(),
            Arc::new(AtomicBool::new(false)),
            self.chat_template.clone(),
            None,
        )
    }

    /// What this session's model shares with its other sessions (the server reads the
    /// tokenizer and the grammar compiler through it).
    #[cfg_attr(not(feature = "server"), allow(dead_code))]
    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// The model's metadata.
    pub fn metadata(&self) -> &ModelMetadata {
        &self.shared.info.metadata
    }

    /// The model's methods and metadata.
    pub fn model_info(&self) -> &ModelInfo {
        &self.shared.info
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.shared.tokenizer
    }

    /// The BOS id in use: the model's `get_bos_id`, else the tokenizer's.
    pub fn bos_id(&self) -> Option<u32> {
        self.shared.bos_id
    }

    /// The EOS ids in use: the model's `get_eos_ids`, else the tokenizer's.
    pub fn eos_ids(&self) -> &[u32] {
        &self.shared.eos_ids
    }

    /// The model's vocabulary size.
    pub fn vocab_size(&self) -> usize {
        self.shared.vocab_size
    }

    /// The most positions a conversation can hold (see [`Runner::max_context`](crate::Runner::max_context)).
    pub fn max_context(&self) -> usize {
        self.shared.max_context
    }

    /// Tokens in the conversation so far: prompts and generated tokens since the last
    /// reset.
    pub fn position(&self) -> usize {
        self.pos + self.pending.is_some() as usize
    }

    /// The conversation's tokens: those in the KV cache, then the last generated token
    /// (fed at the start of the next call). [`position`](Self::position) of them.
    pub fn tokens(&self) -> Vec<u32> {
        let mut all = self.tokens.clone();
        all.extend(self.pending);
        all
    }

    /// A handle that stops this session's running `generate` from any thread.
    pub fn stop_handle(&self) -> StopHandle {
        StopHandle(self.stop.clone())
    }

    /// Asks this session's running `generate` to stop.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
    }

    /// Sets (or with `None` removes) this session's sampling plugin.
    pub fn set_sampler_plugin(&mut self, plugin: Option<Box<dyn SamplerPlugin>>) {
        self.plugin = plugin;
    }

    /// Sets (or with `None` goes back to the model's own) this session's chat template.
    pub fn set_chat_template(&mut self, template: Option<ChatTemplate>) {
        self.chat_template = template;
    }

    /// The chat template in use (see [`Runner::chat_template`](crate::Runner::chat_template)).
    pub fn chat_template(&self) -> Result<&ChatTemplate> {
        ChatTemplate::for_tokenizer(
            self.chat_template.as_ref(),
            Some(&self.shared.tokenizer_template),
        )
        .unwrap_or_else(|| Err(Error::NotLoaded("no chat template".into())))
    }

    /// Renders `messages` with the [chat template](Self::chat_template) into prompt text.
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        self.chat_template()?.apply(messages, add_generation_prompt)
    }

    /// The grammar compiler for this model's vocabulary, built on first use.
    pub fn grammar_compiler(&self) -> Result<&Compiler> {
        self.shared.compiler()
    }

    /// Locks the model and brings this session's state in.
    fn acquire(&self) -> Result<CoreGuard<'_>> {
        let mut core = self.shared.lock()?;
        core.make_resident(self.id)?;
        Ok(core)
    }

    /// Rolls the conversation back to its first `pos` tokens (see
    /// [`Runner::rewind`](crate::Runner::rewind)).
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
        let mut core = self.acquire()?;
        if core.ring && pos != 0 {
            return Err(Error::InvalidArgument(format!(
                "cannot rewind to {pos}: the model keeps a ring-buffer KV cache (attention \
                 sink or sliding window), whose older positions may be overwritten; rewind \
                 to 0 (reset) instead"
            )));
        }
        // Positions past `pos` stay in the cache but are overwritten before they are read.
        core.io.rewind(pos)?;
        drop(core);
        self.pos = pos;
        self.pending = None;
        self.tokens.truncate(pos);
        Ok(())
    }

    /// Forgets the conversation: the next `generate` starts at position 0. Fails only if
    /// a custom KV-cache manager's reset fails; the position is 0 either way.
    pub fn reset(&mut self) -> Result<()> {
        // Locked first: a refused call (Busy) changes nothing.
        let mut core = self.shared.lock()?;
        self.pos = 0;
        self.pending = None;
        self.tokens.clear();
        // Its state is dropped (the buffers cleaned when it was resident); it starts from
        // the baseline when it next runs.
        let resident = core.resident == Some(self.id);
        core.forget(self.id);
        if resident {
            core.io.reset()
        } else {
            Ok(())
        }
    }

    /// See [`Runner::generate`](crate::Runner::generate).
    pub fn generate(
        &mut self,
        prompt: &str,
        config: &GenerationConfig,
        on_token: impl FnMut(TokenPiece<'_>) -> ControlFlow<()>,
        on_stats: impl FnMut(&Stats),
    ) -> Result<Stats> {
        self.start(Prompt::Text(prompt), false, config, on_token, on_stats)
    }

    /// See [`Runner::generate_from_ids`](crate::Runner::generate_from_ids).
    pub fn generate_from_ids(
        &mut self,
        prompt_ids: &[u32],
        config: &GenerationConfig,
        on_token: impl FnMut(TokenPiece<'_>) -> ControlFlow<()>,
        on_stats: impl FnMut(&Stats),
    ) -> Result<Stats> {
        self.start(Prompt::Ids(prompt_ids), false, config, on_token, on_stats)
    }

    /// See [`Runner::prefill`](crate::Runner::prefill).
    pub fn prefill(&mut self, prompt: &str, config: &GenerationConfig) -> Result<Stats> {
        let (no_token, no_stats) = (
            |_: TokenPiece<'_>| ControlFlow::Continue(()),
            |_: &Stats| {},
        );
        self.start(Prompt::Text(prompt), true, config, no_token, no_stats)
    }

    /// See [`Runner::prefill_ids`](crate::Runner::prefill_ids).
    pub fn prefill_ids(&mut self, prompt_ids: &[u32], config: &GenerationConfig) -> Result<Stats> {
        let (no_token, no_stats) = (
            |_: TokenPiece<'_>| ControlFlow::Continue(()),
            |_: &Stats| {},
        );
        self.start(Prompt::Ids(prompt_ids), true, config, no_token, no_stats)
    }

    /// Runs a short greedy generation so that first-call costs are paid, then resets.
    pub fn warmup(&mut self) -> Result<()> {
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
        // The model's buffers are as after loading: the first real session starts free.
        self.reset()?;
        result.map(|_| ())
    }

    /// The prompt with the config's BOS and EOS tokens.
    fn framed(&self, ids: &[u32], config: &GenerationConfig) -> Result<Vec<u32>> {
        let n_bos = config.num_bos.max(0) as usize;
        let n_eos = config.num_eos.max(0) as usize;
        if n_bos + n_eos > self.shared.max_context {
            return Err(Error::ContextFull {
                prompt_tokens: n_bos + ids.len() + n_eos,
                available: self.shared.max_context.saturating_sub(self.pos),
                max_context: self.shared.max_context,
                position: self.position(),
            });
        }
        let mut prompt = Vec::with_capacity(n_bos + ids.len() + n_eos);
        if n_bos > 0 {
            let bos = self.shared.bos_id.ok_or_else(|| {
                Error::InvalidArgument(
                    "num_bos > 0 but neither the model nor the tokenizer defines a BOS token"
                        .into(),
                )
            })?;
            prompt.extend(std::iter::repeat_n(bos, n_bos));
        }
        prompt.extend_from_slice(ids);
        if n_eos > 0 {
            let eos = *self.shared.eos_ids.first().ok_or_else(|| {
                Error::InvalidArgument(
                    "num_eos > 0 but neither the model nor the tokenizer defines an EOS token"
                        .into(),
                )
            })?;
            prompt.extend(std::iter::repeat_n(eos, n_eos));
        }
        Ok(prompt)
    }

    /// Prefix reuse: keeps the longest prefix of the conversation that `prompt` (the whole
    /// conversation) starts with, and returns how many of the prompt's tokens are already
    /// in place (in the cache, or the pending token that this call feeds first).
    fn reuse_prefix(&mut self, prompt: &[u32]) -> Result<usize> {
        let held = self.tokens();
        let common = held.iter().zip(prompt).take_while(|(a, b)| a == b).count();
        if common == held.len() && (prompt.len() > held.len() || self.pending.is_some()) {
            // The prompt extends everything held: continue.
            return Ok(held.len());
        }
        // Keep what matches, but feed at least the prompt's last token (its logits pick
        // the first new token).
        let keep = common.min(self.pos).min(prompt.len().saturating_sub(1));
        if keep > 0 {
            match self.rewind(keep) {
                Ok(()) => return Ok(keep),
                // Not now: nothing has changed, and nothing should.
                Err(e @ Error::Busy(_)) => return Err(e),
                // This cache cannot go back there (a ring buffer, a sliding window past
                // its cache): start over.
                Err(_) => {}
            }
        }
        self.reset()?;
        Ok(0)
    }

    /// The config's grammar, compiled before any model step: a bad one changes nothing. A
    /// stop request from before this call is cleared first (it would cancel the compile).
    fn constraint(
        &self,
        prefill_only: bool,
        config: &GenerationConfig,
    ) -> Result<Option<Constraint>> {
        self.stop.store(false, Ordering::Release);
        if prefill_only || config.grammar.is_empty() {
            return Ok(None);
        }
        Ok(Some(self.shared.compiler()?.compile_with_stop(
            config.grammar_type,
            &config.grammar,
            Some(self.stop.clone()),
        )?))
    }

    /// Checks the arguments, turns the prompt into ids and runs.
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
        let shared = self.shared.clone();
        let ids = match prompt {
            Prompt::Text("") => Vec::new(),
            Prompt::Text(text) => shared.tokenizer.encode(text)?,
            Prompt::Ids(ids) => {
                if let Some(bad) = ids.iter().find(|&&id| id as usize >= shared.vocab_size) {
                    return Err(Error::InvalidArgument(format!(
                        "token id {bad} is outside the model's vocabulary of {}",
                        shared.vocab_size
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
        let constraint = self.constraint(prefill_only, config)?;
        let mode = match (prefill_only, prompt) {
            (true, _) => Mode::Prefill,
            (false, Prompt::Text(text)) => Mode::Generate(Some(text)),
            (false, Prompt::Ids(_)) => Mode::Generate(None),
        };
        if !config.reuse_prefix {
            return self.run(
                start,
                mode,
                (Vec::new(), ids),
                None,
                config,
                constraint,
                on_token,
                on_stats,
            );
        }
        let full = self.framed(&ids, config)?;
        let in_place = self.reuse_prefix(&full)?;
        let framing = GenerationConfig {
            num_bos: 0,
            num_eos: 0,
            ..config.clone()
        };
        let rest = full[in_place..].to_vec();
        if rest.is_empty() && prefill_only {
            // The whole prompt is in place already (its last token pending).
            return Ok(Stats {
                model_load_start_us: shared.load_start_us,
                model_load_end_us: shared.load_end_us,
                inference_start_us: start,
                token_encode_end_us: now_us(),
                prompt_eval_end_us: now_us(),
                inference_end_us: now_us(),
                num_prompt_tokens: full.len() as u64,
                reused_prompt_tokens: self.pos as u64,
                ..Default::default()
            });
        }
        let cached = self.pos as u64;
        self.run(
            start,
            mode,
            (Vec::new(), rest),
            Some((full.len() as u64, cached)),
            &framing,
            constraint,
            on_token,
            on_stats,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn run(
        &mut self,
        start: u64,
        mode: Mode<'_>,
        (pre, ids): (Vec<Segment>, Vec<u32>),
        reused: Option<(u64, u64)>,
        config: &GenerationConfig,
        constraint: Option<Constraint>,
        mut on_token: impl FnMut(TokenPiece<'_>) -> ControlFlow<()>,
        mut on_stats: impl FnMut(&Stats),
    ) -> Result<Stats> {
        self.stop.store(false, Ordering::Release);
        let shared = self.shared.clone();
        let mut core = shared.lock()?;
        core.make_resident(self.id)?;
        let core = &mut *core;
        let max_context = shared.max_context;
        // A prompt that cannot fit is refused before it is built: `num_bos` and `num_eos`
        // go up to i32::MAX, and building such a prompt first would take gigabytes.
        // Positions that encoders and earlier inputs fill before `ids` (input lists).
        let pre_len: usize = pre.iter().map(Segment::len).sum();
        let prompt_len =
            pre_len + config.num_bos.max(0) as usize + ids.len() + config.num_eos.max(0) as usize;
        // A ring-buffer model bounds each call, not the conversation.
        let available = if core.ring {
            max_context
        } else {
            max_context.saturating_sub(self.pos)
        };
        let pending = usize::from(self.pending.is_some());
        if prompt_len + pending > available {
            return Err(Error::ContextFull {
                prompt_tokens: prompt_len,
                available: available.saturating_sub(pending),
                max_context,
                position: self.position(),
            });
        }
        let prompt = self.framed(&ids, config)?;
        let mut stats = Stats {
            model_load_start_us: shared.load_start_us,
            model_load_end_us: shared.load_end_us,
            inference_start_us: start,
            token_encode_end_us: now_us(),
            num_prompt_tokens: (pre_len + prompt.len()) as u64,
            ..Default::default()
        };
        if let Some((total, cached)) = reused {
            stats.num_prompt_tokens = total;
            stats.reused_prompt_tokens = cached;
        }

        let orig_pos = self.pos;
        let orig_pending = self.pending;
        // With earlier inputs, the pending token goes first with them.
        let pre: Vec<Segment> = match (orig_pending, pre.is_empty()) {
            (Some(t), false) => std::iter::once(Segment::Tokens(vec![t]))
                .chain(pre)
                .collect(),
            _ => pre,
        };
        let feed: Vec<u64> = orig_pending
            .filter(|_| pre.is_empty())
            .iter()
            .chain(prompt.iter())
            .map(|&t| t as u64)
            .collect();
        // `feed` fits: checked above, before the prompt was built.
        let context_left = (available - orig_pending.is_some() as usize) as i64;
        let (n_new, prompt_text) = match mode {
            // A ring-buffer model: at most max_context new tokens a call (upstream's rule).
            Mode::Generate(text) if core.ring => (
                config.resolve_max_new_tokens(max_context as i64, 0) as usize,
                text,
            ),
            Mode::Generate(text) => (
                config.resolve_max_new_tokens(context_left, (pre_len + prompt.len()) as i64)
                    as usize,
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
            vocab: shared.vocab_size,
            elapsed_ns: 0,
        };
        if let Some(p) = picker.plugin.as_mut() {
            p.reset()?;
        }
        // A prefill keeps the last token back, so that a following `generate` can start
        // from it even without a prompt of its own.
        let (feed, held) = match mode {
            Mode::Prefill if !feed.is_empty() => {
                (&feed[..feed.len() - 1], feed.last().map(|&t| t as u32))
            }
            // Input lists that end with an encoder's output: nothing is held back.
            Mode::Prefill => (&feed[..], None),
            Mode::Generate(_) => (&feed[..], None),
        };
        // Whether the context, not the caller's limits, decides how many tokens this call
        // makes: reaching `n_new` then ends with ContextFull.
        let context_bound = n_new < config.resolve_max_new_tokens(i64::MAX / 4, 0) as usize;
        let orig_tokens = self.tokens.len();
        // With prefix reuse, the prompt's part already in the cache.
        // (copied only when a repetition penalty or a plugin reads the history).
        let prior: Vec<u32> = match reused {
            Some((_, cached)) if config.repetition_penalty != 1.0 || picker.plugin.is_some() => {
                self.tokens[..cached as usize].to_vec()
            }
            _ => Vec::new(),
        };
        // The model is about to write into its buffers.
        core.clean = false;
        let mut pre_out = (orig_pos, Vec::new());
        let mut pre_ns = 0u128;
        if !pre.is_empty() {
            let t0 = std::time::Instant::now();
            match feed_segments(
                &mut core.model,
                &mut core.io,
                &mut self.tokens,
                &pre,
                orig_pos,
                max_context,
            ) {
                Ok(out) => pre_out = out,
                Err(e) => {
                    self.roll_back(core, orig_pos, orig_pending, orig_tokens);
                    return Err(e);
                }
            }
            pre_ns = t0.elapsed().as_nanos();
        }
        let (fed_pos, pre_logits) = pre_out;
        let outcome = generate_loop(
            Parts {
                model: &mut core.model,
                tokenizer: &shared.tokenizer,
                io: &mut core.io,
                eos_ids: &shared.eos_ids,
                max_context,
                ring: &mut core.ring,
                fed: &mut self.tokens,
                initial_logits: (!pre.is_empty()).then_some(pre_logits.as_slice()),
            },
            &self.stop,
            &prior,
            feed,
            fed_pos,
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
                self.roll_back(core, orig_pos, orig_pending, orig_tokens);
                return Err(e);
            }
        }
        stats.aggregate_model_execution_time_us += (pre_ns / 1000) as u64;
        stats.inference_end_us = now_us();
        if config.warming {
            drop(picker);
            self.pos = 0;
            self.pending = None;
            self.tokens.clear();
            core.io.reset()?;
        } else if callbacks {
            on_stats(&stats);
        }
        Ok(stats)
    }

    /// Rolls the conversation back to where it was before a failed call; a manager that
    /// cannot (a sliding window past its cache) starts over instead, and so does a
    /// ring-buffer model, whose older positions may be overwritten.
    fn roll_back(
        &mut self,
        core: &mut Core,
        orig_pos: usize,
        orig_pending: Option<u32>,
        orig_tokens: usize,
    ) {
        if !core.ring && core.io.rewind(orig_pos).is_ok() {
            self.pos = orig_pos;
            self.pending = orig_pending;
            self.tokens.truncate(orig_tokens);
        } else {
            let _ = core.io.reset();
            self.pos = 0;
            self.pending = None;
            self.tokens.clear();
        }
    }

    /// Generates from a list of inputs (text, token ids, images, features), fed in order
    /// after the conversation so far, as upstream's `MultimodalRunner::generate`: see
    /// [`multimodal`]. The config's BOS/EOS framing applies to the
    /// first input when it is text or tokens and the conversation is empty. Every input
    /// is decoded, preprocessed and checked against the context before the model runs;
    /// a bad one changes nothing. `reuse_prefix` does not apply (the inputs continue
    /// the conversation).
    pub fn generate_inputs(
        &mut self,
        inputs: &[Input],
        config: &GenerationConfig,
        on_token: impl FnMut(TokenPiece<'_>) -> ControlFlow<()>,
        on_stats: impl FnMut(&Stats),
    ) -> Result<Stats> {
        self.start_inputs(inputs, false, config, on_token, on_stats)
    }

    /// Feeds a list of inputs without generating (see
    /// [`generate_inputs`](Self::generate_inputs)); a following `generate` continues.
    pub fn prefill_inputs(&mut self, inputs: &[Input], config: &GenerationConfig) -> Result<Stats> {
        let (no_token, no_stats) = (
            |_: TokenPiece<'_>| ControlFlow::Continue(()),
            |_: &Stats| {},
        );
        self.start_inputs(inputs, true, config, no_token, no_stats)
    }

    fn start_inputs(
        &mut self,
        inputs: &[Input],
        prefill_only: bool,
        config: &GenerationConfig,
        mut on_token: impl FnMut(TokenPiece<'_>) -> ControlFlow<()>,
        on_stats: impl FnMut(&Stats),
    ) -> Result<Stats> {
        let start = now_us();
        config.validate()?;
        if config.reuse_prefix {
            return Err(Error::InvalidArgument(
                "reuse_prefix does not apply to input lists: they continue the conversation".into(),
            ));
        }
        let shared = self.shared.clone();
        let encode = |text: &str| shared.tokenizer.encode(text);
        let frame = |ids: Vec<u32>| self.framed(&ids, config);
        let at_start = self.pos == 0 && self.pending.is_none();
        let mut segments = multimodal::prepare(
            inputs,
            &shared.info,
            shared.kind,
            &shared.media,
            &encode,
            &frame,
            at_start,
            shared.vocab_size,
        )?;
        let constraint = self.constraint(prefill_only, config)?;
        // Text inputs are echoed together, before the first generated token.
        let echoed: String = inputs
            .iter()
            .filter_map(|i| match i {
                Input::Text(t) => Some(t.as_str()),
                _ => None,
            })
            .collect();
        let last = match segments.last() {
            Some(Segment::Tokens(_)) => match segments.pop() {
                Some(Segment::Tokens(t)) => t,
                _ => unreachable!("just matched"),
            },
            _ => Vec::new(),
        };
        let framing = GenerationConfig {
            num_bos: 0,
            num_eos: 0,
            echo: false,
            ..config.clone()
        };
        let mut echo_pending = config.echo && !echoed.is_empty() && !config.warming;
        let mode = if prefill_only {
            Mode::Prefill
        } else {
            Mode::Generate(None)
        };
        self.run(
            start,
            mode,
            (segments, last),
            None,
            &framing,
            constraint,
            |piece| {
                if echo_pending {
                    echo_pending = false;
                    if on_token(TokenPiece {
                        token: None,
                        text: &echoed,
                    })
                    .is_break()
                    {
                        return ControlFlow::Break(());
                    }
                }
                on_token(piece)
            },
            on_stats,
        )
    }

    /// The session's state as bytes: the model's KV cache (its all-zero parts left out),
    /// the KV-cache manager's state, the conversation's tokens, and `user_data` (for
    /// example a chat's messages), under a header naming the model. Restore it with
    /// [`load_state`](Self::load_state) into a session of the same model, in this process
    /// or another. Fails when the KV-cache manager cannot save its state.
    pub fn save_state_with(&self, user_data: &[u8]) -> Result<Vec<u8>> {
        let identity = self.shared.identity()?;
        let mut core = self.shared.lock()?;
        let (arenas, io) = if core.resident == Some(self.id) {
            let parked = core.capture()?;
            (parked.arenas, parked.io)
        } else if let Some(parked) = core.parked.get(&self.id) {
            (parked.arenas.clone(), parked.io.clone())
        } else {
            // Never ran (or reset since): an empty cache, and the manager's empty state.
            drop(core);
            let mut core = self.acquire()?;
            let parked = core.capture()?;
            (parked.arenas, parked.io)
        };
        let state = SavedState {
            identity,
            stamp: self.shared.stamp(),
            etllm_version: env!("CARGO_PKG_VERSION").to_string(),
            pos: self.pos,
            pending: self.pending,
            tokens: self.tokens.clone(),
            arenas,
            io: Cow::Owned(io),
            user_data: Cow::Borrowed(user_data),
        };
        Ok(state.to_bytes())
    }

    /// [`save_state_with`](Self::save_state_with) without user data.
    pub fn save_state(&self) -> Result<Vec<u8>> {
        self.save_state_with(&[])
    }

    /// Writes [`save_state_with`](Self::save_state_with)'s bytes to `path` (through a
    /// temporary file beside it, renamed into place, so a reader never sees half a state).
    pub fn save_state_file(&self, path: impl AsRef<Path>, user_data: &[u8]) -> Result<()> {
        let path = path.as_ref();
        let bytes = self.save_state_with(user_data)?;
        let file_error = |e: std::io::Error| Error::FileAccess {
            path: path.to_path_buf(),
            message: e.to_string(),
        };
        let name = path
            .file_name()
            .ok_or_else(|| Error::InvalidArgument(format!("{} is not a file", path.display())))?;
        let mut tmp_name = std::ffi::OsString::from(".");
        tmp_name.push(name);
        tmp_name.push(format!(".{}.tmp", std::process::id()));
        let tmp = path.with_file_name(tmp_name);
        std::fs::write(&tmp, &bytes).map_err(file_error)?;
        std::fs::rename(&tmp, path).map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            file_error(e)
        })
    }

    /// Replaces this session's conversation with a saved state (from
    /// [`save_state_with`](Self::save_state_with) on a session of the same model) and
    /// returns its user data. A state that is not one, is truncated or corrupt, comes
    /// from another model, or that the KV-cache manager refuses is an
    /// [`Error::InvalidState`] (or the manager's error), and the session keeps its state.
    pub fn load_state(&mut self, bytes: &[u8]) -> Result<Vec<u8>> {
        let state = SavedState::from_bytes(bytes)?;
        // Saved from these very files (same stamp): no need to hash them.
        let same_files = state.stamp != 0 && state.stamp == self.shared.stamp();
        if !same_files && state.identity != self.shared.identity()? {
            return Err(Error::InvalidState(
                "it was saved from another model (or another export of it): the model's \
                 files or method signatures differ"
                    .into(),
            ));
        }
        let max = self.shared.max_context;
        let mut core = self.shared.lock()?;
        if (!core.ring && state.pos + state.pending.is_some() as usize > max)
            || state.tokens.len() != state.pos
        {
            return Err(Error::InvalidState(format!(
                "it holds {} positions and {} tokens; this model holds {max}",
                state.pos,
                state.tokens.len()
            )));
        }
        // Positions an encoder filled are recorded as MEDIA_POSITION, on models that
        // have encoders.
        let media_ok = self.shared.kind == ModelKind::Embeddings;
        let media = |t: u32| media_ok && t == multimodal::MEDIA_POSITION;
        if let Some(bad) = state
            .tokens
            .iter()
            .find(|&&t| t as usize >= self.shared.vocab_size && !media(t))
            .or(state
                .pending
                .iter()
                .find(|&&t| t as usize >= self.shared.vocab_size))
        {
            return Err(Error::InvalidState(format!(
                "it holds token {bad}, outside the model's vocabulary of {}",
                self.shared.vocab_size
            )));
        }
        core.restore(self.id, &state.arenas, &state.io)?;
        drop(core);
        self.pos = state.pos;
        self.pending = state.pending;
        self.tokens = state.tokens;
        Ok(state.user_data.into_owned())
    }

    /// [`load_state`](Self::load_state) from a file written by
    /// [`save_state_file`](Self::save_state_file). The file is memory-mapped while it
    /// loads, as ExecuTorch maps the `.pte`: it must not be truncated in place meanwhile
    /// (`save_state_file` never does: it writes a new file and renames it over the old).
    pub fn load_state_file(&mut self, path: impl AsRef<Path>) -> Result<Vec<u8>> {
        let path = path.as_ref();
        // Mapped rather than read: the state's pages come from the page cache without a
        // copy into fresh memory.
        let bytes = crate::et::MappedFile::open(path).map_err(|e| Error::FileAccess {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        self.load_state(&bytes).map_err(|e| match e {
            Error::InvalidState(m) => Error::InvalidState(format!("{}: {m}", path.display())),
            other => other,
        })
    }
}
