//! Tokenizers of every format upstream's runner loads: HF `tokenizer.json` (a file, or a
//! folder with `tokenizer_config.json`), tiktoken rank files, SentencePiece `.model` files
//! and llama2.c `tokenizer.bin` files. The format is found from the content, not the name.
//! Also a streaming decoder that only ever yields complete UTF-8.

mod hf;
mod llama2c;
mod sentencepiece;
mod tiktoken;
pub(crate) mod tokenizer_config;

use std::path::Path;
use std::sync::Arc;

use crate::error::{Error, Result};

pub use self::tiktoken::TiktokenOptions;

/// The file formats a [`Tokenizer`] loads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum TokenizerFormat {
    /// HF `tokenizer.json` (through the `tokenizers` crate).
    HuggingFace,
    /// A tiktoken base64 rank file, with special tokens and a split pattern.
    Tiktoken,
    /// A SentencePiece `.model` (BPE or unigram).
    SentencePiece,
    /// A llama2.c `tokenizer.bin`, as `pytorch_tokenizers` writes it.
    Llama2c,
}

impl TokenizerFormat {
    /// A short name: "hf", "tiktoken", "sentencepiece" or "llama2c".
    pub fn name(self) -> &'static str {
        match self {
            TokenizerFormat::HuggingFace => "hf",
            TokenizerFormat::Tiktoken => "tiktoken",
            TokenizerFormat::SentencePiece => "sentencepiece",
            TokenizerFormat::Llama2c => "llama2c",
        }
    }
}

/// Model-family conventions applied on top of what a tokenizer file says (upstream's
/// `LlamaRunner` role).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Preset {
    /// Llama 2 and Llama 3. A tokenizer with `<|begin_of_text|>` is taken as Llama 3: BOS
    /// `<|begin_of_text|>`, EOS `<|end_of_text|>` and `<|eot_id|>` (the end of a turn); a
    /// tiktoken rank file gets Llama 3's special tokens and split pattern. Any other is taken
    /// as Llama 2: BOS `<s>`, EOS `</s>`. [`Tokenizer::llama_version`] tells which, for
    /// choosing the chat template.
    Llama,
}

impl std::str::FromStr for Preset {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "llama" => Ok(Preset::Llama),
            _ => Err(Error::InvalidArgument(format!(
                "unknown preset {s:?}; known presets: llama"
            ))),
        }
    }
}

/// Which Llama generation the `llama` preset recognised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum LlamaVersion {
    /// Llama 2: `<s>`/`</s>`, `[INST]` chat format.
    Llama2,
    /// Llama 3: `<|begin_of_text|>`, turns end with `<|eot_id|>`, header-based chat format.
    Llama3,
}

/// Runs a call into a tokenizer library, turning a panic into an error. Some of their code
/// `expect`s on input from the file: the `tokenizers` crate's deserializers (a `decoder`
/// value cut short, a `Precompiled` normalizer whose `precompiled_charsmap` does not parse),
/// the `sentencepiece` crate's decoding of the library's reply (a piece that is not UTF-8
/// after a corrupt normalizer).
fn no_panic<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|panic| {
        let why = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        Err(Error::Tokenizer(format!(
            "{what} failed in the tokenizer library: {why}"
        )))
    })
}

/// The most BOS and EOS tokens together that [`Tokenizer::encode_with`] adds (2^20).
pub const MAX_ADDED_TOKENS: usize = 1 << 20;

/// An empty id vector with room for `body` ids and `bos` + `eos` BOS/EOS ids. The counts
/// come from callers (up to u32::MAX through the C ABI): an allocation that fails is an
/// error, not an abort.
fn reserve_ids(body: usize, bos: usize, eos: usize) -> Result<Vec<u32>> {
    let mut ids = Vec::new();
    body.checked_add(bos)
        .and_then(|n| n.checked_add(eos))
        .and_then(|n| ids.try_reserve_exact(n).ok())
        .ok_or_else(|| {
            Error::InvalidArgument(format!(
                "{bos} BOS and {eos} EOS tokens do not fit in memory"
            ))
        })?;
    Ok(ids)
}

