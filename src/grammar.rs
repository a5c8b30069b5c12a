//! Constrained decoding: the generated text is made to match a JSON schema, a regular
//! expression, a Lark grammar or a llama.cpp GBNF grammar.
//!
//! The engine is [llguidance](https://github.com/guidance-ai/llguidance). For each step it
//! computes the set of tokens that keep the output a prefix of some string of the grammar's
//! language; the runner gives every other token a logit of minus infinity before anything
//! else looks at the logits (sampler plugins, the repetition penalty, temperature, top-k,
//! top-p, min-p, and greedy's argmax), and allows the EOS tokens only where the output is a
//! complete match.
//!
//! JSON schemas are compiled by llguidance's JSON-schema compiler (see its
//! `docs/json_schema.md` for the keywords it supports); by default the JSON is written
//! compactly (no whitespace between tokens); a schema's own `"x-guidance"` object (e.g.
//! `{"whitespace_flexible": true}`) overrides that. Regular expressions use the `regex`
//! crate's syntax and must match the whole output. Lark grammars use llguidance's Lark
//! dialect (`docs/syntax.md`). GBNF grammars (llama.cpp's format) are translated into that
//! dialect by [`gbnf::gbnf_to_lark`].

pub mod gbnf;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use llguidance::api::{StopReason, TopLevelGrammar};
use llguidance::toktrie::{SimpleVob, TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};

use crate::error::{Error, Result};
use crate::tokenizer::TokenBytes;

/// The language a [`GenerationConfig::grammar`](crate::GenerationConfig::grammar) is
/// written in: upstream ExecuTorch's `grammar_type` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
#[non_exhaustive]
pub enum GrammarType {
    /// A JSON schema (`"json_schema"`, the default): the output is one JSON value valid
    /// under it.
    #[default]
    JsonSchema,
    /// A regular expression in the `regex` crate's syntax (`"regex"`) that the whole
    /// output matches.
    Regex,
    /// A grammar in llguidance's Lark dialect (`"lark"`; onnxruntime-genai's spelling
    /// `"lark_grammar"` is accepted too), starting at its `start` rule.
    Lark,
    /// A llama.cpp GBNF grammar (`"gbnf"`), starting at its `root` rule.
    Gbnf,
}

impl GrammarType {
    /// The name upstream uses: `json_schema`, `regex`, `lark` or `gbnf`.
    pub fn as_str(self) -> &'static str {
        match self {
            GrammarType::JsonSchema => "json_schema",
            GrammarType::Regex => "regex",
            GrammarType::Lark => "lark",
            GrammarType::Gbnf => "gbnf",
        }
    }
}

impl std::fmt::Display for GrammarType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for GrammarType {
    type Err = Error;

    /// `json_schema`, `regex`, `lark`, `lark_grammar` or `gbnf` (ASCII case ignored).
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "json_schema" => Ok(GrammarType::JsonSchema),
            "regex" => Ok(GrammarType::Regex),
            "lark" | "lark_grammar" => Ok(GrammarType::Lark),
            "gbnf" => Ok(GrammarType::Gbnf),
            _ => Err(Error::InvalidArgument(format!(
                "grammar_type is {s:?}; use json_schema, regex, lark (or lark_grammar) or gbnf"
            ))),
        }
    }
}

/// Compiles grammars against one vocabulary: every token's bytes, built once per loaded
/// runner (it takes a noticeable time for large vocabularies) and shared by every
/// constrained generation. [`Runner::grammar_compiler`](crate::Runner::grammar_compiler)
/// gives the runner's own; the runner uses it for `GenerationConfig::grammar`, and it is
/// public for callers that drive a [`Constraint`] themselves (a sampler plugin, a
/// benchmark).
pub struct Compiler {
    factory: ParserFactory,
    /// The model's vocabulary size: the length of the logits.
    vocab: usize,
}

impl Compiler {
    /// A compiler for a model whose logits have `vocab` entries; `tokens` are the
    /// tokenizer's tokens ([`Tokenizer::token_bytes`](crate::Tokenizer::token_bytes); there
    /// may be fewer than `vocab`: the rows past them are never allowed) and `eos_ids` the
    /// ids that end generation.
    pub fn new(tokens: &[TokenBytes], vocab: usize, eos_ids: &[u32]) -> Result<Self> {
        Self::build(tokens, vocab, eos_ids, None)
    }

