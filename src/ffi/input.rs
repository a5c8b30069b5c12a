//! `etllm_input`: one part of a multimodal prompt (text, token ids, an image, audio,
//! features), and generation from a list of them on runners and sessions.

use std::ffi::{c_char, c_void};

use super::config::etllm_generation_config;
use super::error::{etllm_status, guard, FfiError};
use super::runner::{
    etllm_runner, etllm_stats_callback, etllm_token_callback, lock_runner, stream,
};
use super::session::{etllm_session, lock_session};
use super::stats::{check_stats_out, etllm_stats, write_stats};
use super::{c_slice, c_str, read_versioned};
use crate::media::image::Pixels;
use crate::multimodal::{AudioSource, ImageSource, Input};

/// The kind of an `etllm_input`, and which of its fields it reads.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(non_camel_case_types)]
pub enum etllm_input_kind {
    /// `text`: NUL-terminated UTF-8, tokenized with the model's tokenizer.
    ETLLM_INPUT_TEXT = 0,
    /// `tokens` / `num_tokens`: token ids, fed as they are.
    ETLLM_INPUT_TOKENS = 1,
    /// `path`: an image file (PNG, JPEG, GIF, BMP or WebP).
    ETLLM_INPUT_IMAGE_FILE = 2,
    /// `bytes` / `num_bytes`: the bytes of such an image file.
    ETLLM_INPUT_IMAGE_ENCODED = 3,
    /// `bytes`: decoded 8-bit pixels, rows top to bottom, channels interleaved;
    /// `width`, `height`, `channels` (1 gray, 2 gray+alpha, 3 RGB, 4 RGBA); `num_bytes`
    /// must be `width * height * channels`.
    ETLLM_INPUT_IMAGE_PIXELS = 4,
    /// `path`: a WAV file (PCM 8/16/24/32-bit or float 32-bit, mono or stereo).
    ETLLM_INPUT_AUDIO_FILE = 5,
    /// `floats` / `num_floats`: samples in [-1, 1], `channels` (1, or 2 interleaved and
    /// averaged) at `sample_rate`.
    ETLLM_INPUT_AUDIO_SAMPLES = 6,
    /// `floats` / `num_floats` with `sizes` / `num_sizes`: values computed elsewhere for
    /// the model's encoder (a vision encoder's pixel values; with `etllm_asr_transcribe`,
    /// log-mel features).
    ETLLM_INPUT_FEATURES = 7,
    /// `bytes` / `num_bytes`: the bytes of a WAV file (as `ETLLM_INPUT_AUDIO_FILE`).
    ETLLM_INPUT_AUDIO_WAV = 8,
}

/// The token id that `etllm_session_tokens` (and saved states) record for each position an
/// image filled: it matches no real token.
pub const ETLLM_MEDIA_POSITION: u32 = u32::MAX;

/// One part of a multimodal prompt. Versioned: initialize it with `etllm_input_default()`
/// and set `kind` and the fields that kind reads (see `etllm_input_kind`); the others are
/// ignored. Every pointer is read during the call that takes the input and never kept.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
#[allow(non_camel_case_types)]
pub struct etllm_input {
    /// `sizeof(etllm_input)` as the caller compiled it.
    pub struct_size: u32,
    /// An `etllm_input_kind` value.
    pub kind: i32,
    /// `ETLLM_INPUT_TEXT`: the text.
    pub text: *const c_char,
    /// `ETLLM_INPUT_IMAGE_FILE`, `ETLLM_INPUT_AUDIO_FILE`: the file's path (UTF-8).
    pub path: *const c_char,
    /// `ETLLM_INPUT_TOKENS`: the ids.
    pub tokens: *const u32,
    /// Number of `tokens`.
    pub num_tokens: usize,
    /// `ETLLM_INPUT_IMAGE_ENCODED`, `ETLLM_INPUT_IMAGE_PIXELS`, `ETLLM_INPUT_AUDIO_WAV`:
    /// the bytes.
    pub bytes: *const u8,
    /// Number of `bytes`.
    pub num_bytes: usize,
    /// `ETLLM_INPUT_IMAGE_PIXELS`: width in pixels.
    pub width: u32,
    /// `ETLLM_INPUT_IMAGE_PIXELS`: height in pixels.
    pub height: u32,
    /// `ETLLM_INPUT_IMAGE_PIXELS`: 1 to 4; `ETLLM_INPUT_AUDIO_SAMPLES`: 1 or 2.
    pub channels: u32,
    /// `ETLLM_INPUT_AUDIO_SAMPLES`: samples a second.
    pub sample_rate: u32,
    /// `ETLLM_INPUT_AUDIO_SAMPLES`, `ETLLM_INPUT_FEATURES`: the values.
    pub floats: *const f32,
    /// Number of `floats`.
    pub num_floats: usize,
    /// `ETLLM_INPUT_FEATURES`: the sizes, outermost first.
    pub sizes: *const usize,
    /// Number of `sizes`.
    pub num_sizes: usize,
}

