//! Speech to text with encoder-decoder exports (Whisper), as upstream's `Seq2SeqRunner`
//! (`extension/asr/runner`) runs them: `encoder(features[1, n_mels, frames])` once, then
//! `text_decoder(tokens[1, 1], encoder_output, cache_position[1]) -> logits` a token at a
//! time. The features are Whisper's log-mel spectrogram, computed here from the audio
//! ([`crate::media::audio`]).
//!
//! ```
//! use std::ops::ControlFlow;
//! use etllm::multimodal::AudioSource;
//! use etllm::{AsrOptions, AsrRunner, TranscribeConfig};
//!
//! // A tiny Whisper exported by optimum-executorch (random weights: its text is noise).
//! let dir = "tests/fixtures/whisper";
//! let mut asr = AsrRunner::open(
//!     format!("{dir}/model.pte"),
//!     format!("{dir}/tokenizer.json"),
//!     AsrOptions::default(),
//! )?;
//! let mut config = TranscribeConfig::default(); // greedy, until <|endoftext|>
//! config.language = Some("en".into()); // None: detected
//! let audio = AudioSource::File(format!("{dir}/audio/speech16k.wav").into());
//! let t = asr.transcribe(&audio, &config, |piece| {
//!     eprint!("{}", piece.text); // streamed
//!     ControlFlow::Continue(())
//! })?;
//! assert_eq!(t.prompt.len(), 4); // <|startoftranscript|><|en|><|transcribe|><|notimestamps|>
//! assert_eq!(t.stats.num_prompt_tokens, 1500); // the encoder's output rows
//! # Ok::<(), etllm::Error>(())
//! ```

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crate::config::GenerationConfig;
use crate::error::{Error, Result};
use crate::generate::{clock_seed, StopHandle, TokenPiece};
use crate::io_manager::last_logits;
use crate::media::audio::{LogMel, LogMelConfig};
use crate::model::{Model, ModelFiles, ModelKind, SEQ2SEQ_ENCODER, TEXT_DECODER};
use crate::multimodal::AudioSource;
use crate::sampler::Sampler;
use crate::stats::{now_us, Stats, StopReason};
use crate::tensor::{DType, HostData, HostTensor, TensorSpec};
use crate::tokenizer::Tokenizer;

/// Whisper's language codes, in its token order (`<|en|>` first).
const LANGUAGES: &[&str] = &[
    "en", "zh", "de", "es", "ru", "ko", "fr", "ja", "pt", "tr", "pl", "ca", "nl", "ar", "sv", "it",
    "id", "hi", "fi", "vi", "he", "uk", "el", "ms", "cs", "ro", "da", "hu", "ta", "no", "th", "ur",
    "hr", "bg", "lt", "la", "mi", "ml", "cy", "sk", "te", "fa", "lv", "bn", "sr", "az", "sl", "kn",
    "et", "mk", "br", "eu", "is", "hy", "ne", "mn", "bs", "kk", "sq", "sw", "gl", "mr", "pa", "si",
    "km", "sn", "yo", "so", "af", "oc", "ka", "be", "tg", "sd", "gu", "am", "yi", "lo", "uz", "fo",
    "ht", "ps", "tk", "nn", "mt", "sa", "lb", "my", "bo", "tl", "mg", "as", "tt", "haw", "ln",
    "ha", "ba", "jw", "su", "yue",
];

/// Options of [`AsrRunner::open`].
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct AsrOptions {
    /// Threads of ExecuTorch's CPU thread pool (see [`crate::RunnerOptions::num_threads`]).
    pub num_threads: Option<usize>,
    /// External data files (`.ptd`); when empty, `<model stem>.ptd` beside the model is
    /// used if it exists.
    pub data_paths: Vec<PathBuf>,
    /// The feature extractor's settings (a Whisper `preprocessor_config.json`). When
    /// `None`, `preprocessor_config.json` beside the model, else beside the tokenizer, is
    /// used if there is one; else Whisper's defaults (80 mel bands, 16 kHz, 30 s), which
    /// must then match the encoder's input.
    pub preprocessor_config: Option<PathBuf>,
}

