//! Multimodal inputs: a prompt as a list of text, token ids, images and precomputed
//! features, in order, as upstream's `MultimodalRunner` takes it
//! (`extension/llm/runner/multimodal_input.h`).
//!
//! A multimodal export has upstream's methods (`extension/llm/runner/constants.h`):
//! `token_embedding(tokens[1, seq])`, `text_decoder(embeddings[1, seq, dim],
//! cache_position)` and `vision_encoder(pixels) -> embeddings[1, n, dim]`. Text runs
//! through `token_embedding`, an image through `vision_encoder`, and each result is fed to
//! `text_decoder` at the next positions. Text-only prompts run on such a model through
//! every other API as well (a `forward` that chains `token_embedding` and `text_decoder`).
//!
//! ```
//! use std::ops::ControlFlow;
//! use etllm::{GenerationConfig, Input, Runner, RunnerOptions};
//!
//! // A tiny Llava exported by optimum-executorch (random weights: its text is noise).
//! let dir = "tests/fixtures/multimodal";
//! let mut runner = Runner::open(
//!     format!("{dir}/model.pte"),
//!     format!("{dir}/tokenizer.json"),
//!     RunnerOptions::default(), // preprocessor_config.json is found beside the model
//! )?;
//! let inputs = [
//!     Input::text("USER: "),
//!     Input::image_file(format!("{dir}/images/rgb.png")),
//!     Input::text("\nDescribe.ASSISTANT:"),
//! ];
//! let config = GenerationConfig { max_new_tokens: 16, num_bos: 1, temperature: 0.0, ..Default::default() };
//! let mut text = String::new();
//! let stats = runner.generate_inputs(&inputs, &config, |piece| {
//!     text.push_str(piece.text);
//!     ControlFlow::Continue(())
//! }, |_| {})?;
//! assert_eq!(stats.num_prompt_tokens, 42); // 7 + 16 image rows + 19
//! assert_eq!(stats.num_generated_tokens, 16);
//! # Ok::<(), etllm::Error>(())
//! ```

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::generate::feed_tokens;
use crate::io_manager::{last_logits, IoManager};
use crate::media::audio::Audio;
use crate::media::image::{self, ImagePreprocessor, Pixels};
use crate::model::{Model, ModelInfo, ModelKind, AUDIO_ENCODER, VISION_ENCODER};
use crate::tensor::{DType, HostData, HostTensor, TensorData, TensorView};

/// The token id recorded (in [`Session::tokens`](crate::Session::tokens) and saved
/// states) for each position an encoder filled: it matches no real token.
pub const MEDIA_POSITION: u32 = u32::MAX;

/// One part of a multimodal prompt.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Input {
    /// Text, tokenized with the model's tokenizer.
    Text(String),
    /// Token ids, fed as they are.
    Tokens(Vec<u32>),
    /// An image for the model's `vision_encoder`.
    Image(ImageSource),
    /// Audio. Decoder-only models with an `audio_encoder` are not supported yet;
    /// encoder-decoder speech models take audio through [`AsrRunner`](crate::AsrRunner).
    Audio(AudioSource),
    /// Values computed elsewhere for the model's `vision_encoder` (e.g. a processor's
    /// `pixel_values`), with their sizes; fed to the encoder as they are.
    Features {
        /// Sizes, outermost first; they must be the encoder input's (a leading batch
        /// dimension of 1 may be left out).
        sizes: Vec<usize>,
        /// `sizes`' product of values.
        data: Vec<f32>,
    },
}

impl Input {
    /// Text.
    pub fn text(text: impl Into<String>) -> Self {
        Self::Text(text.into())
    }

    /// An image file (PNG, JPEG, GIF, BMP or WebP).
    pub fn image_file(path: impl AsRef<Path>) -> Self {
        Self::Image(ImageSource::File(path.as_ref().to_path_buf()))
    }

    /// A WAV file.
    pub fn audio_file(path: impl AsRef<Path>) -> Self {
        Self::Audio(AudioSource::File(path.as_ref().to_path_buf()))
    }
}

/// Where an image comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ImageSource {
    /// A file (PNG, JPEG, GIF, BMP or WebP).
    File(PathBuf),
    /// The bytes of such a file.
    Encoded(Vec<u8>),
    /// Decoded pixels.
    Pixels(Pixels),
}

impl ImageSource {
    /// The decoded image; `what` names it in errors.
    pub fn decode(&self, what: &str) -> Result<Pixels> {
        match self {
            Self::File(path) => image::decode_file(path),
            Self::Encoded(bytes) => image::decode(bytes, what),
            Self::Pixels(p) => Ok(p.clone()),
        }
    }
}