/// What one token contributes to the output text, for grammar engines.
///
/// For `llguidance`/`toktrie`, which take one byte string per token: `Text(b)` is `b`,
/// `Special(name)` is `0xFF` followed by the name's bytes, `None` is the empty string.
/// toktrie reads any string that starts with `0xFF` as a special token. A `Text` starts
/// with that byte only for a token of raw bytes that are not UTF-8 (the single byte 0xFF
/// of a byte-level, byte-fallback or tiktoken vocabulary, say): it can never be part of
/// UTF-8 text, so giving it the empty string instead loses nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenBytes {
    /// Ordinary text: these exact bytes (possibly not UTF-8 on their own, e.g. a
    /// byte-fallback token or part of a multi-byte character).
    Text(Vec<u8>),
    /// A special/control token (BOS, EOS, `<|eot_id|>`, chat markers...), by its name.
    Special(String),
    /// A token that never appears in text (e.g. `<unk>`, an unused id, a hole in the id
    /// space).
    None,
}

/// What each format implements.
trait Backend: Send + Sync {
    fn format(&self) -> TokenizerFormat;
    fn vocab_size(&self) -> usize;
    fn encode(&self, text: &str) -> Result<Vec<u32>>;
    /// Encodes with `bos` copies of `bos_id` before and `eos` copies of `eos_id` after.
    fn encode_with(&self, text: &str, bos: (u32, usize), eos: (u32, usize)) -> Result<Vec<u32>> {
        let body = self.encode(text)?;
        let mut ids = reserve_ids(body.len(), bos.1, eos.1)?;
        ids.extend(std::iter::repeat_n(bos.0, bos.1));
        ids.extend(body);
        ids.extend(std::iter::repeat_n(eos.0, eos.1));
        Ok(ids)
    }
    fn decode(&self, ids: &[u32]) -> Result<String>;
    /// The token's piece as the vocabulary stores it; `None` when out of range.
    fn piece(&self, id: u32) -> Option<Vec<u8>>;
    /// The id of a token given by its exact piece (special tokens included).
    fn token_id(&self, piece: &str) -> Option<u32>;
    fn default_bos(&self) -> Option<u32>;
    fn default_eos(&self) -> Vec<u32>;
    /// Every token's bytes in the middle of a text, `vocab_size()` entries (see
    /// [`Tokenizer::token_bytes`]).
    fn token_bytes(&self) -> Result<Vec<TokenBytes>>;
}

/// A loaded tokenizer of any supported format. Immutable once loaded: it may be shared
/// between threads.
///
/// ```
/// use etllm::Tokenizer;
///
/// let tokenizer = Tokenizer::from_file("tests/fixtures/tokenizer.json")?;
/// let ids = tokenizer.encode_with("Hello, world!", 1, 0)?; // one BOS, no EOS
/// assert_eq!(ids[0], tokenizer.bos_id().unwrap());
/// assert_eq!(tokenizer.decode(&ids[1..])?, "Hello, world!");
///
/// // Streaming: each push returns the text the token completes (complete UTF-8 only).
/// let mut stream = tokenizer.stream();
/// let mut text = String::new();
/// for &id in &ids[1..] {
///     text += &stream.push(id)?;
/// }
/// text += &stream.flush()?;
/// assert_eq!(text, "Hello, world!");
/// # Ok::<(), etllm::Error>(())
/// ```
pub struct Tokenizer {
    backend: Box<dyn Backend>,
    bos_id: Option<u32>,
    eos_ids: Vec<u32>,
    bos_token: Option<String>,
    eos_token: Option<String>,
    llama_version: Option<LlamaVersion>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("format", &self.format())
            .field("vocab_size", &self.vocab_size())
            .field("bos_id", &self.bos_id)
            .field("eos_ids", &self.eos_ids)
            .finish()
    }
}

