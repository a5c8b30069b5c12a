//! `etllm_asr`: speech to text with encoder-decoder exports (Whisper).

use std::ffi::{c_char, c_void};
use std::sync::{Mutex, MutexGuard};

use super::config::{etllm_generation_config, read_config};
use super::error::{etllm_status, guard, FfiError};
use super::input::{etllm_input, read_inputs};
use super::runner::{etllm_token_callback, token_callback};
use super::stats::{check_stats_out, etllm_stats, write_stats};
use super::tokenizer::malloc_copy;
use super::{c_slice, c_str, out_arg, read_versioned};
use crate::asr::{AsrOptions, AsrRunner, TranscribeConfig};
use crate::generate::StopHandle;
use crate::multimodal::Input;

/// A speech-to-text model (upstream's ASR layout: `encoder` and `text_decoder` methods)
/// with its tokenizer. Opaque. Thread rules: one call at a time from any thread
/// (another concurrent call returns `ETLLM_ERR_BUSY`), except `etllm_asr_stop`, which may
/// be called from any thread at any time. `etllm_asr_free` must not race with any other
/// call on it.
#[allow(non_camel_case_types)]
pub struct etllm_asr {
    asr: Mutex<AsrRunner>,
    stop: StopHandle,
}

/// Options of `etllm_asr_open`. Versioned: initialize with `etllm_asr_options_default()`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
#[allow(non_camel_case_types)]
pub struct etllm_asr_options {
    /// `sizeof(etllm_asr_options)` as the caller compiled it.
    pub struct_size: u32,
    /// Threads of ExecuTorch's CPU thread pool (see `etllm_runner_options.num_threads`);
    /// 0 keeps its current size.
    pub num_threads: u32,
    /// The feature extractor's settings (a Whisper `preprocessor_config.json`), or NULL:
    /// then `preprocessor_config.json` beside the model, else beside the tokenizer, is
    /// used if there is one, else Whisper's settings (80 mel bands, 16 kHz, 30 s).
    pub preprocessor_config: *const c_char,
    /// External data files (`.ptd`), as `etllm_runner_options.data_paths`.
    pub data_paths: *const *const c_char,
    /// Number of entries in `data_paths`.
    pub num_data_paths: usize,
}

impl Default for etllm_asr_options {
    fn default() -> Self {
        Self {
            struct_size: std::mem::size_of::<Self>() as u32,
            num_threads: 0,
            preprocessor_config: std::ptr::null(),
            data_paths: std::ptr::null(),
            num_data_paths: 0,
        }
    }
}

/// ASR options with every default and `struct_size` set.
#[no_mangle]
pub extern "C" fn etllm_asr_options_default() -> etllm_asr_options {
    etllm_asr_options::default()
}

super::versioned!(etllm_asr_options, "options"; num_threads, preprocessor_config, data_paths,
    num_data_paths);

/// What `etllm_asr_transcribe` decodes. Versioned: initialize with
/// `etllm_transcribe_options_default()`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
#[allow(non_camel_case_types)]
pub struct etllm_transcribe_options {
    /// `sizeof(etllm_transcribe_options)` as the caller compiled it.
    pub struct_size: u32,
    /// Translate into English (`<|translate|>`) instead of transcribing.
    pub translate: bool,
    /// The spoken language as Whisper's code ("en", "fr"...), or NULL to detect it from
    /// the decoder's first step.
    pub language: *const c_char,
    /// The whole decoder prompt (replacing the start token, language, task and
    /// `<|notimestamps|>`), or NULL.
    pub decoder_prompt: *const u32,
    /// Number of `decoder_prompt` ids.
    pub num_decoder_prompt: usize,
}

impl Default for etllm_transcribe_options {
    fn default() -> Self {
        Self {
            struct_size: std::mem::size_of::<Self>() as u32,
            translate: false,
            language: std::ptr::null(),
            decoder_prompt: std::ptr::null(),
            num_decoder_prompt: 0,
        }
    }
}

/// Transcribe options with every default and `struct_size` set.
#[no_mangle]
pub extern "C" fn etllm_transcribe_options_default() -> etllm_transcribe_options {
    etllm_transcribe_options::default()
}

