//! A session's state as bytes: the image of the model's memory-planned buffers (its KV
//! cache), the KV-cache manager's own state, the tokens in the cache, and the file format
//! that carries them.
//!
//! The file is little-endian:
//!
//! | field | bytes |
//! |---|---|
//! | magic `ETLLMSES` | 8 |
//! | format version ([`FORMAT_VERSION`]) | 4 |
//! | EtLlm version: length, then UTF-8 | 2 + n |
//! | model identity (XXH3-128 of the program, its data files and method signatures) | 16 |
//! | the model files' stamp (XXH3-128 of their device, inode, size, mtime and ctime) | 16 |
//! | arena layout: count, then each size | 4 + 8 each |
//! | chunk size of the arena image | 4 |
//! | position, pending flag, pending token | 8 + 1 + 4 |
//! | token count, then the tokens (u32) | 8 + 4 each |
//! | per arena: a bitmap of the chunks present, then their bytes | |
//! | manager state: length, then bytes | 8 + n |
//! | user data: length, then bytes | 8 + n |
//! | XXH3-64 of everything before | 8 |
//!
//! Chunks of the arenas that are all zeros (never written: positions the cache has not
//! reached) are left out, so a state costs about the part of the cache in use.

use std::borrow::Cow;

use crate::error::{Error, Result};

/// Bytes per chunk of an arena image.
pub(crate) const CHUNK: usize = 4096;

const MAGIC: &[u8; 8] = b"ETLLMSES";

/// Version of the file layout; a different one is refused.
pub(crate) const FORMAT_VERSION: u32 = 1;

/// The contents of a set of memory-planned buffers, without their all-zero chunks. The
/// chunk bytes are owned (a session set aside) or borrowed (a state being restored from
/// the caller's bytes).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct ArenaImage<'a> {
    /// Each buffer's size.
    pub(crate) sizes: Vec<usize>,
    /// Per buffer, one bit per chunk: set when the chunk is in `data`.
    pub(crate) present: Vec<Vec<u8>>,
    /// The present chunks, buffer by buffer, in order (the last chunk of a buffer may be
    /// short).
    pub(crate) data: Cow<'a, [u8]>,
}

fn chunks_of(size: usize) -> usize {
    size.div_ceil(CHUNK)
}

/// Whether every byte is zero.
pub(crate) fn all_zero(bytes: &[u8]) -> bool {
    // Word-wise OR of the whole chunk: no early exit, so the loop vectorises.
    let words = bytes.chunks_exact(8);
    let tail = words.remainder();
    words.fold(0u64, |acc, w| {
        acc | u64::from_ne_bytes(w.try_into().expect("8 bytes"))
    }) == 0
        && tail.iter().all(|&b| b == 0)
}

fn bit(bits: &[u8], i: usize) -> bool {
    bits.get(i / 8).is_some_and(|b| b & (1 << (i % 8)) != 0)
}