/// Reads a whole file, as an `Error::FileAccess` on failure.
fn read_file(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| Error::FileAccess {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

impl Tokenizer {
    /// Loads a tokenizer of any supported format, found from the content: an HF
    /// `tokenizer.json` or a folder holding one (with an optional `tokenizer_config.json`),
    /// a tiktoken rank file (with Llama 3's special tokens and pattern), a SentencePiece
    /// `.model` or a llama2.c `tokenizer.bin`. A file that is none of them gives an
    /// [`Error::InvalidTokenizer`] that lists what was tried and why each failed.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        Self::load(path, None)
    }

    /// [`Tokenizer::from_file`], then the conventions of `preset`, if any.
    pub fn load(path: impl AsRef<Path>, preset: Option<Preset>) -> Result<Self> {
        let path = path.as_ref();
        let mut tokenizer = if path.is_dir() {
            hf::load_folder(path)?
        } else {
            let bytes = read_file(path)?;
            detect(path, &bytes)?
        };
        if let Some(preset) = preset {
            tokenizer.apply_preset(preset);
        }
        Ok(tokenizer)
    }

    /// Loads a tiktoken rank file with the given special tokens and split pattern.
    pub fn from_tiktoken(path: impl AsRef<Path>, options: &TiktokenOptions) -> Result<Self> {
        let path = path.as_ref();
        let bytes = read_file(path)?;
        let backend = tiktoken::Tiktoken::parse(&bytes, options).map_err(|message| {
            Error::InvalidTokenizer {
                path: path.to_path_buf(),
                message: format!("not a valid tiktoken rank file: {message}"),
            }
        })?;
        Ok(Self::new(Box::new(backend)))
    }

    fn new(backend: Box<dyn Backend>) -> Self {
        let bos_id = backend.default_bos();
        let eos_ids = backend.default_eos();
        let mut t = Self {
            backend,
            bos_id,
            eos_ids,
            bos_token: None,
            eos_token: None,
            llama_version: None,
        };
        t.bos_token = t.piece_text(t.bos_id);
        t.eos_token = t.piece_text(t.eos_ids.first().copied());
        t
    }

    fn piece_text(&self, id: Option<u32>) -> Option<String> {
        id.and_then(|id| self.backend.piece(id))
            .and_then(|p| String::from_utf8(p).ok())
    }

    fn apply_preset(&mut self, preset: Preset) {
        match preset {
            Preset::Llama => {
                let id = |name: &str| self.backend.token_id(name);
                if let Some(bot) = id("<|begin_of_text|>") {
                    self.llama_version = Some(LlamaVersion::Llama3);
                    self.bos_id = Some(bot);
                    let eos: Vec<u32> = ["<|end_of_text|>", "<|eot_id|>"]
                        .iter()
                        .filter_map(|n| id(n))
                        .collect();
                    if !eos.is_empty() {
                        self.eos_ids = eos;
                    }
                } else {
                    self.llama_version = Some(LlamaVersion::Llama2);
                    if let Some(bos) = id("<s>") {
                        self.bos_id = Some(bos);
                    }
                    if let Some(eos) = id("</s>") {
                        self.eos_ids = vec![eos];
                    }
                }
                self.bos_token = self.piece_text(self.bos_id);
                self.eos_token = self.piece_text(self.eos_ids.first().copied());
            }
        }
    }

    /// The format of the loaded file.
    pub fn format(&self) -> TokenizerFormat {
        self.backend.format()
    }

    /// Number of token ids, added and special tokens included.
    pub fn vocab_size(&self) -> usize {
        self.backend.vocab_size()
    }

    /// The BOS id: from `tokenizer_config.json`, the model file's own, or found among the
    /// special tokens by name; the preset's when one was applied.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos_id
    }

    /// The EOS ids (the first is the tokenizer's own EOS; a preset may add more, such as
    /// Llama 3's `<|eot_id|>`).
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    /// The BOS token's text, e.g. `<s>` (from `tokenizer_config.json` when there is one).
    pub fn bos_token(&self) -> Option<&str> {
        self.bos_token.as_deref()
    }

    /// The first EOS token's text, e.g. `</s>` (from `tokenizer_config.json` when there is
    /// one).
    pub fn eos_token(&self) -> Option<&str> {
        self.eos_token.as_deref()
    }

    /// Which Llama generation the `llama` preset recognised; `None` without the preset.
    pub fn llama_version(&self) -> Option<LlamaVersion> {
        self.llama_version
    }

    /// The id of the token whose piece is exactly `piece` (special tokens included).
    pub fn token_id(&self, piece: &str) -> Option<u32> {
        self.backend.token_id(piece)
    }

    /// Encodes `text` without adding any BOS or EOS token. Special tokens written in the
    /// text are recognised as the reference implementation of the format does: HF added
    /// tokens and tiktoken special tokens are; SentencePiece and llama2.c read them as text.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        self.backend.encode(text)
    }

    /// Encodes `text` with `num_bos` BOS tokens before it and `num_eos` EOS tokens (the
    /// first EOS id) after it. A count above 0 needs the tokenizer to define that token;
    /// more than [`MAX_ADDED_TOKENS`] of them together, or counts whose ids cannot be
    /// allocated, are an [`Error::InvalidArgument`].
    pub fn encode_with(&self, text: &str, num_bos: usize, num_eos: usize) -> Result<Vec<u32>> {
        if num_bos.saturating_add(num_eos) > MAX_ADDED_TOKENS {
            return Err(Error::InvalidArgument(format!(
                "{num_bos} BOS and {num_eos} EOS tokens are more than {MAX_ADDED_TOKENS}"
            )));
        }
        let bos = match (num_bos, self.bos_id) {
            (0, id) => id.unwrap_or(0),
            (_, Some(id)) => id,
            (_, None) => {
                return Err(Error::InvalidArgument(
                    "num_bos > 0 but the tokenizer defines no BOS token".into(),
                ))
            }
        };
        let eos = match (num_eos, self.eos_ids.first()) {
            (0, id) => id.copied().unwrap_or(0),
            (_, Some(id)) => *id,
            (_, None) => {
                return Err(Error::InvalidArgument(
                    "num_eos > 0 but the tokenizer defines no EOS token".into(),
                ))
            }
        };
        self.backend
            .encode_with(text, (bos, num_bos), (eos, num_eos))
    }

    /// Decodes `ids` to text as the format's reference implementation does (HF: special
    /// tokens skipped; SentencePiece: control tokens skipped; tiktoken and llama2.c: every
    /// token's bytes). Bytes that are not UTF-8 become U+FFFD. An id outside the
    /// vocabulary is an [`Error::Tokenizer`].
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.backend.decode(ids)
    }

    /// The token's piece as the vocabulary stores it: e.g. `▁the` (SentencePiece), `Ġthe`
    /// (HF byte-level BPE), or raw bytes, possibly not UTF-8 (tiktoken, llama2.c).
    pub fn token_to_piece(&self, id: u32) -> Result<Vec<u8>> {
        self.backend.piece(id).ok_or_else(|| {
            Error::Tokenizer(format!(
                "token id {id} is outside the vocabulary ({} tokens)",
                self.vocab_size()
            ))
        })
    }

    /// Every token's bytes, indexed by id, [`Tokenizer::vocab_size`] entries: what each
    /// token contributes to the output text, for grammar engines such as `llguidance`.
    ///
    /// A token's bytes are those it adds *in the middle of a text*. Some decoders treat
    /// the first token of a text differently, and [`Tokenizer::decode`] and
    /// [`TextStream`] follow them: SentencePiece-style tokenizers (SentencePiece,
    /// llama2.c, HF `Metaspace` or `Strip` decoders) drop the leading space of the first
    /// token (`▁Hello` decodes to `Hello` at the start of a text, or right after BOS, and
    /// to ` Hello` after other text), and an HF tokenizer without a decoder joins tokens
    /// with spaces. Here such a token keeps its space: `▁Hello` is ` Hello`. Likewise an
    /// HF `BPEDecoder`'s word-end suffix is a space here, which decode drops at the very
    /// end of a text.
    ///
    /// Per format:
    /// - tiktoken: each rank's bytes; the special tokens are [`TokenBytes::Special`]; an
    ///   id between them with no rank is [`TokenBytes::None`].
    /// - SentencePiece: `▁` is a space; `<0xHH>` byte pieces are the byte; control pieces
    ///   are `Special`; the unknown piece and unused pieces are `None`.
    /// - llama2.c: each piece's bytes; `<0xHH>` pieces the byte (`<0x00>`, which decode
    ///   drops, is `None`); the BOS and EOS ids are `Special`; `<unk>` is `None`.
    /// - HF: the model's pieces through the decoder (`ByteLevel`'s byte map, `Metaspace`,
    ///   and `Sequence`s of `Replace`, `ByteFallback`, `Fuse` and `Strip`, `BPEDecoder`,
    ///   or no decoder); special added tokens are `Special`; other added tokens are their
    ///   content (not byte-level mapped, but `▁` is a space where the decoder replaces
    ///   it, as the `tokenizers` crate decodes them); the model's unknown token is
    ///   `None` unless it is a special added token; ids with no token are `None`.
    ///   Decoders whose effect on a token depends on its neighbours (`WordPiece`, `CTC`,
    ///   a regex `Replace`, ...) are an [`Error::Tokenizer`] naming them.
    ///
    /// A token that adds no bytes at all is `None`. Takes tens of milliseconds for a
    /// vocabulary of 150k tokens (in a release build); meant to run once per tokenizer.
    pub fn token_bytes(&self) -> Result<Vec<TokenBytes>> {
        // The backends call into the tokenizer libraries, which may panic on odd files.
        let mut bytes = no_panic("listing token bytes", || self.backend.token_bytes())?;
        let n = self.vocab_size();
        if bytes.len() != n {
            return Err(Error::Tokenizer(format!(
                "internal error: {} token byte strings for {n} tokens",
                bytes.len()
            )));
        }
        for b in &mut bytes {
            if matches!(b, TokenBytes::Text(t) if t.is_empty()) {
                *b = TokenBytes::None;
            }
        }
        Ok(bytes)
    }

    /// A streaming decoder over this tokenizer.
    pub fn stream(&self) -> TextStream<'_> {
        TextStream::with(TokRef::Borrowed(self))
    }

    /// A streaming decoder that keeps the tokenizer alive itself.
    pub fn stream_shared(tokenizer: Arc<Tokenizer>) -> TextStream<'static> {
        TextStream::with(TokRef::Shared(tokenizer))
    }
}

