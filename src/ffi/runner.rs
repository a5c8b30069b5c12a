//! `etllm_runner`: load a model and tokenizer, generate with streaming callbacks.

use std::ffi::{c_char, c_void};
use std::ops::ControlFlow;
use std::sync::{Mutex, MutexGuard};

use super::config::{etllm_generation_config, etllm_runner_options, read_config};
use super::error::{etllm_status, guard, FfiError};
use super::io_manager::CIoManager;
use super::stats::{check_stats_out, etllm_stats, write_stats};
use super::{c_slice, c_str, out_arg, read_versioned};
use crate::runner::{Runner, RunnerOptions, StopHandle, TokenPiece};
use crate::stats::Stats;

/// A runner: one model, one tokenizer, one conversation (KV cache). Opaque.
///
/// Thread rules: a runner may be used from any thread, one call at a time.
/// `etllm_runner_stop` is the exception: it may be called from any thread at any time,
/// including while `etllm_runner_generate` runs on another. Any other call made while a
/// call is in progress (from another thread, or from inside a callback of a running
/// generate) returns `ETLLM_ERR_BUSY` and changes nothing. `etllm_runner_free` must not
/// race with any other call on the same runner.
#[allow(non_camel_case_types)]
pub struct etllm_runner {
    runner: Mutex<Runner>,
    stop: StopHandle,
}

/// Called with each piece of generated text: `piece` points to `len` bytes of complete
/// UTF-8 (followed by a NUL that `len` does not count), valid only during the call. Use
/// `len`, not `strlen`: a model may generate the character U+0000, which is a NUL byte
/// inside the piece.
/// `token_id` is the generated token, or -1 for the echoed prompt and for bytes released
/// at the end. Return 0 to continue, non-zero to stop generating. It runs on the thread
/// that called generate and must not unwind (no C++ exception, no longjmp) out of it.
#[allow(non_camel_case_types)]
pub type etllm_token_callback = Option<
    unsafe extern "C" fn(
        user_data: *mut c_void,
        piece: *const c_char,
        len: usize,
        token_id: i64,
    ) -> i32,
>;

/// Called once when generation ends, with its stats (valid only during the call).
#[allow(non_camel_case_types)]
pub type etllm_stats_callback =
    Option<unsafe extern "C" fn(user_data: *mut c_void, stats: *const etllm_stats)>;

fn runner_ref<'a>(runner: *const etllm_runner) -> Result<&'a etllm_runner, FfiError> {
    // Safety: non-null pointers come from etllm_runner_new/open and stay valid until
    // etllm_runner_free, which the caller must not race with.
    unsafe { runner.as_ref() }.ok_or(FfiError::Null("runner"))
}

fn lock(r: &etllm_runner) -> Result<MutexGuard<'_, Runner>, FfiError> {
    super::lock_call(&r.runner)
}

/// Locks a runner for one call (`ETLLM_ERR_BUSY` if another call holds it).
pub(crate) fn lock_runner<'a>(
    runner: *mut etllm_runner,
) -> Result<MutexGuard<'a, Runner>, FfiError> {
    lock(runner_ref(runner)?)
}

fn options_from(ptr: *const etllm_runner_options) -> Result<RunnerOptions, FfiError> {
    let o = read_versioned(ptr, etllm_runner_options::default())?;
    // Take the manager first: from here on dropping it calls its destroy exactly once.
    let io_manager = if o.io_manager.is_null() {
        None
    } else {
        Some(Box::new(CIoManager::new(o.io_manager)?) as Box<dyn crate::IoManager>)
    };
    Ok(RunnerOptions {
        num_threads: (o.num_threads > 0).then_some(o.num_threads as usize),
        io_manager,
        preset: super::tokenizer::preset_from(o.preset)?,
        data_paths: c_slice(o.data_paths, o.num_data_paths, "options.data_paths")?
            .iter()
            .map(|&p| c_str(p, "options.data_paths[i]").map(std::path::PathBuf::from))
            .collect::<Result<_, _>>()?,
        method_name: if o.method_name.is_null() {
            None
        } else {
            Some(c_str(o.method_name, "options.method_name")?.to_string())
        },
        preprocessor_config: if o.preprocessor_config.is_null() {
            None
        } else {
            Some(c_str(o.preprocessor_config, "options.preprocessor_config")?.into())
        },
    })
}