impl Default for etllm_input {
    fn default() -> Self {
        Self {
            struct_size: std::mem::size_of::<Self>() as u32,
            kind: etllm_input_kind::ETLLM_INPUT_TEXT as i32,
            text: std::ptr::null(),
            path: std::ptr::null(),
            tokens: std::ptr::null(),
            num_tokens: 0,
            bytes: std::ptr::null(),
            num_bytes: 0,
            width: 0,
            height: 0,
            channels: 0,
            sample_rate: 0,
            floats: std::ptr::null(),
            num_floats: 0,
            sizes: std::ptr::null(),
            num_sizes: 0,
        }
    }
}

/// An input with every default (an empty text input) and `struct_size` set.
#[no_mangle]
pub extern "C" fn etllm_input_default() -> etllm_input {
    etllm_input::default()
}

super::versioned!(etllm_input, "input"; kind, text, path, tokens, num_tokens, bytes, num_bytes,
    width, height, channels, sample_rate, floats, num_floats, sizes, num_sizes);

/// Reads the caller's inputs into owned ones.
pub(crate) fn read_inputs(ptr: *const etllm_input, n: usize) -> Result<Vec<Input>, FfiError> {
    if n > 0 && ptr.is_null() {
        return Err(FfiError::Null("inputs"));
    }
    let mut out = Vec::with_capacity(n);
    let mut at = ptr.cast::<u8>();
    for _ in 0..n {
        // Each element is `struct_size` bytes long, as the caller compiled the struct:
        // step by the caller's size, not ours.
        let item = read_versioned(at.cast::<etllm_input>(), etllm_input::default())?;
        out.push(read_input(&item)?);
        // Safety: the caller's array holds `n` elements of `struct_size` bytes.
        at = unsafe { at.add(item.struct_size as usize) };
    }
    Ok(out)
}

/// Reads one input.
pub(crate) fn read_input(i: &etllm_input) -> Result<Input, FfiError> {
    use etllm_input_kind::*;
    let kind = [
        ETLLM_INPUT_TEXT,
        ETLLM_INPUT_TOKENS,
        ETLLM_INPUT_IMAGE_FILE,
        ETLLM_INPUT_IMAGE_ENCODED,
        ETLLM_INPUT_IMAGE_PIXELS,
        ETLLM_INPUT_AUDIO_FILE,
        ETLLM_INPUT_AUDIO_SAMPLES,
        ETLLM_INPUT_FEATURES,
        ETLLM_INPUT_AUDIO_WAV,
    ]
    .into_iter()
    .find(|k| *k as i32 == i.kind)
    .ok_or_else(|| {
        FfiError::Core(crate::Error::InvalidArgument(format!(
            "input.kind {} is not an etllm_input_kind",
            i.kind
        )))
    })?;
    Ok(match kind {
        ETLLM_INPUT_TEXT => Input::Text(c_str(i.text, "input.text")?.to_string()),
        ETLLM_INPUT_TOKENS => {
            Input::Tokens(c_slice(i.tokens, i.num_tokens, "input.tokens")?.to_vec())
        }
        ETLLM_INPUT_IMAGE_FILE => Input::image_file(c_str(i.path, "input.path")?),
        ETLLM_INPUT_IMAGE_ENCODED => Input::Image(ImageSource::Encoded(
            c_slice(i.bytes, i.num_bytes, "input.bytes")?.to_vec(),
        )),
        ETLLM_INPUT_IMAGE_PIXELS => Input::Image(ImageSource::Pixels(Pixels::new(
            i.width as usize,
            i.height as usize,
            i.channels as usize,
            c_slice(i.bytes, i.num_bytes, "input.bytes")?.to_vec(),
        )?)),
        ETLLM_INPUT_AUDIO_FILE => Input::audio_file(c_str(i.path, "input.path")?),
        ETLLM_INPUT_AUDIO_SAMPLES => Input::Audio(AudioSource::Samples {
            samples: c_slice(i.floats, i.num_floats, "input.floats")?.to_vec(),
            sample_rate: i.sample_rate,
            channels: i.channels as usize,
        }),
        ETLLM_INPUT_AUDIO_WAV => Input::Audio(AudioSource::Wav(
            c_slice(i.bytes, i.num_bytes, "input.bytes")?.to_vec(),
        )),
        ETLLM_INPUT_FEATURES => Input::Features {
            sizes: c_slice(i.sizes, i.num_sizes, "input.sizes")?.to_vec(),
            data: c_slice(i.floats, i.num_floats, "input.floats")?.to_vec(),
        },
    })
}