/// What to decode: the start of the decoder's prompt and the sampling.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct TranscribeConfig {
    /// Sampling and limits: `max_new_tokens` (-1: until the decoder's context is full),
    /// `temperature` (0 is greedy), `top_k`, `top_p`, `min_p`, `seed`,
    /// `repetition_penalty`, `stop_token_ids`. Other fields do not apply.
    pub generation: GenerationConfig,
    /// The spoken language as Whisper's code (`"en"`, `"fr"`...). `None`: detected from
    /// the decoder's first step, as Whisper does, when the tokenizer has language tokens.
    pub language: Option<String>,
    /// Translate to English instead of transcribing (`<|translate|>`).
    pub translate: bool,
    /// The whole decoder prompt, replacing `<|startoftranscript|>`, the language, the
    /// task and `<|notimestamps|>`.
    pub decoder_prompt: Option<Vec<u32>>,
}

impl Default for TranscribeConfig {
    fn default() -> Self {
        Self {
            generation: GenerationConfig {
                temperature: 0.0,
                max_new_tokens: -1,
                echo: false,
                ..GenerationConfig::default()
            },
            language: None,
            translate: false,
            decoder_prompt: None,
        }
    }
}

/// The result of [`AsrRunner::transcribe`].
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Transcript {
    /// The text (special tokens left out).
    pub text: String,
    /// The generated token ids, the EOS excluded.
    pub tokens: Vec<u32>,
    /// The decoder prompt used (start token, language, task...).
    pub prompt: Vec<u32>,
    /// The language code detected or given, if the prompt has one.
    pub language: Option<String>,
    /// Timings and counts. `num_prompt_tokens` is the encoder's output length;
    /// `prompt_eval_end_us` marks the end of the encoder.
    pub stats: Stats,
}

/// Runs an encoder-decoder speech-to-text export (Whisper). Used from one thread at a
/// time; its [`StopHandle`] may be used from any thread.
pub struct AsrRunner {
    model: Model,
    tokenizer: Tokenizer,
    mel: LogMel,
    features_spec: TensorSpec,
    encoder_dtype: DType,
    tokens_i32: bool,
    decoder_start: u32,
    eos_ids: Vec<u32>,
    /// Tokens from this id on are special (Whisper's `<|endoftext|>` and after).
    first_special: u32,
    max_positions: usize,
    vocab: usize,
    stop: Arc<AtomicBool>,
    load_us: (u64, u64),
}

impl std::fmt::Debug for AsrRunner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AsrRunner")
            .field("features", &self.features_spec.sizes)
            .field("decoder_start", &self.decoder_start)
            .field("eos_ids", &self.eos_ids)
            .finish()
    }
}