/// Creates a runner handle in `*out_runner` (NULL on failure), loading it first when `load`.
fn create(
    model_path: *const c_char,
    tokenizer_path: *const c_char,
    options: *const etllm_runner_options,
    out_runner: *mut *mut etllm_runner,
    load: bool,
) -> etllm_status {
    guard(|| {
        if !out_runner.is_null() {
            // Safety: non-null, and the caller guarantees it is writable.
            unsafe { *out_runner = std::ptr::null_mut() };
        }
        // The options before the other arguments: they may carry a KV-cache manager,
        // whose destroy must run (when they are dropped) even if a later argument is bad.
        let options = options_from(options)?;
        let out = out_arg(out_runner, "out_runner")?;
        let model = c_str(model_path, "model_path")?;
        let tokenizer = c_str(tokenizer_path, "tokenizer_path")?;
        let mut runner = Runner::new(model, tokenizer, options);
        if load {
            runner.load()?;
        }
        let stop = runner.stop_handle();
        *out = Box::into_raw(Box::new(etllm_runner {
            runner: Mutex::new(runner),
            stop,
        }));
        Ok(())
    })
}

/// Creates a runner for `model_path` (a `.pte`) and `tokenizer_path` (any tokenizer
/// `etllm_tokenizer_load` reads: HF `tokenizer.json` or its folder, tiktoken, SentencePiece
/// or llama2.c) without reading them; `etllm_runner_load` (or the first generate)
/// loads. `options` may be NULL for the defaults. On success `*out_runner` is a new runner
/// that the caller frees with `etllm_runner_free`; on failure it is set to NULL.
#[no_mangle]
pub extern "C" fn etllm_runner_new(
    model_path: *const c_char,
    tokenizer_path: *const c_char,
    options: *const etllm_runner_options,
    out_runner: *mut *mut etllm_runner,
) -> etllm_status {
    create(model_path, tokenizer_path, options, out_runner, false)
}

/// `etllm_runner_new` followed by `etllm_runner_load`: on success `*out_runner` is a loaded
/// runner (free it with `etllm_runner_free`); on failure it is NULL and nothing needs
/// freeing.
#[no_mangle]
pub extern "C" fn etllm_runner_open(
    model_path: *const c_char,
    tokenizer_path: *const c_char,
    options: *const etllm_runner_options,
    out_runner: *mut *mut etllm_runner,
) -> etllm_status {
    create(model_path, tokenizer_path, options, out_runner, true)
}

/// Loads the tokenizer and model. Does nothing when already loaded. On failure the runner
/// stays unloaded and usable: loading can be tried again.
#[no_mangle]
pub extern "C" fn etllm_runner_load(runner: *mut etllm_runner) -> etllm_status {
    guard(|| Ok(lock(runner_ref(runner)?)?.load()?))
}

/// Sets `*out_loaded` to whether the runner is loaded.
#[no_mangle]
pub extern "C" fn etllm_runner_is_loaded(
    runner: *const etllm_runner,
    out_loaded: *mut bool,
) -> etllm_status {
    guard(|| {
        let out = out_arg(out_loaded, "out_loaded")?;
        *out = lock(runner_ref(runner)?)?.is_loaded();
        Ok(())
    })
}

/// Frees a runner. NULL is ignored. No other call on the runner may be in progress.
#[no_mangle]
pub extern "C" fn etllm_runner_free(runner: *mut etllm_runner) {
    super::free_handle(runner);
}

/// Streams one generation through the C callbacks.
pub(crate) fn stream<'a, T: 'a>(
    lock: impl FnOnce() -> Result<MutexGuard<'a, T>, FfiError>,
    config: *const etllm_generation_config,
    on_token: etllm_token_callback,
    on_stats: etllm_stats_callback,
    user_data: *mut c_void,
    out_stats: *mut etllm_stats,
    run: impl FnOnce(
        &mut T,
        &crate::GenerationConfig,
        &mut dyn FnMut(TokenPiece<'_>) -> ControlFlow<()>,
        &mut dyn FnMut(&Stats),
    ) -> crate::Result<Stats>,
) -> Result<(), FfiError> {
    let config = read_config(config)?;
    check_stats_out(out_stats)?;
    let mut guard = lock()?;
    let mut token_cb = token_callback(on_token, user_data);
    let mut stats_cb = |stats: &Stats| {
        if let Some(cb) = on_stats {
            let c = etllm_stats::from(stats);
            // Safety: the caller's callback; the stats live until it returns.
            unsafe { cb(user_data, &c) };
        }
    };
    let stats = run(&mut guard, &config, &mut token_cb, &mut stats_cb)?;
    write_stats(out_stats, &stats)
}

/// The caller's token callback as a closure over pieces: each piece is copied into a
/// NUL-terminated buffer that lives until the callback returns; a non-zero return stops.
pub(crate) fn token_callback(
    on_token: etllm_token_callback,
    user_data: *mut c_void,
) -> impl FnMut(TokenPiece<'_>) -> ControlFlow<()> {
    let mut buf: Vec<u8> = Vec::new();
    move |piece: TokenPiece<'_>| {
        let Some(cb) = on_token else {
            return ControlFlow::Continue(());
        };
        buf.clear();
        buf.extend_from_slice(piece.text.as_bytes());
        buf.push(0);
        let id = piece.token.map_or(-1, i64::from);
        // Safety: the caller's callback, with the caller's user data; the piece is a
        // NUL-terminated buffer of `len` bytes that lives until the callback returns.
        let rc = unsafe { cb(user_data, buf.as_ptr().cast(), piece.text.len(), id) };
        if rc == 0 {
            ControlFlow::Continue(())
        } else {
            ControlFlow::Break(())
        }
    }
}

