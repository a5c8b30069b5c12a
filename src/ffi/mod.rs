//! The C ABI. A thin layer: argument checks, handle casts, the panic boundary and status
//! mapping; the behaviour lives in the safe core. `include/etllm.h` is generated from
//! this module by cbindgen (see `cbindgen.toml`), so the doc comments here are the C
//! reference manual.
//!
//! Rules that hold for every function (repeated in the header's preamble):
//! - Every fallible function returns an `etllm_status`; `etllm_last_error_message()` gives
//!   the message of the most recent call on the calling thread.
//! - No panic crosses the boundary: one becomes `ETLLM_ERR_PANIC`.
//! - Objects the library allocates are freed with the matching `*_free` function.

// The C entry points take raw pointers from C by design; each one checks them (null,
// UTF-8, sizes) before use, behind the panic boundary.
#![allow(clippy::not_unsafe_ptr_arg_deref)]

pub mod asr;
pub mod chat;
pub mod config;
pub mod error;
pub mod input;
pub mod io_manager;
pub mod runner;
pub mod sampler;
#[cfg(feature = "server")]
pub mod server;
pub mod session;
pub mod stats;
pub mod tokenizer;

use std::ffi::{c_char, CStr};

pub use error::etllm_status;
use error::FfiError;

/// Version of the EtLlm library, e.g. "0.1.0". The string is static; do not free it.
#[no_mangle]
pub extern "C" fn etllm_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}

/// Version of the ExecuTorch runtime EtLlm is built against, "1.5.1". Static; do not free.
#[no_mangle]
pub extern "C" fn etllm_executorch_version() -> *const c_char {
    c"1.5.1".as_ptr()
}

/// Frees a string that EtLlm allocated and handed to the caller (for example by
/// `etllm_stats_to_json`). NULL is ignored. Never pass a string from anywhere else.
#[no_mangle]
pub extern "C" fn etllm_string_free(s: *mut c_char) {
    if !s.is_null() {
        // Safety: the caller passes a pointer that CString::into_raw produced.
        drop(unsafe { std::ffi::CString::from_raw(s) });
    }
}

/// Reads a C string argument as UTF-8.
pub(crate) fn c_str<'a>(ptr: *const c_char, name: &'static str) -> Result<&'a str, FfiError> {
    if ptr.is_null() {
        return Err(FfiError::Null(name));
    }
    // Safety: non-null, and the caller guarantees a NUL-terminated string that lives for
    // the duration of the call.
    unsafe { CStr::from_ptr(ptr) }
        .to_str()
        .map_err(|_| FfiError::Utf8(name))
}

/// Frees a handle that `Box::into_raw` made, behind the panic boundary (a destructor that
/// panics must not unwind into C). NULL is ignored. The caller of the public `*_free`
/// guarantees the pointer came from the matching constructor and is freed once.
/// Locks a handle's object for one call: `ETLLM_ERR_BUSY` while another call holds it. A
/// lock poisoned by a panic in an earlier call is taken anyway: every mutation rolls back
/// on error, so the object is still consistent.
pub(crate) fn lock_call<T>(
    m: &std::sync::Mutex<T>,
) -> Result<std::sync::MutexGuard<'_, T>, FfiError> {
    match m.try_lock() {
        Ok(g) => Ok(g),
        Err(std::sync::TryLockError::Poisoned(p)) => Ok(p.into_inner()),
        Err(std::sync::TryLockError::WouldBlock) => Err(FfiError::Busy),
    }
}

pub(crate) fn free_handle<T>(handle: *mut T) {
    if handle.is_null() {
        return;
    }
    let _ = error::guard(|| {
        // Safety: see above.
        drop(unsafe { Box::from_raw(handle) });
        Ok(())
    });
}

/// Hands `text` to the caller as a new NUL-terminated string (freed with
/// `etllm_string_free`). Text holding a NUL byte cannot be a C string: an error.
pub(crate) fn out_string(out: &mut *mut c_char, text: String) -> Result<(), FfiError> {
    let s = std::ffi::CString::new(text).map_err(|_| {
        FfiError::Core(crate::Error::InvalidArgument(
            "the text holds a NUL byte and cannot be returned as a C string".into(),
        ))
    })?;
    *out = s.into_raw();
    Ok(())
}

