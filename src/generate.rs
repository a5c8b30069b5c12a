//! The generation loop shared by runners and sessions: feeding tokens to the model
//! through the KV-cache manager, picking each next token, streaming the text.

use std::collections::VecDeque;
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crate::config::GenerationConfig;
use crate::error::{Error, Result};
use crate::grammar::Constraint;
use crate::io_manager::IoManager;
use crate::model::Model;
use crate::sampler::{Sampler, SamplerPlugin};
use crate::stats::{now_us, Stats, StopReason};
use crate::stop::{StopScan, StopStrings};
use crate::tokenizer::Tokenizer;

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

/// Stops a running [`Runner::generate`](crate::Runner::generate) (or a session's) from any thread. Cheap to clone.
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
pub struct StopHandle(pub(crate) Arc<AtomicBool>);

impl StopHandle {
    /// Asks the generation in progress to end before its next model step. The request is
    /// cleared when the next `generate` starts, so it only affects a generation already
    /// running.
    pub fn stop(&self) {
        self.0.store(true, Ordering::Release);
    }
}

/// A prompt as text or as token ids.
#[derive(Clone, Copy)]
pub(crate) enum Prompt<'a> {
    Text(&'a str),
    Ids(&'a [u32]),
}

/// What a generation call does with the prompt.
#[derive(Clone, Copy)]
pub(crate) enum Mode<'a> {
    /// Prefill, then generate; the prompt text, if any, is echoed.
    Generate(Option<&'a str>),
    /// Prefill only.
    Prefill,
}

/// What the generation loop works on: the model and manager (locked for the call), the
/// tokenizer and the limits, and the session's record of the tokens in the cache.
pub(crate) struct Parts<'a> {
    pub(crate) model: &'a mut Model,
    pub(crate) tokenizer: &'a Tokenizer,
    pub(crate) io: &'a mut Box<dyn IoManager>,
    pub(crate) eos_ids: &'a [u32],
    pub(crate) max_context: usize,
    /// The manager's ring-buffer flag, cleared when a step past the context fails.
    pub(crate) ring: &'a mut bool,
    /// Every token fed to the model is appended here.
    pub(crate) fed: &'a mut Vec<u32>,
    /// The logits after what was fed before this loop (an encoder's output), used when
    /// there are no tokens to feed.
    pub(crate) initial_logits: Option<&'a [f32]>,
}

/// Prefills `feed` at `pos`, then samples up to `n_new` tokens. `prior` are tokens of
/// this call's prompt already in the cache (prefix reuse): the repetition penalty sees
/// them as it sees `feed`. Returns the new cache
/// position and the last generated token not yet fed.
#[allow(clippy::too_many_arguments)]
pub(crate) fn generate_loop(
    parts: Parts<'_>,
    stop: &AtomicBool,
    prior: &[u32],
    feed: &[u64],
    mut pos: usize,
    (n_new, context_bound): (usize, bool),
    config: &GenerationConfig,
    picker: &mut Picker<'_>,
    stats: &mut Stats,
    mut emit: impl FnMut(TokenPiece<'_>) -> ControlFlow<()>,
) -> Result<(usize, Option<u32>)> {
    let Parts {
        model,
        tokenizer,
        io,
        eos_ids,
        max_context,
        ring,
        fed,
        initial_logits,
    } = parts;
    let stopped = || stop.load(Ordering::Acquire);
    // This call's tokens, for the repetition penalty.
    let mut history: Vec<u32> = Vec::new();
    let keep_history = config.repetition_penalty != 1.0 || picker.plugin.is_some();
    if keep_history {
        history.extend_from_slice(prior);
        history.extend(feed.iter().map(|&t| t as u32));
    }
    // Summed in nanoseconds: a single step can take less than a microsecond.
    let mut model_ns = 0u128;
    // The part of `model_ns` spent in decode steps (after prefill).
    let mut decode_model_ns = 0u128;
    let mut token = None;
    if !feed.is_empty() {
        let t0 = Instant::now();
        let logits = feed_tokens(model, io, feed, pos, *ring, max_context, false)?;
        model_ns += t0.elapsed().as_nanos();
        let Some(logits) = logits else {
            *ring = false;
            return Err(past_ring_context(feed.len(), pos, max_context));
        };
        pos += feed.len();
        fed.extend(feed.iter().map(|&t| t as u32));
        if n_new > 0 {
            token = match picker.pick(logits, &history) {
                Ok(t) => Some(t),
                Err(_) if picker.grammar_stopped() => None,
                Err(e) => return Err(e),
            };
        }
    }
    if let (true, Some(logits), true) = (feed.is_empty(), initial_logits, n_new > 0) {
        token = match picker.pick(logits, &history) {
            Ok(t) => Some(t),
            Err(_) if picker.grammar_stopped() => None,
            Err(e) => return Err(e),
        };
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
        } else if pos >= max_context {
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
                pos + unfed.len() + 1 >= max_context
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
        let Some(logits) = feed_tokens(model, io, &unfed, pos, *ring, max_context, true)? else {
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
        fed.extend(unfed.iter().map(|&t| t as u32));
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
        if feed_tokens(model, io, &unfed, pos, *ring, max_context, true)?.is_none() {
            *ring = false;
            return Err(past_ring_context(unfed.len(), pos, max_context));
        }
        let step_ns = t0.elapsed().as_nanos();
        model_ns += step_ns;
        decode_model_ns += step_ns;
        pos += unfed.len();
        fed.extend(unfed.iter().map(|&t| t as u32));
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
pub(crate) fn feed_tokens<'a>(
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
pub(crate) fn past_ring_context(tokens: usize, pos: usize, max_context: usize) -> Error {
    Error::ContextFull {
        prompt_tokens: tokens,
        available: max_context.saturating_sub(pos),
        max_context,
        position: pos,
    }
}

/// Picks each generated token: the grammar's mask first, if any, then the caller's plugin,
/// if any, then the sampler.
pub(crate) struct Picker<'p> {
    pub(crate) sampler: Sampler,
    pub(crate) plugin: Option<&'p mut (dyn SamplerPlugin + 'static)>,
    /// Constrained decoding: the tokens the grammar allows.
    pub(crate) constraint: Option<Constraint>,
    /// The logits copy the grammar masks and a plugin may edit.
    pub(crate) scratch: Vec<f32>,
    pub(crate) vocab: usize,
    /// Time spent picking, summed.
    pub(crate) elapsed_ns: u128,
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
pub(crate) fn clock_seed() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos() as u64;
    nanos ^ (std::process::id() as u64).rotate_left(32)
}
