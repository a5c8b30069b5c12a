//! `etllm_sampler`: a sampling step written in C (or any language with a C FFI), run
//! before the built-in sampler for every generated token.

use std::ffi::c_void;

use super::check_struct_size;
use super::error::{etllm_status, guard, FfiError};
use super::io_manager::call_plugin;
use super::runner::{etllm_runner, lock_runner};
use crate::error::{Error, Result};
use crate::sampler::SamplerPlugin;

/// A sampler plugin, in the manner of llama.cpp's `llama_sampler_i`: `apply` sees the
/// next-token logits (a copy it may edit, e.g. to forbid tokens for constrained decoding)
/// and either picks the token or leaves the choice to the built-in sampler, which then
/// samples from the edited logits. Start from a zeroed struct with `struct_size` set to
/// `sizeof(etllm_sampler)`.
///
/// Ownership: `etllm_runner_set_sampler` copies the struct and owns `user_data` from then
/// on; it calls `destroy(user_data)` exactly once: when the sampler is replaced or
/// removed, when the runner is freed, or before `etllm_runner_set_sampler` returns if it
/// fails. The exception is a `struct_size` this library does not know: nothing in the
/// struct is trusted and `destroy` is not called.
///
/// The functions run on the thread that called generate. An error status (with a message
/// set through `etllm_set_error_message`) ends generate with `ETLLM_ERR_SAMPLER`, and the
/// conversation is rolled back.
#[repr(C)]
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy)]
pub struct etllm_sampler {
    /// `sizeof(etllm_sampler)` as the caller compiled it.
    pub struct_size: u32,
    /// Passed to every function.
    pub user_data: *mut c_void,
    /// Required. `logits` holds `num_logits` writable floats (valid during the call);
    /// `history` the `num_history` tokens of this generate call so far (prompt, then
    /// generated). Set `*out_token` to the chosen token id, or to -1 to let the built-in
    /// sampler choose from `logits` as left.
    pub apply: Option<
        unsafe extern "C" fn(
            user_data: *mut c_void,
            logits: *mut f32,
            num_logits: usize,
            history: *const u32,
            num_history: usize,
            out_token: *mut i64,
        ) -> etllm_status,
    >,
    /// Called when a generate call starts. May be NULL.
    pub reset: Option<unsafe extern "C" fn(user_data: *mut c_void) -> etllm_status>,
    /// Frees `user_data`; called exactly once. May be NULL.
    pub destroy: Option<unsafe extern "C" fn(user_data: *mut c_void)>,
}

super::versioned!(etllm_sampler, "sampler"; apply, reset, destroy);

/// A caller's sampler vtable as a [`SamplerPlugin`]. Calls `destroy` once when dropped.
struct CSampler(etllm_sampler);

// Safety: the caller's contract: its functions are called from whichever thread calls into
// the runner, one call at a time (the runner's lock guarantees that).
unsafe impl Send for CSampler {}

impl Drop for CSampler {
    fn drop(&mut self) {
        if let Some(destroy) = self.0.destroy {
            // Safety: called exactly once, with the caller's own user data.
            unsafe { destroy(self.0.user_data) };
        }
    }
}

impl SamplerPlugin for CSampler {
    fn reset(&mut self) -> Result<()> {
        let (Some(f), ud) = (self.0.reset, self.0.user_data) else {
            return Ok(());
        };
        // Safety: the caller's function.
        call_plugin("sampler reset", || unsafe { f(ud) }).map_err(Error::Sampler)
    }

    fn apply(&mut self, logits: &mut [f32], history: &[u32]) -> Result<Option<u32>> {
        let (f, ud) = (self.0.apply.expect("checked when set"), self.0.user_data);
        let mut token: i64 = -1;
        call_plugin("sampler apply", || {
            // Safety: the caller's function, with buffers valid for the call.
            unsafe {
                f(
                    ud,
                    logits.as_mut_ptr(),
                    logits.len(),
                    history.as_ptr(),
                    history.len(),
                    &mut token,
                )
            }
        })
        .map_err(Error::Sampler)?;
        match token {
            -1 => Ok(None),
            t if (0..=u32::MAX as i64).contains(&t) => Ok(Some(t as u32)),
            t => Err(Error::Sampler(format!("apply chose token {t}"))),
        }
    }
}

/// Sets the runner's sampler plugin (copied; see `etllm_sampler` for ownership), or
/// removes it when `sampler` is NULL. A previous plugin is destroyed. It applies to the
/// following generate calls. Returns `ETLLM_ERR_NULL_ARGUMENT` if `apply` is NULL and
/// `ETLLM_ERR_BUSY` during a generate; the new sampler is destroyed in both cases.
#[no_mangle]
pub extern "C" fn etllm_runner_set_sampler(
    runner: *mut etllm_runner,
    sampler: *const etllm_sampler,
) -> etllm_status {
    guard(|| {
        let plugin = if sampler.is_null() {
            None
        } else {
            // Safety: non-null; the struct starts with struct_size.
            check_struct_size::<etllm_sampler>(unsafe { (*sampler).struct_size } as usize)?;
            let mut vt = etllm_sampler {
                struct_size: std::mem::size_of::<etllm_sampler>() as u32,
                user_data: std::ptr::null_mut(),
                apply: None,
                reset: None,
                destroy: None,
            };
            // Safety: the caller's struct holds `struct_size` readable bytes ending on a
            // field boundary of this layout.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    sampler as *const u8,
                    &mut vt as *mut _ as *mut u8,
                    (*sampler).struct_size as usize,
                )
            };
            // Owned from here: dropping it on any error below calls destroy.
            let plugin = CSampler(vt);
            if plugin.0.apply.is_none() {
                return Err(FfiError::Null("sampler.apply"));
            }
            Some(Box::new(plugin) as Box<dyn SamplerPlugin>)
        };
        lock_runner(runner)?.set_sampler_plugin(plugin);
        Ok(())
    })
}
