//! `etllm_session`: conversations over one loaded model.

use std::ffi::{c_char, c_void};
use std::sync::{Mutex, MutexGuard};

use super::config::{etllm_generation_config, read_config};
use super::error::{etllm_status, guard, FfiError};
use super::runner::{
    etllm_runner, etllm_stats_callback, etllm_token_callback, lock_runner, stream,
};
use super::stats::{check_stats_out, etllm_stats, write_stats};
use super::tokenizer::malloc_copy;
use super::{c_slice, c_str, out_arg};
use crate::generate::StopHandle;
use crate::session::Session;

/// A session: a conversation of its own (KV cache, position, tokens) over a runner's
/// loaded model, which it shares with the runner and the runner's other sessions. Opaque;
/// made by `etllm_session_new`, freed with `etllm_session_free`.
///
/// Memory: the model's weights exist once. The model's KV cache holds the state of the
/// session (or runner) that ran last; when another one runs, that state is copied aside
/// (without its all-zero parts, so about the part of the cache in use) and the other's is
/// copied in. A session that keeps running pays nothing.
///
/// Thread rules: a session is used from one thread at a time; a second call on the same
/// session while one is in progress returns `ETLLM_ERR_BUSY`, except
/// `etllm_session_stop`, which may be called from any thread at any time. Sessions of
/// one model (and the runner itself) may be used from different threads at once: their
/// calls take turns, each waiting until the model is free (for the whole of a generate).
/// A call that needs the model (generate, prefill, rewind, reset, save or load state) made
/// from inside a callback of a running call on the same model returns `ETLLM_ERR_BUSY` and
/// changes nothing; calls that only read a session (position, tokens) work there. A session may outlive its runner: freeing the runner keeps the model
/// loaded until its last session is freed. `etllm_session_free` must not race with any
/// other call on the same session.
#[allow(non_camel_case_types)]
pub struct etllm_session {
    session: Mutex<Session>,
    stop: StopHandle,
}

fn session_ref<'a>(session: *const etllm_session) -> Result<&'a etllm_session, FfiError> {
    // Safety: non-null pointers come from etllm_session_new and stay valid until
    // etllm_session_free, which the caller must not race with.
    unsafe { session.as_ref() }.ok_or(FfiError::Null("session"))
}

fn lock(s: &etllm_session) -> Result<MutexGuard<'_, Session>, FfiError> {
    super::lock_call(&s.session)
}

pub(crate) fn lock_session<'a>(
    session: *const etllm_session,
) -> Result<MutexGuard<'a, Session>, FfiError> {
    lock(session_ref(session)?)
}

/// Opens a new, empty session over `runner`'s model, loading the runner first if it is
/// not loaded. The session has no sampler plugin and the runner's chat template. On
/// success `*out_session` is a new session the caller frees with `etllm_session_free`;
/// on failure it is set to NULL.
#[no_mangle]
pub extern "C" fn etllm_session_new(
    runner: *mut etllm_runner,
    out_session: *mut *mut etllm_session,
) -> etllm_status {
    guard(|| {
        let out = out_arg(out_session, "out_session")?;
        *out = std::ptr::null_mut();
        let session = lock_runner(runner)?.session()?;
        let stop = session.stop_handle();
        *out = Box::into_raw(Box::new(etllm_session {
            session: Mutex::new(session),
            stop,
        }));
        Ok(())
    })
}

/// Frees a session and the state it keeps. NULL is ignored.
#[no_mangle]
pub extern "C" fn etllm_session_free(session: *mut etllm_session) {
    super::free_handle(session);
}

/// `etllm_runner_generate` on this session's conversation.
#[no_mangle]
pub extern "C" fn etllm_session_generate(
    session: *mut etllm_session,
    prompt: *const c_char,
    config: *const etllm_generation_config,
    on_token: etllm_token_callback,
    on_stats: etllm_stats_callback,
    user_data: *mut c_void,
    out_stats: *mut etllm_stats,
) -> etllm_status {
    guard(|| {
        let prompt = c_str(prompt, "prompt")?;
        let s = session_ref(session)?;
        stream(
            || lock(s),
            config,
            on_token,
            on_stats,
            user_data,
            out_stats,
            |s, c, t, st| s.generate(prompt, c, t, st),
        )
    })
}

