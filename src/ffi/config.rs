//! `etllm_generation_config` and `etllm_runner_options`: versioned option structs.

use std::ffi::c_char;

use super::error::FfiError;
use super::io_manager::etllm_io_manager;
use super::{c_slice, c_str, read_versioned};
use crate::config::GenerationConfig;
use crate::grammar::GrammarType;

/// Settings of one generation. Always start from `etllm_generation_config_default()`,
/// which fills in `struct_size` and every default, then change the fields you need;
/// later library versions may add fields at the end, and `struct_size` tells them apart.
///
/// Field names and defaults follow upstream ExecuTorch's `GenerationConfig`, except that
/// `max_new_tokens = N` yields exactly N tokens (upstream yields N - 1).
#[repr(C)]
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy)]
pub struct etllm_generation_config {
    /// `sizeof(etllm_generation_config)` as the caller compiled it.
    pub struct_size: u32,
    /// Pass the prompt text to the token callback (token id -1) first. Default true.
    pub echo: bool,
    /// A warm-up run: no callback is called and the runner is reset afterwards. Default false.
    pub warming: bool,
    /// Keep generating past the model's EOS tokens. Default false.
    pub ignore_eos: bool,
    /// Use `seed`; when false the sampler is seeded from the clock. Default false.
    pub has_seed: bool,
    /// The most tokens to generate; -1: as many as the context allows. Default -1.
    pub max_new_tokens: i32,
    /// The most tokens in the sequence, prompt included; -1: the model's context. Default -1.
    pub seq_len: i32,
    /// Sampling temperature, >= 0; 0 is greedy. Default 0.8.
    pub temperature: f32,
    /// BOS tokens put before the prompt. Default 0.
    pub num_bos: i32,
    /// EOS tokens put after the prompt. Default 0.
    pub num_eos: i32,
    /// Seed of the sampler when `has_seed` is true: the same seed gives the same tokens.
    pub seed: u64,
    /// Extra token ids that end generation like EOS (even with `ignore_eos`); may be NULL
    /// when `num_stop_token_ids` is 0. Read during the call only.
    pub stop_token_ids: *const u32,
    /// Number of entries in `stop_token_ids`.
    pub num_stop_token_ids: usize,
    /// Sample only from the `top_k` most likely tokens; 0 is off. Default 0.
    pub top_k: i32,
    /// Sample only from the smallest most-likely set reaching probability `top_p`, in
    /// (0, 1]; 1 is off. Default 1.
    pub top_p: f32,
    /// Sample only from tokens at least `min_p` times as likely as the best, in [0, 1];
    /// 0 is off. Default 0.
    pub min_p: f32,
    /// Penalty for tokens already in this call's prompt or output, > 0; 1 is off. Default 1.
    pub repetition_penalty: f32,
    /// Strings (UTF-8, NUL-terminated) that end generation when the generated text
    /// contains one; the stop string is not streamed. May be NULL when
    /// `num_stop_strings` is 0. Read during the call only.
    pub stop_strings: *const *const c_char,
    /// Number of entries in `stop_strings`.
    pub num_stop_strings: usize,
    /// Constrained decoding: a grammar (UTF-8, NUL-terminated) the generated text must
    /// match, in the language `grammar_type` names; NULL or "" (the default) is
    /// unconstrained. A grammar that does not compile fails the call with
    /// `ETLLM_ERR_GRAMMAR` before any model step. Read during the call only.
    pub grammar: *const c_char,
    /// The language of `grammar`: "json_schema" (the default, also when NULL), "regex",
    /// "lark" (or "lark_grammar") or "gbnf"; another name is `ETLLM_ERR_INVALID_ARGUMENT`.
    /// Read during the call only.
    pub grammar_type: *const c_char,
    /// With a grammar: do not feed text the grammar forces (a JSON key, `":`) to the model
    /// in one step; sample it token by token instead. Default false (fast-forward on: the
    /// same text, the tokenizer's own tokens for it, fewer model steps).
    pub grammar_no_fast_forward: bool,
    /// The prompt is the whole conversation (as chat UIs resend it): the conversation keeps
    /// the longest prefix of its tokens that the prompt starts with and feeds only the
    /// rest; the count kept is `etllm_stats.reused_prompt_tokens`. Default false: the
    /// prompt continues the conversation.
    pub reuse_prefix: bool,
}

impl Default for etllm_generation_config {
    fn default() -> Self {
        let d = GenerationConfig::default();
        Self {
            struct_size: std::mem::size_of::<Self>() as u32,
            echo: d.echo,
            warming: d.warming,
            ignore_eos: d.ignore_eos,
            has_seed: false,
            max_new_tokens: d.max_new_tokens,
            seq_len: d.seq_len,
            temperature: d.temperature,
            num_bos: d.num_bos,
            num_eos: d.num_eos,
            seed: 0,
            stop_token_ids: std::ptr::null(),
            num_stop_token_ids: 0,
            top_k: d.top_k,
            top_p: d.top_p,
            min_p: d.min_p,
            repetition_penalty: d.repetition_penalty,
            stop_strings: std::ptr::null(),
            num_stop_strings: 0,
            grammar: std::ptr::null(),
            grammar_type: std::ptr::null(),
            grammar_no_fast_forward: !d.grammar_fast_forward,
            reuse_prefix: d.reuse_prefix,
        }
    }
}

/// A generation config with every default and `struct_size` set.
#[no_mangle]
pub extern "C" fn etllm_generation_config_default() -> etllm_generation_config {
    etllm_generation_config::default()
}

