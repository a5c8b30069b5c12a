//! `etllm_io_manager`: KV-cache managers written in C (or any language with a C FFI),
//! plugged into a runner through a vtable; `etllm_model_info`, what they see of the
//! model; and `etllm_state_buffer`, where they save their conversation state.

use std::cell::RefCell;
use std::ffi::{c_char, c_void, CStr, CString};

use super::error::{etllm_status, guard, FfiError};
use super::{c_slice, c_str, check_struct_size, out_arg, write_versioned};
use crate::error::{Error, Result};
use crate::io_manager::{IoManager, StepInputs};
use crate::model::ModelInfo;
use crate::tensor::{ConstValue, DType, TensorData, TensorView, ValueSpec};

/// Most dimensions an `etllm_tensor_view` describes.
pub const ETLLM_MAX_DIMS: usize = 8;

/// Element type of a tensor.
#[repr(C)]
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum etllm_dtype {
    /// 32-bit float.
    ETLLM_DTYPE_F32 = 0,
    /// 64-bit signed integer.
    ETLLM_DTYPE_I64 = 1,
    /// 32-bit signed integer.
    ETLLM_DTYPE_I32 = 2,
    /// Any other type (not accepted as a method input).
    ETLLM_DTYPE_OTHER = 3,
    /// IEEE 754 half-precision float (2 bytes). Method outputs of this type reach managers
    /// widened to `ETLLM_DTYPE_F32`; inputs may have it.
    ETLLM_DTYPE_F16 = 4,
    /// bfloat16 (2 bytes: the top half of an f32). Method outputs of this type reach
    /// managers widened to `ETLLM_DTYPE_F32`; inputs may have it.
    ETLLM_DTYPE_BF16 = 5,
}

/// A tensor passed across the boundary without a copy: element type, sizes, and a pointer
/// to contiguous row-major data. Views the library hands out are valid only until the
/// call that received them returns (outputs: until the next model step); views a manager
/// hands in must stay valid until its matching update call returns.
#[repr(C)]
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy)]
pub struct etllm_tensor_view {
    /// Element type.
    pub dtype: etllm_dtype,
    /// Number of dimensions, at most 8.
    pub ndim: u32,
    /// Sizes, outermost first; entries past `ndim` are ignored.
    pub sizes: [i64; ETLLM_MAX_DIMS],
    /// The elements (NULL in the input/output descriptions of `etllm_model_info`).
    pub data: *mut c_void,
    /// Size of the data in bytes: the product of the sizes times the element size.
    pub nbytes: usize,
}

/// One model step, as a manager's prepare function fills it in: the method to run and
/// every one of its inputs, in order. The method name and the input array are the
/// manager's and must stay valid until its matching update call returns.
#[repr(C)]
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy)]
pub struct etllm_step {
    /// Name of the method to run, e.g. "forward" (NUL-terminated).
    pub method: *const c_char,
    /// `num_inputs` input views.
    pub inputs: *const etllm_tensor_view,
    /// Number of inputs; must equal the method's input count.
    pub num_inputs: usize,
}

/// What the model's metadata says, for a manager's `load`. -1 where the model does not say.
/// Set `struct_size` to `sizeof(etllm_model_metadata)` before passing it to be filled.
#[repr(C)]
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy)]
pub struct etllm_model_metadata {
    /// `sizeof(etllm_model_metadata)` as the caller compiled it; the library writes no further.
    pub struct_size: u32,
    /// Most tokens per model call.
    pub max_seq_len: i64,
    /// Most positions the KV cache holds.
    pub max_context_len: i64,
    /// Vocabulary size, or -1.
    pub vocab_size: i64,
    /// BOS id, or -1.
    pub bos_id: i64,
    /// Whether the export uses a KV cache.
    pub use_kv_cache: bool,
    /// Whether `forward` accepts a variable number of tokens.
    pub enable_dynamic_shape: bool,
}

/// What a KV-cache manager sees of the model in its `load` function: methods with their
/// input and output descriptions, the constant (metadata) methods' values, and the
/// metadata. Opaque; valid only during that `load` call.
#[allow(non_camel_case_types)]
pub struct etllm_model_info(ModelInfo);

