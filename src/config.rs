//! Generation settings.

use crate::error::{Error, Result};

/// Settings for one [`Runner::generate`](crate::Runner::generate) call.
///
/// Field names and defaults follow upstream ExecuTorch's `GenerationConfig`, with one
/// deliberate difference: `max_new_tokens = N` yields exactly N new tokens (upstream's
/// runner yields N - 1). `top_k`, `top_p`, `min_p`, `repetition_penalty`, `ignore_eos`, `seed`,
/// `stop_token_ids` and `stop_strings` are EtLlm additions. `grammar` and `grammar_type` are
/// upstream's fields, which upstream's runners ignore and EtLlm applies (see
/// [`crate::grammar`]).
///
/// ```
/// use etllm::GenerationConfig;
///
/// let config = GenerationConfig { max_new_tokens: 64, temperature: 0.7, top_p: 0.9, seed: Some(42), ..Default::default() };
/// assert!(config.validate().is_ok());
/// // Upstream's defaults: echo on, no token limit, temperature 0.8, no BOS added.
/// let d = GenerationConfig::default();
/// assert!(d.echo && d.max_new_tokens == -1 && d.temperature == 0.8 && d.num_bos == 0);
/// // Out-of-range values are errors that name the field.
/// let bad = GenerationConfig { temperature: -1.0, ..Default::default() };
/// assert!(bad.validate().unwrap_err().to_string().contains("temperature"));
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationConfig {
    /// Pass the prompt text to the token callback before the generated text. Default true.
    pub echo: bool,
    /// The most tokens to generate; -1 means as many as the context allows. Default -1.
    pub max_new_tokens: i32,
    /// A warm-up run: callbacks are not called and the runner is reset afterwards, so the
    /// run leaves no state behind. Default false.
    pub warming: bool,
    /// The most tokens in the sequence, prompt included; -1 means the model's max context.
    /// Default -1.
    pub seq_len: i32,
    /// Sampling temperature: 0 picks the most likely token (greedy); above 0 samples from
    /// softmax(logits / temperature). Default 0.8, upstream's default.
    pub temperature: f32,
    /// Sample only from the `top_k` most likely tokens; 0 (the default) turns it off.
    pub top_k: i32,
    /// Sample only from the smallest set of most likely tokens whose probability adds up
    /// to `top_p`, in (0, 1]; 1 (the default) turns it off.
    pub top_p: f32,
    /// Sample only from tokens at least `min_p` times as likely as the most likely one, in
    /// [0, 1]; 0 (the default) turns it off.
    pub min_p: f32,
    /// Divide the positive logits (multiply the negative ones) of tokens already in this
    /// call's prompt or output by this, > 0; 1 (the default) turns it off. With
    /// `reuse_prefix` the prompt is the whole conversation, the tokens kept in the cache
    /// included.
    pub repetition_penalty: f32,
    /// How many BOS tokens to put before the prompt. Default 0, as upstream.
    pub num_bos: i32,
    /// How many EOS tokens to put after the prompt. Default 0.
    pub num_eos: i32,
    /// Keep generating past EOS tokens. Default false.
    pub ignore_eos: bool,
    /// Seed of the sampling RNG: the same seed gives the same tokens. `None` seeds from the
    /// clock. Default None.
    pub seed: Option<u64>,
    /// Token ids that end generation like an EOS token, in addition to the model's EOS
    /// ids; they apply even with `ignore_eos`. Default empty.
    pub stop_token_ids: Vec<u32>,
    /// Strings that end generation when the generated text contains one. The stop string
    /// is not streamed, and text that could be its beginning is held back until it is
    /// known not to be. Default empty.
    pub stop_strings: Vec<String>,
    /// Constrained decoding: a grammar the generated text must match, written in
    /// `grammar_type`'s language. Empty (the default) means unconstrained. A grammar that
    /// does not compile fails the call with [`Error::Grammar`] before any model step. See
    /// [`crate::grammar`] for what each type accepts and where the constraint applies.
    pub grammar: String,
    /// The language of `grammar`: a JSON schema (the default), a regular expression, a Lark
    /// grammar or a GBNF grammar. Parse upstream's names (`"json_schema"`, `"regex"`,
    /// `"lark"`, `"lark_grammar"`, `"gbnf"`) with [`str::parse`].
    pub grammar_type: crate::grammar::GrammarType,
    /// With a grammar: when the grammar forces the next text (a JSON key, `":`, the rest
    /// of an enum value), feed its tokens to the model in one step instead of sampling them
    /// one by one. The forced text is the same either way; its tokens are the tokenizer's
    /// own spelling of it, and the model runs fewer steps. Default true.
    pub grammar_fast_forward: bool,
    /// The prompt is the whole conversation rather than its continuation (what chat UIs
    /// and servers send): the session keeps the longest prefix of its tokens that the
    /// prompt starts with, drops the rest (as [`rewind`](crate::Session::rewind) would) and
    /// feeds only the prompt's remaining tokens. The count kept is
    /// [`Stats::reused_prompt_tokens`](crate::Stats::reused_prompt_tokens);
    /// `num_prompt_tokens` counts the whole prompt. A model whose cache cannot be rewound
    /// (a ring buffer, a sliding window past its cache) starts over unless the prompt
    /// extends everything the session holds. A prompt equal to what the session holds
    /// (or a prefix of it) feeds its last token again, since its logits pick the first new
    /// token; a generated token not yet fed that the prompt does not repeat is dropped.
    /// Default false: the prompt continues the conversation.
    pub reuse_prefix: bool,
}

