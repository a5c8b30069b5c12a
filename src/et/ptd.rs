//! Checks an ExecuTorch data file (`.ptd`, the flat-tensor format) before the runtime reads
//! it. ExecuTorch 1.5.1 does not verify a data file's flatbuffer: a corrupt one makes
//! `FlatTensorDataMap` read out of bounds (a crash the fuzzer found). This module verifies
//! the flatbuffer with the `flatbuffers` crate's verifier and checks that every segment
//! and every named blob lies inside the file, so that such a file is refused with an error.
//!
//! The layout (`extension/flat_tensor/serialize/flat_tensor.fbs` and
//! `flat_tensor_header.h` in ExecuTorch 1.5.1):
//! - bytes 4..8: the flatbuffer file identifier `FT01`;
//! - bytes 8..48: the extended header: magic `FH01`, its length (u32), the flatbuffer's
//!   offset and size, the segment base offset and the segment data size (u64 each, little
//!   endian); the flatbuffer is read from the head of the file to its offset plus size;
//! - `table FlatTensor { version: uint32; segments: [DataSegment]; named_data: [NamedData]; }`,
//!   `table DataSegment { offset: uint64; size: uint64; }`,
//!   `table NamedData { key: string; segment_index: uint32; tensor_layout: TensorLayout; }`,
//!   `table TensorLayout { scalar_type: byte; sizes: [int32]; dim_order: [uint8]; }`.

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use flatbuffers::{Follow, ForwardsUOffset, Table, Vector, Verifiable, Verifier};

/// Where the extended header starts, and its length as written by 1.5.1.
const HEADER_OFFSET: usize = 8;
const HEADER_LENGTH: usize = 40;
/// The most bytes of flatbuffer EtLlm reads to check it (the weights are in segments).
const MAX_FLATBUFFER: u64 = 256 << 20;

/// Field offsets in a table's vtable: 4 + 2 * (field index).
const fn field(index: u16) -> u16 {
    4 + 2 * index
}

macro_rules! table {
    ($name:ident) => {
        #[derive(Clone, Copy)]
        struct $name<'a> {
            tab: Table<'a>,
        }

        impl<'a> Follow<'a> for $name<'a> {
            type Inner = $name<'a>;
            unsafe fn follow(buf: &'a [u8], loc: usize) -> Self::Inner {
                // Safety: the caller (flatbuffers' generated-code contract) points `loc` at
                // a table of this type.
                Self {
                    tab: unsafe { Table::new(buf, loc) },
                }
            }
        }
    };
}

table!(FlatTensor);
table!(DataSegment);
table!(NamedData);
table!(TensorLayout);

impl Verifiable for FlatTensor<'_> {
    fn run_verifier(v: &mut Verifier, pos: usize) -> Result<(), flatbuffers::InvalidFlatbuffer> {
        v.visit_table(pos)?
            .visit_field::<u32>("version", field(0), false)?
            .visit_field::<ForwardsUOffset<Vector<'_, ForwardsUOffset<DataSegment>>>>(
                "segments",
                field(1),
                false,
            )?
            .visit_field::<ForwardsUOffset<Vector<'_, ForwardsUOffset<NamedData>>>>(
                "named_data",
                field(2),
                false,
            )?
            .finish();
        Ok(())
    }
}

impl Verifiable for DataSegment<'_> {
    fn run_verifier(v: &mut Verifier, pos: usize) -> Result<(), flatbuffers::InvalidFlatbuffer> {
        v.visit_table(pos)?
            .visit_field::<u64>("offset", field(0), false)?
            .visit_field::<u64>("size", field(1), false)?
            .finish();
        Ok(())
    }
}

impl Verifiable for NamedData<'_> {
    fn run_verifier(v: &mut Verifier, pos: usize) -> Result<(), flatbuffers::InvalidFlatbuffer> {
        v.visit_table(pos)?
            .visit_field::<ForwardsUOffset<&str>>("key", field(0), false)?
            .visit_field::<u32>("segment_index", field(1), false)?
            .visit_field::<ForwardsUOffset<TensorLayout>>("tensor_layout", field(2), false)?
            .finish();
        Ok(())
    }
}

impl Verifiable for TensorLayout<'_> {
    fn run_verifier(v: &mut Verifier, pos: usize) -> Result<(), flatbuffers::InvalidFlatbuffer> {
        v.visit_table(pos)?
            .visit_field::<i8>("scalar_type", field(0), false)?
            .visit_field::<ForwardsUOffset<Vector<'_, i32>>>("sizes", field(1), false)?
            .visit_field::<ForwardsUOffset<Vector<'_, u8>>>("dim_order", field(2), false)?
            .finish();
        Ok(())
    }
}