    /// Like [`new`](Self::new), with the tokenizer's encoder, which turns text the grammar
    /// forces into the tokens the tokenizer itself would give it (fast-forward; see
    /// [`Constraint::forced_tokens`]). Text it does not spell exactly (a prefix space, a
    /// normalizer) is split into tokens by longest match instead.
    pub fn with_tokenizer(
        tokens: &[TokenBytes],
        vocab: usize,
        eos_ids: &[u32],
        encode: impl Fn(&str) -> Option<Vec<u32>> + Send + Sync + 'static,
    ) -> Result<Self> {
        Self::build(tokens, vocab, eos_ids, Some(Box::new(encode)))
    }

    fn build(
        tokens: &[TokenBytes],
        vocab: usize,
        eos_ids: &[u32],
        encode: Option<Encode>,
    ) -> Result<Self> {
        let mut words: Vec<Vec<u8>> = Vec::with_capacity(vocab + 1);
        words.extend(tokens.iter().take(vocab).map(|t| match t {
            // A word starting with 0xFF would read as a special token's name; the byte
            // never occurs in UTF-8 text, so such a token can never match a grammar.
            TokenBytes::Text(bytes) if bytes.first() == Some(&TokTrie::SPECIAL_TOKEN_MARKER) => {
                Vec::new()
            }
            TokenBytes::Text(bytes) => bytes.clone(),
            TokenBytes::Special(name) => {
                let mut w = Vec::with_capacity(name.len() + 1);
                w.push(TokTrie::SPECIAL_TOKEN_MARKER);
                w.extend_from_slice(name.as_bytes());
                w
            }
            TokenBytes::None => Vec::new(),
        }));
        words.resize(vocab, Vec::new());
        let mut eos: Vec<u32> = eos_ids
            .iter()
            .copied()
            .filter(|&id| (id as usize) < vocab)
            .collect();
        if eos.is_empty() {
            // No EOS token: a virtual one past the logits, never sampled; generation then
            // ends when the grammar allows nothing more, or at the length limit.
            words.push(Vec::new());
            eos.push(vocab as u32);
        }
        let info = TokRxInfo::new(words.len() as u32, eos[0]);
        let built = catch_unwind(AssertUnwindSafe(|| {
            let trie = TokTrie::from(&info, &words).with_eos_tokens(&eos);
            let env: TokEnv = Arc::new(Env { trie, encode });
            ParserFactory::new_simple(&env).map_err(|e| e.to_string())
        }));
        let mut factory = match built {
            Ok(Ok(f)) => f,
            Ok(Err(e)) => {
                return Err(Error::Grammar(format!(
                    "cannot prepare the vocabulary for grammars: {e}"
                )))
            }
            Err(_) => {
                return Err(Error::Grammar(
                    "preparing the vocabulary for grammars panicked".into(),
                ))
            }
        };
        factory.quiet();
        Ok(Self { factory, vocab })
    }

    /// Compiles `text` as a grammar of type `ty` into a fresh constraint, and computes the
    /// tokens allowed first. A grammar that does not compile is an [`Error::Grammar`] with
    /// the compiler's message; so is one for which the engine takes longer than
    /// [`STEP_BUDGET`] to compute the allowed tokens of a step (some ambiguous grammars make
    /// it search forever).
    pub fn compile(&self, ty: GrammarType, text: &str) -> Result<Constraint> {
        self.compile_with_stop(ty, text, None)
    }

    /// [`compile`](Self::compile), with a stop flag: once it is set, a step's computation
    /// in progress is cancelled ([`Constraint::was_stopped`] then says so).
    pub(crate) fn compile_with_stop(
        &self,
        ty: GrammarType,
        text: &str,
        stop: Option<Arc<AtomicBool>>,
    ) -> Result<Constraint> {
        let grammar = top_level(ty, text)?;
        let parser = catch_unwind(AssertUnwindSafe(|| self.factory.create_parser(grammar)))
            .map_err(|_| Error::Grammar(format!("the {ty} grammar compiler panicked")))?
            .map_err(|e| Error::Grammar(format!("the {ty} grammar does not compile: {e}")))?;
        let matcher = Matcher::new(Ok(parser)).into_cancellable();
        if let Some(e) = matcher.get_error() {
            return Err(Error::Grammar(format!(
                "the {ty} grammar does not compile: {e}"
            )));
        }
        let eos = self.factory.tok_env().tok_trie().eos_tokens().to_vec();
        let watchdog = Watchdog::start(&matcher, stop);
        let mut constraint = Constraint {
            matcher,
            mask: None,
            vocab: self.vocab,
            eos,
            watchdog,
        };
        constraint.mask()?;
        Ok(constraint)
    }
}

