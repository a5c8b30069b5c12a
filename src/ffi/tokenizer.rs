//! `etllm_tokenizer` and `etllm_text_stream`: load any supported tokenizer, encode, decode,
//! and decode incrementally into complete UTF-8.

use std::ffi::{c_char, c_void};
use std::sync::{Arc, Mutex, TryLockError};

use super::error::{etllm_status, guard, FfiError};
use super::{c_slice, c_str, out_arg};
use crate::error::Error;
use crate::tokenizer::{Preset, TextStream, Tokenizer};

/// Model-family conventions applied when loading a tokenizer (see `etllm_tokenizer_load`).
#[repr(C)]
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum etllm_preset {
    /// Only what the tokenizer file says.
    ETLLM_PRESET_NONE = 0,
    /// Llama 2 and Llama 3 (upstream's `LlamaRunner`): a tokenizer with
    /// `<|begin_of_text|>` is Llama 3 (BOS `<|begin_of_text|>`, EOS `<|end_of_text|>` and
    /// `<|eot_id|>`), any other Llama 2 (BOS `<s>`, EOS `</s>`).
    ETLLM_PRESET_LLAMA = 1,
}

/// Reads an `etllm_preset` passed as an integer.
pub(crate) fn preset_from(value: i32) -> Result<Option<Preset>, FfiError> {
    match value {
        0 => Ok(None),
        1 => Ok(Some(Preset::Llama)),
        _ => Err(FfiError::Core(Error::InvalidArgument(format!(
            "preset is {value}, not an etllm_preset"
        )))),
    }
}

/// A loaded tokenizer. Opaque.
///
/// Thread rules: a tokenizer never changes once loaded; any number of threads may use it
/// at the same time. `etllm_tokenizer_free` must not race with any other call on it.
/// Streams made from it keep what they need alive, so it may be freed before them.
#[allow(non_camel_case_types)]
pub struct etllm_tokenizer {
    tokenizer: Arc<Tokenizer>,
}

/// An incremental decoder: token ids in, complete UTF-8 out. Opaque.
///
/// Thread rules: one call at a time (from any thread); a call made while another is in
/// progress returns `ETLLM_ERR_BUSY`. `etllm_text_stream_free` must not race with any
/// other call on it.
#[allow(non_camel_case_types)]
pub struct etllm_text_stream {
    state: Mutex<StreamState>,
}

struct StreamState {
    stream: TextStream<'static>,
    /// The last piece returned, NUL-terminated.
    last: Vec<u8>,
}

fn tokenizer_ref<'a>(t: *const etllm_tokenizer) -> Result<&'a Tokenizer, FfiError> {
    // Safety: non-null pointers come from etllm_tokenizer_load and stay valid until
    // etllm_tokenizer_free, which the caller must not race with.
    Ok(&unsafe { t.as_ref() }
        .ok_or(FfiError::Null("tokenizer"))?
        .tokenizer)
}

/// Copies `bytes` into a `malloc`ed buffer with a NUL after them.
pub(crate) fn malloc_copy<T: Copy>(items: &[T], nul: bool) -> Result<*mut T, FfiError> {
    let size = std::mem::size_of_val(items) + usize::from(nul);
    // Safety: plain allocation; checked for NULL below.
    let ptr = unsafe { libc::malloc(size.max(1)) } as *mut T;
    if ptr.is_null() {
        return Err(FfiError::Core(Error::Tokenizer("out of memory".into())));
    }
    // Safety: `ptr` has room for the items and the NUL byte.
    unsafe {
        std::ptr::copy_nonoverlapping(items.as_ptr(), ptr, items.len());
        if nul {
            *(ptr as *mut u8).add(std::mem::size_of_val(items)) = 0;
        }
    }
    Ok(ptr)
}

/// Loads a tokenizer from `path`, whatever its format, found from the content: an HF
/// `tokenizer.json` or a folder holding one (with an optional `tokenizer_config.json`), a
/// tiktoken rank file (Llama 3's special tokens and pattern), a SentencePiece `.model`, or
/// a llama2.c `tokenizer.bin`. `preset` is an `etllm_preset`. On success `*out_tokenizer`
/// is a new tokenizer that the caller frees with `etllm_tokenizer_free`; on failure it is
/// NULL, and a file that is no known format gives `ETLLM_ERR_INVALID_TOKENIZER` with a
/// message listing what was tried.
#[no_mangle]
pub extern "C" fn etllm_tokenizer_load(
    path: *const c_char,
    preset: i32,
    out_tokenizer: *mut *mut etllm_tokenizer,
) -> etllm_status {
    guard(|| {
        let out = out_arg(out_tokenizer, "out_tokenizer")?;
        *out = std::ptr::null_mut();
        let path = c_str(path, "path")?;
        let preset = preset_from(preset)?;
        let tokenizer = Tokenizer::load(path, preset)?;
        *out = Box::into_raw(Box::new(etllm_tokenizer {
            tokenizer: Arc::new(tokenizer),
        }));
        Ok(())
    })
}

