//! Tokenizers: HF `tokenizer.json` through the `tokenizers` crate, and a streaming decoder
//! that only ever yields complete UTF-8.

use std::path::Path;

use crate::error::{Error, Result};

/// Names that tokenizers commonly give their beginning-of-sequence token.
const BOS_NAMES: &[&str] = &[
    "<s>",
    "<|begin_of_text|>",
    "<bos>",
    "[BOS]",
    "<|startoftext|>",
];
/// Names that tokenizers commonly give their end-of-sequence tokens.
const EOS_NAMES: &[&str] = &[
    "</s>",
    "<|end_of_text|>",
    "<|eot_id|>",
    "<eos>",
    "[EOS]",
    "<|endoftext|>",
    "<|im_end|>",
];

/// A loaded tokenizer.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos_id: Option<u32>,
    eos_ids: Vec<u32>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("bos_id", &self.bos_id)
            .field("eos_ids", &self.eos_ids)
            .finish()
    }
}

impl Tokenizer {
    /// Loads an HF `tokenizer.json`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|e| Error::FileAccess {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        let inner =
            tokenizers::Tokenizer::from_bytes(&bytes).map_err(|e| Error::InvalidTokenizer {
                path: path.to_path_buf(),
                message: format!("not a valid HF tokenizer.json: {e}"),
            })?;
        let special = |names: &[&str]| -> Vec<u32> {
            let added = inner.get_added_tokens_decoder();
            let mut ids: Vec<u32> = names
                .iter()
                .filter_map(|name| {
                    added
                        .iter()
                        .find(|(_, t)| t.special && t.content == *name)
                        .map(|(id, _)| *id)
                })
                .collect();
            ids.dedup();
            ids
        };
        // The first encode compiles the pre-tokenizer's regexes (milliseconds); pay for it
        // here, at load time, rather than in the first generation's latency.
        let _ = inner.encode("warm up", false);
        let bos_id = special(BOS_NAMES).first().copied();
        let eos_ids = special(EOS_NAMES);
        Ok(Self {
            inner,
            bos_id,
            eos_ids,
        })
    }

    /// Number of token ids, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The BOS id the tokenizer defines, found among its special tokens by name.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos_id
    }

    /// The EOS ids the tokenizer defines, found among its special tokens by name.
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    /// Encodes `text` without adding any special token; the tokenizer file's own
    /// post-processor is not applied (the runner adds BOS/EOS as its config says).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| Error::Tokenizer(format!("cannot encode text: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Decodes `ids` to text, skipping special tokens; incomplete UTF-8 becomes U+FFFD.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, true)
            .map_err(|e| Error::Tokenizer(format!("cannot decode ids: {e}")))
    }

    /// A streaming decoder over this tokenizer.
    pub fn stream(&self) -> TextStream<'_> {
        TextStream {
            tokenizer: self,
            ids: Vec::new(),
            prefix: String::new(),
            prefix_index: 0,
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
    tokenizer: &'t Tokenizer,
    ids: Vec<u32>,
    /// The text of `ids[..prefix_index]`, already emitted.
    prefix: String,
    prefix_index: usize,
}

impl TextStream<'_> {
    /// Adds one token; returns the text it completes (possibly empty).
    pub fn push(&mut self, id: u32) -> Result<String> {
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