/// Where audio comes from.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum AudioSource {
    /// A WAV file (PCM 8/16/24/32-bit or float 32-bit, mono or stereo).
    File(PathBuf),
    /// The bytes of such a file.
    Wav(Vec<u8>),
    /// Float samples in [-1, 1], `channels` (1 or 2) interleaved.
    Samples {
        /// The samples.
        samples: Vec<f32>,
        /// Samples a second.
        sample_rate: u32,
        /// 1 (mono) or 2 (stereo, averaged into mono).
        channels: usize,
    },
}

impl AudioSource {
    /// The audio as mono samples at their own rate; `what` names it in errors.
    pub fn decode(&self, what: &str) -> Result<Audio> {
        match self {
            Self::File(path) => Audio::from_wav_file(path),
            Self::Wav(bytes) => Audio::from_wav(bytes, what),
            Self::Samples {
                samples,
                sample_rate,
                channels,
            } => Audio::from_interleaved(samples, *channels, *sample_rate, what),
        }
    }
}

/// A prepared part of the prompt: tokens, or an encoder's input and how many positions
/// its output fills.
pub(crate) enum Segment {
    Tokens(Vec<u32>),
    Encoder {
        method: &'static str,
        input: EncoderInput,
        rows: usize,
    },
}

impl Segment {
    pub(crate) fn len(&self) -> usize {
        match self {
            Segment::Tokens(t) => t.len(),
            Segment::Encoder { rows, .. } => *rows,
        }
    }
}

/// An encoder's input, in the dtype the method takes.
pub(crate) enum EncoderInput {
    Floats(HostTensor),
    Bytes(Vec<usize>, Vec<u8>),
}

impl EncoderInput {
    fn view(&self) -> TensorView<'_> {
        match self {
            Self::Floats(t) => t.view(),
            Self::Bytes(sizes, data) => TensorView {
                sizes: sizes.clone(),
                data: TensorData::Bytes(DType::U8, data),
            },
        }
    }
}

/// What a model needs to prepare images: its vision encoder's input, and the image
/// processor's settings.
pub(crate) struct Media {
    pub(crate) image: Option<ImagePreprocessor>,
    pub(crate) image_config: Option<PathBuf>,
}

impl Media {
    /// Finds the image processor's settings: the caller's file, else
    /// `preprocessor_config.json` beside the model, else beside the tokenizer. Read only
    /// for a model with a `vision_encoder`.
    pub(crate) fn find(
        info: &ModelInfo,
        given: Option<&Path>,
        model: &Path,
        tokenizer: &Path,
    ) -> Result<Self> {
        if !info.methods.contains_key(VISION_ENCODER) {
            if let Some(path) = given {
                return Err(Error::InvalidArgument(format!(
                    "a preprocessor config ({}) was given but the model has no \
                     `{VISION_ENCODER}`",
                    path.display()
                )));
            }
            return Ok(Self {
                image: None,
                image_config: None,
            });
        }
        let beside = |p: &Path| {
            p.parent()
                .map(|d| d.join("preprocessor_config.json"))
                .filter(|f| f.is_file())
        };
        let path = match given {
            Some(p) => Some(p.to_path_buf()),
            None => beside(model).or_else(|| beside(tokenizer)),
        };
        let image = path
            .as_deref()
            .map(ImagePreprocessor::from_file)
            .transpose()?;
        Ok(Self {
            image,
            image_config: path,
        })
    }
}