/// Frees a tokenizer. NULL is ignored. No other call on it may be in progress.
#[no_mangle]
pub extern "C" fn etllm_tokenizer_free(tokenizer: *mut etllm_tokenizer) {
    super::free_handle(tokenizer);
}

/// Frees a buffer EtLlm allocated and returned (ids from `etllm_tokenizer_encode`, text
/// from `etllm_tokenizer_decode` or `etllm_tokenizer_token_to_piece`, a state or user data
/// from `etllm_session_save_state` and `etllm_session_load_state`). NULL is ignored.
#[no_mangle]
pub extern "C" fn etllm_buffer_free(buffer: *mut c_void) {
    // Safety: the caller passes NULL or a buffer that malloc_copy allocated.
    unsafe { libc::free(buffer) }
}

/// Encodes the NUL-terminated UTF-8 `text` with `num_bos` BOS tokens before it and
/// `num_eos` EOS tokens after it (a count above 0 needs the tokenizer to define the token:
/// `ETLLM_ERR_INVALID_ARGUMENT` otherwise, as is a `num_bos + num_eos` above 2^20). On success `*out_ids` holds `*out_len` ids in a
/// buffer the caller frees with `etllm_buffer_free` (NULL-safe even when `*out_len` is 0);
/// on failure it is NULL.
#[no_mangle]
pub extern "C" fn etllm_tokenizer_encode(
    tokenizer: *const etllm_tokenizer,
    text: *const c_char,
    num_bos: u32,
    num_eos: u32,
    out_ids: *mut *mut u32,
    out_len: *mut usize,
) -> etllm_status {
    guard(|| {
        let out = out_arg(out_ids, "out_ids")?;
        *out = std::ptr::null_mut();
        let len = out_arg(out_len, "out_len")?;
        *len = 0;
        let t = tokenizer_ref(tokenizer)?;
        let text = c_str(text, "text")?;
        let ids = t.encode_with(text, num_bos as usize, num_eos as usize)?;
        *out = malloc_copy(&ids, false)?;
        *len = ids.len();
        Ok(())
    })
}

/// Decodes `num_ids` ids to text. On success `*out_text` holds `*out_len` bytes of UTF-8
/// followed by a NUL that `*out_len` does not count (the text itself may contain U+0000:
/// use the length); the caller frees it with `etllm_buffer_free`. An id outside the
/// vocabulary gives `ETLLM_ERR_TOKENIZER`. `ids` may be NULL when `num_ids` is 0.
#[no_mangle]
pub extern "C" fn etllm_tokenizer_decode(
    tokenizer: *const etllm_tokenizer,
    ids: *const u32,
    num_ids: usize,
    out_text: *mut *mut c_char,
    out_len: *mut usize,
) -> etllm_status {
    guard(|| {
        let out = out_arg(out_text, "out_text")?;
        *out = std::ptr::null_mut();
        let len = out_arg(out_len, "out_len")?;
        *len = 0;
        let t = tokenizer_ref(tokenizer)?;
        let ids = c_slice(ids, num_ids, "ids")?;
        let text = t.decode(ids)?;
        *out = malloc_copy(text.as_bytes(), true)? as *mut c_char;
        *len = text.len();
        Ok(())
    })
}

/// The piece of token `id` as the vocabulary stores it (e.g. `▁the` for SentencePiece;
/// raw bytes, possibly not UTF-8, for tiktoken and llama2.c). On success `*out_piece`
/// holds `*out_len` bytes followed by a NUL; the caller frees it with `etllm_buffer_free`.
/// An id outside the vocabulary gives `ETLLM_ERR_TOKENIZER`.
#[no_mangle]
pub extern "C" fn etllm_tokenizer_token_to_piece(
    tokenizer: *const etllm_tokenizer,
    id: u32,
    out_piece: *mut *mut c_char,
    out_len: *mut usize,
) -> etllm_status {
    guard(|| {
        let out = out_arg(out_piece, "out_piece")?;
        *out = std::ptr::null_mut();
        let len = out_arg(out_len, "out_len")?;
        *len = 0;
        let piece = tokenizer_ref(tokenizer)?.token_to_piece(id)?;
        *out = malloc_copy(&piece, true)? as *mut c_char;
        *len = piece.len();
        Ok(())
    })
}

/// Sets `*out_size` to the number of token ids, special tokens included.
#[no_mangle]
pub extern "C" fn etllm_tokenizer_vocab_size(
    tokenizer: *const etllm_tokenizer,
    out_size: *mut usize,
) -> etllm_status {
    guard(|| {
        let out = out_arg(out_size, "out_size")?;
        *out = tokenizer_ref(tokenizer)?.vocab_size();
        Ok(())
    })
}