/// Finds the format of `bytes` and loads it; the error lists every format tried.
fn detect(path: &Path, bytes: &[u8]) -> Result<Tokenizer> {
    let invalid = |message: String| Error::InvalidTokenizer {
        path: path.to_path_buf(),
        message,
    };
    let first = bytes.iter().find(|b| !b.is_ascii_whitespace()).copied();
    if first == Some(b'{') {
        // JSON: only HF's format is JSON, so its error is the one that matters.
        return hf::load_json(path, bytes, None);
    }
    let mut tried = Vec::new();
    match tiktoken::Tiktoken::parse(bytes, &TiktokenOptions::llama3()) {
        Ok(t) => return Ok(Tokenizer::new(Box::new(t))),
        Err(e) => tried.push(format!("tiktoken rank file ({e})")),
    }
    match llama2c::Llama2c::parse(bytes) {
        Ok(t) => return Ok(Tokenizer::new(Box::new(t))),
        Err(e) => tried.push(format!("llama2.c tokenizer.bin ({e})")),
    }
    match sentencepiece::Sp::parse(bytes) {
        Ok(t) => return Ok(Tokenizer::new(Box::new(t))),
        Err(e) => tried.push(format!("SentencePiece model ({e})")),
    }
    Err(invalid(format!(
        "not a tokenizer format EtLlm knows; tried: HF tokenizer.json (does not start with \
         '{{'); {}",
        tried.join("; ")
    )))
}