/// Reads a caller's config (NULL means the defaults) into the core's config.
pub(crate) fn read_config(
    ptr: *const etllm_generation_config,
) -> Result<GenerationConfig, FfiError> {
    let c = read_versioned(ptr, etllm_generation_config::default())?;
    let stop = c_slice(
        c.stop_token_ids,
        c.num_stop_token_ids,
        "config.stop_token_ids",
    )?;
    let stop_strings = c_slice(c.stop_strings, c.num_stop_strings, "config.stop_strings")?
        .iter()
        .map(|&s| c_str(s, "config.stop_strings[i]").map(str::to_string))
        .collect::<Result<Vec<_>, _>>()?;
    let grammar = if c.grammar.is_null() {
        String::new()
    } else {
        c_str(c.grammar, "config.grammar")?.to_string()
    };
    let grammar_type = if c.grammar_type.is_null() {
        GrammarType::default()
    } else {
        c_str(c.grammar_type, "config.grammar_type")?
            .parse()
            .map_err(FfiError::Core)?
    };
    Ok(GenerationConfig {
        echo: c.echo,
        max_new_tokens: c.max_new_tokens,
        warming: c.warming,
        seq_len: c.seq_len,
        temperature: c.temperature,
        num_bos: c.num_bos,
        num_eos: c.num_eos,
        ignore_eos: c.ignore_eos,
        seed: c.has_seed.then_some(c.seed),
        stop_token_ids: stop.to_vec(),
        top_k: c.top_k,
        top_p: c.top_p,
        min_p: c.min_p,
        repetition_penalty: c.repetition_penalty,
        stop_strings,
        grammar,
        grammar_type,
        grammar_fast_forward: !c.grammar_no_fast_forward,
        reuse_prefix: c.reuse_prefix,
    })
}

/// Options fixed when a runner is created. Start from `etllm_runner_options_default()`.
#[repr(C)]
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy)]
pub struct etllm_runner_options {
    /// `sizeof(etllm_runner_options)` as the caller compiled it.
    pub struct_size: u32,
    /// Threads of ExecuTorch's CPU thread pool, which the whole process shares; 0 keeps
    /// its current size. Default 0. Applied when the runner loads; the pool cannot be
    /// resized while any model is loaded in the process (ExecuTorch's XNNPACK delegate
    /// keeps the pool it was loaded with), so a count other than the current one then
    /// fails the load with `ETLLM_ERR_INVALID_ARGUMENT`.
    pub num_threads: u32,
    /// A KV-cache manager to use instead of the built-in one chosen from the model's
    /// signature, or NULL. The runner copies the struct and takes ownership of its
    /// `user_data` as soon as `etllm_runner_new`/`etllm_runner_open` is called, whatever
    /// the outcome (see `etllm_io_manager`).
    pub io_manager: *const etllm_io_manager,
    /// Model-family conventions for the tokenizer: an `etllm_preset` value. Default
    /// `ETLLM_PRESET_NONE`.
    pub preset: i32,
    /// External data files (`.ptd`) holding weights the export kept out of the `.pte`:
    /// `num_data_paths` NUL-terminated UTF-8 paths, read during the call that takes these
    /// options (the runner copies them). Default none: then a file with the model's stem
    /// and the `.ptd` extension beside the model is used if it exists. A missing,
    /// unreadable or foreign data file fails the load with `ETLLM_ERR_FILE_ACCESS` or
    /// `ETLLM_ERR_INVALID_MODEL`, naming it.
    pub data_paths: *const *const c_char,
    /// Number of entries in `data_paths`.
    pub num_data_paths: usize,
    /// The method that runs the model's steps when it is not "forward" (e.g.
    /// "lora_forward" in a multi-method LoRA export), or NULL for "forward". KV-cache
    /// managers see it under the name "forward". A name the program lacks fails the load
    /// with `ETLLM_ERR_INVALID_ARGUMENT`.
    pub method_name: *const c_char,
    /// The image processor's settings (a Hugging Face `preprocessor_config.json`) for a
    /// multimodal model whose `vision_encoder` takes preprocessed pixel values, as a
    /// NUL-terminated UTF-8 path, or NULL: then `preprocessor_config.json` beside the
    /// model, else beside the tokenizer, is used if there is one. Given for a model
    /// without a `vision_encoder`, it fails the load with `ETLLM_ERR_INVALID_ARGUMENT`.
    pub preprocessor_config: *const c_char,
}

impl Default for etllm_runner_options {
    fn default() -> Self {
        Self {
            struct_size: std::mem::size_of::<Self>() as u32,
            num_threads: 0,
            io_manager: std::ptr::null(),
            preset: 0,
            data_paths: std::ptr::null(),
            num_data_paths: 0,
            method_name: std::ptr::null(),
            preprocessor_config: std::ptr::null(),
        }
    }
}

/// Runner options with every default and `struct_size` set.
#[no_mangle]
pub extern "C" fn etllm_runner_options_default() -> etllm_runner_options {
    etllm_runner_options::default()
}

super::versioned!(etllm_generation_config, "config"; warming, ignore_eos, has_seed,
    max_new_tokens, seq_len, temperature, num_bos, num_eos, seed, stop_token_ids,
    num_stop_token_ids, top_k, top_p, min_p, repetition_penalty, stop_strings, num_stop_strings, grammar, grammar_type,
    grammar_no_fast_forward);
super::versioned!(etllm_runner_options, "options"; io_manager, preset, data_paths,
    num_data_paths, method_name, preprocessor_config);