/// A KV-cache manager implemented by the caller: prepares every input of each model step
/// and receives every output. Fill it in starting from a zeroed struct with `struct_size`
/// set to `sizeof(etllm_io_manager)`, and pass it in `etllm_runner_options.io_manager`.
///
/// Ownership: the runner copies the struct when the runner is created and owns
/// `user_data` from then on; it calls `destroy(user_data)` exactly once: when the runner
/// is freed, or before `etllm_runner_new`/`etllm_runner_open` returns if they fail
/// (including when a required function is NULL). The one exception is a `struct_size`
/// this library does not know (in this struct or in the `etllm_runner_options` carrying
/// it), where nothing in the struct can be trusted and `destroy` is not called. A valid
/// `struct_size` is `sizeof(etllm_io_manager)` or, for a caller built against an older
/// header, that version's size.
///
/// Every function except `destroy` returns `ETLLM_OK` or an error status; on error it may
/// call `etllm_set_error_message` first to explain. An error ends the current generate
/// with `ETLLM_ERR_IO_MANAGER` and that message; the runner rolls the conversation back
/// and stays usable. Functions are called on the thread that called into the runner, one
/// at a time, in the order load, then for each step prepare_* followed by update_*;
/// `reset`, `rewind`, `save_state` and `restore_state` between steps. All functions are
/// required except `destroy`, `save_state` and `restore_state` (set both of these or
/// neither). If `rewind` fails while the runner rolls back a failed generate, the runner
/// calls `reset` and the conversation starts over; if `reset` fails, `etllm_runner_reset`
/// reports it.
///
/// Saved states: a manager that keeps a conversation's data between steps (its own KV
/// caches, its position, a token history) can save it with `save_state` and take it
/// back with `restore_state`, so that several conversations share one model and a
/// conversation can be stored and resumed; a manager without them (NULL, or a caller
/// built against a header that did not have them) serves one conversation and refuses
/// to save. The bytes are the manager's own format: put a tag and a version first, and
/// the layout they depend on (cache shapes and types), so that `restore_state` can
/// refuse a state of another manager, version or model. The model's own buffers (a KV
/// cache inside the program) are saved by EtLlm, not by the manager.
#[repr(C)]
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy)]
pub struct etllm_io_manager {
    /// `sizeof(etllm_io_manager)` as the caller compiled it.
    pub struct_size: u32,
    /// Passed to every function.
    pub user_data: *mut c_void,
    /// Called when the runner loads (again on each retry after a failed load): check the
    /// model fits, allocate buffers, and
    /// set `*out_max_prefill_chunk` (most tokens per prefill step, >= 1) and
    /// `*out_max_context` (most positions the manager can hold).
    pub load: Option<
        unsafe extern "C" fn(
            user_data: *mut c_void,
            model: *const etllm_model_info,
            out_max_prefill_chunk: *mut i64,
            out_max_context: *mut i64,
        ) -> etllm_status,
    >,
    /// Forget everything: the next step starts at position 0.
    pub reset: Option<unsafe extern "C" fn(user_data: *mut c_void) -> etllm_status>,
    /// Keep only the first `pos` positions.
    pub rewind: Option<unsafe extern "C" fn(user_data: *mut c_void, pos: i64) -> etllm_status>,
    /// Fill `*out_step` for a prefill step of `num_tokens` tokens starting at `start_pos`.
    pub prepare_prefill: Option<
        unsafe extern "C" fn(
            user_data: *mut c_void,
            tokens: *const u64,
            num_tokens: usize,
            start_pos: i64,
            out_step: *mut etllm_step,
        ) -> etllm_status,
    >,
    /// Take the outputs of the prefill step prepared last and point `*out_logits` at the
    /// `*out_vocab` logits predicting the next token (valid until the next step).
    pub update_prefill: Option<
        unsafe extern "C" fn(
            user_data: *mut c_void,
            outputs: *const etllm_tensor_view,
            num_outputs: usize,
            out_logits: *mut *const f32,
            out_vocab: *mut usize,
        ) -> etllm_status,
    >,
    /// Fill `*out_step` for a decode step of `token` at position `pos`.
    pub prepare_decode: Option<
        unsafe extern "C" fn(
            user_data: *mut c_void,
            token: u64,
            pos: i64,
            out_step: *mut etllm_step,
        ) -> etllm_status,
    >,
    /// As `update_prefill`, for the decode step prepared last.
    pub update_decode: Option<
        unsafe extern "C" fn(
            user_data: *mut c_void,
            outputs: *const etllm_tensor_view,
            num_outputs: usize,
            out_logits: *mut *const f32,
            out_vocab: *mut usize,
        ) -> etllm_status,
    >,
    /// Frees `user_data`; called exactly once. May be NULL.
    pub destroy: Option<unsafe extern "C" fn(user_data: *mut c_void)>,
    /// Appends the manager's conversation state to `buffer` with
    /// `etllm_state_buffer_append` (as many calls as it likes). `buffer` belongs to EtLlm
    /// and is valid only during this call: do not keep or free it. Called between steps,
    /// never between a prepare and its update. On error, whatever was appended is
    /// dropped. NULL (with `restore_state` NULL): the manager cannot save.
    pub save_state: Option<
        unsafe extern "C" fn(
            user_data: *mut c_void,
            buffer: *mut etllm_state_buffer,
        ) -> etllm_status,
    >,
    /// Replaces the manager's conversation state with the `len` bytes at `data`, which
    /// its `save_state` wrote (in this process or another, for the same model). `data`
    /// is valid only during this call: copy what you keep. Check everything before
    /// changing anything: on error the manager must keep the state it had, and stay
    /// usable. NULL (with `save_state` NULL): the manager cannot restore.
    pub restore_state: Option<
        unsafe extern "C" fn(user_data: *mut c_void, data: *const u8, len: usize) -> etllm_status,
    >,
}

/// A growable byte buffer that EtLlm owns, where a KV-cache manager's `save_state` writes
/// its state with `etllm_state_buffer_append`. Opaque.
///
/// Ownership and threads: the buffer EtLlm passes to `save_state` is valid only during
/// that call, on that thread; append to it, and never keep the pointer or free it. A
/// buffer made with `etllm_state_buffer_new`, to call a manager's `save_state` yourself
/// (a manager that saves the managers it wraps, each into a buffer of its own to learn
/// their lengths; a test), is the caller's until `etllm_state_buffer_free`, and is used
/// by one thread at a time.
#[allow(non_camel_case_types)]
pub struct etllm_state_buffer(Vec<u8>);

/// Makes an empty buffer in `*out_buffer`; free it with `etllm_state_buffer_free`.
#[no_mangle]
pub extern "C" fn etllm_state_buffer_new(out_buffer: *mut *mut etllm_state_buffer) -> etllm_status {
    guard(|| {
        // The argument is checked first: the buffer must not be made for nobody.
        let out = out_arg(out_buffer, "out_buffer")?;
        *out = Box::into_raw(Box::new(etllm_state_buffer(Vec::new())));
        Ok(())
    })
}

/// Appends the `len` bytes at `data` to `buffer` (copied; `data` may be NULL when `len` is
/// 0). `ETLLM_ERR_INVALID_ARGUMENT` when the buffer cannot grow that much (out of memory);
/// the buffer is then unchanged.
#[no_mangle]
pub extern "C" fn etllm_state_buffer_append(
    buffer: *mut etllm_state_buffer,
    data: *const c_void,
    len: usize,
) -> etllm_status {
    guard(|| {
        let buffer = out_arg(buffer, "buffer")?;
        let bytes = c_slice(data.cast::<u8>(), len, "data")?;
        buffer.0.try_reserve(len).map_err(|_| {
            Error::InvalidArgument(format!(
                "the state buffer cannot grow by {len} bytes past its {} (out of memory)",
                buffer.0.len()
            ))
        })?;
        buffer.0.extend_from_slice(bytes);
        Ok(())
    })
}