// Safety of the accessors below: every table was verified by `flatbuffers::root` (each
// field has the type its vtable slot is read as), which is the precondition of
// `Table::get`.
impl<'a> FlatTensor<'a> {
    fn segments(&self) -> Option<Vector<'a, ForwardsUOffset<DataSegment<'a>>>> {
        unsafe {
            self.tab
                .get::<ForwardsUOffset<Vector<'a, ForwardsUOffset<DataSegment>>>>(field(1), None)
        }
    }
    fn named_data(&self) -> Option<Vector<'a, ForwardsUOffset<NamedData<'a>>>> {
        unsafe {
            self.tab
                .get::<ForwardsUOffset<Vector<'a, ForwardsUOffset<NamedData>>>>(field(2), None)
        }
    }
}

impl DataSegment<'_> {
    fn offset(&self) -> u64 {
        unsafe { self.tab.get::<u64>(field(0), Some(0)).unwrap_or(0) }
    }
    fn size(&self) -> u64 {
        unsafe { self.tab.get::<u64>(field(1), Some(0)).unwrap_or(0) }
    }
}

impl<'a> NamedData<'a> {
    fn key(&self) -> Option<&'a str> {
        unsafe { self.tab.get::<ForwardsUOffset<&str>>(field(0), None) }
    }
    fn segment_index(&self) -> u32 {
        unsafe { self.tab.get::<u32>(field(1), Some(0)).unwrap_or(0) }
    }
    fn tensor_layout(&self) -> Option<TensorLayout<'a>> {
        unsafe {
            self.tab
                .get::<ForwardsUOffset<TensorLayout>>(field(2), None)
        }
    }
}

impl<'a> TensorLayout<'a> {
    fn scalar_type(&self) -> i8 {
        unsafe { self.tab.get::<i8>(field(0), Some(0)).unwrap_or(0) }
    }
    fn sizes(&self) -> Option<Vector<'a, i32>> {
        unsafe {
            self.tab
                .get::<ForwardsUOffset<Vector<'a, i32>>>(field(1), None)
        }
    }
    fn dim_order(&self) -> Option<Vector<'a, u8>> {
        unsafe {
            self.tab
                .get::<ForwardsUOffset<Vector<'a, u8>>>(field(2), None)
        }
    }
}

/// Bytes per element of an ExecuTorch scalar type code, for the types a tensor in a data
/// file can have; `None` for others.
fn element_size(scalar_type: i8) -> Option<u64> {
    Some(match scalar_type {
        0 | 1 | 11 => 1, // Byte, Char, Bool
        2 | 5 | 15 => 2, // Short, Half, BFloat16
        3 | 6 => 4,      // Int, Float
        4 | 7 => 8,      // Long, Double
        _ => return None,
    })
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"))
}