/// An output argument, checked for NULL.
pub(crate) fn out_arg<'a, T>(ptr: *mut T, name: &'static str) -> Result<&'a mut T, FfiError> {
    // Safety: non-null, and the caller guarantees it points to writable storage for a T.
    unsafe { ptr.as_mut() }.ok_or(FfiError::Null(name))
}

/// A C array argument `(ptr, len)`; NULL is accepted only with `len == 0`.
pub(crate) fn c_slice<'a, T>(
    ptr: *const T,
    len: usize,
    name: &'static str,
) -> Result<&'a [T], FfiError> {
    if len == 0 {
        return Ok(&[]);
    }
    if ptr.is_null() {
        return Err(FfiError::Null(name));
    }
    // Safety: non-null, and the caller guarantees `len` readable elements.
    Ok(unsafe { std::slice::from_raw_parts(ptr, len) })
}

/// A struct that starts with `uint32_t struct_size` and may grow at its end. A caller's
/// `struct_size` must end on a field boundary of this version (an older version's size);
/// anything else would cut a field in half and is refused.
pub(crate) trait Versioned: Copy {
    /// The struct's name in messages.
    const NAME: &'static str;
    /// Every accepted size: the offset of each field after `struct_size`, and the whole size.
    fn valid_sizes() -> Vec<usize>;
}

/// The accepted sizes of a versioned struct: each listed field's offset, and its full size.
/// The list starts at the second field after `struct_size`, so that every accepted size
/// holds at least one field.
macro_rules! versioned {
    ($t:ty, $name:literal; $($field:ident),+) => {
        impl $crate::ffi::Versioned for $t {
            const NAME: &'static str = $name;
            fn valid_sizes() -> Vec<usize> {
                vec![$(std::mem::offset_of!($t, $field),)+ std::mem::size_of::<$t>()]
            }
        }
    };
}
pub(crate) use versioned;

/// Checks a caller's `struct_size` for `T`.
pub(crate) fn check_struct_size<T: Versioned>(size: usize) -> Result<(), FfiError> {
    if T::valid_sizes().contains(&size) {
        Ok(())
    } else {
        Err(FfiError::StructSize {
            name: T::NAME,
            given: size,
            known: std::mem::size_of::<T>(),
        })
    }
}

/// Reads a caller's versioned struct: `struct_size` (its first field, a `uint32_t`) says
/// how many bytes the caller's version has. Fields the caller's version lacks keep the
/// values of `defaults`. NULL means `defaults`.
pub(crate) fn read_versioned<T: Versioned>(ptr: *const T, defaults: T) -> Result<T, FfiError> {
    if ptr.is_null() {
        return Ok(defaults);
    }
    // Safety: every versioned struct starts with a uint32_t struct_size.
    let size = unsafe { *(ptr as *const u32) } as usize;
    check_struct_size::<T>(size)?;
    let mut value = defaults;
    // Safety: the caller's struct has `size` readable bytes, `size <= size_of::<T>()` and
    // ends on a field boundary; every field of these structs is valid for any bit pattern
    // except `bool`s, which the caller's compiler wrote as 0 or 1, and enums, which the
    // callers of this function check first.
    unsafe {
        std::ptr::copy_nonoverlapping(ptr as *const u8, &mut value as *mut T as *mut u8, size);
    }
    Ok(value)
}

/// Writes `value` into a caller's versioned struct, no further than its `struct_size`.
pub(crate) fn write_versioned<T: Versioned>(out: *mut T, value: &T) -> Result<(), FfiError> {
    // Safety: callers pass a non-null pointer whose struct starts with struct_size.
    let size = unsafe { *(out as *const u32) } as usize;
    check_struct_size::<T>(size)?;
    // Safety: the caller's struct holds `size` writable bytes; struct_size itself is then
    // put back to the caller's value.
    unsafe {
        std::ptr::copy_nonoverlapping(value as *const T as *const u8, out as *mut u8, size);
        *(out as *mut u32) = size as u32;
    }
    Ok(())
}