/// Sets `*out_data` to the buffer's bytes and `*out_len` to how many there are. The
/// pointer is valid until the buffer is appended to or freed.
#[no_mangle]
pub extern "C" fn etllm_state_buffer_data(
    buffer: *const etllm_state_buffer,
    out_data: *mut *const u8,
    out_len: *mut usize,
) -> etllm_status {
    guard(|| {
        // Safety: NULL or a live buffer, per the contract.
        let buffer = unsafe { buffer.as_ref() }.ok_or(FfiError::Null("buffer"))?;
        let out_data = out_arg(out_data, "out_data")?;
        *out_arg(out_len, "out_len")? = buffer.0.len();
        *out_data = buffer.0.as_ptr();
        Ok(())
    })
}

/// Frees a buffer made by `etllm_state_buffer_new`. NULL is ignored. Never pass the buffer
/// EtLlm hands to `save_state`.
#[no_mangle]
pub extern "C" fn etllm_state_buffer_free(buffer: *mut etllm_state_buffer) {
    super::free_handle(buffer);
}

thread_local! {
    static MANAGER_MESSAGE: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Sets the message that explains the error a plugin function (of an `etllm_io_manager` or
/// an `etllm_sampler`) is about to return (copied; NULL clears it). Call it from inside
/// that function, on the same thread. Has no effect elsewhere.
#[no_mangle]
pub extern "C" fn etllm_set_error_message(message: *const c_char) {
    let text = if message.is_null() {
        None
    } else {
        // Safety: non-null NUL-terminated string per the contract.
        Some(
            unsafe { CStr::from_ptr(message) }
                .to_string_lossy()
                .into_owned(),
        )
    };
    let _ = MANAGER_MESSAGE.try_with(|m| *m.borrow_mut() = text);
}

/// Runs one function of a caller's plugin (KV-cache manager or sampler) and turns a
/// failure into a message naming the function, its status and the plugin's own message.
pub(crate) fn call_plugin(
    what: &str,
    f: impl FnOnce() -> etllm_status,
) -> std::result::Result<(), String> {
    let _ = MANAGER_MESSAGE.try_with(|m| m.borrow_mut().take());
    let status = f();
    let message = MANAGER_MESSAGE
        .try_with(|m| m.borrow_mut().take())
        .ok()
        .flatten();
    if status == etllm_status::ETLLM_OK {
        return Ok(());
    }
    let name = super::error::status_name(status);
    Err(match message {
        Some(m) => format!("{what} failed ({name}): {m}"),
        None => format!("{what} failed ({name})"),
    })
}

/// A caller's vtable as a Rust [`IoManager`]. Calls `destroy` once when dropped.
pub(crate) struct CIoManager {
    vt: etllm_io_manager,
    max_chunk: usize,
    max_context: usize,
    /// The method name of the step prepared last.
    method: String,
    /// Output views handed to the update function.
    out_views: Vec<etllm_tensor_view>,
}

// Safety: the caller's contract says the manager may be called from whichever thread
// calls into the runner, one call at a time (the runner's own lock guarantees that).
unsafe impl Send for CIoManager {}

impl Drop for CIoManager {
    fn drop(&mut self) {
        if let Some(destroy) = self.vt.destroy {
            // Safety: called exactly once, with the caller's own user data.
            unsafe { destroy(self.vt.user_data) };
        }
    }
}

impl CIoManager {
    /// Takes ownership of the caller's vtable (so `destroy` runs exactly once from here
    /// on), then checks it.
    pub(crate) fn new(ptr: *const etllm_io_manager) -> std::result::Result<Self, FfiError> {
        // Safety: non-null (checked by the caller); the struct starts with struct_size.
        let size = unsafe { (*ptr).struct_size } as usize;
        let ours = std::mem::size_of::<etllm_io_manager>();
        let mut vt: etllm_io_manager = etllm_io_manager {
            struct_size: ours as u32,
            user_data: std::ptr::null_mut(),
            load: None,
            reset: None,
            rewind: None,
            prepare_prefill: None,
            update_prefill: None,
            prepare_decode: None,
            update_decode: None,
            destroy: None,
            save_state: None,
            restore_state: None,
        };
        // A size that is not one of this struct's field boundaries would cut a function
        // pointer in half; with it even `destroy` cannot be trusted, so it is not called.
        check_struct_size::<etllm_io_manager>(size)?;
        // Safety: the caller's struct has `size` readable bytes of this layout, ending on a
        // field boundary.
        unsafe {
            std::ptr::copy_nonoverlapping(ptr as *const u8, &mut vt as *mut _ as *mut u8, size)
        };
        let manager = Self {
            vt,
            max_chunk: 1,
            max_context: 0,
            method: String::new(),
            out_views: Vec::new(),
        };
        let missing = [
            ("load", vt.load.is_none()),
            ("reset", vt.reset.is_none()),
            ("rewind", vt.rewind.is_none()),
            ("prepare_prefill", vt.prepare_prefill.is_none()),
            ("update_prefill", vt.update_prefill.is_none()),
            ("prepare_decode", vt.prepare_decode.is_none()),
            ("update_decode", vt.update_decode.is_none()),
        ]
        .iter()
        .filter(|(_, m)| *m)
        .map(|(n, _)| *n)
        .collect::<Vec<_>>();
        if !missing.is_empty() {
            // Dropping `manager` calls destroy: the runner owns user_data from here on.
            drop(manager);
            return Err(FfiError::Null(if missing.len() == 1 {
                missing[0]
            } else {
                "io_manager functions"
            }));
        }
        if vt.save_state.is_some() != vt.restore_state.is_some() {
            let (set, unset) = match vt.save_state {
                Some(_) => ("save_state", "restore_state"),
                None => ("restore_state", "save_state"),
            };
            drop(manager);
            return Err(FfiError::Core(Error::InvalidArgument(format!(
                "the io_manager sets {set} but not {unset}; a manager saves and restores its \
                 state with both, or with neither"
            ))));
        }
        Ok(manager)
    }

    /// Runs one manager function and turns a failure into an IoManager error.
    fn call(&self, what: &str, f: impl FnOnce() -> etllm_status) -> Result<()> {
        call_plugin(what, f).map_err(Error::IoManager)
    }

    fn step<'s>(&'s mut self, step: etllm_step) -> Result<StepInputs<'s>> {
        if step.method.is_null() {
            return Err(Error::IoManager("the step's method name is NULL".into()));
        }
        // Safety: a NUL-terminated name the manager keeps alive until its update call.
        self.method = unsafe { CStr::from_ptr(step.method) }
            .to_str()
            .map_err(|_| Error::IoManager("the step's method name is not UTF-8".into()))?
            .to_string();
        if step.num_inputs > 0 && step.inputs.is_null() {
            return Err(Error::IoManager("the step's inputs are NULL".into()));
        }
        let views = if step.num_inputs == 0 {
            &[][..]
        } else {
            // Safety: `num_inputs` views the manager keeps alive until its update call.
            unsafe { std::slice::from_raw_parts(step.inputs, step.num_inputs) }
        };
        let inputs = views
            .iter()
            .enumerate()
            .map(|(i, v)| view_from_c(v).map_err(|e| Error::IoManager(format!("input {i}: {e}"))))
            .collect::<Result<Vec<_>>>()?;
        Ok(StepInputs {
            method: &self.method,
            inputs,
        })
    }

    fn update<'o>(&mut self, outputs: &[TensorView<'o>], prefill: bool) -> Result<&'o [f32]> {
        self.out_views.clear();
        self.out_views.extend(outputs.iter().map(view_to_c));
        let mut logits: *const f32 = std::ptr::null();
        let mut vocab = 0usize;
        let f = if prefill {
            self.vt.update_prefill
        } else {
            self.vt.update_decode
        }
        .expect("checked at creation");
        let (ud, views) = (self.vt.user_data, &self.out_views);
        self.call(
            if prefill {
                "update_prefill"
            } else {
                "update_decode"
            },
            || {
                // Safety: the caller's function, with views valid for the call.
                unsafe { f(ud, views.as_ptr(), views.len(), &mut logits, &mut vocab) }
            },
        )?;
        if logits.is_null() || vocab == 0 {
            return Err(Error::IoManager("the update returned no logits".into()));
        }
        // Safety: the manager guarantees `vocab` floats at `logits`, valid until the next
        // step, which cannot start before the runner has sampled from them.
        Ok(unsafe { std::slice::from_raw_parts(logits, vocab) })
    }
}