/// A tokenizer's encoder, as [`Compiler::with_tokenizer`] takes it.
type Encode = Box<dyn Fn(&str) -> Option<Vec<u32>> + Send + Sync>;

/// The vocabulary as llguidance sees it: the token trie, and a tokenization of forced text
/// whose bytes are always exactly that text.
struct Env {
    trie: TokTrie,
    encode: Option<Encode>,
}

impl TokenizerEnv for Env {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    /// The tokenizer's own tokens when they spell exactly `s` (no prefix space, no special
    /// token, no normalization), else the longest-match split of the trie.
    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        if let (Some(encode), Ok(text)) = (&self.encode, std::str::from_utf8(s)) {
            if let Some(ids) = encode(text) {
                if ids.iter().all(|&t| (t as usize) < self.trie.vocab_size())
                    && self.trie.decode_raw(&ids) == s
                {
                    return ids;
                }
            }
        }
        self.trie.greedy_tokenize(s)
    }

    /// Every tokenization this gives spells its text exactly, which is what forcing needs.
    fn tokenize_is_canonical(&self) -> bool {
        true
    }
}

/// llguidance's grammar for `text` as a grammar of type `ty`.
fn top_level(ty: GrammarType, text: &str) -> Result<TopLevelGrammar> {
    Ok(match ty {
        GrammarType::JsonSchema => {
            let mut schema: serde_json::Value = serde_json::from_str(text)
                .map_err(|e| Error::Grammar(format!("the json_schema grammar is not JSON: {e}")))?;
            if let Some(obj) = schema.as_object_mut() {
                obj.entry("x-guidance")
                    .or_insert_with(|| serde_json::json!({ "whitespace_flexible": false }));
            }
            TopLevelGrammar::from_json_schema(schema)
        }
        GrammarType::Regex => TopLevelGrammar::from_regex(text),
        GrammarType::Lark => TopLevelGrammar::from_lark(text.to_string()),
        GrammarType::Gbnf => {
            let lark = gbnf::gbnf_to_lark(text)
                .map_err(|e| Error::Grammar(format!("the gbnf grammar is invalid: {e}")))?;
            TopLevelGrammar::from_lark(lark)
        }
    })
}

/// One generation's grammar state: which tokens may come next. Made by
/// [`Compiler::compile`]; feed it each chosen token with [`commit`](Self::commit).
pub struct Constraint {
    matcher: Matcher,
    /// The mask of the current step, once computed.
    mask: Option<SimpleVob>,
    vocab: usize,
    eos: Vec<u32>,
    watchdog: Watchdog,
}

/// The longest the grammar engine may take over one step (the allowed tokens, the forced
/// tokens, or taking a token) before the step is cancelled and generation fails with
/// [`Error::Grammar`]. Steps take microseconds to a few milliseconds; some ambiguous
/// grammars would make the engine search forever.
pub const STEP_BUDGET: Duration = Duration::from_secs(3);

/// Cancels a constraint's step that runs past [`STEP_BUDGET`], or once the runner's stop
/// flag is set: a thread per constraint, which ends when the constraint is dropped.
struct Watchdog {
    /// Milliseconds since `epoch` when the step in progress began; 0 when idle.
    step_started_ms: Arc<AtomicU64>,
    timed_out: Arc<AtomicBool>,
    stop: Option<Arc<AtomicBool>>,
    epoch: Instant,
    /// Dropped with the constraint, which wakes and ends the thread.
    _alive: Option<mpsc::Sender<()>>,
}

