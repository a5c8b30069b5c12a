//! SentencePiece `.model` files (BPE and unigram) through the `sentencepiece` crate, which
//! binds the C++ library (the system's `libsentencepiece`, found with pkg-config).

use std::collections::HashMap;

use sentencepiece::SentencePieceProcessor;

use super::{Backend, TokenizerFormat};
use crate::error::{Error, Result};

pub(super) struct Sp {
    processor: SentencePieceProcessor,
    pieces: Vec<String>,
    index: HashMap<String, u32>,
}

/// Reads a protobuf varint at `*pos`.
fn varint(bytes: &[u8], pos: &mut usize) -> Option<u64> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let b = *bytes.get(*pos)?;
        *pos += 1;
        value |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

/// Walks the fields of a protobuf message, calling `f(field, payload)` for each
/// length-delimited one.
fn fields<'a>(
    bytes: &'a [u8],
    mut f: impl FnMut(u64, &'a [u8]) -> std::result::Result<(), String>,
) -> std::result::Result<(), String> {
    let mut pos = 0;
    while pos < bytes.len() {
        let key = varint(bytes, &mut pos).ok_or("truncated protobuf field")?;
        let end = match key & 7 {
            0 => {
                varint(bytes, &mut pos).ok_or("truncated protobuf varint")?;
                pos
            }
            1 => pos + 8,
            5 => pos + 4,
            2 => {
                let len = varint(bytes, &mut pos).ok_or("truncated protobuf length")?;
                let end = pos
                    .checked_add(usize::try_from(len).map_err(|_| "protobuf length overflows")?)
                    .ok_or("protobuf length overflows")?;
                if end > bytes.len() {
                    return Err("truncated: a protobuf field runs past the end".into());
                }
                f(key >> 3, &bytes[pos..end])?;
                end
            }
            t => return Err(format!("protobuf wire type {t} is not valid here")),
        };
        if end > bytes.len() {
            return Err("truncated: a protobuf field runs past the end".into());
        }
        pos = end;
    }
    Ok(())
}

/// The pieces of a serialized `ModelProto` (field 1, each with its piece in field 1).
fn parse_pieces(bytes: &[u8]) -> std::result::Result<Vec<String>, String> {
    let mut pieces = Vec::new();
    fields(bytes, |field, payload| {
        if field == 1 {
            let mut piece = None;
            fields(payload, |f, p| {
                if f == 1 {
                    piece = Some(
                        std::str::from_utf8(p)
                            .map_err(|_| "a piece is not UTF-8".to_string())?
                            .to_string(),
                    );
                }
                Ok(())
            })?;
            pieces.push(piece.ok_or("a vocabulary entry has no piece")?);
        }
        Ok(())
    })?;
    if pieces.is_empty() {
        return Err("no vocabulary pieces".into());
    }
    Ok(pieces)
}

impl Sp {
    pub(super) fn parse(bytes: &[u8]) -> std::result::Result<Self, String> {
        // Check the structure first: the C++ library is given only well-formed messages.
        let pieces = parse_pieces(bytes)?;
        let processor = SentencePieceProcessor::from_serialized_proto(bytes)
            .map_err(|e| format!("the SentencePiece library refused it: {e}"))?;
        if processor.len() != pieces.len() {
            return Err(format!(
                "the library reads {} pieces, the file lists {}",
                processor.len(),
                pieces.len()
            ));
        }
        let mut index = HashMap::with_capacity(pieces.len());
        for (id, piece) in pieces.iter().enumerate() {
            index.entry(piece.clone()).or_insert(id as u32);
        }
        Ok(Self {
            processor,
            pieces,
            index,
        })
    }

    fn check(&self, ids: &[u32]) -> Result<()> {
        match ids.iter().find(|&&id| id as usize >= self.pieces.len()) {
            Some(bad) => Err(Error::Tokenizer(format!(
                "token id {bad} is outside the vocabulary ({} tokens)",
                self.pieces.len()
            ))),
            None => Ok(()),
        }
    }
}

impl Backend for Sp {
    fn format(&self) -> TokenizerFormat {
        TokenizerFormat::SentencePiece
    }

    fn vocab_size(&self) -> usize {
        self.pieces.len()
    }

    fn encode(&self, text: &str) -> Result<Vec<u32>> {
        super::no_panic("encoding", || {
            let pieces = self
                .processor
                .encode(text)
                .map_err(|e| Error::Tokenizer(format!("cannot encode text: {e}")))?;
            Ok(pieces.into_iter().map(|p| p.id).collect())
        })
    }

    fn decode(&self, ids: &[u32]) -> Result<String> {
        self.check(ids)?;
        super::no_panic("decoding", || {
            self.processor
                .decode_piece_ids(ids)
                .map_err(|e| Error::Tokenizer(format!("cannot decode ids: {e}")))
        })
    }

    fn piece(&self, id: u32) -> Option<Vec<u8>> {
        self.pieces.get(id as usize).map(|p| p.clone().into_bytes())
    }

    fn token_id(&self, piece: &str) -> Option<u32> {
        self.index.get(piece).copied()
    }

    fn default_bos(&self) -> Option<u32> {
        self.processor.bos_id()
    }

    fn default_eos(&self) -> Vec<u32> {
        self.processor.eos_id().into_iter().collect()
    }
}