fn dtype_to_c(d: DType) -> etllm_dtype {
    match d {
        DType::F32 => etllm_dtype::ETLLM_DTYPE_F32,
        DType::I64 => etllm_dtype::ETLLM_DTYPE_I64,
        DType::I32 => etllm_dtype::ETLLM_DTYPE_I32,
        DType::F16 => etllm_dtype::ETLLM_DTYPE_F16,
        DType::BF16 => etllm_dtype::ETLLM_DTYPE_BF16,
        _ => etllm_dtype::ETLLM_DTYPE_OTHER,
    }
}

fn sizes_to_c(sizes: &[usize]) -> (u32, [i64; ETLLM_MAX_DIMS]) {
    let mut out = [0i64; ETLLM_MAX_DIMS];
    for (o, &s) in out.iter_mut().zip(sizes) {
        *o = s as i64;
    }
    (sizes.len().min(ETLLM_MAX_DIMS) as u32, out)
}

fn view_to_c(t: &TensorView<'_>) -> etllm_tensor_view {
    let (ndim, sizes) = sizes_to_c(&t.sizes);
    let (ptr, nbytes) = match t.data {
        TensorData::F32(v) => (v.as_ptr() as *mut c_void, std::mem::size_of_val(v)),
        TensorData::I64(v) => (v.as_ptr() as *mut c_void, std::mem::size_of_val(v)),
        TensorData::I32(v) => (v.as_ptr() as *mut c_void, std::mem::size_of_val(v)),
        TensorData::F16(v) => (v.as_ptr() as *mut c_void, std::mem::size_of_val(v)),
        TensorData::BF16(v) => (v.as_ptr() as *mut c_void, std::mem::size_of_val(v)),
        TensorData::Bytes(_, b) => (b.as_ptr() as *mut c_void, b.len()),
    };
    etllm_tensor_view {
        dtype: dtype_to_c(t.dtype()),
        ndim,
        sizes,
        data: ptr,
        nbytes,
    }
}

/// A caller's input view as a borrowed tensor, checked for consistency.
fn view_from_c<'a>(v: &etllm_tensor_view) -> std::result::Result<TensorView<'a>, String> {
    let ndim = v.ndim as usize;
    if ndim > ETLLM_MAX_DIMS {
        return Err(format!("ndim {ndim} exceeds {ETLLM_MAX_DIMS}"));
    }
    let sizes: Vec<usize> = v.sizes[..ndim]
        .iter()
        .map(|&s| usize::try_from(s).map_err(|_| format!("negative size {s}")))
        .collect::<std::result::Result<_, _>>()?;
    let numel: usize = sizes.iter().product();
    // The raw dtype value is checked before it is read as the enum.
    // Safety: reading the first 4 bytes of the view as the integer the C enum is.
    let raw = unsafe { *(v as *const etllm_tensor_view as *const u32) };
    let elem = match raw {
        0 => 4,
        1 => 8,
        2 => 4,
        4 | 5 => 2,
        _ => return Err(format!("dtype {raw} cannot be a method input")),
    };
    if v.nbytes != numel * elem {
        return Err(format!(
            "nbytes {} does not match sizes {sizes:?}",
            v.nbytes
        ));
    }
    if v.data.is_null() || !(v.data as usize).is_multiple_of(elem) {
        return Err("data is NULL or misaligned".into());
    }
    // Safety: the manager guarantees `nbytes` readable, aligned bytes that stay valid
    // until its update call returns, which happens before the runner drops this view.
    let data = unsafe {
        match raw {
            0 => TensorData::F32(std::slice::from_raw_parts(v.data as *const f32, numel)),
            1 => TensorData::I64(std::slice::from_raw_parts(v.data as *const i64, numel)),
            2 => TensorData::I32(std::slice::from_raw_parts(v.data as *const i32, numel)),
            4 => TensorData::F16(std::slice::from_raw_parts(
                v.data as *const crate::tensor::f16,
                numel,
            )),
            _ => TensorData::BF16(std::slice::from_raw_parts(
                v.data as *const crate::tensor::bf16,
                numel,
            )),
        }
    };
    Ok(TensorView { sizes, data })
}