impl Watchdog {
    fn start(matcher: &Matcher, stop: Option<Arc<AtomicBool>>) -> Self {
        let step_started_ms = Arc::new(AtomicU64::new(0));
        let timed_out = Arc::new(AtomicBool::new(false));
        let epoch = Instant::now();
        let (alive, dead) = mpsc::channel::<()>();
        let handle = matcher.cancellation_handle();
        let (started, late, stop_flag) = (step_started_ms.clone(), timed_out.clone(), stop.clone());
        let spawned = std::thread::Builder::new()
            .name("etllm-grammar-watchdog".into())
            .spawn(move || {
                let Some(handle) = handle else { return };
                while let Err(mpsc::RecvTimeoutError::Timeout) =
                    dead.recv_timeout(Duration::from_millis(20))
                {
                    let began = started.load(Ordering::Acquire);
                    if began == 0 {
                        continue;
                    }
                    let now = epoch.elapsed().as_millis() as u64 + 1;
                    if now.saturating_sub(began) > STEP_BUDGET.as_millis() as u64 {
                        late.store(true, Ordering::Release);
                        handle.cancel();
                    } else if stop_flag
                        .as_ref()
                        .is_some_and(|s| s.load(Ordering::Acquire))
                    {
                        handle.cancel();
                    }
                }
            });
        Self {
            step_started_ms,
            timed_out,
            stop,
            epoch,
            // Without a thread (none could be started), steps run unguarded.
            _alive: spawned.ok().map(|_| alive),
        }
    }

    /// Runs one engine step under the watchdog.
    fn guard<T>(&self, f: impl FnOnce() -> T) -> T {
        let now = self.epoch.elapsed().as_millis() as u64 + 1;
        self.step_started_ms.store(now, Ordering::Release);
        let out = f();
        self.step_started_ms.store(0, Ordering::Release);
        out
    }

    /// The error for a step that failed with `message`: a timeout and a stop are named.
    fn error(&self, what: &str, message: String) -> Error {
        if self.timed_out.load(Ordering::Acquire) {
            Error::Grammar(format!(
                "{what}: the grammar engine took longer than {} s for one step (the grammar \
                 is too ambiguous for it; simplify it)",
                STEP_BUDGET.as_secs()
            ))
        } else if self.stopped() {
            Error::Grammar(format!("{what}: stopped"))
        } else {
            Error::Grammar(format!("{what}: {message}"))
        }
    }

    fn stopped(&self) -> bool {
        self.stop
            .as_ref()
            .is_some_and(|s| s.load(Ordering::Acquire))
    }
}

impl Constraint {
    /// Whether a step failed because the runner's stop flag was set while it ran.
    pub(crate) fn was_stopped(&self) -> bool {
        self.matcher.is_cancelled()
            && self.watchdog.stopped()
            && !self.watchdog.timed_out.load(Ordering::Acquire)
    }

    /// The tokens allowed next (computed once per step; only EOS once the grammar is
    /// complete). An empty set is an error: the
    /// vocabulary cannot continue the output (e.g. the grammar needs a character no token
    /// has).
    fn mask(&mut self) -> Result<&SimpleVob> {
        if self.mask.is_none() {
            let (matcher, watchdog) = (&mut self.matcher, &self.watchdog);
            let mask = watchdog
                .guard(|| matcher.compute_mask_or_eos())
                .map_err(|e| {
                    if self.matcher.stop_reason() == StopReason::NoExtensionBias {
                        Error::Grammar(
                            "no token of the vocabulary can continue the output here: the \
                         grammar needs text that no token spells"
                                .into(),
                        )
                    } else {
                        self.watchdog
                            .error("computing the allowed tokens", e.to_string())
                    }
                })?;
            if mask.is_zero() {
                return Err(Error::Grammar(
                    "no token of the vocabulary can continue the output here".into(),
                ));
            }
            self.mask = Some(mask);
        }
        Ok(self.mask.as_ref().expect("computed"))
    }

    /// Copies `logits` into `out` with minus infinity for every token the grammar does not
    /// allow next.
    pub fn apply(&mut self, logits: &[f32], out: &mut Vec<f32>) -> Result<()> {
        let mask = self.mask()?;
        out.clear();
        out.extend_from_slice(logits);
        let words = mask.as_slice();
        for (chunk, &word) in out.chunks_mut(32).zip(words) {
            if word == u32::MAX {
                continue;
            }
            if word == 0 {
                chunk.fill(f32::NEG_INFINITY);
                continue;
            }
            for (bit, l) in chunk.iter_mut().enumerate() {
                if word & (1 << bit) == 0 {
                    *l = f32::NEG_INFINITY;
                }
            }
        }
        // Rows past the mask (none: the mask covers the vocabulary) stay as they are.
        Ok(())
    }