/// `etllm_runner_generate_tokens` on this session's conversation.
#[no_mangle]
pub extern "C" fn etllm_session_generate_tokens(
    session: *mut etllm_session,
    ids: *const u32,
    num_ids: usize,
    config: *const etllm_generation_config,
    on_token: etllm_token_callback,
    on_stats: etllm_stats_callback,
    user_data: *mut c_void,
    out_stats: *mut etllm_stats,
) -> etllm_status {
    guard(|| {
        let ids = c_slice(ids, num_ids, "ids")?;
        let s = session_ref(session)?;
        stream(
            || lock(s),
            config,
            on_token,
            on_stats,
            user_data,
            out_stats,
            |s, c, t, st| s.generate_from_ids(ids, c, t, st),
        )
    })
}

/// `etllm_runner_prefill` on this session's conversation.
#[no_mangle]
pub extern "C" fn etllm_session_prefill(
    session: *mut etllm_session,
    prompt: *const c_char,
    config: *const etllm_generation_config,
    out_stats: *mut etllm_stats,
) -> etllm_status {
    guard(|| {
        let prompt = c_str(prompt, "prompt")?;
        let config = read_config(config)?;
        check_stats_out(out_stats)?;
        let stats = lock_session(session)?.prefill(prompt, &config)?;
        write_stats(out_stats, &stats)
    })
}

/// `etllm_runner_prefill_tokens` on this session's conversation.
#[no_mangle]
pub extern "C" fn etllm_session_prefill_tokens(
    session: *mut etllm_session,
    ids: *const u32,
    num_ids: usize,
    config: *const etllm_generation_config,
    out_stats: *mut etllm_stats,
) -> etllm_status {
    guard(|| {
        let ids = c_slice(ids, num_ids, "ids")?;
        let config = read_config(config)?;
        check_stats_out(out_stats)?;
        let stats = lock_session(session)?.prefill_ids(ids, &config)?;
        write_stats(out_stats, &stats)
    })
}

/// Asks this session's running generate to stop; callable from any thread at any time.
#[no_mangle]
pub extern "C" fn etllm_session_stop(session: *const etllm_session) -> etllm_status {
    guard(|| {
        session_ref(session)?.stop.stop();
        Ok(())
    })
}

/// `etllm_runner_rewind` on this session's conversation.
#[no_mangle]
pub extern "C" fn etllm_session_rewind(session: *mut etllm_session, pos: i64) -> etllm_status {
    guard(|| {
        let pos = usize::try_from(pos).map_err(|_| {
            FfiError::Core(crate::Error::InvalidArgument(format!(
                "position {pos} is negative"
            )))
        })?;
        lock_session(session)?.rewind(pos)?;
        Ok(())
    })
}

/// Forgets this session's conversation (and the state it kept aside).
#[no_mangle]
pub extern "C" fn etllm_session_reset(session: *mut etllm_session) -> etllm_status {
    guard(|| Ok(lock_session(session)?.reset()?))
}

/// Tokens in this session's conversation (see `etllm_runner_position`).
#[no_mangle]
pub extern "C" fn etllm_session_position(
    session: *const etllm_session,
    out: *mut i64,
) -> etllm_status {
    guard(|| {
        let out = out_arg(out, "out")?;
        *out = lock_session(session)?.position() as i64;
        Ok(())
    })
}

/// Copies the conversation's tokens (those in the KV cache, then the last generated one)
/// into `ids`, at most `capacity` of them, and sets `*out_count` to how many there are
/// (which may be more than `capacity`: call again with a larger buffer). `ids` may be NULL
/// when `capacity` is 0.
#[no_mangle]
pub extern "C" fn etllm_session_tokens(
    session: *const etllm_session,
    ids: *mut u32,
    capacity: usize,
    out_count: *mut usize,
) -> etllm_status {
    guard(|| {
        let out = out_arg(out_count, "out_count")?;
        let tokens = lock_session(session)?.tokens();
        let n = tokens.len().min(capacity);
        if n > 0 {
            if ids.is_null() {
                return Err(FfiError::Null("ids"));
            }
            // Safety: the caller's buffer holds `capacity` >= n ids.
            unsafe { std::ptr::copy_nonoverlapping(tokens.as_ptr(), ids, n) };
        }
        *out = tokens.len();
        Ok(())
    })
}

