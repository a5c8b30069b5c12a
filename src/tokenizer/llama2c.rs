//! llama2.c `tokenizer.bin`, as `pytorch_tokenizers`' converter writes it, encoded and
//! decoded exactly as upstream's C++ `Llama2cTokenizer` does.
//!
//! The file: `vocab_size`, `bos_id`, `eos_id` and `max_token_length` (four little-endian
//! `i32`), then per token its score (`f32`), its length (`i32`) and its bytes.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};

use super::{Backend, TokenBytes, TokenizerFormat};
use crate::error::{Error, Result};

/// Upstream refuses more; a larger header value means the file is something else.
const MAX_VOCAB: usize = 1 << 24;

pub(super) struct Llama2c {
    /// Each token's bytes, cut at the first NUL (upstream keeps C strings).
    vocab: Vec<Vec<u8>>,
    scores: Vec<f32>,
    /// Bytes to id; the first of equal pieces wins.
    index: HashMap<Vec<u8>, u32>,
    bos: u32,
    eos: u32,
    /// Upstream builds merge candidates in a buffer of `2 * max_token_length + 3` bytes
    /// (NUL included); longer candidates are cut to fit.
    max_candidate: usize,
}

fn read_i32(bytes: &[u8], at: usize) -> Option<i32> {
    Some(i32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
}

impl Llama2c {
    pub(super) fn parse(bytes: &[u8]) -> std::result::Result<Self, String> {
        if bytes.len() < 16 {
            return Err(format!(
                "{} bytes, shorter than its 16-byte header",
                bytes.len()
            ));
        }
        let header: Vec<i32> = (0..4).filter_map(|i| read_i32(bytes, i * 4)).collect();
        let (vocab_size, bos, eos, max_len) = (header[0], header[1], header[2], header[3]);
        if vocab_size <= 0 || vocab_size as usize > MAX_VOCAB {
            return Err(format!("implausible vocabulary size {vocab_size}"));
        }
        if bos < 0 || bos >= vocab_size || eos < 0 || eos >= vocab_size {
            return Err(format!(
                "BOS {bos} or EOS {eos} is outside the vocabulary of {vocab_size}"
            ));
        }
        if max_len <= 0 || max_len as usize > MAX_VOCAB {
            return Err(format!("implausible max token length {max_len}"));
        }
        let n = vocab_size as usize;
        let mut vocab = Vec::with_capacity(n.min(bytes.len() / 8));
        let mut scores = Vec::with_capacity(n.min(bytes.len() / 8));
        let mut at = 16;
        for i in 0..n {
            if at == bytes.len() {
                if i == 0 {
                    return Err("no tokens after the header".into());
                }
                // Upstream pads a file that ends early (on a token boundary) with <pad>.
                vocab.push(b"<pad>".to_vec());
                scores.push(0.0);
                continue;
            }
            let truncated = || format!("truncated in token {i} of {n}");
            let score = f32::from_le_bytes(
                bytes
                    .get(at..at + 4)
                    .ok_or_else(truncated)?
                    .try_into()
                    .map_err(|_| truncated())?,
            );
            let len = read_i32(bytes, at + 4).ok_or_else(truncated)?;
            if len <= 0 {
                return Err(format!("token {i} has length {len}"));
            }
            let start = at + 8;
            let piece = bytes
                .get(start..start + len as usize)
                .ok_or_else(truncated)?;
            let piece = match piece.iter().position(|&b| b == 0) {
                Some(nul) => &piece[..nul],
                None => piece,
            };
            vocab.push(piece.to_vec());
            scores.push(score);
            at = start + len as usize;
        }
        if at < bytes.len() {
            return Err(format!(
                "{} bytes left after the last of its {n} tokens",
                bytes.len() - at
            ));
        }
        let mut index = HashMap::with_capacity(n);
        for (id, piece) in vocab.iter().enumerate() {
            index.entry(piece.clone()).or_insert(id as u32);
        }
        Ok(Self {
            vocab,
            scores,
            index,
            bos: bos as u32,
            eos: eos as u32,
            max_candidate: 2 * max_len as usize + 2,
        })
    }

    fn lookup(&self, piece: &[u8]) -> Option<u32> {
        self.index.get(piece).copied()
    }

    /// The id and score of the merge of `a` and `b`, if upstream would merge them.
    fn merge(&self, a: u32, b: u32, buf: &mut Vec<u8>) -> Option<(u32, f32)> {
        buf.clear();
        buf.extend_from_slice(&self.vocab[a as usize]);
        buf.extend_from_slice(&self.vocab[b as usize]);
        buf.truncate(self.max_candidate);
        let id = self.lookup(buf)?;
        let score = self.scores[id as usize];
        // Upstream starts its search for the best score at -1e10 and needs a greater one.
        (score > -1e10f32).then_some((id, score))
    }
}

/// A merge candidate: the best score first, then the leftmost position.
struct Candidate {
    score: f32,
    left: usize,
    left_id: u32,
    right: usize,
    right_id: u32,
    merged: u32,
}

impl PartialEq for Candidate {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Candidate {}
impl PartialOrd for Candidate {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Candidate {
    fn cmp(&self, other: &Self) -> Ordering {
        self.score
            .total_cmp(&other.score)
            .then_with(|| other.left.cmp(&self.left))
    }
}

impl Backend for Llama2c {
    fn format(&self) -> TokenizerFormat {
        TokenizerFormat::Llama2c
    }

    fn vocab_size(&self) -> usize {
        self.vocab.len()
    }

    fn encode(&self, text: &str) -> Result<Vec<u32>> {
        self.encode_with(text, (self.bos, 0), (self.eos, 0))
    }

    /// Upstream's algorithm: a dummy-prefix space token, one token per character (or its
    /// bytes as tokens `byte + 3`), then repeatedly the merge of adjacent tokens with the
    /// best score, the leftmost on ties. BOS tokens take part in the merges, as upstream's.
    /// Merging uses a heap rather than upstream's rescans; the result is the same.
    fn encode_with(&self, text: &str, bos: (u32, usize), eos: (u32, usize)) -> Result<Vec<u32>> {
        if text.is_empty() {
            return Err(Error::Tokenizer(
                "cannot encode an empty text with a llama2.c tokenizer (upstream refuses it too)"
                    .into(),
            ));
        }
        // Upstream reads the text as a C string: it ends at the first NUL.
        let text = match text.find('\0') {
            Some(nul) => &text[..nul],
            None => text,
        };
        let mut tokens: Vec<u32> = std::iter::repeat_n(bos.0, bos.1).collect();
        if !text.is_empty() {
            if let Some(space) = self.lookup(b" ") {
                tokens.push(space);
            }
        }
        let mut utf8 = [0u8; 4];
        for c in text.chars() {
            let bytes = c.encode_utf8(&mut utf8).as_bytes();
            match self.lookup(bytes) {
                Some(id) => tokens.push(id),
                None => {
                    for &b in bytes {
                        let id = b as u32 + 3;
                        if id as usize >= self.vocab.len() {
                            return Err(Error::Tokenizer(format!(
                                "the character {c:?} is not in the vocabulary, which has no \
                                 byte tokens for it"
                            )));
                        }
                        tokens.push(id);
                    }
                }
            }
        }

        // A doubly linked list over `tokens`; removed nodes are marked by `alive`.
        let n = tokens.len();
        let mut prev: Vec<usize> = (0..n).map(|i| i.wrapping_sub(1)).collect();
        let mut next: Vec<usize> = (1..=n).collect();
        let mut alive = vec![true; n];
        let mut heap = BinaryHeap::new();
        let mut buf = Vec::new();
        let push = |heap: &mut BinaryHeap<Candidate>,
                    tokens: &[u32],
                    buf: &mut Vec<u8>,
                    left: usize,
                    right: usize| {
            if let Some((merged, score)) = self.merge(tokens[left], tokens[right], buf) {
                heap.push(Candidate {
                    score,
                    left,
                    left_id: tokens[left],
                    right,
                    right_id: tokens[right],
                    merged,
                });
            }
        };
        for i in 1..n {
            push(&mut heap, &tokens, &mut buf, i - 1, i);
        }
        while let Some(c) = heap.pop() {
            let current = alive[c.left]
                && alive[c.right]
                && next[c.left] == c.right
                && tokens[c.left] == c.left_id
                && tokens[c.right] == c.right_id;
            if !current {
                continue;
            }
            tokens[c.left] = c.merged;
            alive[c.right] = false;
            let after = next[c.right];
            next[c.left] = after;
            if after < n {
                prev[after] = c.left;
                push(&mut heap, &tokens, &mut buf, c.left, after);
            }
            let before = prev[c.left];
            if before < n {
                push(&mut heap, &tokens, &mut buf, before, c.left);
            }
        }
        let mut ids: Vec<u32> = (0..n).filter(|&i| alive[i]).map(|i| tokens[i]).collect();
        ids.extend(std::iter::repeat_n(eos.0, eos.1));
        Ok(ids)
    }

    /// Upstream's decode: each token's bytes; after a BOS (and for the first token) one
    /// leading space is dropped; `<0xHH>` pieces are the byte HH.
    fn decode(&self, ids: &[u32]) -> Result<String> {
        let mut out = Vec::new();
        for (i, &id) in ids.iter().enumerate() {
            let Some(piece) = self.vocab.get(id as usize) else {
                return Err(Error::Tokenizer(format!(
                    "token id {id} is outside the vocabulary ({} tokens)",
                    self.vocab.len()
                )));
            };
            let prev = if i > 0 { ids[i - 1] } else { self.bos };
            let mut piece = piece.as_slice();
            if prev == self.bos && piece.first() == Some(&b' ') {
                piece = &piece[1..];
            }
            match byte_piece(piece) {
                // A NUL byte ends upstream's C string: it adds nothing.
                Some(0) => {}
                Some(b) => out.push(b),
                None => out.extend_from_slice(piece),
            }
        }
        Ok(String::from_utf8_lossy(&out).into_owned())
    }

    fn piece(&self, id: u32) -> Option<Vec<u8>> {
        self.vocab.get(id as usize).cloned()
    }

    fn token_id(&self, piece: &str) -> Option<u32> {
        self.lookup(piece.as_bytes())
    }

    fn default_bos(&self) -> Option<u32> {
        Some(self.bos)
    }

    fn default_eos(&self) -> Vec<u32> {
        vec![self.eos]
    }

    /// As `decode` writes each token in the middle of a text (its leading
    /// space kept), except that the BOS and EOS pieces are special tokens (named by their
    /// piece, whitespace trimmed: llama2.c's own files store `\n<s>\n`) and `<unk>` has no
    /// text. The file has no token types: any other control piece the source model had
    /// (such as `<pad>`) is text, as upstream's decode writes it.
    fn token_bytes(&self) -> Result<Vec<TokenBytes>> {
        Ok(self
            .vocab
            .iter()
            .enumerate()
            .map(|(id, piece)| {
                let id = id as u32;
                if id == self.bos || id == self.eos {
                    let name = String::from_utf8_lossy(piece);
                    return TokenBytes::Special(name.trim().to_string());
                }
                if piece.as_slice() == b"<unk>" {
                    return TokenBytes::None;
                }
                match byte_piece(piece) {
                    // A NUL byte ends upstream's C string: decode writes nothing for it.
                    Some(0) => TokenBytes::None,
                    Some(b) => TokenBytes::Text(vec![b]),
                    None => TokenBytes::Text(piece.clone()),
                }
            })
            .collect())
    }
}

/// The byte of a `<0xHH>` piece (upstream: `sscanf(piece, "<0x%02hhX>")`, which needs one
/// or two hex digits after `<0x`).
fn byte_piece(piece: &[u8]) -> Option<u8> {
    let digits = piece.strip_prefix(b"<0x")?;
    let hex: Vec<u8> = digits
        .iter()
        .take(2)
        .take_while(|b| b.is_ascii_hexdigit())
        .copied()
        .collect();
    if hex.is_empty() {
        return None;
    }
    u8::from_str_radix(std::str::from_utf8(&hex).ok()?, 16).ok()
}
