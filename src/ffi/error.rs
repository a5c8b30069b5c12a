//! Status codes, the per-thread error message, and the panic boundary.

use std::cell::RefCell;
use std::ffi::{c_char, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};

use crate::error::Error;

/// Result of every fallible EtLlm call. `ETLLM_OK` is 0; each failure has its own code,
/// and `etllm_last_error_message()` describes it.
#[repr(C)]
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum etllm_status {
    /// Success.
    ETLLM_OK = 0,
    /// A required pointer argument was NULL.
    ETLLM_ERR_NULL_ARGUMENT = 1,
    /// A string argument was not valid UTF-8.
    ETLLM_ERR_INVALID_UTF8 = 2,
    /// An argument or configuration field is out of range (the message names it).
    ETLLM_ERR_INVALID_ARGUMENT = 3,
    /// A versioned struct's `struct_size` is not one this library knows.
    ETLLM_ERR_STRUCT_SIZE = 4,
    /// A file could not be opened or read.
    ETLLM_ERR_FILE_ACCESS = 5,
    /// The model file is not a valid ExecuTorch program.
    ETLLM_ERR_INVALID_MODEL = 6,
    /// The model's methods have a signature EtLlm cannot drive.
    ETLLM_ERR_UNSUPPORTED_MODEL = 7,
    /// The tokenizer file is invalid or does not fit the model.
    ETLLM_ERR_INVALID_TOKENIZER = 8,
    /// Encoding or decoding text failed.
    ETLLM_ERR_TOKENIZER = 9,
    /// The prompt does not fit in the context that is left.
    ETLLM_ERR_CONTEXT_FULL = 10,
    /// ExecuTorch failed while running the model.
    ETLLM_ERR_RUNTIME = 11,
    /// The KV-cache manager failed.
    ETLLM_ERR_IO_MANAGER = 12,
    /// The runner is not loaded.
    ETLLM_ERR_NOT_LOADED = 13,
    /// Another call on the same runner is in progress (for example a second `generate`,
    /// or a call from inside a callback of a running `generate`).
    ETLLM_ERR_BUSY = 14,
    /// The requested item does not exist (for example a BOS id the model does not define).
    ETLLM_ERR_NOT_FOUND = 15,
    /// A bug in EtLlm: a Rust panic was caught at the boundary.
    ETLLM_ERR_PANIC = 16,
    /// The sampler plugin (`etllm_sampler`) failed or chose a token outside the vocabulary.
    ETLLM_ERR_SAMPLER = 17,
    /// A chat template failed to compile or render (its own `raise_exception` message
    /// included).
    ETLLM_ERR_CHAT_TEMPLATE = 18,
    /// The config's grammar (`grammar`, `grammar_type`) failed to compile (the compiler's
    /// message included), or the grammar engine failed during generation.
    ETLLM_ERR_GRAMMAR = 19,
    /// A saved session state was refused: not a state file, truncated or corrupt, from
    /// another model or another state format, or its KV-cache manager state was refused.
    /// The session keeps the state it had.
    ETLLM_ERR_INVALID_STATE = 20,
    /// The HTTP server could not start (its address cannot be bound, e.g. the port is in
    /// use) or failed while serving.
    ETLLM_ERR_SERVER = 21,
    /// An image or audio input could not be used: not a supported format (images: PNG,
    /// JPEG, GIF, BMP, WebP; audio: WAV), corrupt or truncated, or a layout EtLlm does not
    /// take (more than two audio channels, no samples). Nothing changed.
    ETLLM_ERR_INVALID_MEDIA = 22,
}