/// Saves the session's state (its KV cache without the all-zero parts, the KV-cache
/// manager's state, its tokens) with `user_data_len` bytes of `user_data` (may be NULL
/// when the length is 0; EtLlm keeps them as they are, for example a chat's messages)
/// under a header naming the model. On success `*out_state` holds `*out_len` bytes that
/// the caller frees with `etllm_buffer_free`; on failure it is NULL. A KV-cache manager
/// without save/restore callbacks makes this `ETLLM_ERR_IO_MANAGER`.
#[no_mangle]
pub extern "C" fn etllm_session_save_state(
    session: *const etllm_session,
    user_data: *const u8,
    user_data_len: usize,
    out_state: *mut *mut u8,
    out_len: *mut usize,
) -> etllm_status {
    guard(|| {
        let out = out_arg(out_state, "out_state")?;
        *out = std::ptr::null_mut();
        let len = out_arg(out_len, "out_len")?;
        *len = 0;
        let data = c_slice(user_data, user_data_len, "user_data")?;
        let bytes = lock_session(session)?.save_state_with(data)?;
        *out = malloc_copy(&bytes, false)?;
        *len = bytes.len();
        Ok(())
    })
}

/// Restores a state that `etllm_session_save_state` made on a session of the same model
/// (in this process or another). On success the session continues that conversation,
/// token for token as the original would, and `*out_user_data` (may be NULL to ignore
/// it) holds its `*out_user_data_len` bytes of user data, freed with `etllm_buffer_free`.
/// A state that is not one, truncated or corrupt, from another model or refused by the
/// KV-cache manager is `ETLLM_ERR_INVALID_STATE`, and the session keeps its state.
#[no_mangle]
pub extern "C" fn etllm_session_load_state(
    session: *mut etllm_session,
    state: *const u8,
    state_len: usize,
    out_user_data: *mut *mut u8,
    out_user_data_len: *mut usize,
) -> etllm_status {
    guard(|| {
        clear_user_data(out_user_data, out_user_data_len);
        let bytes = c_slice(state, state_len, "state")?;
        let data = lock_session(session)?.load_state(bytes)?;
        write_user_data(&data, out_user_data, out_user_data_len)
    })
}

/// NULL and 0 in the optional user-data outputs, as they read after a failure.
fn clear_user_data(out_data: *mut *mut u8, out_len: *mut usize) {
    if !out_data.is_null() {
        // Safety: non-null, writable by the caller's contract.
        unsafe { *out_data = std::ptr::null_mut() };
    }
    if !out_len.is_null() {
        // Safety: as above.
        unsafe { *out_len = 0 };
    }
}

fn write_user_data(
    data: &[u8],
    out_data: *mut *mut u8,
    out_len: *mut usize,
) -> Result<(), FfiError> {
    if !out_data.is_null() {
        // Safety: non-null, writable by the caller's contract.
        unsafe { *out_data = malloc_copy(data, false)? };
    }
    if !out_len.is_null() {
        // Safety: as above.
        unsafe { *out_len = data.len() };
    }
    Ok(())
}

/// `etllm_session_save_state` into the file at `path` (UTF-8), written through a
/// temporary file beside it and renamed into place.
#[no_mangle]
pub extern "C" fn etllm_session_save_state_file(
    session: *const etllm_session,
    path: *const c_char,
    user_data: *const u8,
    user_data_len: usize,
) -> etllm_status {
    guard(|| {
        let path = c_str(path, "path")?;
        let data = c_slice(user_data, user_data_len, "user_data")?;
        lock_session(session)?.save_state_file(path, data)?;
        Ok(())
    })
}

/// `etllm_session_load_state` from the file at `path` (UTF-8); an unreadable file is
/// `ETLLM_ERR_FILE_ACCESS`.
#[no_mangle]
pub extern "C" fn etllm_session_load_state_file(
    session: *mut etllm_session,
    path: *const c_char,
    out_user_data: *mut *mut u8,
    out_user_data_len: *mut usize,
) -> etllm_status {
    guard(|| {
        clear_user_data(out_user_data, out_user_data_len);
        let path = c_str(path, "path")?;
        let data = lock_session(session)?.load_state_file(path)?;
        write_user_data(&data, out_user_data, out_user_data_len)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn null_arguments_are_errors_not_crashes() {
        let mut out = std::ptr::null_mut();
        assert_eq!(
            etllm_session_new(std::ptr::null_mut(), &mut out),
            etllm_status::ETLLM_ERR_NULL_ARGUMENT
        );
        assert!(out.is_null());
        assert_eq!(
            etllm_session_reset(std::ptr::null_mut()),
            etllm_status::ETLLM_ERR_NULL_ARGUMENT
        );
        etllm_session_free(std::ptr::null_mut());
    }
}