impl AsrRunner {
    /// Loads the model, its tokenizer and the feature extractor's settings.
    pub fn open(
        model_path: impl AsRef<Path>,
        tokenizer_path: impl AsRef<Path>,
        options: AsrOptions,
    ) -> Result<Self> {
        let start = now_us();
        let (model_path, tokenizer_path) = (model_path.as_ref(), tokenizer_path.as_ref());
        if let Some(n) = options.num_threads {
            crate::et::set_num_threads(n)?;
        }
        let tokenizer = Tokenizer::load(tokenizer_path, None)?;
        let model = Model::load(&ModelFiles {
            program: model_path.to_path_buf(),
            data: options.data_paths.clone(),
            method: None,
        })?;
        if model.kind() != ModelKind::Seq2Seq {
            return Err(Error::UnsupportedModel(format!(
                "{} is not an encoder-decoder export: it needs `{SEQ2SEQ_ENCODER}` and \
                 `{TEXT_DECODER}` methods (upstream's ASR layout); decoder-only models run \
                 with Runner",
                model_path.display()
            )));
        }
        let info = model.info();
        let meta = &info.metadata;
        let input = |method: &str, i: usize| -> Result<TensorSpec> {
            info.methods
                .get(method)
                .and_then(|m| m.inputs.get(i))
                .and_then(|v| v.tensor())
                .cloned()
                .ok_or_else(|| {
                    Error::UnsupportedModel(format!(
                        "`{method}` has no tensor input {i}; upstream's ASR layout is \
                         encoder(features) and text_decoder(tokens, encoder_output, \
                         cache_position)"
                    ))
                })
        };
        let features_spec = input(SEQ2SEQ_ENCODER, 0)?;
        let tokens_spec = input(TEXT_DECODER, 0)?;
        let encoder_spec = input(TEXT_DECODER, 1)?;
        input(TEXT_DECODER, 2)?;
        if tokens_spec.sizes != [1, 1] || !matches!(tokens_spec.dtype, DType::I64 | DType::I32) {
            return Err(Error::UnsupportedModel(format!(
                "`{TEXT_DECODER}` takes tokens {:?} {:?}; expected one integer token [1, 1]",
                tokens_spec.dtype, tokens_spec.sizes
            )));
        }
        let config = match options.preprocessor_config.clone().or_else(|| {
            [model_path, tokenizer_path].iter().find_map(|p| {
                p.parent()
                    .map(|d| d.join("preprocessor_config.json"))
                    .filter(|f| f.is_file())
            })
        }) {
            Some(path) => LogMelConfig::from_file(&path)?,
            None => LogMelConfig::default(),
        };
        let want = [1, config.feature_size, config.n_frames()];
        if features_spec.sizes != want {
            return Err(Error::UnsupportedModel(format!(
                "`{SEQ2SEQ_ENCODER}` takes features {:?}, but the feature extractor settings \
                 make {want:?} (give the model's preprocessor_config.json)",
                features_spec.sizes
            )));
        }
        let const_int = |name: &str| meta.raw.get(name).copied();
        let decoder_start = const_int("decoder_start_token_id")
            .and_then(|v| u32::try_from(v).ok())
            .or_else(|| tokenizer.token_id("<|startoftranscript|>"))
            .ok_or_else(|| {
                Error::UnsupportedModel(
                    "the decoder's start token is unknown: the export has no \
                     `decoder_start_token_id` and the tokenizer no <|startoftranscript|>"
                        .into(),
                )
            })?;
        let mut eos_ids = meta.eos_ids.clone();
        if eos_ids.is_empty() {
            eos_ids = tokenizer.eos_ids().to_vec();
        }
        if let Some(eot) = tokenizer.token_id("<|endoftext|>") {
            if !eos_ids.contains(&eot) {
                eos_ids.push(eot);
            }
        }
        if eos_ids.is_empty() {
            return Err(Error::UnsupportedModel(
                "no end-of-text token: neither the export nor the tokenizer names one".into(),
            ));
        }
        let vocab = meta.vocab_size.unwrap_or_else(|| tokenizer.vocab_size());
        let first_special = tokenizer
            .token_id("<|endoftext|>")
            .into_iter()
            .chain(std::iter::once(decoder_start))
            .min()
            .unwrap_or(u32::MAX);
        let encoder_dtype = encoder_spec.dtype;
        let mel = LogMel::new(config)?;
        Ok(Self {
            max_positions: meta.max_context_len,
            model,
            tokenizer,
            mel,
            features_spec,
            encoder_dtype,
            tokens_i32: tokens_spec.dtype == DType::I32,
            decoder_start,
            eos_ids,
            first_special,
            vocab,
            stop: Arc::new(AtomicBool::new(false)),
            load_us: (start, now_us()),
        })
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The feature extractor's settings.
    pub fn features_config(&self) -> &LogMelConfig {
        self.mel.config()
    }

    /// The most decoder positions (prompt and generated tokens).
    pub fn max_decoder_positions(&self) -> usize {
        self.max_positions
    }

    /// A handle that stops a running [`transcribe`](Self::transcribe) from any thread.
    pub fn stop_handle(&self) -> StopHandle {
        StopHandle(self.stop.clone())
    }

    /// The log-mel features of `audio` (resampled to the model's rate when needed), as
    /// the encoder takes them: `feature_size` rows of `n_frames` values.
    pub fn features(&self, audio: &AudioSource) -> Result<Vec<f32>> {
        let audio = audio
            .decode("audio")?
            .resampled(self.mel.config().sampling_rate)?;
        Ok(self.mel.compute(&audio.samples))
    }

    /// The decoder prompt for `config` (before language detection).
    fn prompt(&self, config: &TranscribeConfig) -> Result<(Vec<u32>, bool)> {
        if let Some(p) = &config.decoder_prompt {
            if p.is_empty() {
                return Err(Error::InvalidArgument("the decoder prompt is empty".into()));
            }
            if let Some(bad) = p.iter().find(|&&t| t as usize >= self.vocab) {
                return Err(Error::InvalidArgument(format!(
                    "decoder prompt token {bad} is outside the vocabulary of {}",
                    self.vocab
                )));
            }
            return Ok((p.clone(), false));
        }
        let mut prompt = vec![self.decoder_start];
        let mut detect = false;
        match &config.language {
            Some(code) => {
                let id = self
                    .tokenizer
                    .token_id(&format!("<|{code}|>"))
                    .ok_or_else(|| {
                        Error::InvalidArgument(format!(
                            "language {code:?}: the tokenizer has no <|{code}|> token"
                        ))
                    })?;
                prompt.push(id);
            }
            None => detect = self.language_ids().next().is_some(),
        }
        let task = if config.translate {
            "<|translate|>"
        } else {
            "<|transcribe|>"
        };
        match self.tokenizer.token_id(task) {
            Some(id) => prompt.push(id),
            None if config.translate => {
                return Err(Error::InvalidArgument(
                    "translate: the tokenizer has no <|translate|> token".into(),
                ))
            }
            None => {}
        }
        if let Some(id) = self.tokenizer.token_id("<|notimestamps|>") {
            prompt.push(id);
        }
        Ok((prompt, detect))
    }

    fn language_ids(&self) -> impl Iterator<Item = (&'static str, u32)> + '_ {
        LANGUAGES.iter().filter_map(|&code| {
            self.tokenizer
                .token_id(&format!("<|{code}|>"))
                .map(|id| (code, id))
        })
    }

    /// Transcribes `audio`: decodes and resamples it, computes its features, runs the
    /// encoder once and decodes until an end-of-text token, `max_new_tokens` or the
    /// decoder's context. Text pieces stream to `on_piece` (special tokens left out;
    /// return `Break` to stop).
    pub fn transcribe(
        &mut self,
        audio: &AudioSource,
        config: &TranscribeConfig,
        on_piece: impl FnMut(TokenPiece<'_>) -> ControlFlow<()>,
    ) -> Result<Transcript> {
        let features = self.features(audio)?;
        self.transcribe_features(&features, config, on_piece)
    }

    /// [`transcribe`](Self::transcribe) from features computed elsewhere
    /// (`feature_size` x `n_frames` values, as [`features`](Self::features) makes them).
    pub fn transcribe_features(
        &mut self,
        features: &[f32],
        config: &TranscribeConfig,
        mut on_piece: impl FnMut(TokenPiece<'_>) -> ControlFlow<()>,
    ) -> Result<Transcript> {
        let start = now_us();
        let g = &config.generation;
        g.validate()?;
        if !g.grammar.is_empty() {
            return Err(Error::InvalidArgument(
                "grammars do not apply to transcription".into(),
            ));
        }
        if features.len() != self.features_spec.numel() {
            return Err(Error::InvalidArgument(format!(
                "the features have {} values; the encoder takes {:?}",
                features.len(),
                self.features_spec.sizes
            )));
        }
        if let Some(i) = features.iter().position(|v| !v.is_finite()) {
            return Err(Error::InvalidArgument(format!(
                "feature {i} is not a finite number"
            )));
        }
        let (mut prompt, detect) = self.prompt(config)?;
        if prompt.len() + usize::from(detect) >= self.max_positions {
            return Err(Error::ContextFull {
                prompt_tokens: prompt.len(),
                available: self.max_positions.saturating_sub(1),
                max_context: self.max_positions,
                position: 0,
            });
        }
        self.stop.store(false, Ordering::Release);
        let mut stats = Stats {
            model_load_start_us: self.load_us.0,
            model_load_end_us: self.load_us.1,
            inference_start_us: start,
            token_encode_end_us: now_us(),
            ..Default::default()
        };
        let t0 = Instant::now();
        let mut input = HostTensor::new(
            self.features_spec.sizes.clone(),
            HostData::float_zeros(self.features_spec.dtype, features.len()).ok_or_else(|| {
                Error::UnsupportedModel(format!(
                    "`{SEQ2SEQ_ENCODER}` takes {:?} features; expected floats",
                    self.features_spec.dtype
                ))
            })?,
        )?;
        input.data_mut().write_floats(0, features)?;
        let encoded = self.model.run_encoder(SEQ2SEQ_ENCODER, input.view())?;
        let mut encoder_out = HostTensor::new(
            encoded.sizes().to_vec(),
            HostData::float_zeros(self.encoder_dtype, encoded.numel()).ok_or_else(|| {
                Error::UnsupportedModel(format!(
                    "`{TEXT_DECODER}` takes {:?} encoder output; expected floats",
                    self.encoder_dtype
                ))
            })?,
        )?;
        if let HostData::F32(v) = encoded.data() {
            encoder_out.data_mut().write_floats(0, v)?;
        }
        stats.num_prompt_tokens = encoded.sizes().get(1).copied().unwrap_or(0) as u64;
        stats.prompt_eval_end_us = now_us();
        let mut model_ns = t0.elapsed().as_nanos();

        let tokens_i32 = self.tokens_i32;
        let mut step = |model: &mut Model, token: u32, pos: usize| -> Result<Vec<f32>> {
            let t = Instant::now();
            let tok = if tokens_i32 {
                HostTensor::new(vec![1, 1], HostData::I32(vec![token as i32]))?
            } else {
                HostTensor::new(vec![1, 1], HostData::I64(vec![token as i64]))?
            };
            let position = HostTensor::new(vec![1], HostData::I64(vec![pos as i64]))?;
            let outputs = model.execute(
                TEXT_DECODER,
                &[tok.view(), encoder_out.view(), position.view()],
            )?;
            let logits = last_logits(&outputs)?.to_vec();
            model_ns += t.elapsed().as_nanos();
            Ok(logits)
        };
        let mut logits = Vec::new();
        let mut pos = 0;
        let mut language = config.language.clone();
        if detect {
            // Whisper's language detection: the likeliest language token after the start
            // token; the language then goes right after it.
            logits = step(&mut self.model, prompt[0], 0)?;
            let (code, id) = self
                .language_ids()
                .filter(|&(_, id)| (id as usize) < logits.len())
                .max_by(|a, b| {
                    logits[a.1 as usize]
                        .total_cmp(&logits[b.1 as usize])
                        .then(b.1.cmp(&a.1))
                })
                .expect("detect is set only when there are language tokens");
            language = Some(code.to_string());
            prompt.insert(1, id);
            pos = 1;
        } else if language.is_none() {
            language = prompt.iter().find_map(|&t| {
                self.language_ids()
                    .find(|&(_, id)| id == t)
                    .map(|(c, _)| c.to_string())
            });
        }
        for &t in &prompt[pos..] {
            logits = step(&mut self.model, t, pos)?;
            pos += 1;
        }

        let n_new = g
            .resolve_max_new_tokens(self.max_positions as i64, pos as i64)
            .max(0) as usize;
        // Whether the decoder's context, not the caller's limit, bounds the output.
        let context_bound = (n_new as i64) < g.resolve_max_new_tokens(i64::MAX / 4, pos as i64);
        let mut sampler = Sampler::with_params(g.sampling(), g.seed.unwrap_or_else(clock_seed));
        let mut stream = self.tokenizer.stream();
        let mut text = String::new();
        let mut tokens = Vec::new();
        let mut history = prompt.clone();
        let mut sample_ns = 0u128;
        let reason = loop {
            if tokens.len() >= n_new {
                break if context_bound {
                    StopReason::ContextFull
                } else {
                    StopReason::Length
                };
            }
            if self.stop.load(Ordering::Acquire) {
                break StopReason::Stopped;
            }
            let s0 = Instant::now();
            let token = sampler.sample(&logits, &history);
            sample_ns += s0.elapsed().as_nanos();
            if tokens.is_empty() {
                stats.first_token_us = now_us();
            }
            if (!g.ignore_eos && self.eos_ids.contains(&token)) || g.stop_token_ids.contains(&token)
            {
                break StopReason::Eos;
            }
            tokens.push(token);
            history.push(token);
            stats.num_generated_tokens = tokens.len() as u64;
            if token < self.first_special {
                let piece = stream.push(token)?;
                text.push_str(&piece);
                if on_piece(TokenPiece {
                    token: Some(token),
                    text: &piece,
                })
                .is_break()
                {
                    break StopReason::Callback;
                }
            }
            if tokens.len() >= n_new || pos >= self.max_positions {
                continue;
            }
            logits = step(&mut self.model, token, pos)?;
            pos += 1;
        };
        let rest = stream.flush()?;
        if !rest.is_empty() {
            text.push_str(&rest);
            if reason != StopReason::Callback {
                let _ = on_piece(TokenPiece {
                    token: None,
                    text: &rest,
                });
            }
        }
        stats.stop_reason = reason;
        stats.aggregate_model_execution_time_us = (model_ns / 1000) as u64;
        stats.aggregate_sampling_time_us = (sample_ns / 1000) as u64;
        stats.inference_end_us = now_us();
        Ok(Transcript {
            text,
            tokens,
            prompt,
            language,
            stats,
        })
    }
}