impl IoManager for CIoManager {
    fn load(&mut self, model: &ModelInfo) -> Result<()> {
        let info = etllm_model_info(model.clone());
        let (mut chunk, mut context) = (0i64, 0i64);
        let (f, ud) = (self.vt.load.expect("checked"), self.vt.user_data);
        // Safety: the caller's function; `info` lives for the call.
        let loaded = self.call("load", || unsafe { f(ud, &info, &mut chunk, &mut context) });
        clear_names();
        loaded?;
        if chunk < 1 || context < 1 {
            return Err(Error::IoManager(format!(
                "load set max_prefill_chunk {chunk} and max_context {context}; both must be >= 1"
            )));
        }
        self.max_chunk = chunk as usize;
        self.max_context = context as usize;
        Ok(())
    }

    fn max_prefill_chunk(&self) -> usize {
        self.max_chunk
    }

    fn max_context(&self) -> usize {
        self.max_context
    }

    fn reset(&mut self) -> Result<()> {
        let (f, ud) = (self.vt.reset.expect("checked"), self.vt.user_data);
        // Safety: the caller's function.
        self.call("reset", || unsafe { f(ud) })
    }

    fn rewind(&mut self, pos: usize) -> Result<()> {
        let (f, ud) = (self.vt.rewind.expect("checked"), self.vt.user_data);
        // Safety: the caller's function.
        self.call("rewind", || unsafe { f(ud, pos as i64) })
    }

    fn prepare_prefill(&mut self, tokens: &[u64], start_pos: usize) -> Result<StepInputs<'_>> {
        let mut step = etllm_step {
            method: std::ptr::null(),
            inputs: std::ptr::null(),
            num_inputs: 0,
        };
        let (f, ud) = (self.vt.prepare_prefill.expect("checked"), self.vt.user_data);
        // Safety: the caller's function; `tokens` lives for the call.
        self.call("prepare_prefill", || unsafe {
            f(
                ud,
                tokens.as_ptr(),
                tokens.len(),
                start_pos as i64,
                &mut step,
            )
        })?;
        self.step(step)
    }

    fn update_prefill<'o>(&mut self, outputs: &[TensorView<'o>]) -> Result<&'o [f32]> {
        self.update(outputs, true)
    }

    fn prepare_decode(&mut self, token: u64, pos: usize) -> Result<StepInputs<'_>> {
        let mut step = etllm_step {
            method: std::ptr::null(),
            inputs: std::ptr::null(),
            num_inputs: 0,
        };
        let (f, ud) = (self.vt.prepare_decode.expect("checked"), self.vt.user_data);
        // Safety: the caller's function.
        self.call("prepare_decode", || unsafe {
            f(ud, token, pos as i64, &mut step)
        })?;
        self.step(step)
    }

    fn update_decode<'o>(&mut self, outputs: &[TensorView<'o>]) -> Result<&'o [f32]> {
        self.update(outputs, false)
    }

    fn save_state(&mut self, out: &mut Vec<u8>) -> Result<()> {
        let (Some(f), ud) = (self.vt.save_state, self.vt.user_data) else {
            return Err(Error::IoManager(
                "this KV-cache manager cannot save its state (its etllm_io_manager.save_state \
                 is NULL)"
                    .into(),
            ));
        };
        // The caller's bytes go straight into `out`, moved in and out of the buffer.
        let start = out.len();
        let mut buffer = etllm_state_buffer(std::mem::take(out));
        // Safety: the caller's function; the buffer lives for the call.
        let saved = self.call("save_state", || unsafe { f(ud, &mut buffer) });
        *out = buffer.0;
        if saved.is_err() {
            out.truncate(start);
        }
        saved
    }

    fn restore_state(&mut self, state: &[u8]) -> Result<()> {
        let (Some(f), ud) = (self.vt.restore_state, self.vt.user_data) else {
            return Err(Error::IoManager(
                "this KV-cache manager cannot restore a state (its \
                 etllm_io_manager.restore_state is NULL)"
                    .into(),
            ));
        };
        // Safety: the caller's function; `state` lives for the call.
        self.call("restore_state", || unsafe {
            f(ud, state.as_ptr(), state.len())
        })
    }
}

fn info_ref<'a>(info: *const etllm_model_info) -> std::result::Result<&'a ModelInfo, FfiError> {
    // Safety: non-null pointers are the one passed to the manager's load, valid during it.
    unsafe { info.as_ref() }
        .map(|i| &i.0)
        .ok_or(FfiError::Null("model"))
}

fn method<'a>(
    info: *const etllm_model_info,
    name: *const c_char,
) -> std::result::Result<&'a crate::tensor::MethodInfo, FfiError> {
    let info = info_ref(info)?;
    let name = c_str(name, "method")?;
    info.methods
        .get(name)
        .ok_or_else(|| FfiError::NotFound(format!("the model has no method `{name}`")))
}

/// Sets `*out_count` to the number of (non-constant) methods.
#[no_mangle]
pub extern "C" fn etllm_model_info_num_methods(
    model: *const etllm_model_info,
    out_count: *mut usize,
) -> etllm_status {
    guard(|| {
        *out_arg(out_count, "out_count")? = info_ref(model)?.methods.len();
        Ok(())
    })
}

