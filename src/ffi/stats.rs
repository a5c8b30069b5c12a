//! `etllm_stats`: timings and counts of a generation.

use std::ffi::{c_char, CString};

use super::error::{etllm_status, guard, FfiError};
use super::{check_struct_size, out_arg, read_versioned, write_versioned};
use crate::stats::{Stats, StopReason};

/// Why a generation ended.
#[repr(C)]
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum etllm_stop_reason {
    /// Nothing was generated (or a prefill).
    ETLLM_STOP_NONE = 0,
    /// An EOS token (or one of `config.stop_token_ids`) was generated.
    ETLLM_STOP_EOS = 1,
    /// `max_new_tokens` or `seq_len` was reached.
    ETLLM_STOP_LENGTH = 2,
    /// The context is full.
    ETLLM_STOP_CONTEXT_FULL = 3,
    /// `etllm_runner_stop` was called.
    ETLLM_STOP_REQUESTED = 4,
    /// The token callback returned non-zero.
    ETLLM_STOP_CALLBACK = 5,
    /// The generated text contained one of `config.stop_strings`.
    ETLLM_STOP_STRING = 6,
    /// Constrained decoding: the output is a complete match of the config's grammar, and
    /// the grammar allows nothing more or the model chose EOS (allowed only there).
    ETLLM_STOP_GRAMMAR_COMPLETE = 7,
    /// Constrained decoding: the token limit or the context ended generation before the
    /// output was a complete match of the grammar (a complete match at that point is
    /// `ETLLM_STOP_LENGTH` or `ETLLM_STOP_CONTEXT_FULL`).
    ETLLM_STOP_GRAMMAR_INCOMPLETE = 8,
}

/// Timestamps (microseconds on a monotonic clock anchored to the Unix epoch; 0 when not
/// reached), token counts and summed times of one generation. Initialize with
/// `etllm_stats_default()` before passing it to be filled.
#[repr(C)]
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy)]
pub struct etllm_stats {
    /// `sizeof(etllm_stats)` as the caller compiled it; the library writes no further.
    pub struct_size: u32,
    /// Why generation ended.
    pub stop_reason: etllm_stop_reason,
    /// Model loading began.
    pub model_load_start_us: u64,
    /// Model loading ended.
    pub model_load_end_us: u64,
    /// The generate call began.
    pub inference_start_us: u64,
    /// The prompt was tokenized.
    pub token_encode_end_us: u64,
    /// The prompt was evaluated (prefill ended).
    pub prompt_eval_end_us: u64,
    /// The first token was generated.
    pub first_token_us: u64,
    /// Generation ended.
    pub inference_end_us: u64,
    /// Time spent sampling, summed.
    pub aggregate_sampling_time_us: u64,
    /// Time spent inside the model's method calls, summed.
    pub aggregate_model_execution_time_us: u64,
    /// Tokens in the encoded prompt, BOS/EOS included.
    pub num_prompt_tokens: u64,
    /// Tokens generated, an EOS that ended generation included.
    pub num_generated_tokens: u64,
    /// The part of `aggregate_model_execution_time_us` spent in decode steps (after
    /// prefill). A caller compiled against a header without it has a smaller
    /// `struct_size` and does not get it.
    pub decode_model_execution_time_us: u64,
    /// Prompt tokens already in the conversation's KV cache and not fed again
    /// (`etllm_generation_config.reuse_prefix`); part of `num_prompt_tokens`. Added after
    /// `decode_model_execution_time_us`: an older caller's `struct_size` leaves it out.
    pub reused_prompt_tokens: u64,
}

impl Default for etllm_stats {
    fn default() -> Self {
        Self::from(&Stats::default())
    }
}

impl From<&Stats> for etllm_stats {
    fn from(s: &Stats) -> Self {
        Self {
            struct_size: std::mem::size_of::<Self>() as u32,
            stop_reason: match s.stop_reason {
                StopReason::Eos => etllm_stop_reason::ETLLM_STOP_EOS,
                StopReason::Length => etllm_stop_reason::ETLLM_STOP_LENGTH,
                StopReason::ContextFull => etllm_stop_reason::ETLLM_STOP_CONTEXT_FULL,
                StopReason::Stopped => etllm_stop_reason::ETLLM_STOP_REQUESTED,
                StopReason::Callback => etllm_stop_reason::ETLLM_STOP_CALLBACK,
                StopReason::StopString => etllm_stop_reason::ETLLM_STOP_STRING,
                StopReason::GrammarComplete => etllm_stop_reason::ETLLM_STOP_GRAMMAR_COMPLETE,
                StopReason::GrammarIncomplete => etllm_stop_reason::ETLLM_STOP_GRAMMAR_INCOMPLETE,
                _ => etllm_stop_reason::ETLLM_STOP_NONE,
            },
            model_load_start_us: s.model_load_start_us,
            model_load_end_us: s.model_load_end_us,
            inference_start_us: s.inference_start_us,
            token_encode_end_us: s.token_encode_end_us,
            prompt_eval_end_us: s.prompt_eval_end_us,
            first_token_us: s.first_token_us,
            inference_end_us: s.inference_end_us,
            aggregate_sampling_time_us: s.aggregate_sampling_time_us,
            aggregate_model_execution_time_us: s.aggregate_model_execution_time_us,
            num_prompt_tokens: s.num_prompt_tokens,
            num_generated_tokens: s.num_generated_tokens,
            decode_model_execution_time_us: s.decode_model_execution_time_us,
            reused_prompt_tokens: s.reused_prompt_tokens,
        }
    }
}