super::versioned!(etllm_transcribe_options, "options"; translate, language, decoder_prompt,
    num_decoder_prompt);

fn asr_ref<'a>(asr: *const etllm_asr) -> Result<&'a etllm_asr, FfiError> {
    // Safety: non-null pointers come from etllm_asr_open and stay valid until
    // etllm_asr_free, which the caller must not race with.
    unsafe { asr.as_ref() }.ok_or(FfiError::Null("asr"))
}

fn lock(a: &etllm_asr) -> Result<MutexGuard<'_, AsrRunner>, FfiError> {
    super::lock_call(&a.asr)
}

/// Loads a speech-to-text model and its tokenizer. On success `*out_asr` is a handle the
/// caller frees with `etllm_asr_free`; on failure it is NULL. A decoder-only model is
/// `ETLLM_ERR_UNSUPPORTED_MODEL`. `options` may be NULL.
#[no_mangle]
pub extern "C" fn etllm_asr_open(
    model_path: *const c_char,
    tokenizer_path: *const c_char,
    options: *const etllm_asr_options,
    out_asr: *mut *mut etllm_asr,
) -> etllm_status {
    guard(|| {
        let out = out_arg(out_asr, "out_asr")?;
        *out = std::ptr::null_mut();
        let model = c_str(model_path, "model_path")?;
        let tokenizer = c_str(tokenizer_path, "tokenizer_path")?;
        let o = read_versioned(options, etllm_asr_options::default())?;
        let mut opts = AsrOptions::default();
        let num_threads = (o.num_threads > 0).then_some(o.num_threads as usize);
        let preprocessor_config = if o.preprocessor_config.is_null() {
            None
        } else {
            Some(c_str(o.preprocessor_config, "options.preprocessor_config")?.into())
        };
        let data_paths = c_slice(o.data_paths, o.num_data_paths, "options.data_paths")?
            .iter()
            .map(|&p| c_str(p, "options.data_paths[i]").map(std::path::PathBuf::from))
            .collect::<Result<_, _>>()?;
        // AsrOptions is non-exhaustive: set field by field.
        opts.num_threads = num_threads;
        opts.preprocessor_config = preprocessor_config;
        opts.data_paths = data_paths;
        let asr = AsrRunner::open(model, tokenizer, opts)?;
        let stop = asr.stop_handle();
        *out = Box::into_raw(Box::new(etllm_asr {
            asr: Mutex::new(asr),
            stop,
        }));
        Ok(())
    })
}

/// Frees a speech-to-text handle. NULL is ignored.
#[no_mangle]
pub extern "C" fn etllm_asr_free(asr: *mut etllm_asr) {
    super::free_handle(asr);
}

/// Asks a running `etllm_asr_transcribe` to end before its next decoder step. Safe from
/// any thread at any time; cleared when the next transcription starts.
#[no_mangle]
pub extern "C" fn etllm_asr_stop(asr: *const etllm_asr) -> etllm_status {
    guard(|| {
        asr_ref(asr)?.stop.stop();
        Ok(())
    })
}

