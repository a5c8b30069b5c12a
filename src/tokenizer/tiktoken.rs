//! tiktoken: a base64 rank file plus special tokens and a split pattern, encoded by
//! `tiktoken-rs`'s `CoreBPE` (a port of the `tiktoken` package's Rust core).

use std::collections::{HashMap, HashSet};

use base64::Engine;
use rustc_hash::FxHashMap;
use tiktoken_rs::CoreBPE;

use super::{Backend, TokenBytes, TokenizerFormat};
use crate::error::{Error, Result};

/// Llama 3's split pattern (upstream's default for tiktoken files).
pub const LLAMA3_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The special tokens, split pattern and BOS/EOS of a tiktoken rank file. Special token
/// `i` gets id `ranks + i`, where `ranks` is the number of entries of the rank file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TiktokenOptions {
    /// The regular expression that splits text before byte-pair merging.
    pub pattern: String,
    /// The special tokens, in id order.
    pub special_tokens: Vec<String>,
    /// The BOS token, one of `special_tokens`.
    pub bos_token: Option<String>,
    /// The EOS tokens, each one of `special_tokens`.
    pub eos_tokens: Vec<String>,
}

impl TiktokenOptions {
    /// Llama 3's: its split pattern and 256 special tokens (`<|begin_of_text|>`,
    /// `<|end_of_text|>`, ..., `<|eot_id|>`, ..., then reserved ones), BOS
    /// `<|begin_of_text|>`, EOS `<|end_of_text|>`. The list is `pytorch_tokenizers`'
    /// Python `LLAMA_SPECIAL_TOKENS` (with `<|image|>` at 128011); the C++ `Tiktoken`
    /// default that upstream's runner uses leaves `<|image|>` out, so from 128011 on its
    /// reserved tokens are numbered one lower. Ids, vocabulary size, BOS and EOS agree.
    pub fn llama3() -> Self {
        let mut special: Vec<String> = [
            "<|begin_of_text|>",
            "<|end_of_text|>",
            "<|reserved_special_token_0|>",
            "<|reserved_special_token_1|>",
            "<|finetune_right_pad_id|>",
            "<|step_id|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|eom_id|>",
            "<|eot_id|>",
            "<|python_tag|>",
            "<|image|>",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let basic = special.len();
        special.extend((0..256 - basic).map(|i| format!("<|reserved_special_token_{}|>", 2 + i)));
        Self {
            pattern: LLAMA3_PATTERN.to_string(),
            special_tokens: special,
            bos_token: Some("<|begin_of_text|>".into()),
            eos_tokens: vec!["<|end_of_text|>".into()],
        }
    }
}

impl Default for TiktokenOptions {
    fn default() -> Self {
        Self::llama3()
    }
}

pub(super) struct Tiktoken {
    bpe: CoreBPE,
    special: HashMap<String, u32>,
    vocab_size: usize,
    bos: Option<u32>,
    eos: Vec<u32>,
}

impl Tiktoken {
    /// Parses a rank file: one `base64 rank` pair per line.
    pub(super) fn parse(
        bytes: &[u8],
        options: &TiktokenOptions,
    ) -> std::result::Result<Self, String> {
        let text = std::str::from_utf8(bytes).map_err(|_| "not UTF-8 text".to_string())?;
        let b64 = base64::engine::general_purpose::STANDARD;
        // The map CoreBPE keeps (its own hasher), built once; a 128k-entry file is read in a
        // few tens of milliseconds.
        let mut ranks: FxHashMap<Vec<u8>, u32> = FxHashMap::default();
        ranks.reserve(text.len() / 16);
        // (rank, line) of every entry, to check that no rank is given twice: sorted already
        // when the ranks ascend, as in every published file.
        let mut by_rank: Vec<(u32, usize)> = Vec::with_capacity(text.len() / 16);
        let mut ascending = true;
        for (n, line) in text.lines().enumerate() {
            if line.is_empty() {
                continue;
            }
            let bad = || format!("line {} is not `<base64> <rank>`", n + 1);
            let mut parts = line.split_ascii_whitespace();
            let (Some(token), Some(rank), None) = (parts.next(), parts.next(), parts.next()) else {
                return Err(bad());
            };
            let token = b64.decode(token).map_err(|_| bad())?;
            let rank: u32 = rank.parse().map_err(|_| bad())?;
            if ranks.insert(token, rank).is_some() {
                return Err(format!("line {}: its token appears twice", n + 1));
            }
            ascending &= by_rank.last().is_none_or(|&(last, _)| rank > last);
            by_rank.push((rank, n + 1));
        }
        if ranks.is_empty() {
            return Err("no ranks".into());
        }
        if !ascending {
            by_rank.sort_unstable();
            if let Some(w) = by_rank.windows(2).find(|w| w[0].0 == w[1].0) {
                return Err(format!("line {}: rank {} appears twice", w[1].1, w[1].0));
            }
        }
        let has_rank = |id: u32| by_rank.binary_search_by_key(&id, |&(r, _)| r).is_ok();
        if let Some(b) = (0..=255u8).find(|b| !ranks.contains_key(&vec![*b])) {
            return Err(format!(
                "no rank for the single byte 0x{b:02x} (every byte needs one)"
            ));
        }
        let n_base = ranks.len();
        let mut special = HashMap::new();
        for (i, token) in options.special_tokens.iter().enumerate() {
            let id = (n_base + i) as u32;
            if has_rank(id) {
                return Err(format!(
                    "special token {token:?} would get id {id}, which a rank already has"
                ));
            }
            if token.is_empty() || special.insert(token.clone(), id).is_some() {
                return Err(format!("special token {token:?} is empty or given twice"));
            }
        }
        let find = |name: &String| {
            special
                .get(name)
                .copied()
                .ok_or_else(|| format!("{name:?} is not one of the special tokens"))
        };
        let bos = options.bos_token.as_ref().map(find).transpose()?;
        let eos = options
            .eos_tokens
            .iter()
            .map(find)
            .collect::<std::result::Result<_, _>>()?;
        let max_rank = by_rank.last().map_or(0, |&(r, _)| r) as usize;
        let vocab_size = (n_base + options.special_tokens.len()).max(max_rank + 1);
        let bpe = CoreBPE::new(
            ranks,
            special.iter().map(|(k, &v)| (k.clone(), v)).collect(),
            &options.pattern,
        )
        .map_err(|e| format!("invalid split pattern: {e}"))?;
        Ok(Self {
            bpe,
            special,
            vocab_size,
            bos,
            eos,
        })
    }
}

impl Backend for Tiktoken {
    fn format(&self) -> TokenizerFormat {
        TokenizerFormat::Tiktoken
    }

    fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// Special tokens written in the text are encoded as special tokens, as upstream's
    /// C++ `Tiktoken::encode` does (the `tiktoken` package's `allowed_special="all"`).
    fn encode(&self, text: &str) -> Result<Vec<u32>> {
        if self.special.is_empty() {
            // CoreBPE's special-token search needs at least one special token.
            return std::panic::catch_unwind(|| self.bpe.encode_ordinary(text))
                .map_err(|_| Error::Tokenizer("the split pattern failed on this text".into()));
        }
        let allowed: HashSet<&str> = self.special.keys().map(String::as_str).collect();
        self.bpe
            .encode(text, &allowed)
            .map(|(ids, _)| ids)
            .map_err(|e| Error::Tokenizer(format!("cannot encode text: {e}")))
    }

    fn decode(&self, ids: &[u32]) -> Result<String> {
        let bytes = self.bpe.decode_bytes(ids).map_err(|e| {
            Error::Tokenizer(format!(
                "token id {} is outside the vocabulary ({} tokens)",
                e.token, self.vocab_size
            ))
        })?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    fn piece(&self, id: u32) -> Option<Vec<u8>> {
        self.bpe.decode_bytes(&[id]).ok()
    }

    fn token_id(&self, piece: &str) -> Option<u32> {
        self.special.get(piece).copied().or_else(|| {
            let ids = self.bpe.encode_ordinary(piece);
            (ids.len() == 1 && self.piece(ids[0]).as_deref() == Some(piece.as_bytes()))
                .then(|| ids[0])
        })
    }

    fn default_bos(&self) -> Option<u32> {
        self.bos
    }

    fn default_eos(&self) -> Vec<u32> {
        self.eos.clone()
    }

    /// The ranks' bytes, the special tokens by name; an id with neither is `None`.
    fn token_bytes(&self) -> Result<Vec<TokenBytes>> {
        let mut out: Vec<TokenBytes> = (0..self.vocab_size as u32)
            .map(|id| match self.bpe.decode_bytes(&[id]) {
                Ok(bytes) => TokenBytes::Text(bytes),
                Err(_) => TokenBytes::None,
            })
            .collect();
        for (name, &id) in &self.special {
            if let Some(slot) = out.get_mut(id as usize) {
                *slot = TokenBytes::Special(name.clone());
            }
        }
        Ok(out)
    }
}
