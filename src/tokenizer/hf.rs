//! HF `tokenizer.json` through the `tokenizers` crate, alone or in a folder with
//! `tokenizer_config.json`.

use std::path::Path;

use serde_json::Value;
use tokenizers::{Model, ModelWrapper};

use super::tokenizer_config::token_text;
use super::{no_panic, read_file, Backend, TokenBytes, Tokenizer, TokenizerFormat};
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

    /// Each token through the decoder, as it decodes in the middle of a text (see
    /// [`Step`]); special added tokens by name; ids with no token, and the model's unknown
    /// token unless it is a special added token, have no text.
    fn token_bytes(&self) -> Result<Vec<TokenBytes>> {
        let steps = match self.inner.get_decoder() {
            None => None,
            Some(decoder) => {
                let json = serde_json::to_value(decoder).map_err(|e| {
                    Error::Tokenizer(format!("cannot read the tokenizer's decoder: {e}"))
                })?;
                let mut steps = Vec::new();
                add_steps(&json, &mut false, &mut steps).map_err(|why| {
                    Error::Tokenizer(format!(
                        "cannot tell the bytes of each token of this tokenizer: {why}"
                    ))
                })?;
                Some(steps)
            }
        };
        let byte_map = byte_level_map();
        let added = self.inner.get_added_tokens_decoder();
        let model = self.inner.get_model();
        let unk = model_unk_id(model);
        Ok((0..self.vocab_size as u32)
            .map(|id| {
                let (piece, is_added) = match added.get(&id) {
                    Some(t) if t.special => return TokenBytes::Special(t.content.clone()),
                    _ if Some(id) == unk => return TokenBytes::None,
                    Some(t) => (t.content.clone(), true),
                    None => match model.id_to_token(id) {
                        Some(piece) => (piece, false),
                        None => return TokenBytes::None,
                    },
                };
                TokenBytes::Text(match &steps {
                    Some(steps) => apply_steps(piece, steps, is_added, &byte_map),
                    // Without a decoder, the tokenizers crate joins tokens with spaces.
                    None => [b" ", piece.as_bytes()].concat(),
                })
            })
            .collect())
    }
}

/// The id of the model's unknown token, if it has one.
fn model_unk_id(model: &ModelWrapper) -> Option<u32> {
    let unk = match model {
        ModelWrapper::BPE(m) => m.unk_token.clone()?,
        ModelWrapper::WordPiece(m) => m.unk_token.clone(),
        ModelWrapper::WordLevel(m) => m.unk_token.clone(),
        // Unigram keeps its `unk_id` private: read it back from its serialization.
        ModelWrapper::Unigram(m) => {
            #[derive(serde::Deserialize)]
            struct Unk {
                unk_id: Option<u32>,
            }
            let json = serde_json::to_vec(m).ok()?;
            return serde_json::from_slice::<Unk>(&json).ok()?.unk_id;
        }
    };
    model.token_to_id(&unk)
}

/// What an HF decoder does to one token in the middle of a text. Decoders act on the
/// list of a text's tokens; these are the ones whose effect on a token does not depend
/// on its neighbours, except at the ends of the text, which [`TokenBytes`] ignores.
#[derive(Debug)]
enum Step {
    /// GPT-2's byte-to-character map, reversed: each character is one byte. A token with
    /// a character outside the map is its UTF-8, as the `tokenizers` crate decodes it.
    /// Not applied to added tokens, which are written as plain text.
    ByteLevel,
    /// A literal `Replace` (e.g. `▁` by a space).
    Replace { pattern: String, content: String },
    /// A `<0xHH>` token is the byte HH.
    ByteFallback,
    /// `Metaspace`: the replacement character is a space (dropped at the start of a text
    /// unless the scheme is `never`).
    Metaspace(char),
    /// `Strip` applied to each token (before any `Fuse`).
    Strip {
        content: char,
        start: usize,
        stop: usize,
    },
    /// `BPEDecoder`: the word-end suffix is a space (dropped at the end of a text).
    Suffix(String),
}