/// Checks an input list and turns it into segments, without touching the model.
#[allow(clippy::too_many_arguments)]
/// `first_at_start`: the conversation is empty, so the first text input gets the
/// config's BOS/EOS framing (`frame`), as upstream's runner does.
pub(crate) fn prepare(
    inputs: &[Input],
    info: &ModelInfo,
    kind: ModelKind,
    media: &Media,
    encode: &dyn Fn(&str) -> Result<Vec<u32>>,
    frame: &dyn Fn(Vec<u32>) -> Result<Vec<u32>>,
    first_at_start: bool,
    vocab: usize,
) -> Result<Vec<Segment>> {
    if inputs.is_empty() {
        return Err(Error::InvalidArgument("the input list is empty".into()));
    }
    let mut out = Vec::with_capacity(inputs.len());
    for (i, input) in inputs.iter().enumerate() {
        let what = format!("input {i}");
        let framed = |ids: Vec<u32>| {
            if i == 0 && first_at_start {
                frame(ids)
            } else {
                Ok(ids)
            }
        };
        let segment = match input {
            Input::Text(text) => {
                if text.is_empty() {
                    return Err(Error::InvalidArgument(format!("{what} is empty text")));
                }
                Segment::Tokens(framed(encode(text)?)?)
            }
            Input::Tokens(ids) => {
                if ids.is_empty() {
                    return Err(Error::InvalidArgument(format!("{what} has no tokens")));
                }
                if let Some(bad) = ids.iter().find(|&&id| id as usize >= vocab) {
                    return Err(Error::InvalidArgument(format!(
                        "{what}: token id {bad} is outside the model's vocabulary of {vocab}"
                    )));
                }
                Segment::Tokens(framed(ids.clone())?)
            }
            Input::Image(source) => {
                let (spec, rows) = vision_encoder(info, kind, &what, "an image")?;
                let pixels = source.decode(&what)?;
                let input = image_input(&pixels, &spec, media, &what)?;
                Segment::Encoder {
                    method: VISION_ENCODER,
                    input,
                    rows,
                }
            }
            Input::Features { sizes, data } => {
                let (spec, rows) = vision_encoder(info, kind, &what, "features")?;
                let numel = sizes.iter().try_fold(1usize, |a, &b| a.checked_mul(b));
                if numel != Some(data.len()) {
                    return Err(Error::InvalidArgument(format!(
                        "{what}: sizes {sizes:?} do not hold the {} values given",
                        data.len()
                    )));
                }
                let batched: Vec<usize> = if sizes.len() + 1 == spec.sizes.len() {
                    std::iter::once(1).chain(sizes.iter().copied()).collect()
                } else {
                    sizes.clone()
                };
                if batched != spec.sizes {
                    return Err(Error::InvalidArgument(format!(
                        "{what}: the features have sizes {sizes:?}, but `{VISION_ENCODER}` \
                         takes {:?}",
                        spec.sizes
                    )));
                }
                Segment::Encoder {
                    method: VISION_ENCODER,
                    input: float_input(&spec, batched, data)?,
                    rows,
                }
            }
            Input::Audio(_) => {
                let why = if info.methods.contains_key(AUDIO_ENCODER) {
                    format!(
                        "the model has an `{AUDIO_ENCODER}`, but decoder-only models with \
                         audio input are not supported yet"
                    )
                } else {
                    "the model takes no audio (encoder-decoder speech models such as \
                     Whisper run with AsrRunner / `etllm transcribe`)"
                        .to_string()
                };
                return Err(Error::UnsupportedModel(format!("{what} is audio: {why}")));
            }
        };
        out.push(segment);
    }
    Ok(out)
}

/// The vision encoder's input spec and the positions its output fills.
fn vision_encoder(
    info: &ModelInfo,
    kind: ModelKind,
    what: &str,
    thing: &str,
) -> Result<(crate::tensor::TensorSpec, usize)> {
    let method = info
        .methods
        .get(VISION_ENCODER)
        .filter(|_| kind == ModelKind::Embeddings)
        .ok_or_else(|| {
            Error::UnsupportedModel(format!(
                "{what} is {thing}, but the model takes only text: it has no \
                 `{VISION_ENCODER}` method (upstream's multimodal layout: \
                 `{VISION_ENCODER}`, `token_embedding`, `text_decoder`)"
            ))
        })?;
    let spec = method
        .inputs
        .first()
        .and_then(|v| v.tensor())
        .filter(|_| method.inputs.len() == 1)
        .ok_or_else(|| {
            Error::UnsupportedModel(format!("`{VISION_ENCODER}` does not take one tensor"))
        })?
        .clone();
    let out = method.outputs.first().and_then(|v| v.tensor());
    let rows = match out.map(|t| t.sizes.as_slice()) {
        Some([1, n, _]) => *n,
        Some([n, _]) => *n,
        _ => {
            return Err(Error::UnsupportedModel(format!(
                "`{VISION_ENCODER}` returns {out:?}; expected embeddings [1, n, dim]"
            )))
        }
    };
    Ok((spec, rows))
}