impl Default for GenerationConfig {
    fn default() -> Self {
        Self {
            echo: true,
            max_new_tokens: -1,
            warming: false,
            seq_len: -1,
            temperature: 0.8,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            num_bos: 0,
            num_eos: 0,
            ignore_eos: false,
            seed: None,
            stop_token_ids: Vec::new(),
            stop_strings: Vec::new(),
            grammar: String::new(),
            grammar_type: crate::grammar::GrammarType::JsonSchema,
            grammar_fast_forward: true,
            reuse_prefix: false,
        }
    }
}

impl GenerationConfig {
    /// The sampling part of the config.
    pub fn sampling(&self) -> crate::sampler::SamplingParams {
        crate::sampler::SamplingParams {
            temperature: self.temperature,
            top_k: self.top_k.max(0) as usize,
            top_p: self.top_p,
            min_p: self.min_p,
            repetition_penalty: self.repetition_penalty,
        }
    }

    /// Checks every field; the error names the field and the accepted range.
    pub fn validate(&self) -> Result<()> {
        let check = |ok: bool, msg: String| {
            if ok {
                Ok(())
            } else {
                Err(Error::InvalidArgument(msg))
            }
        };
        check(
            self.max_new_tokens >= -1,
            format!(
                "max_new_tokens is {}; use -1 (no limit) or 0 and up",
                self.max_new_tokens
            ),
        )?;
        check(
            self.seq_len >= -1,
            format!(
                "seq_len is {}; use -1 (the model's context) or 0 and up",
                self.seq_len
            ),
        )?;
        check(
            self.temperature.is_finite() && self.temperature >= 0.0,
            format!(
                "temperature is {}; it must be a finite number >= 0",
                self.temperature
            ),
        )?;
        check(
            self.num_bos >= 0,
            format!("num_bos is {}; it must be >= 0", self.num_bos),
        )?;
        check(
            self.num_eos >= 0,
            format!("num_eos is {}; it must be >= 0", self.num_eos),
        )?;
        check(
            self.top_p > 0.0 && self.top_p <= 1.0,
            format!("top_p is {}; it must be in (0, 1]", self.top_p),
        )?;
        check(
            (0.0..=1.0).contains(&self.min_p),
            format!("min_p is {}; it must be in [0, 1]", self.min_p),
        )?;
        check(
            self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0,
            format!(
                "repetition_penalty is {}; it must be a finite number > 0",
                self.repetition_penalty
            ),
        )?;
        Ok(())
    }

