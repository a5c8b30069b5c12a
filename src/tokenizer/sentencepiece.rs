//! SentencePiece `.model` files (BPE and unigram) through the `sentencepiece` crate, which
//! binds the C++ library (the system's `libsentencepiece`, found with pkg-config).

use std::collections::HashMap;

use sentencepiece::SentencePieceProcessor;

use super::{Backend, TokenBytes, TokenizerFormat};
use crate::error::{Error, Result};

pub(super) struct Sp {
    processor: SentencePieceProcessor,
    pieces: Vec<String>,
    types: Vec<PieceType>,
    denormalizes: bool,
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

/// A protobuf field's payload: a varint, or the bytes of a length-delimited field (fixed
/// 32- and 64-bit fields are skipped).
enum Payload<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
}

/// Walks the fields of a protobuf message, calling `f(field, payload)` for each varint and
/// length-delimited one.
fn fields<'a>(
    bytes: &'a [u8],
    mut f: impl FnMut(u64, Payload<'a>) -> std::result::Result<(), String>,
) -> std::result::Result<(), String> {
    let mut pos = 0;
    while pos < bytes.len() {
        let key = varint(bytes, &mut pos).ok_or("truncated protobuf field")?;
        let end = match key & 7 {
            0 => {
                let value = varint(bytes, &mut pos).ok_or("truncated protobuf varint")?;
                f(key >> 3, Payload::Varint(value))?;
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
                f(key >> 3, Payload::Bytes(&bytes[pos..end]))?;
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

/// A piece's type (`ModelProto.SentencePiece.Type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PieceType {
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    Byte,
}

impl PieceType {
    /// An unknown value is NORMAL, the default, as protobuf (proto2) reads it.
    fn from_proto(value: u64) -> Self {
        match value {
            2 => PieceType::Unknown,
            3 => PieceType::Control,
            4 => PieceType::UserDefined,
            5 => PieceType::Unused,
            6 => PieceType::Byte,
            _ => PieceType::Normal,
        }
    }
}

/// What `token_bytes` needs of a serialized `ModelProto`, besides the pieces.
struct ModelInfo {
    /// Each piece (field 1 of each `pieces` entry, field 1) and its type (field 3, NORMAL
    /// when absent).
    pieces: Vec<(String, PieceType)>,
    /// Whether `denormalizer_spec` (field 5) has rules (a `precompiled_charsmap`, field 2):
    /// the library then rewrites decoded text as a whole.
    denormalizes: bool,
}

fn parse_model(bytes: &[u8]) -> std::result::Result<ModelInfo, String> {
    let mut pieces = Vec::new();
    let mut denormalizes = false;
    fields(bytes, |field, payload| {
        match (field, payload) {
            (1, Payload::Bytes(entry)) => {
                let mut piece = None;
                let mut kind = PieceType::Normal;
                fields(entry, |f, p| {
                    match (f, p) {
                        (1, Payload::Bytes(p)) => {
                            piece = Some(
                                std::str::from_utf8(p)
                                    .map_err(|_| "a piece is not UTF-8".to_string())?
                                    .to_string(),
                            )
                        }
                        (3, Payload::Varint(t)) => kind = PieceType::from_proto(t),
                        _ => {}
                    }
                    Ok(())
                })?;
                pieces.push((piece.ok_or("a vocabulary entry has no piece")?, kind));
            }
            (5, Payload::Bytes(spec)) => fields(spec, |f, p| {
                if let (2, Payload::Bytes(charsmap)) = (f, p) {
                    denormalizes |= !charsmap.is_empty();
                }
                Ok(())
            })?,
            _ => {}
        }
        Ok(())
    })?;
    if pieces.is_empty() {
        return Err("no vocabulary pieces".into());
    }
    Ok(ModelInfo {
        pieces,
        denormalizes,
    })
}

/// The byte of a SentencePiece byte piece, `<0xHH>`.
fn byte_piece(piece: &str) -> Option<u8> {
    let hex = piece.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

impl Sp {
    pub(super) fn parse(bytes: &[u8]) -> std::result::Result<Self, String> {
        // Check the structure first: the C++ library is given only well-formed messages.
        let ModelInfo {
            pieces,
            denormalizes,
        } = parse_model(bytes)?;
        let (pieces, types): (Vec<String>, Vec<PieceType>) = pieces.into_iter().unzip();
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
            types,
            denormalizes,
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

    /// As the library decodes each piece in the middle of a text: `▁` is a space (also
    /// when the model does not escape whitespace: the library replaces it regardless), a
    /// byte piece is its byte, a control piece is special, and the unknown piece (decoded
    /// as ` ⁇ `) and unused pieces (which encoding never yields) have no text. The
    /// library drops the leading space of a text's first piece (the dummy prefix); this
    /// keeps it.
    fn token_bytes(&self) -> Result<Vec<TokenBytes>> {
        if self.denormalizes {
            return Err(Error::Tokenizer(
                "this SentencePiece model has denormalization rules, which rewrite the \
                 decoded text as a whole: a token's bytes cannot be known on their own"
                    .into(),
            ));
        }
        self.pieces
            .iter()
            .zip(&self.types)
            .map(|(piece, kind)| {
                Ok(match kind {
                    PieceType::Normal | PieceType::UserDefined => {
                        TokenBytes::Text(piece.replace('\u{2581}', " ").into_bytes())
                    }
                    PieceType::Byte => {
                        TokenBytes::Text(vec![byte_piece(piece).ok_or_else(|| {
                            Error::Tokenizer(format!(
                                "the byte piece {piece:?} is not of the form <0xHH>"
                            ))
                        })?])
                    }
                    PieceType::Control => TokenBytes::Special(piece.clone()),
                    PieceType::Unknown | PieceType::Unused => TokenBytes::None,
                })
            })
            .collect()
    }
}
