//! Timing and token counts of one generation.

use std::sync::OnceLock;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde_json::json;

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum StopReason {
    /// Not ended yet, or nothing was generated.
    #[default]
    None,
    /// The model produced an EOS token or one of the config's `stop_token_ids`.
    Eos,
    /// `max_new_tokens` or `seq_len` was reached.
    Length,
    /// The model's context is full.
    ContextFull,
    /// [`StopHandle::stop`](crate::StopHandle::stop) or [`Runner::stop`](crate::Runner::stop) was called.
    Stopped,
    /// The token callback asked to stop.
    Callback,
    /// The generated text contained one of the config's `stop_strings`.
    StopString,
    /// Constrained decoding: the output is a complete match of the grammar, and either the
    /// grammar allows nothing more or the model chose an EOS token (which the grammar
    /// allows only where the output is a complete match).
    GrammarComplete,
    /// Constrained decoding: `max_new_tokens`, `seq_len` or the context ended generation
    /// while the output was not yet a complete match of the grammar. (When the output is a
    /// complete match at that point, the reason is `Length` or `ContextFull` as usual.)
    GrammarIncomplete,
}

impl StopReason {
    /// A lower-case name: `none`, `eos`, `length`, `context_full`, `stopped`, `callback`,
    /// `stop_string`, `grammar_complete`, `grammar_incomplete`.
    pub fn as_str(self) -> &'static str {
        match self {
            StopReason::None => "none",
            StopReason::Eos => "eos",
            StopReason::Length => "length",
            StopReason::ContextFull => "context_full",
            StopReason::Stopped => "stopped",
            StopReason::Callback => "callback",
            StopReason::StopString => "stop_string",
            StopReason::GrammarComplete => "grammar_complete",
            StopReason::GrammarIncomplete => "grammar_incomplete",
        }
    }
}

/// Timestamps (microseconds on a monotonic clock anchored to the Unix epoch), token
/// counts and aggregate times of the last load and generation.
///
/// Timestamps are 0 until reached. Differences between them are exact durations.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Model loading began.
    pub model_load_start_us: u64,
    /// Model loading ended.
    pub model_load_end_us: u64,
    /// `generate` began (before tokenizing).
    pub inference_start_us: u64,
    /// The prompt was tokenized.
    pub token_encode_end_us: u64,
    /// Prefill ended: the first token's logits are ready.
    pub prompt_eval_end_us: u64,
    /// The first new token was sampled.
    pub first_token_us: u64,
    /// Generation ended.
    pub inference_end_us: u64,
    /// Time spent in sampling, summed.
    pub aggregate_sampling_time_us: u64,
    /// Time spent inside the model's method calls (prefill and decode), summed.
    pub aggregate_model_execution_time_us: u64,
    /// The part of `aggregate_model_execution_time_us` spent in decode steps (after
    /// prefill), summed. `inference_end_us - prompt_eval_end_us` minus this is the decode
    /// time spent outside the model: sampling, detokenizing, stop checks, callbacks.
    pub decode_model_execution_time_us: u64,
    /// Tokens in the encoded prompt, BOS/EOS included.
    pub num_prompt_tokens: u64,
    /// Prompt tokens that were already in the session's KV cache and were not fed again
    /// ([`GenerationConfig::reuse_prefix`](crate::GenerationConfig::reuse_prefix)); part
    /// of `num_prompt_tokens`.
    pub reused_prompt_tokens: u64,
    /// Tokens generated (an EOS that ended generation included).
    pub num_generated_tokens: u64,
    /// Why generation ended.
    pub stop_reason: StopReason,
}

/// Microseconds since the Unix epoch, on a monotonic clock.
pub(crate) fn now_us() -> u64 {
    static ANCHOR: OnceLock<(Instant, u64)> = OnceLock::new();
    let (instant, epoch_us) = ANCHOR.get_or_init(|| {
        let since_epoch = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        (Instant::now(), since_epoch.as_micros() as u64)
    });
    epoch_us + instant.elapsed().as_micros() as u64
}

fn per_second(count: u64, us: u64) -> f64 {
    if us == 0 {
        0.0
    } else {
        count as f64 * 1e6 / us as f64
    }
}