/// Errors of the C layer itself, and errors of the core.
#[derive(Debug)]
pub(crate) enum FfiError {
    Null(&'static str),
    Utf8(&'static str),
    StructSize {
        name: &'static str,
        given: usize,
        known: usize,
    },
    Busy,
    NotFound(String),
    Core(Error),
}

impl From<Error> for FfiError {
    fn from(e: Error) -> Self {
        FfiError::Core(e)
    }
}

impl FfiError {
    pub(crate) fn status(&self) -> etllm_status {
        use etllm_status::*;
        match self {
            FfiError::Null(_) => ETLLM_ERR_NULL_ARGUMENT,
            FfiError::Utf8(_) => ETLLM_ERR_INVALID_UTF8,
            FfiError::StructSize { .. } => ETLLM_ERR_STRUCT_SIZE,
            FfiError::Busy => ETLLM_ERR_BUSY,
            FfiError::NotFound(_) => ETLLM_ERR_NOT_FOUND,
            FfiError::Core(e) => match e {
                Error::FileAccess { .. } => ETLLM_ERR_FILE_ACCESS,
                Error::InvalidModel { .. } => ETLLM_ERR_INVALID_MODEL,
                Error::UnsupportedModel(_) => ETLLM_ERR_UNSUPPORTED_MODEL,
                Error::InvalidTokenizer { .. } => ETLLM_ERR_INVALID_TOKENIZER,
                Error::Tokenizer(_) => ETLLM_ERR_TOKENIZER,
                Error::InvalidArgument(_) => ETLLM_ERR_INVALID_ARGUMENT,
                Error::ContextFull { .. } => ETLLM_ERR_CONTEXT_FULL,
                Error::Runtime { .. } => ETLLM_ERR_RUNTIME,
                Error::IoManager(_) => ETLLM_ERR_IO_MANAGER,
                Error::Sampler(_) => ETLLM_ERR_SAMPLER,
                Error::NotLoaded(_) => ETLLM_ERR_NOT_LOADED,
                Error::ChatTemplate { .. } => ETLLM_ERR_CHAT_TEMPLATE,
                Error::Grammar(_) => ETLLM_ERR_GRAMMAR,
                Error::InvalidState(_) => ETLLM_ERR_INVALID_STATE,
                Error::Busy(_) => ETLLM_ERR_BUSY,
                Error::Server(_) => ETLLM_ERR_SERVER,
                Error::InvalidMedia { .. } => ETLLM_ERR_INVALID_MEDIA,
            },
        }
    }

    pub(crate) fn message(&self) -> String {
        match self {
            FfiError::Null(name) => format!("argument `{name}` is NULL"),
            FfiError::Utf8(name) => format!("argument `{name}` is not valid UTF-8"),
            FfiError::StructSize { name, given, known } => format!(
                "`{name}.struct_size` is {given}; this library knows sizes 8 to {known} \
                 (initialize the struct with its *_default() function)"
            ),
            FfiError::Busy => "another call on this runner (or session) is in progress (each \
                 runs one call at a time; only etllm_runner_stop and etllm_session_stop may \
                 be called concurrently)"
                .to_string(),
            FfiError::NotFound(what) => what.clone(),
            FfiError::Core(e) => e.to_string(),
        }
    }
}

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_last_error(message: &str) {
    let message = CString::new(message.replace('\0', " ")).unwrap_or_default();
    let _ = LAST_ERROR.try_with(|m| *m.borrow_mut() = message);
}

/// Runs `f` behind the panic boundary and turns its outcome into a status, recording the
/// message for `etllm_last_error_message`.
pub(crate) fn guard(f: impl FnOnce() -> Result<(), FfiError>) -> etllm_status {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => {
            set_last_error("");
            etllm_status::ETLLM_OK
        }
        Ok(Err(e)) => {
            set_last_error(&e.message());
            e.status()
        }
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".to_string());
            set_last_error(&format!("internal error (please report it): {what}"));
            etllm_status::ETLLM_ERR_PANIC
        }
    }
}

/// The name of `status`, e.g. "ETLLM_ERR_IO_MANAGER".
pub(crate) fn status_name(status: etllm_status) -> &'static str {
    // Safety: etllm_status_name returns a static NUL-terminated ASCII string.
    unsafe { std::ffi::CStr::from_ptr(etllm_status_name(status as i32)) }
        .to_str()
        .unwrap_or("unknown status")
}

/// The message describing the status returned by the most recent EtLlm call on the
/// calling thread: "" after a success. The string belongs to EtLlm and stays valid until
/// the next EtLlm call on this thread; copy it to keep it. Never NULL.
#[no_mangle]
pub extern "C" fn etllm_last_error_message() -> *const c_char {
    LAST_ERROR
        .try_with(|m| m.borrow().as_ptr())
        .unwrap_or(c"".as_ptr())
}