    /// How many tokens to generate, by upstream's `resolve_max_new_tokens` rules:
    /// `max_context_len` is the context left before the prompt, `num_prompt_tokens` the
    /// prompt's length. Never negative.
    ///
    /// ```
    /// use etllm::GenerationConfig;
    ///
    /// let limit = |max_new_tokens, seq_len| GenerationConfig { max_new_tokens, seq_len, ..Default::default() };
    /// assert_eq!(limit(-1, -1).resolve_max_new_tokens(128, 20), 108); // the rest of the context
    /// assert_eq!(limit(16, -1).resolve_max_new_tokens(128, 20), 16);
    /// assert_eq!(limit(16, -1).resolve_max_new_tokens(128, 120), 8); // what is left
    /// assert_eq!(limit(-1, 32).resolve_max_new_tokens(128, 20), 12); // seq_len counts the prompt
    /// ```
    pub fn resolve_max_new_tokens(&self, max_context_len: i64, num_prompt_tokens: i64) -> i64 {
        let seq_len = self.seq_len as i64;
        let max_new = self.max_new_tokens as i64;
        let result = match (self.seq_len == -1, self.max_new_tokens == -1) {
            (true, true) => max_context_len - num_prompt_tokens,
            (true, false) => max_new.min(max_context_len - num_prompt_tokens),
            (false, true) => seq_len.min(max_context_len) - num_prompt_tokens,
            (false, false) => (seq_len.min(max_context_len) - num_prompt_tokens).min(max_new),
        };
        result.max(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_upstream() {
        let c = GenerationConfig::default();
        assert!(c.echo && !c.warming && !c.ignore_eos);
        assert_eq!(
            (c.max_new_tokens, c.seq_len, c.num_bos, c.num_eos),
            (-1, -1, 0, 0)
        );
        assert_eq!(c.temperature, 0.8);
        assert_eq!(c.seed, None);
    }

    #[test]
    fn resolve_follows_upstream_rules() {
        let cfg = |seq_len, max_new_tokens| GenerationConfig {
            seq_len,
            max_new_tokens,
            ..Default::default()
        };
        assert_eq!(cfg(-1, -1).resolve_max_new_tokens(128, 10), 118);
        assert_eq!(cfg(-1, 20).resolve_max_new_tokens(128, 10), 20);
        assert_eq!(cfg(-1, 500).resolve_max_new_tokens(128, 10), 118);
        assert_eq!(cfg(50, -1).resolve_max_new_tokens(128, 10), 40);
        assert_eq!(cfg(500, -1).resolve_max_new_tokens(128, 10), 118);
        assert_eq!(cfg(50, 5).resolve_max_new_tokens(128, 10), 5);
        assert_eq!(cfg(5, 50).resolve_max_new_tokens(128, 10), 0);
    }

    #[test]
    fn validate_rejects_each_bad_field() {
        for bad in [
            GenerationConfig {
                max_new_tokens: -2,
                ..Default::default()
            },
            GenerationConfig {
                seq_len: -5,
                ..Default::default()
            },
            GenerationConfig {
                temperature: -0.1,
                ..Default::default()
            },
            GenerationConfig {
                temperature: f32::NAN,
                ..Default::default()
            },
            GenerationConfig {
                num_bos: -1,
                ..Default::default()
            },
            GenerationConfig {
                num_eos: -1,
                ..Default::default()
            },
            // The sampling filters' ranges (the c-abi fuzzer's find: min_p above 1 or a
            // NaN filter left no candidate and the sampler panicked).
            GenerationConfig {
                top_p: 0.0,
                ..Default::default()
            },
            GenerationConfig {
                top_p: 1.5,
                ..Default::default()
            },
            GenerationConfig {
                top_p: f32::NAN,
                ..Default::default()
            },
            GenerationConfig {
                min_p: -0.5,
                ..Default::default()
            },
            GenerationConfig {
                min_p: 2.0,
                ..Default::default()
            },
            GenerationConfig {
                min_p: f32::NAN,
                ..Default::default()
            },
            GenerationConfig {
                repetition_penalty: 0.0,
                ..Default::default()
            },
            GenerationConfig {
                repetition_penalty: f32::INFINITY,
                ..Default::default()
            },
            GenerationConfig {
                repetition_penalty: f32::NAN,
                ..Default::default()
            },
        ] {
            assert!(
                matches!(bad.validate(), Err(Error::InvalidArgument(_))),
                "{bad:?}"
            );
        }
        assert!(GenerationConfig::default().validate().is_ok());
    }
}