impl Stats {
    /// Prompt tokens per second of prefill.
    pub fn prefill_tokens_per_second(&self) -> f64 {
        per_second(
            self.num_prompt_tokens,
            self.prompt_eval_end_us
                .saturating_sub(self.inference_start_us),
        )
    }

    /// Generated tokens per second after prefill (upstream's "Generated tokens" rate).
    pub fn decode_tokens_per_second(&self) -> f64 {
        per_second(
            self.num_generated_tokens,
            self.inference_end_us
                .saturating_sub(self.prompt_eval_end_us),
        )
    }

    /// The share (0 to 1) of decode wall time (`prompt_eval_end_us` to
    /// `inference_end_us`) spent outside the model's decode steps; 0 when nothing was
    /// decoded.
    pub fn decode_outside_model_share(&self) -> f64 {
        let wall = self
            .inference_end_us
            .saturating_sub(self.prompt_eval_end_us);
        if wall == 0 {
            return 0.0;
        }
        wall.saturating_sub(self.decode_model_execution_time_us) as f64 / wall as f64
    }

    /// Microseconds from the start of `generate` to the first new token.
    pub fn time_to_first_token_us(&self) -> u64 {
        self.first_token_us.saturating_sub(self.inference_start_us)
    }

    /// The stats as a JSON object. Fields shared with upstream's `stats_to_json_string`
    /// keep its names and its unit (milliseconds, `SCALING_FACTOR_UNITS_PER_SECOND` 1000),
    /// given as fractional numbers with microsecond resolution. EtLlm adds
    /// `reused_prompt_tokens`, `aggregate_model_execution_time_ms`,
    /// `decode_model_execution_time_ms`, `stop_reason` and the derived rates.
    pub fn to_json(&self) -> serde_json::Value {
        let ms = |us: u64| us as f64 / 1000.0;
        json!({
            "prompt_tokens": self.num_prompt_tokens,
            "reused_prompt_tokens": self.reused_prompt_tokens,
            "generated_tokens": self.num_generated_tokens,
            "model_load_start_ms": ms(self.model_load_start_us),
            "model_load_end_ms": ms(self.model_load_end_us),
            "inference_start_ms": ms(self.inference_start_us),
            "token_encode_end_ms": ms(self.token_encode_end_us),
            "inference_end_ms": ms(self.inference_end_us),
            "prompt_eval_end_ms": ms(self.prompt_eval_end_us),
            "first_token_ms": ms(self.first_token_us),
            "aggregate_sampling_time_ms": ms(self.aggregate_sampling_time_us),
            "aggregate_model_execution_time_ms": ms(self.aggregate_model_execution_time_us),
            "decode_model_execution_time_ms": ms(self.decode_model_execution_time_us),
            "SCALING_FACTOR_UNITS_PER_SECOND": 1000,
            "stop_reason": self.stop_reason.as_str(),
            "prefill_tokens_per_second": self.prefill_tokens_per_second(),
            "decode_tokens_per_second": self.decode_tokens_per_second(),
        })
    }

    /// [`to_json`](Self::to_json) as a compact string.
    pub fn to_json_string(&self) -> String {
        self.to_json().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_uses_upstream_names_and_milliseconds() {
        let s = Stats {
            inference_start_us: 1_000_000,
            prompt_eval_end_us: 1_000_500,
            inference_end_us: 1_002_500,
            num_prompt_tokens: 5,
            reused_prompt_tokens: 3,
            num_generated_tokens: 4,
            stop_reason: StopReason::Length,
            ..Default::default()
        };
        let j = s.to_json();
        assert_eq!(j["prompt_tokens"], 5);
        assert_eq!(j["reused_prompt_tokens"], 3);
        assert_eq!(j["generated_tokens"], 4);
        assert_eq!(j["inference_start_ms"], 1000.0);
        assert_eq!(j["prompt_eval_end_ms"], 1000.5);
        assert_eq!(j["SCALING_FACTOR_UNITS_PER_SECOND"], 1000);
        assert_eq!(j["stop_reason"], "length");
        assert_eq!(s.decode_tokens_per_second(), 2000.0);
        assert_eq!(s.prefill_tokens_per_second(), 10000.0);
    }

    #[test]
    fn clock_is_monotonic() {
        let a = now_us();
        let b = now_us();
        assert!(b >= a && a > 1_600_000_000_000_000);
    }
}