/// The name of a status code, e.g. "ETLLM_ERR_CONTEXT_FULL"; "unknown status" for a
/// value that is not one. Static; do not free.
#[no_mangle]
pub extern "C" fn etllm_status_name(status: i32) -> *const c_char {
    use etllm_status::*;
    let all = [
        ETLLM_OK,
        ETLLM_ERR_NULL_ARGUMENT,
        ETLLM_ERR_INVALID_UTF8,
        ETLLM_ERR_INVALID_ARGUMENT,
        ETLLM_ERR_STRUCT_SIZE,
        ETLLM_ERR_FILE_ACCESS,
        ETLLM_ERR_INVALID_MODEL,
        ETLLM_ERR_UNSUPPORTED_MODEL,
        ETLLM_ERR_INVALID_TOKENIZER,
        ETLLM_ERR_TOKENIZER,
        ETLLM_ERR_CONTEXT_FULL,
        ETLLM_ERR_RUNTIME,
        ETLLM_ERR_IO_MANAGER,
        ETLLM_ERR_NOT_LOADED,
        ETLLM_ERR_BUSY,
        ETLLM_ERR_NOT_FOUND,
        ETLLM_ERR_PANIC,
        ETLLM_ERR_SAMPLER,
        ETLLM_ERR_CHAT_TEMPLATE,
        ETLLM_ERR_GRAMMAR,
        ETLLM_ERR_INVALID_STATE,
        ETLLM_ERR_SERVER,
        ETLLM_ERR_INVALID_MEDIA,
    ];
    let name: &'static std::ffi::CStr = match all.iter().find(|s| **s as i32 == status) {
        Some(ETLLM_OK) => c"ETLLM_OK",
        Some(ETLLM_ERR_NULL_ARGUMENT) => c"ETLLM_ERR_NULL_ARGUMENT",
        Some(ETLLM_ERR_INVALID_UTF8) => c"ETLLM_ERR_INVALID_UTF8",
        Some(ETLLM_ERR_INVALID_ARGUMENT) => c"ETLLM_ERR_INVALID_ARGUMENT",
        Some(ETLLM_ERR_STRUCT_SIZE) => c"ETLLM_ERR_STRUCT_SIZE",
        Some(ETLLM_ERR_FILE_ACCESS) => c"ETLLM_ERR_FILE_ACCESS",
        Some(ETLLM_ERR_INVALID_MODEL) => c"ETLLM_ERR_INVALID_MODEL",
        Some(ETLLM_ERR_UNSUPPORTED_MODEL) => c"ETLLM_ERR_UNSUPPORTED_MODEL",
        Some(ETLLM_ERR_INVALID_TOKENIZER) => c"ETLLM_ERR_INVALID_TOKENIZER",
        Some(ETLLM_ERR_TOKENIZER) => c"ETLLM_ERR_TOKENIZER",
        Some(ETLLM_ERR_CONTEXT_FULL) => c"ETLLM_ERR_CONTEXT_FULL",
        Some(ETLLM_ERR_RUNTIME) => c"ETLLM_ERR_RUNTIME",
        Some(ETLLM_ERR_IO_MANAGER) => c"ETLLM_ERR_IO_MANAGER",
        Some(ETLLM_ERR_NOT_LOADED) => c"ETLLM_ERR_NOT_LOADED",
        Some(ETLLM_ERR_BUSY) => c"ETLLM_ERR_BUSY",
        Some(ETLLM_ERR_NOT_FOUND) => c"ETLLM_ERR_NOT_FOUND",
        Some(ETLLM_ERR_PANIC) => c"ETLLM_ERR_PANIC",
        Some(ETLLM_ERR_SAMPLER) => c"ETLLM_ERR_SAMPLER",
        Some(ETLLM_ERR_CHAT_TEMPLATE) => c"ETLLM_ERR_CHAT_TEMPLATE",
        Some(ETLLM_ERR_GRAMMAR) => c"ETLLM_ERR_GRAMMAR",
        Some(ETLLM_ERR_INVALID_STATE) => c"ETLLM_ERR_INVALID_STATE",
        Some(ETLLM_ERR_INVALID_MEDIA) => c"ETLLM_ERR_INVALID_MEDIA",
        Some(ETLLM_ERR_SERVER) => c"ETLLM_ERR_SERVER",
        None => c"unknown status",
    };
    name.as_ptr()
}