/// The tokenizer a [`TextStream`] decodes with.
enum TokRef<'t> {
    Borrowed(&'t Tokenizer),
    Shared(Arc<Tokenizer>),
}

impl std::ops::Deref for TokRef<'_> {
    type Target = Tokenizer;
    fn deref(&self) -> &Tokenizer {
        match self {
            TokRef::Borrowed(t) => t,
            TokRef::Shared(t) => t,
        }
    }
}

/// Token ids that may still be waiting for bytes of a character split across tokens.
/// A character is at most 4 bytes and every token holds at least one, so more than this
/// many held tokens means the bytes are invalid and are released as U+FFFD.
const MAX_HELD_TOKENS: usize = 4;

/// Turns a stream of token ids into text pieces that are always complete UTF-8: bytes of a
/// character split across tokens are held back until the character is complete.
///
/// It decodes a short window of recent ids and emits what the window adds to the text
/// already emitted, which keeps decoders that treat the first token of a text specially
/// (such as SentencePiece's leading-space rule) correct.
pub struct TextStream<'t> {
    tokenizer: TokRef<'t>,
    ids: Vec<u32>,
    /// The text of `ids[..prefix_index]`, already emitted.
    prefix: String,
    prefix_index: usize,
}

impl<'t> TextStream<'t> {
    fn with(tokenizer: TokRef<'t>) -> Self {
        Self {
            tokenizer,
            ids: Vec::new(),
            prefix: String::new(),
            prefix_index: 0,
        }
    }