/// Transcribes `audio`: an `etllm_input` of kind `ETLLM_INPUT_AUDIO_FILE` or
/// `ETLLM_INPUT_AUDIO_WAV` (WAV), `ETLLM_INPUT_AUDIO_SAMPLES` (any rate: resampled to the
/// model's) or
/// `ETLLM_INPUT_FEATURES` (log-mel features as the encoder takes them). The audio is
/// padded or cut to the model's window (30 s for Whisper); the encoder runs once and the
/// decoder a token at a time until its end-of-text token, `config.max_new_tokens` or its
/// context.
///
/// `config` may be NULL: greedy, until the end of text. Of its fields, the sampling ones
/// (`temperature`, `top_k`, `top_p`, `min_p`, `seed`, `repetition_penalty`),
/// `max_new_tokens`, `ignore_eos` and `stop_token_ids` apply. `options` may be NULL
/// (detect the language, transcribe). Text pieces stream to `on_token` as in
/// `etllm_runner_generate` (special tokens are left out); it may be NULL.
///
/// Outputs, each optional (NULL): `*out_text` the whole text, NUL-terminated, freed with
/// `etllm_string_free`; `*out_tokens` / `*out_num_tokens` the generated ids (end of text
/// excluded), freed with `etllm_buffer_free`; `out_stats` as for generation
/// (`num_prompt_tokens` is the encoder's output length); `*out_num_tokens` may be asked
/// for alone. Unreadable audio is `ETLLM_ERR_INVALID_MEDIA`; on failure the outputs hold
/// NULL and 0. The language detected when `options.language` is NULL is not returned here
/// (the Rust API's `Transcript::language` has it).
#[no_mangle]
pub extern "C" fn etllm_asr_transcribe(
    asr: *mut etllm_asr,
    audio: *const etllm_input,
    options: *const etllm_transcribe_options,
    config: *const etllm_generation_config,
    on_token: etllm_token_callback,
    user_data: *mut c_void,
    out_text: *mut *mut c_char,
    out_tokens: *mut *mut u32,
    out_num_tokens: *mut usize,
    out_stats: *mut etllm_stats,
) -> etllm_status {
    guard(|| {
        // Safety: optional out-pointers, set to NULL first.
        let mut text_out = unsafe { out_text.as_mut() };
        let mut tokens_out = unsafe { out_tokens.as_mut() };
        let mut count_out = unsafe { out_num_tokens.as_mut() };
        if let Some(t) = text_out.as_deref_mut() {
            *t = std::ptr::null_mut();
        }
        if let Some(t) = tokens_out.as_deref_mut() {
            *t = std::ptr::null_mut();
        }
        if let Some(n) = count_out.as_deref_mut() {
            *n = 0;
        }
        if audio.is_null() {
            return Err(FfiError::Null("audio"));
        }
        let input = read_inputs(audio, 1)?.pop().expect("one input read");
        let o = read_versioned(options, etllm_transcribe_options::default())?;
        let mut tc = TranscribeConfig::default();
        if !config.is_null() {
            tc.generation = read_config(config)?;
        }
        tc.translate = o.translate;
        tc.language = if o.language.is_null() {
            None
        } else {
            Some(c_str(o.language, "options.language")?.to_string())
        };
        if !o.decoder_prompt.is_null() || o.num_decoder_prompt > 0 {
            tc.decoder_prompt = Some(
                c_slice(
                    o.decoder_prompt,
                    o.num_decoder_prompt,
                    "options.decoder_prompt",
                )?
                .to_vec(),
            );
        }
        check_stats_out(out_stats)?;
        let mut guard = lock(asr_ref(asr)?)?;
        let on_piece = token_callback(on_token, user_data);
        let transcript = match input {
            Input::Audio(source) => guard.transcribe(&source, &tc, on_piece)?,
            Input::Features { sizes, data } => {
                if sizes.iter().try_fold(1usize, |a, &b| a.checked_mul(b)) != Some(data.len()) {
                    return Err(FfiError::Core(crate::Error::InvalidArgument(format!(
                        "audio.sizes {sizes:?} do not hold the {} values given",
                        data.len()
                    ))));
                }
                guard.transcribe_features(&data, &tc, on_piece)?
            }
            _ => {
                return Err(FfiError::Core(crate::Error::InvalidArgument(
                    "audio must be an input of kind ETLLM_INPUT_AUDIO_FILE, \
                     ETLLM_INPUT_AUDIO_SAMPLES or ETLLM_INPUT_FEATURES"
                        .into(),
                )))
            }
        };
        write_stats(out_stats, &transcript.stats)?;
        // The tokens first: the one allocation that can fail comes before the text is
        // handed out.
        if let Some(t) = tokens_out {
            *t = malloc_copy(&transcript.tokens, false)?;
        }
        if let Some(n) = count_out {
            *n = transcript.tokens.len();
        }
        if let Some(t) = text_out {
            let c = std::ffi::CString::new(transcript.text.replace('\0', "\u{FFFD}"))
                .expect("NULs replaced");
            *t = c.into_raw();
        }
        Ok(())
    })
}