impl ArenaImage<'_> {
    /// The image of `arenas`.
    pub(crate) fn capture(arenas: &[&[u8]]) -> ArenaImage<'static> {
        // First where the data is, then exactly that much room, then the copy: a session
        // set aside holds no spare capacity.
        let mut present = Vec::with_capacity(arenas.len());
        let mut total = 0;
        for arena in arenas {
            let mut bits = vec![0u8; chunks_of(arena.len()).div_ceil(8)];
            for (i, chunk) in arena.chunks(CHUNK).enumerate() {
                if !all_zero(chunk) {
                    bits[i / 8] |= 1 << (i % 8);
                    total += chunk.len();
                }
            }
            present.push(bits);
        }
        let mut data = Vec::with_capacity(total);
        for (arena, bits) in arenas.iter().zip(&present) {
            for (i, chunk) in arena.chunks(CHUNK).enumerate() {
                if bit(bits, i) {
                    data.extend_from_slice(chunk);
                }
            }
        }
        ArenaImage {
            sizes: arenas.iter().map(|a| a.len()).collect(),
            present,
            data: Cow::Owned(data),
        }
    }

    /// Whether the image has the layout of `sizes`.
    pub(crate) fn fits(&self, sizes: &[usize]) -> bool {
        self.sizes == sizes
    }

    /// Whether chunk `i` of buffer `arena` is in the image.
    fn has(&self, arena: usize, i: usize) -> bool {
        bit(&self.present[arena], i)
    }

    /// Calls `f(arena, chunk index, bytes)` for every chunk in the image.
    fn each_chunk(&self, mut f: impl FnMut(usize, usize, &[u8])) {
        let mut at = 0;
        for (a, &size) in self.sizes.iter().enumerate() {
            for i in 0..chunks_of(size) {
                if self.has(a, i) {
                    let len = CHUNK.min(size - i * CHUNK);
                    f(a, i, &self.data[at..at + len]);
                    at += len;
                }
            }
        }
    }

    /// Writes the image into `arenas`, which hold `baseline` (see
    /// [`clear`](Self::clear)): its chunks are copied, and the baseline's chunks that the
    /// image does not have become zeros. Only those chunks are touched.
    pub(crate) fn write_over(&self, baseline: &ArenaImage<'_>, arenas: &mut [&mut [u8]]) {
        baseline.each_chunk(|a, i, _| {
            if !self.has(a, i) {
                let arena = &mut arenas[a];
                let end = (i * CHUNK + CHUNK).min(arena.len());
                arena[i * CHUNK..end].fill(0);
            }
        });
        self.each_chunk(|a, i, bytes| {
            arenas[a][i * CHUNK..i * CHUNK + bytes.len()].copy_from_slice(bytes);
        });
    }

    /// Brings `arenas`, which hold this image, back to `baseline`: this image's chunks
    /// become zeros, then the baseline's are copied. Only those chunks are touched.
    pub(crate) fn clear(&self, baseline: &ArenaImage<'_>, arenas: &mut [&mut [u8]]) {
        self.each_chunk(|a, i, bytes| {
            arenas[a][i * CHUNK..i * CHUNK + bytes.len()].fill(0);
        });
        baseline.each_chunk(|a, i, bytes| {
            arenas[a][i * CHUNK..i * CHUNK + bytes.len()].copy_from_slice(bytes);
        });
    }

    /// Brings `arenas`, whatever they hold, back to this image: every chunk is read, and
    /// written only where it differs from the image's zeros (a page never written stays
    /// unmapped).
    pub(crate) fn reset(&self, arenas: &mut [&mut [u8]]) {
        for (a, arena) in arenas.iter_mut().enumerate() {
            for (i, chunk) in arena.chunks_mut(CHUNK).enumerate() {
                if !self.has(a, i) && !all_zero(chunk) {
                    chunk.fill(0);
                }
            }
        }
        self.each_chunk(|a, i, bytes| {
            arenas[a][i * CHUNK..i * CHUNK + bytes.len()].copy_from_slice(bytes);
        });
    }

    /// Bytes held.
    pub(crate) fn len(&self) -> usize {
        self.data.len() + self.present.iter().map(Vec::len).sum::<usize>()
    }
}

/// Everything a session's state holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct SavedState<'a> {
    pub(crate) identity: u128,
    /// The model files as the file system saw them when the state was saved (0: unknown):
    /// the same stamp now means the same files, without hashing them again.
    pub(crate) stamp: u128,
    pub(crate) etllm_version: String,
    pub(crate) pos: usize,
    pub(crate) pending: Option<u32>,
    pub(crate) tokens: Vec<u32>,
    pub(crate) arenas: ArenaImage<'a>,
    pub(crate) io: Cow<'a, [u8]>,
    pub(crate) user_data: Cow<'a, [u8]>,
}

fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