/// Generates from `prompt` (UTF-8, NUL-terminated): the prompt is tokenized, `config.num_bos`
/// BOS and `config.num_eos` EOS tokens are added, and the generated text streams to
/// `on_token`. `on_stats` gets the stats at the end; they are also written to `out_stats`
/// when it is not NULL (initialize it with `etllm_stats_default()`). `config`, `on_token`,
/// `on_stats`, `user_data` and `out_stats` may be NULL. `user_data` is passed to both
/// callbacks.
///
/// The conversation continues across calls until `etllm_runner_reset`. An empty prompt is
/// accepted only to continue after an earlier call. A prompt that does not fit in the
/// context left returns `ETLLM_ERR_CONTEXT_FULL` and changes nothing; a failure midway
/// rolls the conversation back to where it was. Blocks until generation ends; stop it
/// early with a non-zero return from `on_token` or `etllm_runner_stop` from any thread.
#[no_mangle]
pub extern "C" fn etllm_runner_generate(
    runner: *mut etllm_runner,
    prompt: *const c_char,
    config: *const etllm_generation_config,
    on_token: etllm_token_callback,
    on_stats: etllm_stats_callback,
    user_data: *mut c_void,
    out_stats: *mut etllm_stats,
) -> etllm_status {
    guard(|| {
        let prompt = c_str(prompt, "prompt")?;
        let r = runner_ref(runner)?;
        stream(
            || lock(r),
            config,
            on_token,
            on_stats,
            user_data,
            out_stats,
            |r, c, t, s| r.generate(prompt, c, t, s),
        )
    })
}

/// Like `etllm_runner_generate`, from `num_ids` token ids instead of text (`num_bos` and
/// `num_eos` still apply). Every id must be below the model's vocabulary size.
#[no_mangle]
pub extern "C" fn etllm_runner_generate_tokens(
    runner: *mut etllm_runner,
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
        let r = runner_ref(runner)?;
        stream(
            || lock(r),
            config,
            on_token,
            on_stats,
            user_data,
            out_stats,
            |r, c, t, s| r.generate_from_ids(ids, c, t, s),
        )
    })
}

/// Feeds `prompt` into the conversation without generating (for example to restore chat
/// history); a following generate continues after it, and may then use an empty prompt.
/// Only `num_bos` and `num_eos` of `config` (which may be NULL) are used. `out_stats` may
/// be NULL.
#[no_mangle]
pub extern "C" fn etllm_runner_prefill(
    runner: *mut etllm_runner,
    prompt: *const c_char,
    config: *const etllm_generation_config,
    out_stats: *mut etllm_stats,
) -> etllm_status {
    guard(|| {
        let prompt = c_str(prompt, "prompt")?;
        let config = read_config(config)?;
        check_stats_out(out_stats)?;
        let stats = lock(runner_ref(runner)?)?.prefill(prompt, &config)?;
        write_stats(out_stats, &stats)
    })
}

/// Like `etllm_runner_prefill`, from `num_ids` token ids.
#[no_mangle]
pub extern "C" fn etllm_runner_prefill_tokens(
    runner: *mut etllm_runner,
    ids: *const u32,
    num_ids: usize,
    config: *const etllm_generation_config,
    out_stats: *mut etllm_stats,
) -> etllm_status {
    guard(|| {
        let ids = c_slice(ids, num_ids, "ids")?;
        let config = read_config(config)?;
        check_stats_out(out_stats)?;
        let stats = lock(runner_ref(runner)?)?.prefill_ids(ids, &config)?;
        write_stats(out_stats, &stats)
    })
}

/// Asks a running generate to end before its next model step. Safe to call from any
/// thread at any time, including from a callback. It only affects a generation already
/// running: the request is cleared when the next generate starts.
#[no_mangle]
pub extern "C" fn etllm_runner_stop(runner: *const etllm_runner) -> etllm_status {
    guard(|| {
        runner_ref(runner)?.stop.stop();
        Ok(())
    })
}

/// Rolls the conversation back to its first `pos` tokens (see `etllm_runner_position`), to
/// regenerate a reply or drop a turn; the next generate needs a non-empty prompt.
/// `ETLLM_ERR_INVALID_ARGUMENT` if `pos` is negative or past the position, or if a
/// static-attention model's sliding window has already dropped what rewinding needs.
#[no_mangle]
pub extern "C" fn etllm_runner_rewind(runner: *mut etllm_runner, pos: i64) -> etllm_status {
    guard(|| {
        let pos = usize::try_from(pos).map_err(|_| {
            FfiError::Core(crate::Error::InvalidArgument(format!(
                "position {pos} is negative"
            )))
        })?;
        lock(runner_ref(runner)?)?.rewind(pos)?;
        Ok(())
    })
}