/// Generates from `num_inputs` inputs (text, token ids, images, features) fed in order
/// after the conversation so far, as upstream's `MultimodalRunner` does; otherwise like
/// `etllm_runner_generate` (callbacks, stats, stop, errors). Images need a model with
/// upstream's multimodal methods (`vision_encoder`, `token_embedding`, `text_decoder`);
/// an image for a text-only model is `ETLLM_ERR_UNSUPPORTED_MODEL`, an unreadable one
/// `ETLLM_ERR_INVALID_MEDIA`. `config.num_bos` / `num_eos` apply to the first input when
/// it is text or tokens and the conversation is empty; `config.echo` echoes the text
/// inputs. Every input is decoded and checked before the model runs: a bad input or one
/// that does not fit the context changes nothing.
#[no_mangle]
pub extern "C" fn etllm_runner_generate_inputs(
    runner: *mut etllm_runner,
    inputs: *const etllm_input,
    num_inputs: usize,
    config: *const etllm_generation_config,
    on_token: etllm_token_callback,
    on_stats: etllm_stats_callback,
    user_data: *mut c_void,
    out_stats: *mut etllm_stats,
) -> etllm_status {
    guard(|| {
        let inputs = read_inputs(inputs, num_inputs)?;
        stream(
            || lock_runner(runner),
            config,
            on_token,
            on_stats,
            user_data,
            out_stats,
            |r, c, t, s| r.generate_inputs(&inputs, c, t, s),
        )
    })
}

/// Feeds `num_inputs` inputs without generating (see `etllm_runner_generate_inputs`); a
/// following generate continues after them. `config` may be NULL; `out_stats` may be
/// NULL.
#[no_mangle]
pub extern "C" fn etllm_runner_prefill_inputs(
    runner: *mut etllm_runner,
    inputs: *const etllm_input,
    num_inputs: usize,
    config: *const etllm_generation_config,
    out_stats: *mut etllm_stats,
) -> etllm_status {
    guard(|| {
        let inputs = read_inputs(inputs, num_inputs)?;
        let config = super::config::read_config(config)?;
        check_stats_out(out_stats)?;
        let stats = lock_runner(runner)?.prefill_inputs(&inputs, &config)?;
        write_stats(out_stats, &stats)
    })
}

/// `etllm_runner_generate_inputs` on this session's conversation.
#[no_mangle]
pub extern "C" fn etllm_session_generate_inputs(
    session: *mut etllm_session,
    inputs: *const etllm_input,
    num_inputs: usize,
    config: *const etllm_generation_config,
    on_token: etllm_token_callback,
    on_stats: etllm_stats_callback,
    user_data: *mut c_void,
    out_stats: *mut etllm_stats,
) -> etllm_status {
    guard(|| {
        let inputs = read_inputs(inputs, num_inputs)?;
        stream(
            || lock_session(session),
            config,
            on_token,
            on_stats,
            user_data,
            out_stats,
            |s, c, t, st| s.generate_inputs(&inputs, c, t, st),
        )
    })
}

/// `etllm_runner_prefill_inputs` on this session's conversation.
#[no_mangle]
pub extern "C" fn etllm_session_prefill_inputs(
    session: *mut etllm_session,
    inputs: *const etllm_input,
    num_inputs: usize,
    config: *const etllm_generation_config,
    out_stats: *mut etllm_stats,
) -> etllm_status {
    guard(|| {
        let inputs = read_inputs(inputs, num_inputs)?;
        let config = super::config::read_config(config)?;
        check_stats_out(out_stats)?;
        let stats = lock_session(session)?.prefill_inputs(&inputs, &config)?;
        write_stats(out_stats, &stats)
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_c_media_position_is_the_cores() {
        assert_eq!(
            super::ETLLM_MEDIA_POSITION,
            crate::multimodal::MEDIA_POSITION
        );
    }
}