    /// Adds one token; returns the text it completes (possibly empty). An id outside the
    /// tokenizer's vocabulary has no text and yields nothing: models often pad their
    /// embedding table past the tokenizer's vocabulary, and a generation that samples such
    /// a row goes on (`Tokenizer::decode`, asked for that id, is an error).
    pub fn push(&mut self, id: u32) -> Result<String> {
        if id as usize >= self.tokenizer.vocab_size() {
            return Ok(String::new());
        }
        self.ids.push(id);
        let text = self.tokenizer.decode(&self.ids)?;
        let held = self.ids.len() - self.prefix_index;
        if text.ends_with('\u{FFFD}') && held <= MAX_HELD_TOKENS {
            return Ok(String::new());
        }
        Ok(self.advance(text))
    }

    /// Releases whatever is held back (incomplete bytes become U+FFFD) and starts over.
    pub fn flush(&mut self) -> Result<String> {
        if self.ids.len() == self.prefix_index {
            self.clear();
            return Ok(String::new());
        }
        let text = self.tokenizer.decode(&self.ids)?;
        let piece = self.advance(text);
        self.clear();
        Ok(piece)
    }

    fn clear(&mut self) {
        self.ids.clear();
        self.prefix.clear();
        self.prefix_index = 0;
    }

    fn advance(&mut self, text: String) -> String {
        let piece = match text.get(self.prefix.len()..) {
            Some(rest) if text.starts_with(&self.prefix) => rest.to_string(),
            // The decoder rewrote earlier text (rare): emit the whole window's text anew.
            _ => text.clone(),
        };
        // Keep only the newest id as context for the next window.
        let keep_from = self.ids.len() - 1;
        self.ids.drain(..keep_from);
        self.prefix = self.tokenizer.decode(&self.ids).unwrap_or_default();
        self.prefix_index = self.ids.len();
        piece
    }
}