/// Sets `*out_name` to the name of method `index` (in name order). The string belongs to
/// the model info and is valid during the manager's `load` call.
#[no_mangle]
pub extern "C" fn etllm_model_info_method_name(
    model: *const etllm_model_info,
    index: usize,
    out_name: *mut *const c_char,
) -> etllm_status {
    guard(|| {
        let out = out_arg(out_name, "out_name")?;
        let info = info_ref(model)?;
        let name = info
            .methods
            .keys()
            .nth(index)
            .ok_or_else(|| FfiError::NotFound(format!("no method at index {index}")))?;
        *out = NAMES.with(|n| {
            let mut n = n.borrow_mut();
            n.push(CString::new(name.as_str()).unwrap_or_default());
            n.last().expect("pushed").as_ptr()
        });
        Ok(())
    })
}

thread_local! {
    /// Method names handed out during a manager's load; cleared when the runner's load
    /// returns.
    static NAMES: RefCell<Vec<CString>> = const { RefCell::new(Vec::new()) };
}

/// Sets the input and output counts of method `method`; `ETLLM_ERR_NOT_FOUND` if the model
/// has no such method.
#[no_mangle]
pub extern "C" fn etllm_model_info_method(
    model: *const etllm_model_info,
    method_name: *const c_char,
    out_num_inputs: *mut usize,
    out_num_outputs: *mut usize,
) -> etllm_status {
    guard(|| {
        let m = method(model, method_name)?;
        *out_arg(out_num_inputs, "out_num_inputs")? = m.inputs.len();
        *out_arg(out_num_outputs, "out_num_outputs")? = m.outputs.len();
        Ok(())
    })
}

fn describe(spec: &ValueSpec) -> std::result::Result<etllm_tensor_view, FfiError> {
    let t = spec
        .tensor()
        .ok_or_else(|| FfiError::NotFound("that value is not a tensor".into()))?;
    let (ndim, sizes) = sizes_to_c(&t.sizes);
    Ok(etllm_tensor_view {
        dtype: dtype_to_c(t.dtype),
        ndim,
        sizes,
        data: std::ptr::null_mut(),
        nbytes: t.numel() * t.dtype.size(),
    })
}

/// Writes the description of input (or output) `index` of a method to `*out`.
fn describe_value(
    model: *const etllm_model_info,
    method_name: *const c_char,
    index: usize,
    out: *mut etllm_tensor_view,
    output: bool,
) -> etllm_status {
    guard(|| {
        let m = method(model, method_name)?;
        let (values, what) = if output {
            (&m.outputs, "output")
        } else {
            (&m.inputs, "input")
        };
        let spec = values
            .get(index)
            .ok_or_else(|| FfiError::NotFound(format!("`{}` has no {what} {index}", m.name)))?;
        *out_arg(out, "out")? = describe(spec)?;
        Ok(())
    })
}

/// Describes input `index` of method `method` in `*out` (data NULL; for a dynamic-shape
/// input the sizes are the upper bound). `ETLLM_ERR_NOT_FOUND` if it does not exist or is
/// not a tensor.
#[no_mangle]
pub extern "C" fn etllm_model_info_input(
    model: *const etllm_model_info,
    method_name: *const c_char,
    index: usize,
    out: *mut etllm_tensor_view,
) -> etllm_status {
    describe_value(model, method_name, index, out, false)
}

/// Describes output `index` of method `method`, as `etllm_model_info_input`.
#[no_mangle]
pub extern "C" fn etllm_model_info_output(
    model: *const etllm_model_info,
    method_name: *const c_char,
    index: usize,
    out: *mut etllm_tensor_view,
) -> etllm_status {
    describe_value(model, method_name, index, out, true)
}

fn constant<'a>(
    model: *const etllm_model_info,
    name: *const c_char,
) -> std::result::Result<&'a ConstValue, FfiError> {
    let info = info_ref(model)?;
    let name = c_str(name, "name")?;
    info.constants
        .get(name)
        .ok_or_else(|| FfiError::NotFound(format!("the model has no constant method `{name}`")))
}

/// Copies up to `capacity` integers of constant method `name` (an int, bool, int list or
/// integer tensor, flattened) into `values`, and sets `*out_count` to how many it has.
/// `ETLLM_ERR_NOT_FOUND` if there is no such constant, `ETLLM_ERR_INVALID_ARGUMENT` if it
/// is not integers.
#[no_mangle]
pub extern "C" fn etllm_model_info_constant_ints(
    model: *const etllm_model_info,
    name: *const c_char,
    values: *mut i64,
    capacity: usize,
    out_count: *mut usize,
) -> etllm_status {
    guard(|| {
        let v = constant(model, name)?.as_ints().ok_or_else(|| {
            FfiError::Core(Error::InvalidArgument(
                "that constant is not integers".into(),
            ))
        })?;
        copy_out(&v, values, capacity)?;
        *out_arg(out_count, "out_count")? = v.len();
        Ok(())
    })
}

/// Copies up to `capacity` floats of constant method `name` (a float tensor, flattened
/// row-major; `etllm_model_info_constant_shape` gives its shape) into `values`, and sets
/// `*out_count` to how many it has. `ETLLM_ERR_NOT_FOUND` if there is no such constant,
/// `ETLLM_ERR_INVALID_ARGUMENT` if it is not floats.
#[no_mangle]
pub extern "C" fn etllm_model_info_constant_floats(
    model: *const etllm_model_info,
    name: *const c_char,
    values: *mut f32,
    capacity: usize,
    out_count: *mut usize,
) -> etllm_status {
    guard(|| {
        let v = match constant(model, name)? {
            ConstValue::FloatTensor { data, .. } => data.clone(),
            ConstValue::Double(d) => vec![*d as f32],
            _ => {
                return Err(FfiError::Core(Error::InvalidArgument(
                    "that constant is not floats".into(),
                )))
            }
        };
        copy_out(&v, values, capacity)?;
        *out_arg(out_count, "out_count")? = v.len();
        Ok(())
    })
}