/// Sets `*out_id` to the BOS id; `ETLLM_ERR_NOT_FOUND` when the tokenizer defines none.
#[no_mangle]
pub extern "C" fn etllm_tokenizer_bos_id(
    tokenizer: *const etllm_tokenizer,
    out_id: *mut u32,
) -> etllm_status {
    guard(|| {
        let out = out_arg(out_id, "out_id")?;
        *out = tokenizer_ref(tokenizer)?
            .bos_id()
            .ok_or_else(|| FfiError::NotFound("the tokenizer defines no BOS token".into()))?;
        Ok(())
    })
}

/// Sets `*out_ids` to the tokenizer's EOS ids (`*out_len` of them, possibly 0). The array
/// belongs to the tokenizer and stays valid until `etllm_tokenizer_free`.
#[no_mangle]
pub extern "C" fn etllm_tokenizer_eos_ids(
    tokenizer: *const etllm_tokenizer,
    out_ids: *mut *const u32,
    out_len: *mut usize,
) -> etllm_status {
    guard(|| {
        let out = out_arg(out_ids, "out_ids")?;
        let len = out_arg(out_len, "out_len")?;
        let eos = tokenizer_ref(tokenizer)?.eos_ids();
        *out = eos.as_ptr();
        *len = eos.len();
        Ok(())
    })
}

/// Creates an incremental decoder over `tokenizer` in `*out_stream` (NULL on failure); the
/// caller frees it with `etllm_text_stream_free`. The stream keeps the tokenizer's data
/// alive: the tokenizer may be freed first.
#[no_mangle]
pub extern "C" fn etllm_text_stream_new(
    tokenizer: *const etllm_tokenizer,
    out_stream: *mut *mut etllm_text_stream,
) -> etllm_status {
    guard(|| {
        let out = out_arg(out_stream, "out_stream")?;
        *out = std::ptr::null_mut();
        // Safety: see tokenizer_ref.
        let handle = unsafe { tokenizer.as_ref() }.ok_or(FfiError::Null("tokenizer"))?;
        let stream = Tokenizer::stream_shared(Arc::clone(&handle.tokenizer));
        *out = Box::into_raw(Box::new(etllm_text_stream {
            state: Mutex::new(StreamState {
                stream,
                last: vec![0],
            }),
        }));
        Ok(())
    })
}

/// Runs `f` on a stream and hands its text out through `out_text`/`out_len`.
fn stream_call(
    stream: *mut etllm_text_stream,
    out_text: *mut *const c_char,
    out_len: *mut usize,
    f: impl FnOnce(&mut TextStream<'static>) -> crate::Result<String>,
) -> etllm_status {
    guard(|| {
        let out = out_arg(out_text, "out_text")?;
        let len = out_arg(out_len, "out_len")?;
        // Safety: non-null pointers come from etllm_text_stream_new and stay valid until
        // etllm_text_stream_free, which the caller must not race with.
        let s = unsafe { stream.as_ref() }.ok_or(FfiError::Null("stream"))?;
        let mut state = match s.state.try_lock() {
            Ok(g) => g,
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            Err(TryLockError::WouldBlock) => return Err(FfiError::Busy),
        };
        let text = f(&mut state.stream)?;
        state.last.clear();
        state.last.extend_from_slice(text.as_bytes());
        state.last.push(0);
        *out = state.last.as_ptr().cast();
        *len = text.len();
        Ok(())
    })
}

/// Adds token `id` to the stream. `*out_text` is set to the text it completes: `*out_len`
/// bytes of complete UTF-8 (often 0 bytes, while a character split across tokens is
/// incomplete), followed by a NUL. The text belongs to the stream and stays valid until
/// the next call on the stream or its free. An id outside the vocabulary gives
/// `ETLLM_ERR_TOKENIZER`.
#[no_mangle]
pub extern "C" fn etllm_text_stream_push(
    stream: *mut etllm_text_stream,
    id: u32,
    out_text: *mut *const c_char,
    out_len: *mut usize,
) -> etllm_status {
    stream_call(stream, out_text, out_len, |s| s.push(id))
}

/// Releases whatever the stream holds back (incomplete bytes become U+FFFD) and starts it
/// over. Output as for `etllm_text_stream_push`.
#[no_mangle]
pub extern "C" fn etllm_text_stream_flush(
    stream: *mut etllm_text_stream,
    out_text: *mut *const c_char,
    out_len: *mut usize,
) -> etllm_status {
    stream_call(stream, out_text, out_len, |s| s.flush())
}

/// Frees a stream. NULL is ignored. No other call on it may be in progress.
#[no_mangle]
pub extern "C" fn etllm_text_stream_free(stream: *mut etllm_text_stream) {
    super::free_handle(stream);
}
