//! The byte format of the built-in managers' saved states (see
//! [`IoManager::save_state`](super::IoManager::save_state)): a header of a four-byte kind
//! tag and a `u32` format version, then the manager's own fields. Every integer is
//! little-endian; so are the elements of saved caches.

use crate::error::{Error, Result};

/// The format version every built-in manager writes today.
pub(crate) const VERSION: u32 = 1;

/// The kind tags of the built-in managers, with the names used in messages.
pub(crate) const KV_IN_MODEL: ([u8; 4], &str) = (*b"KVIM", "KvCacheInModel");
pub(crate) const NO_KV_CACHE: ([u8; 4], &str) = (*b"NOKV", "NoKvCache");
pub(crate) const STATIC_ATTENTION: ([u8; 4], &str) = (*b"SATT", "StaticAttention");

const KINDS: [([u8; 4], &str); 3] = [KV_IN_MODEL, NO_KV_CACHE, STATIC_ATTENTION];

/// Length of the header.
pub(crate) const HEADER_LEN: usize = 8;

/// Appends the header of a state of `kind`.
pub(crate) fn write_header(out: &mut Vec<u8>, kind: ([u8; 4], &str)) {
    out.extend_from_slice(&kind.0);
    out.extend_from_slice(&VERSION.to_le_bytes());
}

/// Reads a saved state field by field; every shortfall is an error naming the field.
pub(crate) struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
    kind: &'static str,
}

impl<'a> Reader<'a> {
    /// Checks the header of `state` for `kind` (tag, then version) and reads past it.
    pub(crate) fn new(state: &'a [u8], kind: ([u8; 4], &'static str)) -> Result<Self> {
        let (tag, name) = kind;
        let head = state.get(..4).ok_or_else(|| {
            Error::IoManager(format!(
                "not a saved {name} state: it is {} bytes, shorter than the {HEADER_LEN}-byte \
                 header",
                state.len()
            ))
        })?;
        if head != tag {
            return Err(Error::IoManager(
                match KINDS.iter().find(|(t, _)| t == head) {
                    Some((_, other)) => format!(
                        "the state was saved by a {other} manager; this is a {name} manager"
                    ),
                    None => format!(
                        "not a saved {name} state: it starts with bytes {head:02x?}, not the \
                         tag {:?}",
                        String::from_utf8_lossy(&tag)
                    ),
                },
            ));
        }
        let mut reader = Self {
            bytes: state,
            at: 4,
            kind: name,
        };
        let version = reader.u32("the format version")?;
        if version != VERSION {
            return Err(Error::IoManager(format!(
                "the {name} state has format version {version}; this EtLlm reads version \
                 {VERSION}"
            )));
        }
        Ok(reader)
    }

    /// The next `n` bytes, which hold `field`.
    pub(crate) fn bytes(&mut self, n: usize, field: &str) -> Result<&'a [u8]> {
        let left = self.bytes.len() - self.at;
        if n > left {
            return Err(Error::IoManager(format!(
                "the {} state is truncated: {field} needs {n} bytes at offset {}, {left} left",
                self.kind, self.at
            )));
        }
        let out = &self.bytes[self.at..self.at + n];
        self.at += n;
        Ok(out)
    }

    pub(crate) fn u32(&mut self, field: &str) -> Result<u32> {
        let b = self.bytes(4, field)?;
        Ok(u32::from_le_bytes(b.try_into().expect("4 bytes")))
    }

    pub(crate) fn u64(&mut self, field: &str) -> Result<u64> {
        let b = self.bytes(8, field)?;
        Ok(u64::from_le_bytes(b.try_into().expect("8 bytes")))
    }

    /// A `u64` count or size, as a `usize`.
    pub(crate) fn size(&mut self, field: &str) -> Result<usize> {
        let v = self.u64(field)?;
        usize::try_from(v).map_err(|_| {
            Error::IoManager(format!(
                "the {} state gives {field} {v}, too large",
                self.kind
            ))
        })
    }

    /// Bytes not read yet.
    pub(crate) fn remaining(&self) -> usize {
        self.bytes.len() - self.at
    }

    /// Fails when bytes are left over.
    pub(crate) fn finish(self) -> Result<()> {
        match self.remaining() {
            0 => Ok(()),
            n => Err(Error::IoManager(format!(
                "the {} state has {n} bytes past its end (at offset {})",
                self.kind, self.at
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(e: Error) -> String {
        match e {
            Error::IoManager(m) => m,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_header_of_another_builtin_kind_names_that_kind() {
        let mut out = Vec::new();
        write_header(&mut out, NO_KV_CACHE);
        let e = Reader::new(&out, STATIC_ATTENTION).err().unwrap();
        assert!(message(e).contains("saved by a NoKvCache manager"));
    }

    #[test]
    fn unknown_tag_short_header_and_newer_version_are_errors() {
        let e = Reader::new(b"GIF89a..", KV_IN_MODEL).err().unwrap();
        assert!(message(e).contains("not a saved KvCacheInModel state"));
        let e = Reader::new(b"KV", KV_IN_MODEL).err().unwrap();
        assert!(message(e).contains("shorter than the 8-byte header"));
        let e = Reader::new(b"KVIM\x01\x00", KV_IN_MODEL).err().unwrap();
        assert!(message(e).contains("truncated: the format version"));
        let e = Reader::new(b"KVIM\x02\x00\x00\x00", KV_IN_MODEL)
            .err()
            .unwrap();
        assert!(message(e).contains("format version 2"));
    }

    #[test]
    fn fields_past_the_end_and_bytes_left_over_are_errors() {
        let mut out = Vec::new();
        write_header(&mut out, KV_IN_MODEL);
        out.extend_from_slice(&[1, 2, 3]);
        let mut r = Reader::new(&out, KV_IN_MODEL).unwrap();
        let e = r.u32("the count").err().unwrap();
        assert!(message(e).contains("the count needs 4 bytes at offset 8, 3 left"));
        let r = Reader::new(&out, KV_IN_MODEL).unwrap();
        assert!(message(r.finish().err().unwrap()).contains("3 bytes past its end"));
    }
}
