//! HF `tokenizer.json` through the `tokenizers` crate, alone or in a folder with
//! `tokenizer_config.json`.

use std::path::Path;

use serde_json::Value;

use super::tokenizer_config::token_text;
use super::{no_panic, read_file, Backend, Tokenizer, TokenizerFormat};
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

pub(super) struct Hf {
    inner: tokenizers::Tokenizer,
    /// `inner.get_vocab_size(true)`, which builds the whole vocabulary map on every call:
    /// asked for every streamed token, so counted once here (and again after tokens are
    /// added).
    vocab_size: usize,
}

impl Hf {
    fn new(inner: tokenizers::Tokenizer) -> Self {
        let vocab_size = inner.get_vocab_size(true);
        Self { inner, vocab_size }
    }

    fn add_token(&mut self, token: tokenizers::AddedToken, special: bool) {
        if special {
            self.inner.add_special_tokens(&[token]);
        } else {
            self.inner.add_tokens(&[token]);
        }
        self.vocab_size = self.inner.get_vocab_size(true);
    }

    /// The ids of the special tokens named in `names`, in that order.
    fn special(&self, names: &[&str]) -> Vec<u32> {
        let added = self.inner.get_added_tokens_decoder();
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
    }
}

impl Backend for Hf {
    fn format(&self) -> TokenizerFormat {
        TokenizerFormat::HuggingFace
    }

    fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// The tokenizer file's own post-processor is not applied (the caller adds BOS/EOS).
    fn encode(&self, text: &str) -> Result<Vec<u32>> {
        no_panic("encoding", || {
            let enc = self
                .inner
                .encode(text, false)
                .map_err(|e| Error::Tokenizer(format!("cannot encode text: {e}")))?;
            Ok(enc.get_ids().to_vec())
        })
    }

    fn decode(&self, ids: &[u32]) -> Result<String> {
        let size = self.vocab_size();
        if let Some(bad) = ids.iter().find(|&&id| id as usize >= size) {
            return Err(Error::Tokenizer(format!(
                "token id {bad} is outside the vocabulary ({size} tokens)"
            )));
        }
        no_panic("decoding", || {
            self.inner
                .decode(ids, true)
                .map_err(|e| Error::Tokenizer(format!("cannot decode ids: {e}")))
        })
    }

    fn piece(&self, id: u32) -> Option<Vec<u8>> {
        self.inner.id_to_token(id).map(String::into_bytes)
    }

    fn token_id(&self, piece: &str) -> Option<u32> {
        self.inner.token_to_id(piece)
    }

    fn default_bos(&self) -> Option<u32> {
        self.special(BOS_NAMES).first().copied()
    }

    fn default_eos(&self) -> Vec<u32> {
        self.special(EOS_NAMES)
    }
}

/// Loads `tokenizer.json` bytes; `config` is the folder's parsed `tokenizer_config.json`.
pub(super) fn load_json(path: &Path, bytes: &[u8], config: Option<&Value>) -> Result<Tokenizer> {
    let invalid = |message: String| Error::InvalidTokenizer {
        path: path.to_path_buf(),
        message,
    };
    // JSON syntax first: a file cut short is then a clean error (the tokenizers crate
    // panics on some of those, see `no_panic`).
    serde_json::from_slice::<serde::de::IgnoredAny>(bytes)
        .map_err(|e| invalid(format!("not a valid HF tokenizer.json: {e}")))?;
    let inner = no_panic("loading", || {
        let inner = tokenizers::Tokenizer::from_bytes(bytes)
            .map_err(|e| invalid(format!("not a valid HF tokenizer.json: {e}")))?;
        // The first encode compiles the pre-tokenizer's regexes (milliseconds); pay for it
        // here, at load time, rather than in the first generation's latency.
        let _ = inner.encode("warm up", false);
        Ok(inner)
    })
    .map_err(|e| match e {
        Error::Tokenizer(m) => invalid(format!("not a valid HF tokenizer.json: {m}")),
        e => e,
    })?;
    let mut hf = Hf::new(inner);
    let Some(config) = config else {
        return Ok(Tokenizer::new(Box::new(hf)));
    };
    add_config_tokens(&mut hf, config).map_err(invalid)?;
    let mut tokenizer = Tokenizer::new(Box::new(hf));
    let config_token = |key: &str| config.get(key).and_then(token_text);
    if let Some(bos) = config_token("bos_token") {
        let id = tokenizer.backend.token_id(bos).ok_or_else(|| {
            invalid(format!(
                "tokenizer_config.json names the BOS token {bos:?}, which is not in the vocabulary"
            ))
        })?;
        tokenizer.bos_id = Some(id);
        tokenizer.bos_token = Some(bos.to_string());
    }
    if let Some(eos) = config_token("eos_token") {
        let id = tokenizer.backend.token_id(eos).ok_or_else(|| {
            invalid(format!(
                "tokenizer_config.json names the EOS token {eos:?}, which is not in the vocabulary"
            ))
        })?;
        tokenizer.eos_ids = vec![id];
        tokenizer.eos_token = Some(eos.to_string());
    }
    Ok(tokenizer)
}

/// Adds the `added_tokens_decoder` entries of `tokenizer_config.json` that
/// `tokenizer.json` lacks; each must take the next free id. An entry whose id holds a
/// different token is an error.
fn add_config_tokens(hf: &mut Hf, config: &Value) -> std::result::Result<(), String> {
    let Some(added) = config
        .get("added_tokens_decoder")
        .and_then(Value::as_object)
    else {
        return Ok(());
    };
    let mut entries: Vec<(u32, String, bool)> = Vec::new();
    for (id, entry) in added {
        let id: u32 = id
            .parse()
            .map_err(|_| format!("tokenizer_config.json: added token id {id:?} is not a number"))?;
        let content = entry
            .get("content")
            .and_then(Value::as_str)
            .ok_or_else(|| format!("tokenizer_config.json: added token {id} has no content"))?;
        let special = entry
            .get("special")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        entries.push((id, content.to_string(), special));
    }
    entries.sort();
    for (id, content, special) in entries {
        match hf.inner.id_to_token(id) {
            Some(existing) if existing == content => continue,
            Some(existing) => {
                return Err(format!(
                    "tokenizer_config.json gives id {id} to {content:?} but tokenizer.json \
                     gives it to {existing:?}"
                ))
            }
            None => {}
        }
        if id as usize != hf.vocab_size() {
            return Err(format!(
                "tokenizer_config.json adds {content:?} as id {id}, but the next free id is {}",
                hf.vocab_size()
            ));
        }
        hf.add_token(tokenizers::AddedToken::from(content, special), special);
    }
    Ok(())
}

/// Loads a folder holding `tokenizer.json` and, optionally, `tokenizer_config.json`.
pub(super) fn load_folder(dir: &Path) -> Result<Tokenizer> {
    let json = dir.join("tokenizer.json");
    if !json.is_file() {
        return Err(Error::InvalidTokenizer {
            path: dir.to_path_buf(),
            message: "a folder without tokenizer.json (a tokenizer folder holds an HF \
                      tokenizer.json, and optionally tokenizer_config.json)"
                .into(),
        });
    }
    let bytes = read_file(&json)?;
    let config_path = dir.join("tokenizer_config.json");
    let config = if config_path.is_file() {
        let text = read_file(&config_path)?;
        Some(
            serde_json::from_slice::<Value>(&text).map_err(|e| Error::InvalidTokenizer {
                path: config_path.clone(),
                message: format!("not valid JSON: {e}"),
            })?,
        )
    } else {
        None
    };
    load_json(&json, &bytes, config.as_ref())
}