/// Adds the steps of `decoder` (as the `tokenizers` crate serializes it) to `steps`.
/// `fused` tells whether an earlier decoder joined the tokens into one text (`Fuse`,
/// `ByteLevel`): a `Strip` then acts on the text's ends only and is left out, as is a
/// `ByteFallback` (a whole text is not a `<0xHH>` token); decoders whose effect on the
/// joined text differs from their effect on each token are refused.
fn add_steps(
    decoder: &Value,
    fused: &mut bool,
    steps: &mut Vec<Step>,
) -> std::result::Result<(), String> {
    let kind = decoder
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or("untyped");
    let str_field = |key: &str| {
        decoder
            .get(key)
            .and_then(Value::as_str)
            .ok_or_else(|| format!("its {kind} decoder has no string {key:?}"))
    };
    let char_field = |key: &str| {
        let s = str_field(key)?;
        let mut chars = s.chars();
        match (chars.next(), chars.next()) {
            (Some(c), None) => Ok(c),
            _ => Err(format!(
                "its {kind} decoder's {key} {s:?} is not one character"
            )),
        }
    };
    let count_field = |key: &str| {
        decoder
            .get(key)
            .and_then(Value::as_u64)
            .map(|n| n as usize)
            .ok_or_else(|| format!("its {kind} decoder has no count {key:?}"))
    };
    let after_join = || {
        Err(format!(
            "its {kind} decoder comes after the tokens are joined, where its effect on a \
             token depends on the others"
        ))
    };
    match kind {
        "Sequence" => {
            let list = decoder
                .get("decoders")
                .and_then(Value::as_array)
                .ok_or("its Sequence decoder has no list of decoders")?;
            for d in list {
                add_steps(d, fused, steps)?;
            }
        }
        "ByteLevel" => {
            if *fused {
                return after_join();
            }
            steps.push(Step::ByteLevel);
            *fused = true;
        }
        "Fuse" => *fused = true,
        "Replace" => {
            let pattern = decoder.get("pattern");
            let Some(pattern) = pattern
                .and_then(|p| p.get("String"))
                .and_then(Value::as_str)
            else {
                return Err(format!(
                    "its Replace decoder's pattern {} is not a plain string (a regular \
                     expression can match across tokens)",
                    pattern.unwrap_or(&Value::Null)
                ));
            };
            // Once tokens are joined, a longer pattern could match across them; after
            // ByteLevel, it would act on decoded bytes rather than on each token's string.
            let byte_level = steps.iter().any(|s| matches!(s, Step::ByteLevel));
            if pattern.is_empty() || byte_level || (*fused && pattern.chars().count() > 1) {
                return after_join();
            }
            steps.push(Step::Replace {
                pattern: pattern.to_string(),
                content: str_field("content")?.to_string(),
            });
        }
        "ByteFallback" => {
            if !*fused {
                steps.push(Step::ByteFallback);
            }
        }
        "Strip" => {
            if !*fused {
                steps.push(Step::Strip {
                    content: char_field("content")?,
                    start: count_field("start")?,
                    stop: count_field("stop")?,
                });
            }
        }
        "Metaspace" => {
            if *fused {
                return after_join();
            }
            steps.push(Step::Metaspace(char_field("replacement")?));
        }
        "BPEDecoder" => {
            if *fused {
                return after_join();
            }
            steps.push(Step::Suffix(str_field("suffix")?.to_string()));
        }
        // WordPiece (its cleanup joins punctuation to the previous word), CTC (drops
        // repeats of the previous token) and any other.
        other => {
            return Err(format!(
                "its {other} decoder is not supported (token bytes are known for ByteLevel, \
                 Metaspace, BPEDecoder and Sequences of Replace, ByteFallback, Fuse and Strip)"
            ))
        }
    }
    Ok(())
}

/// GPT-2's byte-level map reversed: the byte of each character below U+0144.
fn byte_level_map() -> [Option<u8>; 0x144] {
    let mut map = [None; 0x144];
    let mut next = 0x100;
    for b in 0..=255u8 {
        let c = b as usize;
        if matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF) {
            map[c] = Some(b);
        } else {
            map[next] = Some(b);
            next += 1;
        }
    }
    map
}