impl<'a> SavedState<'a> {
    /// The file's bytes.
    pub(crate) fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(
            128 + self.tokens.len() * 4 + self.arenas.len() + self.io.len() + self.user_data.len(),
        );
        out.extend_from_slice(MAGIC);
        put_u32(&mut out, FORMAT_VERSION);
        let version = self.etllm_version.as_bytes();
        out.extend_from_slice(&(version.len().min(u16::MAX as usize) as u16).to_le_bytes());
        out.extend_from_slice(&version[..version.len().min(u16::MAX as usize)]);
        out.extend_from_slice(&self.identity.to_le_bytes());
        out.extend_from_slice(&self.stamp.to_le_bytes());
        put_u32(&mut out, self.arenas.sizes.len() as u32);
        for &size in &self.arenas.sizes {
            put_u64(&mut out, size as u64);
        }
        put_u32(&mut out, CHUNK as u32);
        put_u64(&mut out, self.pos as u64);
        out.push(self.pending.is_some() as u8);
        put_u32(&mut out, self.pending.unwrap_or(0));
        put_u64(&mut out, self.tokens.len() as u64);
        for &t in &self.tokens {
            put_u32(&mut out, t);
        }
        for bits in &self.arenas.present {
            out.extend_from_slice(bits);
        }
        out.extend_from_slice(&self.arenas.data);
        put_u64(&mut out, self.io.len() as u64);
        out.extend_from_slice(&self.io);
        put_u64(&mut out, self.user_data.len() as u64);
        out.extend_from_slice(&self.user_data);
        let sum = xxhash_rust::xxh3::xxh3_64(&out);
        put_u64(&mut out, sum);
        out
    }

    /// Reads a file's bytes. Every field is checked; nothing is trusted.
    pub(crate) fn from_bytes(bytes: &'a [u8]) -> Result<Self> {
        let bad = |message: String| Error::InvalidState(message);
        if bytes.len() < MAGIC.len() || &bytes[..MAGIC.len()] != MAGIC {
            return Err(bad(
                "it is not an EtLlm session state (no ETLLMSES header)".into()
            ));
        }
        let mut r = Reader {
            bytes,
            at: MAGIC.len(),
        };
        let version = r.u32()?;
        if version != FORMAT_VERSION {
            return Err(bad(format!(
                "it uses state format version {version}; this EtLlm ({}) reads version \
                 {FORMAT_VERSION}",
                env!("CARGO_PKG_VERSION")
            )));
        }
        if bytes.len() < 8 {
            return Err(bad("it is truncated".into()));
        }
        let (body, sum) = bytes.split_at(bytes.len() - 8);
        let sum = u64::from_le_bytes(sum.try_into().expect("8 bytes"));
        if xxhash_rust::xxh3::xxh3_64(body) != sum {
            return Err(bad(
                "it is truncated or corrupt (its checksum does not match)".into(),
            ));
        }
        let mut r = Reader {
            bytes: body,
            at: r.at,
        };
        let n = r.u16()? as usize;
        let etllm_version = String::from_utf8_lossy(r.take(n)?).into_owned();
        let identity = u128::from_le_bytes(r.take(16)?.try_into().expect("16 bytes"));
        let stamp = u128::from_le_bytes(r.take(16)?.try_into().expect("16 bytes"));
        let n_arenas = r.u32()? as usize;
        if n_arenas > 64 {
            return Err(bad(format!("it claims {n_arenas} memory arenas")));
        }
        let mut sizes = Vec::with_capacity(n_arenas);
        for _ in 0..n_arenas {
            let size = r.u64()?;
            sizes.push(usize::try_from(size).map_err(|_| bad(format!("arena size {size}")))?);
        }
        let chunk = r.u32()? as usize;
        if chunk != CHUNK {
            return Err(bad(format!(
                "its arena image uses {chunk}-byte chunks, not {CHUNK}"
            )));
        }
        let pos = usize::try_from(r.u64()?).map_err(|_| bad("position out of range".into()))?;
        let pending = match r.u8()? {
            0 => {
                r.u32()?;
                None
            }
            1 => Some(r.u32()?),
            f => return Err(bad(format!("pending flag {f}"))),
        };
        let n_tokens = r.u64()?;
        if n_tokens > (r.left() / 4) as u64 {
            return Err(bad(format!(
                "it claims {n_tokens} tokens, more than it holds"
            )));
        }
        let tokens = r
            .take(n_tokens as usize * 4)?
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect();
        let mut present = Vec::with_capacity(n_arenas);
        let mut data_len = 0usize;
        for &size in &sizes {
            let n_chunks = chunks_of(size);
            let bits = r.take(n_chunks.div_ceil(8))?.to_vec();
            for i in 0..n_chunks {
                if bits[i / 8] & (1 << (i % 8)) != 0 {
                    data_len += if i + 1 == n_chunks && size % CHUNK != 0 {
                        size % CHUNK
                    } else {
                        CHUNK
                    };
                }
            }
            if bits.len() * 8 > n_chunks
                && bits
                    .last()
                    .is_some_and(|&b| b >> (n_chunks % 8) != 0 && !n_chunks.is_multiple_of(8))
            {
                return Err(bad("its arena bitmap marks chunks past the arena".into()));
            }
            present.push(bits);
        }
        let data = Cow::Borrowed(r.take(data_len)?);
        let n = r.u64()?;
        let io = Cow::Borrowed(r.take_len(n)?);
        let n = r.u64()?;
        let user_data = Cow::Borrowed(r.take_len(n)?);
        if r.left() != 0 {
            return Err(bad(format!("{} bytes follow its last field", r.left())));
        }
        Ok(SavedState {
            identity,
            stamp,
            etllm_version,
            pos,
            pending,
            tokens,
            arenas: ArenaImage {
                sizes,
                present,
                data,
            },
            io,
            user_data,
        })
    }
}