fn copy_out<T: Copy>(v: &[T], dst: *mut T, capacity: usize) -> std::result::Result<(), FfiError> {
    let n = v.len().min(capacity);
    if n > 0 {
        if dst.is_null() {
            return Err(FfiError::Null("values"));
        }
        // Safety: the caller guarantees `capacity` writable elements.
        unsafe { std::ptr::copy_nonoverlapping(v.as_ptr(), dst, n) };
    }
    Ok(())
}

/// Sets the shape of constant method `name`'s value: `*out_ndim` dimensions in `sizes`
/// (a scalar has 0, a list 1). `ETLLM_ERR_NOT_FOUND` if there is no such constant.
#[no_mangle]
pub extern "C" fn etllm_model_info_constant_shape(
    model: *const etllm_model_info,
    name: *const c_char,
    sizes: *mut i64,
    out_ndim: *mut u32,
) -> etllm_status {
    guard(|| {
        let shape: Vec<usize> = match constant(model, name)? {
            ConstValue::IntTensor { sizes, .. } | ConstValue::FloatTensor { sizes, .. } => {
                sizes.clone()
            }
            ConstValue::IntList(v) => vec![v.len()],
            _ => Vec::new(),
        };
        if shape.len() > ETLLM_MAX_DIMS {
            return Err(FfiError::Core(Error::InvalidArgument(format!(
                "the constant has {} dimensions, more than {ETLLM_MAX_DIMS}",
                shape.len()
            ))));
        }
        let (ndim, c_sizes) = sizes_to_c(&shape);
        if ndim > 0 {
            if sizes.is_null() {
                return Err(FfiError::Null("sizes"));
            }
            // Safety: the caller provides room for ETLLM_MAX_DIMS sizes.
            unsafe { std::ptr::copy_nonoverlapping(c_sizes.as_ptr(), sizes, ndim as usize) };
        }
        *out_arg(out_ndim, "out_ndim")? = ndim;
        Ok(())
    })
}

/// Fills `*out` with the model's metadata, no further than its `struct_size`.
#[no_mangle]
pub extern "C" fn etllm_model_info_metadata(
    model: *const etllm_model_info,
    out: *mut etllm_model_metadata,
) -> etllm_status {
    guard(|| {
        let m = &info_ref(model)?.metadata;
        let out = out_arg(out, "out")?;
        let value = etllm_model_metadata {
            struct_size: std::mem::size_of::<etllm_model_metadata>() as u32,
            max_seq_len: m.max_seq_len as i64,
            max_context_len: m.max_context_len as i64,
            vocab_size: m.vocab_size.map_or(-1, |v| v as i64),
            bos_id: m.bos_id.map_or(-1, i64::from),
            use_kv_cache: m.use_kv_cache,
            enable_dynamic_shape: m.enable_dynamic_shape,
        };
        write_versioned(out, &value)?;
        Ok(())
    })
}

/// Frees the method names handed out during a manager's load.
pub(crate) fn clear_names() {
    let _ = NAMES.try_with(|n| n.borrow_mut().clear());
}

super::versioned!(etllm_io_manager, "io_manager"; load, reset, rewind,
    prepare_prefill, update_prefill, prepare_decode, update_decode, destroy, save_state,
    restore_state);
super::versioned!(etllm_model_metadata, "metadata"; max_context_len, vocab_size,
    bos_id, use_kv_cache, enable_dynamic_shape);

#[cfg(test)]
mod tests {
    //! The vtable adapter's save and restore, with callbacks written as a C manager would.
    use super::*;
    use etllm_status::*;

    /// A manager whose conversation state is a byte string.
    #[derive(Default)]
    struct Fake {
        state: Vec<u8>,
        saves: usize,
        restores: usize,
        fail: bool,
    }

    fn fake<'a>(ud: *mut c_void) -> &'a mut Fake {
        // Safety: every vtable here carries a live `Fake`.
        unsafe { &mut *ud.cast::<Fake>() }
    }

    unsafe extern "C" fn load(
        _: *mut c_void,
        _: *const etllm_model_info,
        _: *mut i64,
        _: *mut i64,
    ) -> etllm_status {
        ETLLM_OK
    }
    unsafe extern "C" fn reset(_: *mut c_void) -> etllm_status {
        ETLLM_OK
    }
    unsafe extern "C" fn rewind(_: *mut c_void, _: i64) -> etllm_status {
        ETLLM_OK
    }
    unsafe extern "C" fn prepare_prefill(
        _: *mut c_void,
        _: *const u64,
        _: usize,
        _: i64,
        _: *mut etllm_step,
    ) -> etllm_status {
        ETLLM_OK
    }
    unsafe extern "C" fn prepare_decode(
        _: *mut c_void,
        _: u64,
        _: i64,
        _: *mut etllm_step,
    ) -> etllm_status {
        ETLLM_OK
    }
    unsafe extern "C" fn update(
        _: *mut c_void,
        _: *const etllm_tensor_view,
        _: usize,
        _: *mut *const f32,
        _: *mut usize,
    ) -> etllm_status {
        ETLLM_OK
    }

    /// Appends the state in two pieces (as a header, then data), then fails if told to.
    unsafe extern "C" fn save(ud: *mut c_void, buffer: *mut etllm_state_buffer) -> etllm_status {
        let f = fake(ud);
        f.saves += 1;
        let (head, rest) = f.state.split_at(f.state.len() / 2);
        for piece in [head, rest] {
            let s = etllm_state_buffer_append(buffer, piece.as_ptr().cast(), piece.len());
            if s != ETLLM_OK {
                return s;
            }
        }
        if f.fail {
            etllm_set_error_message(c"the disk is on fire".as_ptr());
            return ETLLM_ERR_IO_MANAGER;
        }
        ETLLM_OK
    }

    unsafe extern "C" fn restore(ud: *mut c_void, data: *const u8, len: usize) -> etllm_status {
        let f = fake(ud);
        f.restores += 1;
        if f.fail {
            etllm_set_error_message(c"not my state".as_ptr());
            return ETLLM_ERR_INVALID_ARGUMENT;
        }
        f.state = c_slice(data, len, "data").unwrap().to_vec();
        ETLLM_OK
    }