impl From<&etllm_stats> for Stats {
    fn from(s: &etllm_stats) -> Self {
        Stats {
            model_load_start_us: s.model_load_start_us,
            model_load_end_us: s.model_load_end_us,
            inference_start_us: s.inference_start_us,
            token_encode_end_us: s.token_encode_end_us,
            prompt_eval_end_us: s.prompt_eval_end_us,
            first_token_us: s.first_token_us,
            inference_end_us: s.inference_end_us,
            aggregate_sampling_time_us: s.aggregate_sampling_time_us,
            aggregate_model_execution_time_us: s.aggregate_model_execution_time_us,
            num_prompt_tokens: s.num_prompt_tokens,
            num_generated_tokens: s.num_generated_tokens,
            decode_model_execution_time_us: s.decode_model_execution_time_us,
            reused_prompt_tokens: s.reused_prompt_tokens,
            stop_reason: match s.stop_reason {
                etllm_stop_reason::ETLLM_STOP_NONE => StopReason::None,
                etllm_stop_reason::ETLLM_STOP_EOS => StopReason::Eos,
                etllm_stop_reason::ETLLM_STOP_LENGTH => StopReason::Length,
                etllm_stop_reason::ETLLM_STOP_CONTEXT_FULL => StopReason::ContextFull,
                etllm_stop_reason::ETLLM_STOP_REQUESTED => StopReason::Stopped,
                etllm_stop_reason::ETLLM_STOP_CALLBACK => StopReason::Callback,
                etllm_stop_reason::ETLLM_STOP_STRING => StopReason::StopString,
                etllm_stop_reason::ETLLM_STOP_GRAMMAR_COMPLETE => StopReason::GrammarComplete,
                etllm_stop_reason::ETLLM_STOP_GRAMMAR_INCOMPLETE => StopReason::GrammarIncomplete,
            },
        }
    }
}

/// Stats with every field 0 and `struct_size` set.
#[no_mangle]
pub extern "C" fn etllm_stats_default() -> etllm_stats {
    etllm_stats::default()
}

/// Checks the `struct_size` of a caller's stats struct (NULL is fine), so that a bad one
/// is reported before any work is done.
pub(crate) fn check_stats_out(out: *const etllm_stats) -> Result<(), FfiError> {
    if out.is_null() {
        return Ok(());
    }
    // Safety: non-null; the caller's struct starts with its struct_size.
    check_struct_size::<etllm_stats>(unsafe { (*out).struct_size } as usize)
}

/// Writes `stats` into the caller's struct (if any), no further than its `struct_size`.
pub(crate) fn write_stats(out: *mut etllm_stats, stats: &Stats) -> Result<(), FfiError> {
    if out.is_null() {
        return Ok(());
    }
    write_versioned(out, &etllm_stats::from(stats))
}

/// The stats as a JSON object, with upstream's field names (milliseconds, fractional) plus
/// EtLlm's `reused_prompt_tokens`, `aggregate_model_execution_time_ms`,
/// `decode_model_execution_time_ms`, `stop_reason` and derived rates. On
/// success `*out_json` is a NUL-terminated string the caller frees with
/// `etllm_string_free`.
#[no_mangle]
pub extern "C" fn etllm_stats_to_json(
    stats: *const etllm_stats,
    out_json: *mut *mut c_char,
) -> etllm_status {
    guard(|| {
        let out = out_arg(out_json, "out_json")?;
        if stats.is_null() {
            return Err(FfiError::Null("stats"));
        }
        check_stats_out(stats)?;
        // Safety: non-null, at least 8 bytes (checked); `stop_reason` is the second 32-bit
        // field. An out-of-range value must not be read as the enum.
        let reason = unsafe { *(stats as *const u32).add(1) };
        if reason > etllm_stop_reason::ETLLM_STOP_STRING as u32 {
            return Err(FfiError::Core(crate::Error::InvalidArgument(format!(
                "stats.stop_reason is {reason}, not an etllm_stop_reason"
            ))));
        }
        let s = read_versioned(stats, etllm_stats::default())?;
        let json = Stats::from(&s).to_json_string();
        *out = CString::new(json).expect("JSON has no NUL").into_raw();
        Ok(())
    })
}

// The smallest accepted size covers `stop_reason` too.
super::versioned!(etllm_stats, "stats"; model_load_start_us, model_load_end_us,
    inference_start_us, token_encode_end_us, prompt_eval_end_us, first_token_us,
    inference_end_us, aggregate_sampling_time_us, aggregate_model_execution_time_us,
    num_prompt_tokens, num_generated_tokens, decode_model_execution_time_us);