/// Reads fields off a byte slice; running out is an [`Error::InvalidState`].
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn left(&self) -> usize {
        self.bytes.len() - self.at
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if n > self.left() {
            return Err(Error::InvalidState("it is truncated".into()));
        }
        let s = &self.bytes[self.at..self.at + n];
        self.at += n;
        Ok(s)
    }

    fn take_len(&mut self, n: u64) -> Result<&'a [u8]> {
        match usize::try_from(n) {
            Ok(n) => self.take(n),
            Err(_) => Err(Error::InvalidState("it is truncated".into())),
        }
    }

    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().expect("2")))
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4")))
    }

    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> SavedState<'static> {
        let mut a = vec![0u8; 3 * CHUNK + 100];
        a[5] = 1;
        a[3 * CHUNK + 99] = 7;
        let b = vec![9u8; 10];
        SavedState {
            identity: 0x1234_5678_9abc_def0_1122_3344_5566_7788,
            stamp: 7,
            etllm_version: "0.1.0".into(),
            pos: 3,
            pending: Some(42),
            tokens: vec![1, 2, 3],
            arenas: ArenaImage::capture(&[&a, &b]),
            io: Cow::Owned(vec![4, 5]),
            user_data: Cow::Owned(b"chat".to_vec()),
        }
    }

    /// A buffer of 4 chunks and a bit, with bytes set in the chunks named.
    fn arena(chunks: &[usize], value: u8) -> Vec<u8> {
        let mut a = vec![0u8; 4 * CHUNK + 100];
        for &c in chunks {
            a[c * CHUNK + 3] = value;
        }
        a
    }

    #[test]
    fn an_image_keeps_only_the_chunks_that_are_not_zero() {
        let image = ArenaImage::capture(&[&arena(&[1, 4], 1)]);
        assert_eq!(image.data.len(), CHUNK + 100);
    }

    #[test]
    fn an_image_written_over_its_baseline_gives_every_byte_back() {
        let baseline_bytes = arena(&[0, 2], 5);
        let baseline = ArenaImage::capture(&[&baseline_bytes]);
        let want = arena(&[1, 4], 1);
        let image = ArenaImage::capture(&[&want]);
        let mut live = baseline_bytes.clone();
        image.write_over(&baseline, &mut [&mut live]);
        assert_eq!(live, want);
        image.clear(&baseline, &mut [&mut live]);
        assert_eq!(live, baseline_bytes);
    }

    #[test]
    fn a_reset_brings_any_contents_back_to_the_image() {
        let want = arena(&[2], 9);
        let image = ArenaImage::capture(&[&want]);
        let mut live = arena(&[0, 1, 2, 3, 4], 3);
        image.reset(&mut [&mut live]);
        assert_eq!(live, want);
    }

    #[test]
    fn a_state_round_trips_through_bytes() {
        let state = sample();
        assert_eq!(SavedState::from_bytes(&state.to_bytes()).unwrap(), state);
    }

    #[test]
    fn every_truncation_and_every_flipped_byte_is_an_error() {
        let bytes = sample().to_bytes();
        for n in 0..bytes.len() {
            assert!(matches!(
                SavedState::from_bytes(&bytes[..n]),
                Err(Error::InvalidState(_))
            ));
        }
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x10;
            assert!(
                SavedState::from_bytes(&bad).is_err(),
                "flipping byte {i} went unnoticed"
            );
        }
    }
}