    /// Whether `token` is allowed next.
    pub fn allows(&mut self, token: u32) -> Result<bool> {
        Ok((token as usize) < self.vocab && self.mask()?.is_allowed(token))
    }

    /// The lowest allowed token id (a fallback when the logits give no usable choice).
    pub fn first_allowed(&mut self) -> Result<u32> {
        let vocab = self.vocab;
        let mask = self.mask()?;
        mask.first_bit_set()
            .filter(|&i| i < vocab)
            .map(|i| i as u32)
            .ok_or_else(|| Error::Grammar("only the end of the output is allowed here".into()))
    }

    /// How many tokens are allowed next.
    pub fn num_allowed(&mut self) -> Result<usize> {
        Ok(self.mask()?.num_set())
    }

    /// The bytes the grammar forces next, whatever the model would choose (e.g. `":` after
    /// a JSON key, or a required key's name): text a runner could feed without sampling.
    pub fn forced_bytes(&mut self) -> Vec<u8> {
        self.matcher.compute_ff_bytes()
    }

    /// Fast-forward: the tokens that spell the text the grammar forces next (at most
    /// `max`), already fed to the grammar, so that a runner feeds them to the model in one
    /// step instead of sampling them one by one. Empty when nothing is forced. The text is
    /// cut before its last token when that token could still grow into a longer one.
    pub fn forced_tokens(&mut self, max: usize) -> Result<Vec<u32>> {
        if max == 0 {
            return Ok(Vec::new());
        }
        self.mask = None;
        let (matcher, watchdog) = (&mut self.matcher, &self.watchdog);
        let mut tokens = watchdog.guard(|| matcher.compute_ff_tokens());
        if let Some(e) = self.matcher.get_error() {
            return Err(self.watchdog.error("computing forced tokens", e));
        }
        tokens.truncate(max);
        if let Some(i) = tokens.iter().position(|&t| t as usize >= self.vocab) {
            tokens.truncate(i);
        }
        let (matcher, watchdog) = (&mut self.matcher, &self.watchdog);
        watchdog
            .guard(|| matcher.consume_tokens(&tokens))
            .map_err(|e| {
                self.watchdog
                    .error("the grammar refused its forced tokens", e.to_string())
            })?;
        Ok(tokens)
    }

    /// Whether `token` is one of the EOS tokens the grammar knows.
    pub fn is_eos(&self, token: u32) -> bool {
        self.eos.contains(&token)
    }

    /// Feeds the chosen token (which must be allowed) to the grammar.
    pub fn commit(&mut self, token: u32) -> Result<()> {
        self.mask = None;
        let (matcher, watchdog) = (&mut self.matcher, &self.watchdog);
        watchdog
            .guard(|| matcher.consume_token(token))
            .map_err(|e| {
                self.watchdog
                    .error(&format!("the grammar refused token {token}"), e.to_string())
            })
    }

    /// Whether the grammar allows nothing more than the end of the output.
    pub fn is_complete(&self) -> bool {
        self.matcher.is_stopped()
    }

    /// Whether the output so far is a complete match (EOS would be allowed).
    pub fn is_accepting(&mut self) -> bool {
        self.matcher.is_stopped() || self.matcher.is_accepting().unwrap_or(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grammar_type_names_round_trip() {
        for ty in [
            GrammarType::JsonSchema,
            GrammarType::Regex,
            GrammarType::Lark,
            GrammarType::Gbnf,
        ] {
            assert_eq!(ty.as_str().parse::<GrammarType>().unwrap(), ty);
        }
        assert_eq!(
            "lark_grammar".parse::<GrammarType>().unwrap(),
            GrammarType::Lark
        );
        let err = "yaml".parse::<GrammarType>().unwrap_err().to_string();
        assert!(err.contains("yaml") && err.contains("json_schema"), "{err}");
    }
}