/// The byte of a `<0xHH>` token, as the `tokenizers` crate's `ByteFallback` reads it.
fn hf_byte_piece(token: &str) -> Option<u8> {
    if token.len() == 6 && token.starts_with("<0x") && token.ends_with('>') {
        u8::from_str_radix(token.get(3..5)?, 16).ok()
    } else {
        None
    }
}

/// `token` through `steps`. Once a step has made bytes of it (`ByteLevel`,
/// `ByteFallback`), the string steps after it do not apply.
fn apply_steps(
    mut token: String,
    steps: &[Step],
    is_added: bool,
    byte_map: &[Option<u8>; 0x144],
) -> Vec<u8> {
    for step in steps {
        match step {
            Step::ByteLevel => {
                if is_added {
                    continue;
                }
                let bytes: Option<Vec<u8>> = token
                    .chars()
                    .map(|c| byte_map.get(c as usize).copied().flatten())
                    .collect();
                if let Some(bytes) = bytes {
                    return bytes;
                }
            }
            Step::Replace { pattern, content } => {
                if token.contains(pattern.as_str()) {
                    token = token.replace(pattern.as_str(), content);
                }
            }
            Step::ByteFallback => {
                if let Some(b) = hf_byte_piece(&token) {
                    return vec![b];
                }
            }
            Step::Metaspace(c) => {
                if token.contains(*c) {
                    token = token.replace(*c, " ");
                }
            }
            Step::Strip {
                content,
                start,
                stop,
            } => {
                let chars: Vec<char> = token.chars().collect();
                let from = chars
                    .iter()
                    .take(*start)
                    .take_while(|&&c| c == *content)
                    .count();
                let trailing = chars[from..]
                    .iter()
                    .rev()
                    .take(*stop)
                    .take_while(|&&c| c == *content)
                    .count();
                token = chars[from..chars.len() - trailing].iter().collect();
            }
            Step::Suffix(suffix) => {
                if !suffix.is_empty() && token.contains(suffix.as_str()) {
                    token = token.replace(suffix.as_str(), " ");
                }
            }
        }
    }
    token.into_bytes()
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokenizers::{Decoder, DecoderWrapper};

    /// Our steps against the `tokenizers` crate's own decoder, for decoders that keep one
    /// string per token: each token between two anchors, which take the first- and
    /// last-token rules.
    fn check_against_tokenizers(decoder: Value, tokens: &[&str]) {
        let mut steps = Vec::new();
        add_steps(&decoder, &mut false, &mut steps).unwrap();
        let wrapper: DecoderWrapper = serde_json::from_value(decoder.clone()).unwrap();
        let map = byte_level_map();
        for &token in tokens {
            let ours = apply_steps(token.to_string(), &steps, false, &map);
            let theirs = wrapper
                .decode_chain(vec!["ab".into(), token.into(), "cd".into()])
                .unwrap();
            assert_eq!(theirs.len(), 3, "{decoder}");
            assert_eq!(
                String::from_utf8(ours).as_deref(),
                Ok(theirs[1].as_str()),
                "{decoder}: {token:?}"
            );
        }
    }

    const TOKENS: &[&str] = &[
        "▁hello", "▁▁", "▁", "plain", " spaced ", "  ", "<0x41>", "<0x0A>", "<0x+1>", "<0x4>",
        "word</w>", "</w>", "é▁x", "",
    ];

    #[test]
    fn per_token_steps_match_the_tokenizers_crate() {
        let decoders = [
            serde_json::json!({"type": "Replace", "pattern": {"String": "▁"}, "content": " "}),
            serde_json::json!({"type": "Replace", "pattern": {"String": "</w>"}, "content": "!"}),
            serde_json::json!({"type": "ByteFallback"}),
            serde_json::json!({"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": true}),
            serde_json::json!({"type": "Metaspace", "replacement": "▁", "prepend_scheme": "never", "split": false}),
            serde_json::json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}),
            serde_json::json!({"type": "Strip", "content": " ", "start": 2, "stop": 1}),
            serde_json::json!({"type": "BPEDecoder", "suffix": "</w>"}),
            serde_json::json!({"type": "Sequence", "decoders": [
                {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
                {"type": "ByteFallback"},
                {"type": "Strip", "content": " ", "start": 1, "stop": 1},
            ]}),
        ];
        for decoder in decoders {
            // Strip panics in the tokenizers crate on tokens shorter than what it strips.
            let tokens: Vec<&str> = if decoder.to_string().contains("Strip") {
                TOKENS
                    .iter()
                    .copied()
                    .filter(|t| t.chars().count() >= 3)
                    .collect()
            } else {
                TOKENS.to_vec()
            };
            check_against_tokenizers(decoder, &tokens);
        }
    }

    #[test]
    fn steps_after_the_tokens_are_joined() {
        let steps = |decoder: Value| {
            let mut steps = Vec::new();
            add_steps(&decoder, &mut false, &mut steps).map(|()| steps)
        };
        // Llama 2's: the Strip after Fuse only touches the start of the text.
        let llama2 = steps(serde_json::json!({"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0},
        ]}))
        .unwrap();
        assert_eq!(llama2.len(), 2);
        let map = byte_level_map();
        assert_eq!(apply_steps("▁hi".into(), &llama2, false, &map), b" hi");
        assert_eq!(apply_steps("<0xE6>".into(), &llama2, false, &map), [0xE6]);
        // A one-character Replace acts on the joined text as on each token; a longer one
        // could match across tokens, and after ByteLevel it would act on bytes.
        for (decoder, ok) in [
            (
                serde_json::json!([{"type": "Fuse"}, {"type": "Replace", "pattern": {"String": "▁"}, "content": " "}]),
                true,
            ),
            (
                serde_json::json!([{"type": "Fuse"}, {"type": "Replace", "pattern": {"String": "ab"}, "content": " "}]),
                false,
            ),
            (
                serde_json::json!([{"type": "Replace", "pattern": {"String": "ab"}, "content": " "}, {"type": "Fuse"}]),
                true,
            ),
            (
                serde_json::json!([{"type": "ByteLevel"}, {"type": "Replace", "pattern": {"String": "▁"}, "content": " "}]),
                false,
            ),
            (
                serde_json::json!([{"type": "Replace", "pattern": {"String": ""}, "content": " "}]),
                false,
            ),
            (
                serde_json::json!([{"type": "ByteLevel"}, {"type": "Strip", "content": " ", "start": 1, "stop": 0}]),
                true,
            ),
            (
                serde_json::json!([{"type": "Fuse"}, {"type": "BPEDecoder", "suffix": "</w>"}]),
                false,
            ),
            (
                serde_json::json!([{"type": "Fuse"}, {"type": "ByteLevel"}]),
                false,
            ),
        ] {
            let result = steps(serde_json::json!({"type": "Sequence", "decoders": decoder}));
            assert_eq!(result.is_ok(), ok, "{decoder}: {result:?}");
        }
    }

    #[test]
    fn byte_level_keeps_tokens_outside_the_map_as_utf8() {
        // As the tokenizers crate does: a token with a character outside GPT-2's map is
        // its UTF-8 (this happens for added tokens listed in the vocabulary).
        let map = byte_level_map();
        let steps = [Step::ByteLevel];
        assert_eq!(apply_steps("Ġhi".into(), &steps, false, &map), b" hi");
        assert_eq!(apply_steps("é".into(), &steps, false, &map), [0xE9]);
        assert_eq!(apply_steps("a b".into(), &steps, false, &map), b"a b");
        assert_eq!(
            apply_steps("日".into(), &steps, false, &map),
            "日".as_bytes()
        );
        // Added tokens are their content.
        assert_eq!(apply_steps("é".into(), &steps, true, &map), "é".as_bytes());
    }
}