/// Checks the data file at `path`; the error says what is wrong with it.
pub(crate) fn check(path: &Path) -> Result<(), String> {
    let mut file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let file_len = file.metadata().map_err(|e| e.to_string())?.len();
    let mut head = vec![0u8; HEADER_OFFSET + HEADER_LENGTH];
    file.read_exact(&mut head)
        .map_err(|_| "it is too short to be an ExecuTorch data file".to_string())?;
    if &head[4..8] != b"FT01" {
        return Err("it is not an ExecuTorch data file (.ptd: no FT01 identifier)".into());
    }
    if &head[HEADER_OFFSET..HEADER_OFFSET + 4] != b"FH01" {
        return Err("its flat-tensor header (FH01) is missing".into());
    }
    let header_len = u32::from_le_bytes(head[12..16].try_into().expect("4 bytes")) as usize;
    if header_len < HEADER_LENGTH {
        return Err(format!(
            "its flat-tensor header is {header_len} bytes long, too short"
        ));
    }
    let (fb_offset, fb_size) = (u64_at(&head, 16), u64_at(&head, 24));
    let (seg_base, seg_size) = (u64_at(&head, 32), u64_at(&head, 40));
    let fb_end = fb_offset
        .checked_add(fb_size)
        .filter(|&end| end <= file_len && fb_size <= MAX_FLATBUFFER)
        .ok_or_else(|| {
            format!("its flatbuffer ({fb_size} bytes at {fb_offset}) does not fit the file")
        })?;
    let seg_end = seg_base
        .checked_add(seg_size)
        .filter(|&end| end <= file_len)
        .ok_or_else(|| {
            format!(
                "its segment data ({seg_size} bytes at {seg_base}) does not fit the file of \
                 {file_len} bytes"
            )
        })?;
    let _ = seg_end;
    // The flatbuffer starts at the head of the file (its root offset and identifier come
    // first, the extended header sits in its padding) and ends at `fb_end`, as
    // ExecuTorch's FlatTensorDataMap reads it.
    let mut flatbuffer = vec![0u8; fb_end as usize];
    file.seek(SeekFrom::Start(0))
        .and_then(|_| file.read_exact(&mut flatbuffer))
        .map_err(|e| e.to_string())?;
    let root = flatbuffers::root::<FlatTensor>(&flatbuffer)
        .map_err(|e| format!("its flatbuffer is corrupt ({e})"))?;
    let segments: Vec<(u64, u64)> = root
        .segments()
        .map(|v| v.iter().map(|s| (s.offset(), s.size())).collect())
        .unwrap_or_default();
    for (i, &(offset, size)) in segments.iter().enumerate() {
        if offset.checked_add(size).is_none_or(|end| end > seg_size) {
            return Err(format!(
                "segment {i} ({size} bytes at {offset}) lies outside the segment data of \
                 {seg_size} bytes"
            ));
        }
    }
    for (i, named) in root.named_data().into_iter().flatten().enumerate() {
        let key = named.key().unwrap_or("");
        let index = named.segment_index() as usize;
        let Some(&(_, segment_size)) = segments.get(index) else {
            return Err(format!(
                "blob {i} (`{key}`) names segment {index}, but there are {}",
                segments.len()
            ));
        };
        if let Some(layout) = named.tensor_layout() {
            let sizes: Vec<i32> = layout
                .sizes()
                .map(|v| v.iter().collect())
                .unwrap_or_default();
            let dim_order: Vec<u8> = layout
                .dim_order()
                .map(|v| v.iter().collect())
                .unwrap_or_default();
            let mut sorted = dim_order.clone();
            sorted.sort_unstable();
            if sizes.iter().any(|&s| s < 0)
                || sorted != (0..sizes.len()).map(|d| d as u8).collect::<Vec<_>>()
            {
                return Err(format!(
                    "tensor `{key}` has sizes {sizes:?} with dim order {dim_order:?}"
                ));
            }
            let elem = element_size(layout.scalar_type()).ok_or_else(|| {
                format!(
                    "tensor `{key}` has scalar type {}, not one a data file holds",
                    layout.scalar_type()
                )
            })?;
            let bytes = sizes
                .iter()
                .try_fold(elem, |n, &s| n.checked_mul(s as u64))
                .filter(|&n| n <= segment_size)
                .ok_or_else(|| {
                    format!(
                        "tensor `{key}` ({sizes:?}) needs more than its segment's \
                         {segment_size} bytes"
                    )
                })?;
            let _ = bytes;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(rel: &str) -> std::path::PathBuf {
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(rel)
    }

    #[test]
    fn the_data_files_upstreams_exporter_writes_pass() {
        for f in [
            "shipped/fp32_ptd/model.ptd",
            "shipped/lora/foundation.ptd",
            "shipped/lora/lora.ptd",
        ] {
            check(&fixture(f)).unwrap_or_else(|e| panic!("{f}: {e}"));
        }
    }

    fn mutated(tag: &str, edit: impl FnOnce(&mut Vec<u8>)) -> Result<(), String> {
        let mut bytes = std::fs::read(fixture("shipped/lora/lora.ptd")).unwrap();
        edit(&mut bytes);
        let path = std::env::temp_dir().join(format!("etllm-ptd-{tag}-{}", std::process::id()));
        std::fs::write(&path, &bytes).unwrap();
        let result = check(&path);
        std::fs::remove_file(path).unwrap();
        result
    }

    #[test]
    fn a_flatbuffer_past_the_end_of_the_file_is_refused() {
        let err = mutated("fbsize", |b| {
            b[24..32].copy_from_slice(&u64::MAX.to_le_bytes())
        })
        .unwrap_err();
        assert!(err.contains("flatbuffer"), "{err}");
    }

    #[test]
    fn segment_data_past_the_end_of_the_file_is_refused() {
        let err = mutated("segsize", |b| {
            let len = b.len() as u64;
            b[40..48].copy_from_slice(&len.to_le_bytes())
        })
        .unwrap_err();
        assert!(err.contains("segment data"), "{err}");
    }

    #[test]
    fn a_truncated_file_is_refused() {
        let err = mutated("cut", |b| b.truncate(b.len() / 2)).unwrap_err();
        assert!(err.contains("does not fit"), "{err}");
    }

    #[test]
    fn flipping_any_byte_of_the_flatbuffer_never_panics_and_some_flips_are_refused() {
        // Flip each byte of the flatbuffer part in turn (the first 4 KiB): the check must
        // not panic on any of them, and it must notice at least the structural ones.
        let bytes = std::fs::read(fixture("shipped/lora/lora.ptd")).unwrap();
        let fb_size = u64_at(&bytes, 24) as usize;
        let path = std::env::temp_dir().join(format!("etllm-ptd-flip-{}", std::process::id()));
        let mut refused = 0;
        for i in 0..fb_size.min(4096) {
            let mut b = bytes.clone();
            b[i] ^= 0xA5;
            std::fs::write(&path, &b).unwrap();
            if check(&path).is_err() {
                refused += 1;
            }
        }
        std::fs::remove_file(path).unwrap();
        assert!(refused > 0, "no flip was refused");
    }
}