    /// A full vtable over `f` (no destroy: the test owns `f`).
    fn vtable(f: &mut Fake) -> etllm_io_manager {
        etllm_io_manager {
            struct_size: std::mem::size_of::<etllm_io_manager>() as u32,
            user_data: (f as *mut Fake).cast(),
            load: Some(load),
            reset: Some(reset),
            rewind: Some(rewind),
            prepare_prefill: Some(prepare_prefill),
            update_prefill: Some(update),
            prepare_decode: Some(prepare_decode),
            update_decode: Some(update),
            destroy: None,
            save_state: Some(save),
            restore_state: Some(restore),
        }
    }

    fn manager(vt: &etllm_io_manager) -> CIoManager {
        CIoManager::new(vt).unwrap_or_else(|e| panic!("{}", e.message()))
    }

    fn io_message(r: Result<()>) -> String {
        match r {
            Err(Error::IoManager(m)) => m,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn save_state_appends_the_callbacks_bytes_after_what_out_held() {
        let mut f = Fake {
            state: b"a saved conversation".to_vec(),
            ..Default::default()
        };
        let vt = vtable(&mut f);
        let mut out = b"before|".to_vec();
        manager(&vt).save_state(&mut out).unwrap();
        assert_eq!(out, b"before|a saved conversation");
        assert_eq!(f.saves, 1);
    }

    #[test]
    fn restore_state_hands_the_bytes_to_the_callback() {
        let mut f = Fake::default();
        let vt = vtable(&mut f);
        manager(&vt).restore_state(b"from a file").unwrap();
        assert_eq!((f.state.as_slice(), f.restores), (&b"from a file"[..], 1));
    }

    #[test]
    fn a_failing_save_drops_what_it_appended_and_gives_its_message() {
        let mut f = Fake {
            state: b"half written".to_vec(),
            fail: true,
            ..Default::default()
        };
        let vt = vtable(&mut f);
        let mut out = b"before|".to_vec();
        let msg = io_message(manager(&vt).save_state(&mut out));
        assert_eq!(
            msg,
            "save_state failed (ETLLM_ERR_IO_MANAGER): the disk is on fire"
        );
        assert_eq!(out, b"before|");
    }

    #[test]
    fn a_failing_restore_gives_its_status_and_message() {
        let mut f = Fake {
            fail: true,
            ..Default::default()
        };
        let vt = vtable(&mut f);
        let msg = io_message(manager(&vt).restore_state(b"junk"));
        assert_eq!(
            msg,
            "restore_state failed (ETLLM_ERR_INVALID_ARGUMENT): not my state"
        );
    }

    #[test]
    fn null_callbacks_cannot_save_or_restore() {
        let mut f = Fake::default();
        let vt = etllm_io_manager {
            save_state: None,
            restore_state: None,
            ..vtable(&mut f)
        };
        let mut m = manager(&vt);
        let mut out = b"kept".to_vec();
        assert!(io_message(m.save_state(&mut out)).contains("save_state is NULL"));
        assert_eq!(out, b"kept");
        assert!(io_message(m.restore_state(b"x")).contains("restore_state is NULL"));
        assert_eq!((f.saves, f.restores), (0, 0));
    }

    #[test]
    fn a_vtable_of_the_older_size_loads_and_cannot_save() {
        let mut f = Fake::default();
        // A caller built before save_state existed: its struct ends at `destroy`, and what
        // follows in memory is not its own.
        let vt = etllm_io_manager {
            struct_size: std::mem::offset_of!(etllm_io_manager, save_state) as u32,
            ..vtable(&mut f)
        };
        let mut m = manager(&vt);
        assert!(io_message(m.save_state(&mut Vec::new())).contains("save_state is NULL"));
        assert!(io_message(m.restore_state(b"")).contains("restore_state is NULL"));
        assert_eq!((f.saves, f.restores), (0, 0));
    }

    #[test]
    fn save_state_without_restore_state_is_refused() {
        let mut f = Fake::default();
        for vt in [
            etllm_io_manager {
                restore_state: None,
                ..vtable(&mut f)
            },
            etllm_io_manager {
                save_state: None,
                ..vtable(&mut f)
            },
        ] {
            match CIoManager::new(&vt) {
                Err(e) => {
                    assert_eq!(e.status(), ETLLM_ERR_INVALID_ARGUMENT);
                    assert!(e.message().contains("with both, or with neither"));
                }
                Ok(_) => panic!("accepted a vtable with one of save_state and restore_state"),
            }
        }
    }

    #[test]
    fn a_state_buffer_collects_appends_and_checks_its_arguments() {
        let mut b: *mut etllm_state_buffer = std::ptr::null_mut();
        assert_eq!(
            etllm_state_buffer_new(std::ptr::null_mut()),
            ETLLM_ERR_NULL_ARGUMENT
        );
        assert_eq!(etllm_state_buffer_new(&mut b), ETLLM_OK);
        assert_eq!(
            etllm_state_buffer_append(b, c"abc".as_ptr().cast(), 3),
            ETLLM_OK
        );
        assert_eq!(etllm_state_buffer_append(b, std::ptr::null(), 0), ETLLM_OK);
        assert_eq!(
            etllm_state_buffer_append(b, std::ptr::null(), 1),
            ETLLM_ERR_NULL_ARGUMENT
        );
        assert_eq!(
            etllm_state_buffer_append(std::ptr::null_mut(), c"d".as_ptr().cast(), 1),
            ETLLM_ERR_NULL_ARGUMENT
        );
        assert_eq!(
            etllm_state_buffer_append(b, c"de".as_ptr().cast(), 2),
            ETLLM_OK
        );
        let (mut data, mut len) = (std::ptr::null(), 0);
        assert_eq!(etllm_state_buffer_data(b, &mut data, &mut len), ETLLM_OK);
        assert_eq!(c_slice(data, len, "data").unwrap(), b"abcde");
        etllm_state_buffer_free(b);
        etllm_state_buffer_free(std::ptr::null_mut());
    }
}