/// Loads if needed and runs a short generation without callbacks, so the first real
/// request does not pay first-call costs; the conversation is empty afterwards.
#[no_mangle]
pub extern "C" fn etllm_runner_warmup(runner: *mut etllm_runner) -> etllm_status {
    guard(|| Ok(lock(runner_ref(runner)?)?.warmup()?))
}

/// Forgets the conversation: the next generate starts at position 0. Returns
/// `ETLLM_ERR_IO_MANAGER` if a custom KV-cache manager's reset fails (the position is 0
/// either way).
#[no_mangle]
pub extern "C" fn etllm_runner_reset(runner: *mut etllm_runner) -> etllm_status {
    guard(|| Ok(lock(runner_ref(runner)?)?.reset()?))
}

/// Reads one value of a loaded runner.
fn loaded_value<T>(
    runner: *const etllm_runner,
    out: *mut T,
    name: &'static str,
    get: impl FnOnce(&Runner) -> Result<T, FfiError>,
) -> etllm_status {
    guard(|| {
        let out = out_arg(out, name)?;
        let r = lock(runner_ref(runner)?)?;
        if !r.is_loaded() {
            return Err(FfiError::Core(crate::Error::NotLoaded(
                "call etllm_runner_load first".into(),
            )));
        }
        *out = get(&r)?;
        Ok(())
    })
}

/// Sets `*out` to the most positions (tokens) a conversation can hold. Needs a loaded runner.
#[no_mangle]
pub extern "C" fn etllm_runner_max_context_len(
    runner: *const etllm_runner,
    out: *mut i64,
) -> etllm_status {
    loaded_value(runner, out, "out", |r| {
        Ok(r.max_context().unwrap_or(0) as i64)
    })
}

/// Sets `*out` to the most tokens one model call accepts (`get_max_seq_len`). Needs a loaded runner.
#[no_mangle]
pub extern "C" fn etllm_runner_max_seq_len(
    runner: *const etllm_runner,
    out: *mut i64,
) -> etllm_status {
    loaded_value(runner, out, "out", |r| {
        Ok(r.metadata().map_or(0, |m| m.max_seq_len) as i64)
    })
}

/// Sets `*out` to the model's vocabulary size. Needs a loaded runner.
#[no_mangle]
pub extern "C" fn etllm_runner_vocab_size(
    runner: *const etllm_runner,
    out: *mut i64,
) -> etllm_status {
    loaded_value(runner, out, "out", |r| {
        Ok(r.vocab_size().unwrap_or(0) as i64)
    })
}

/// Sets `*out` to the BOS id in use (the model's `get_bos_id`, else the tokenizer's).
/// Returns `ETLLM_ERR_NOT_FOUND` when neither defines one. Needs a loaded runner.
#[no_mangle]
pub extern "C" fn etllm_runner_bos_id(runner: *const etllm_runner, out: *mut u32) -> etllm_status {
    loaded_value(runner, out, "out", |r| {
        r.bos_id().ok_or_else(|| {
            FfiError::NotFound("neither the model nor the tokenizer defines a BOS token".into())
        })
    })
}

/// Copies up to `capacity` EOS ids in use (the model's `get_eos_ids`, else the
/// tokenizer's) into `ids` and sets `*out_count` to how many there are in all (which may
/// exceed `capacity`; call with `capacity` 0 and `ids` NULL to ask for the count). Needs a
/// loaded runner.
#[no_mangle]
pub extern "C" fn etllm_runner_eos_ids(
    runner: *const etllm_runner,
    ids: *mut u32,
    capacity: usize,
    out_count: *mut usize,
) -> etllm_status {
    loaded_value(runner, out_count, "out_count", |r| {
        let eos = r.eos_ids();
        let n = eos.len().min(capacity);
        if n > 0 {
            if ids.is_null() {
                return Err(FfiError::Null("ids"));
            }
            // Safety: the caller guarantees `capacity` writable elements at `ids`.
            unsafe { std::ptr::copy_nonoverlapping(eos.as_ptr(), ids, n) };
        }
        Ok(eos.len())
    })
}

/// Sets `*out` to the tokens in the conversation so far (prompts and generated tokens
/// since the last reset). Needs a loaded runner.
#[no_mangle]
pub extern "C" fn etllm_runner_position(
    runner: *const etllm_runner,
    out: *mut i64,
) -> etllm_status {
    loaded_value(runner, out, "out", |r| Ok(r.position() as i64))
}