/// The encoder input for an image: preprocessed floats (`[1, 3, H, W]` or `[3, H, W]`),
/// or 8-bit RGB resized to the input's size for an encoder that takes bytes and
/// preprocesses them itself (upstream's Llava example).
fn image_input(
    pixels: &Pixels,
    spec: &crate::tensor::TensorSpec,
    media: &Media,
    what: &str,
) -> Result<EncoderInput> {
    let dims = spec.sizes.as_slice();
    let (c, h, w) = match dims {
        [1, c, h, w] | [c, h, w] => (*c, *h, *w),
        _ => {
            return Err(Error::UnsupportedModel(format!(
                "`{VISION_ENCODER}` takes {dims:?}; expected [1, 3, H, W] or [3, H, W]"
            )))
        }
    };
    if c != 3 {
        return Err(Error::UnsupportedModel(format!(
            "`{VISION_ENCODER}` takes {c} channels; EtLlm prepares RGB"
        )));
    }
    match spec.dtype {
        DType::U8 => {
            let rgb = pixels.to_rgb();
            let rgb = if (rgb.width, rgb.height) == (w, h) {
                rgb
            } else {
                image::resize(&rgb, w, h, image::Resample::Bicubic)
            };
            let mut chw = vec![0u8; 3 * h * w];
            for (i, px) in rgb.data.chunks_exact(3).enumerate() {
                for ch in 0..3 {
                    chw[ch * h * w + i] = px[ch];
                }
            }
            Ok(EncoderInput::Bytes(dims.to_vec(), chw))
        }
        DType::F32 | DType::F16 | DType::BF16 => {
            let pre = media.image.as_ref().ok_or_else(|| {
                Error::UnsupportedModel(format!(
                    "{what}: the model's `{VISION_ENCODER}` takes preprocessed pixel values, \
                     and no image processor settings were found: put the model's \
                     preprocessor_config.json beside the .pte or the tokenizer, or name it \
                     (RunnerOptions::preprocessor_config, --preprocessor-config)"
                ))
            })?;
            let (values, pw, ph) = pre.pixel_values(pixels);
            if (pw, ph) != (w, h) {
                return Err(Error::UnsupportedModel(format!(
                    "{what}: the image processor settings{} make {pw}x{ph} images, but \
                     `{VISION_ENCODER}` takes {w}x{h}",
                    media
                        .image_config
                        .as_ref()
                        .map(|p| format!(" ({})", p.display()))
                        .unwrap_or_default()
                )));
            }
            float_input(spec, dims.to_vec(), &values)
        }
        other => Err(Error::UnsupportedModel(format!(
            "`{VISION_ENCODER}` takes {other:?} input; EtLlm gives f32, f16, bf16 or u8"
        ))),
    }
}

fn float_input(
    spec: &crate::tensor::TensorSpec,
    sizes: Vec<usize>,
    values: &[f32],
) -> Result<EncoderInput> {
    let data = HostData::float_zeros(spec.dtype, values.len()).ok_or_else(|| {
        Error::UnsupportedModel(format!(
            "`{VISION_ENCODER}` takes {:?} input; features are floats",
            spec.dtype
        ))
    })?;
    let mut t = HostTensor::new(sizes, data)?;
    t.data_mut().write_floats(0, values)?;
    Ok(EncoderInput::Floats(t))
}

/// Feeds `segments` from `pos`: tokens through the manager, encoder outputs straight to
/// `text_decoder`. Appends what it fed to `fed` ([`MEDIA_POSITION`] for encoder rows).
/// Returns the position after them and the logits after the last.
pub(crate) fn feed_segments(
    model: &mut Model,
    io: &mut Box<dyn IoManager>,
    fed: &mut Vec<u32>,
    segments: &[Segment],
    mut pos: usize,
    max_context: usize,
) -> Result<(usize, Vec<f32>)> {
    let mut logits = Vec::new();
    for segment in segments {
        match segment {
            Segment::Tokens(tokens) => {
                let feed: Vec<u64> = tokens.iter().map(|&t| t as u64).collect();
                let out = feed_tokens(model, io, &feed, pos, false, max_context, false)?
                    .ok_or_else(|| Error::IoManager("the model failed past its context".into()))?;
                logits.clear();
                logits.extend_from_slice(out);
                fed.extend_from_slice(tokens);
                pos += tokens.len();
            }
            Segment::Encoder {
                method,
                input,
                rows,
            } => {
                let embeds = model.run_encoder(method, input.view())?;
                let (chunk, dim) = model.embedding_rows().ok_or_else(|| {
                    Error::UnsupportedModel("the model takes no embeddings".into())
                })?;
                let values = match embeds.data() {
                    HostData::F32(v) => v.as_slice(),
                    _ => unreachable!("run_encoder widens to f32"),
                };
                if values.len() != rows * dim {
                    return Err(Error::UnsupportedModel(format!(
                        "`{method}` returned sizes {:?}; expected [1, {rows}, {dim}]",
                        embeds.sizes()
                    )));
                }
                for (i, part) in values.chunks(chunk * dim).enumerate() {
                    let at = pos + i * chunk;
                    let outputs = model.decode_embeddings(part, at)?;
                    let out = last_logits(&outputs)?;
                    logits.clear();
                    logits.extend_from_slice(out);
                }
                fed.extend(std::iter::repeat_n(MEDIA_POSITION, *rows));
                pos += rows;
            }
        }
    }
    Ok((pos, logits))
}
