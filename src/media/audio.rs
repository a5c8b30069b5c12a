//! Audio: WAV reading (`hound`), downmixing, resampling (`rubato`) and Whisper's log-mel
//! features, computed as `transformers`' `WhisperFeatureExtractor` computes them.

use std::path::Path;

use realfft::RealFftPlanner;
use serde::Deserialize;

use crate::error::{Error, Result};

/// Mono samples in [-1, 1] at a sample rate.
#[derive(Debug, Clone, PartialEq)]
pub struct Audio {
    /// The samples.
    pub samples: Vec<f32>,
    /// Samples a second.
    pub sample_rate: u32,
}

/// The lowest and highest sample rates accepted.
pub const SAMPLE_RATES: std::ops::RangeInclusive<u32> = 1_000..=384_000;

fn bad(what: &str, message: impl Into<String>) -> Error {
    Error::InvalidMedia {
        what: what.to_string(),
        message: message.into(),
    }
}

impl Audio {
    /// Float samples, `channels` interleaved: one channel, or two averaged into one (as
    /// whisper.cpp and librosa downmix stereo). `what` names the audio in errors.
    pub fn from_interleaved(
        samples: &[f32],
        channels: usize,
        sample_rate: u32,
        what: &str,
    ) -> Result<Self> {
        if !SAMPLE_RATES.contains(&sample_rate) {
            return Err(bad(
                what,
                format!(
                    "a sample rate of {sample_rate} Hz is out of range ({} to {} Hz)",
                    SAMPLE_RATES.start(),
                    SAMPLE_RATES.end()
                ),
            ));
        }
        let mono = match channels {
            1 => samples.to_vec(),
            2 => {
                if !samples.len().is_multiple_of(2) {
                    return Err(bad(what, "stereo samples come in pairs; the count is odd"));
                }
                samples
                    .chunks_exact(2)
                    .map(|p| (p[0] + p[1]) * 0.5)
                    .collect()
            }
            n => {
                return Err(bad(
                    what,
                    format!("audio with {n} channels is not supported (mono or stereo)"),
                ))
            }
        };
        if mono.is_empty() {
            return Err(bad(what, "the audio has no samples"));
        }
        if let Some(i) = mono.iter().position(|v| !v.is_finite()) {
            return Err(bad(what, format!("sample {i} is not a finite number")));
        }
        Ok(Self {
            samples: mono,
            sample_rate,
        })
    }

    /// Reads a WAV file: PCM 8, 16, 24 or 32 bits, or IEEE float 32 bits; mono or stereo.
    pub fn from_wav_file(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::FileAccess {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        Self::from_wav(&bytes, &path.display().to_string())
    }

    /// Reads WAV bytes; `what` names them in errors.
    pub fn from_wav(bytes: &[u8], what: &str) -> Result<Self> {
        let reader = hound::WavReader::new(std::io::Cursor::new(bytes))
            .map_err(|e| bad(what, format!("not a WAV file EtLlm can read: {e}")))?;
        let spec = reader.spec();
        let channels = spec.channels as usize;
        if !(1..=2).contains(&channels) {
            return Err(bad(
                what,
                format!("audio with {channels} channels is not supported (mono or stereo)"),
            ));
        }
        let truncated =
            |e: hound::Error| bad(what, format!("the WAV data ends early or is corrupt: {e}"));
        let samples: Vec<f32> = match (spec.sample_format, spec.bits_per_sample) {
            (hound::SampleFormat::Float, 32) => reader
                .into_samples::<f32>()
                .collect::<std::result::Result<_, _>>()
                .map_err(truncated)?,
            (hound::SampleFormat::Int, bits @ (8 | 16 | 24 | 32)) => {
                let scale = 1.0 / (1u64 << (bits - 1)) as f64;
                reader
                    .into_samples::<i32>()
                    .map(|s| s.map(|v| (v as f64 * scale) as f32))
                    .collect::<std::result::Result<_, _>>()
                    .map_err(truncated)?
            }
            (format, bits) => {
                return Err(bad(
                    what,
                    format!("{bits}-bit {format:?} WAV samples are not supported"),
                ))
            }
        };
        Self::from_interleaved(&samples, channels, spec.sample_rate, what)
    }

    /// The audio at `rate` (`rubato`'s FFT resampler), or itself when it is at `rate`.
    pub fn resampled(self, rate: u32) -> Result<Self> {
        if self.sample_rate == rate {
            return Ok(self);
        }
        use rubato::{FftFixedIn, Resampler};
        let fail = |e: &dyn std::fmt::Display| Error::InvalidArgument(format!("resampling: {e}"));
        let (from, to) = (self.sample_rate as usize, rate as usize);
        let mut r = FftFixedIn::<f64>::new(from, to, 1024, 2, 1).map_err(|e| fail(&e))?;
        let want = (self.samples.len() as u128 * to as u128).div_ceil(from as u128) as usize;
        let delay = r.output_delay();
        let input: Vec<f64> = self.samples.iter().map(|&v| v as f64).collect();
        let mut out: Vec<f64> = Vec::with_capacity(want + delay + 2048);
        let mut at = 0;
        while input.len() - at >= r.input_frames_next() {
            let n = r.input_frames_next();
            let block = r
                .process(&[&input[at..at + n]], None)
                .map_err(|e| fail(&e))?;
            out.extend_from_slice(&block[0]);
            at += n;
        }
        if at < input.len() {
            let block = r
                .process_partial(Some(&[&input[at..]]), None)
                .map_err(|e| fail(&e))?;
            out.extend_from_slice(&block[0]);
        }
        while out.len() < want + delay {
            let block = r
                .process_partial::<&[f64]>(None, None)
                .map_err(|e| fail(&e))?;
            if block[0].is_empty() {
                break;
            }
            out.extend_from_slice(&block[0]);
        }
        let end = (delay + want).min(out.len());
        Ok(Self {
            samples: out[delay.min(end)..end].iter().map(|&v| v as f32).collect(),
            sample_rate: rate,
        })
    }
}

/// The settings of Whisper's feature extractor (`preprocessor_config.json` of a Whisper
/// model, `WhisperFeatureExtractor`); the defaults are Whisper's.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct LogMelConfig {
    /// Mel bands (`feature_size`): 80, or 128 for large-v3.
    pub feature_size: usize,
    /// The rate the model hears (16000).
    pub sampling_rate: u32,
    /// Samples between frames (160).
    pub hop_length: usize,
    /// Window and FFT length (400).
    pub n_fft: usize,
    /// Seconds of input (30): shorter audio is padded with zeros, longer is cut.
    pub chunk_length: usize,
}

impl Default for LogMelConfig {
    fn default() -> Self {
        Self {
            feature_size: 80,
            sampling_rate: 16_000,
            hop_length: 160,
            n_fft: 400,
            chunk_length: 30,
        }
    }
}

impl LogMelConfig {
    /// Reads the feature extractor's settings from `preprocessor_config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::FileAccess {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        let config: Self = serde_json::from_str(&text).map_err(|e| {
            Error::InvalidArgument(format!(
                "{}: not a feature extractor config: {e}",
                path.display()
            ))
        })?;
        config.check()?;
        Ok(config)
    }

    fn check(&self) -> Result<()> {
        let ok = (1..=512).contains(&self.feature_size)
            && SAMPLE_RATES.contains(&self.sampling_rate)
            && (1..=1 << 16).contains(&self.hop_length)
            && (2..=1 << 16).contains(&self.n_fft)
            && (1..=600).contains(&self.chunk_length);
        if ok {
            Ok(())
        } else {
            Err(Error::InvalidArgument(format!(
                "feature extractor settings out of range: {self:?}"
            )))
        }
    }

    /// Samples in one input (`chunk_length` seconds).
    pub fn n_samples(&self) -> usize {
        self.chunk_length * self.sampling_rate as usize
    }

    /// Frames in one input (3000 for Whisper).
    pub fn n_frames(&self) -> usize {
        self.n_samples() / self.hop_length
    }
}

/// Whisper's log-mel spectrogram: `feature_size` x `n_frames` values, row-major.
pub struct LogMel {
    config: LogMelConfig,
    /// `feature_size` rows of `n_fft / 2 + 1` weights.
    filters: Vec<f64>,
    window: Vec<f64>,
}

fn hz_to_mel(f: f64) -> f64 {
    let logstep = 27.0 / 6.4f64.ln();
    if f >= 1000.0 {
        15.0 + (f / 1000.0).ln() * logstep
    } else {
        3.0 * f / 200.0
    }
}

fn mel_to_hz(m: f64) -> f64 {
    let logstep = 6.4f64.ln() / 27.0;
    if m >= 15.0 {
        1000.0 * (logstep * (m - 15.0)).exp()
    } else {
        200.0 * m / 3.0
    }
}

impl LogMel {
    /// Builds the mel filters (Slaney scale and norm, 0 Hz to half the rate) and the
    /// periodic Hann window.
    pub fn new(config: LogMelConfig) -> Result<Self> {
        config.check()?;
        let bins = config.n_fft / 2 + 1;
        let n_mels = config.feature_size;
        let (lo, hi) = (hz_to_mel(0.0), hz_to_mel(config.sampling_rate as f64 / 2.0));
        let filter_freqs: Vec<f64> = (0..n_mels + 2)
            .map(|i| mel_to_hz(lo + (hi - lo) * i as f64 / (n_mels + 1) as f64))
            .collect();
        // np.linspace(0, sampling_rate // 2, bins)
        let nyquist = (config.sampling_rate / 2) as f64;
        let fft_freqs: Vec<f64> = (0..bins)
            .map(|i| nyquist * i as f64 / (bins - 1) as f64)
            .collect();
        let mut filters = vec![0f64; n_mels * bins];
        for m in 0..n_mels {
            let (f0, f1, f2) = (filter_freqs[m], filter_freqs[m + 1], filter_freqs[m + 2]);
            let enorm = 2.0 / (f2 - f0);
            for (b, &f) in fft_freqs.iter().enumerate() {
                let down = -(f0 - f) / (f1 - f0);
                let up = (f2 - f) / (f2 - f1);
                filters[m * bins + b] = down.min(up).max(0.0) * enorm;
            }
        }
        let n = config.n_fft;
        let window = (0..n)
            .map(|i| 0.5 - 0.5 * (2.0 * std::f64::consts::PI * i as f64 / n as f64).cos())
            .collect();
        Ok(Self {
            config,
            filters,
            window,
        })
    }

    /// The settings.
    pub fn config(&self) -> &LogMelConfig {
        &self.config
    }

    /// The features of `samples` (mono, at the config's rate), padded with zeros or cut
    /// to `chunk_length` seconds: `feature_size` rows of `n_frames` values.
    pub fn compute(&self, samples: &[f32]) -> Vec<f32> {
        let c = &self.config;
        let n_samples = c.n_samples();
        let mut wave: Vec<f64> = samples.iter().take(n_samples).map(|&v| v as f64).collect();
        wave.resize(n_samples, 0.0);
        // center=True: reflect-pad n_fft / 2 on each side.
        let pad = c.n_fft / 2;
        let mut padded = Vec::with_capacity(n_samples + 2 * pad);
        padded.extend((1..=pad).rev().map(|i| wave[i.min(n_samples - 1)]));
        padded.extend_from_slice(&wave);
        padded.extend((0..pad).map(|i| wave[n_samples.saturating_sub(2 + i)]));
        let n_frames = c.n_frames();
        let bins = c.n_fft / 2 + 1;
        let n_mels = c.feature_size;
        let fft = RealFftPlanner::<f64>::new().plan_fft_forward(c.n_fft);
        let mut input = fft.make_input_vec();
        let mut spectrum = fft.make_output_vec();
        let mut scratch = fft.make_scratch_vec();
        let mut power = vec![0f64; bins];
        let mut log_spec = vec![0f64; n_mels * n_frames];
        for t in 0..n_frames {
            let frame = &padded[t * c.hop_length..t * c.hop_length + c.n_fft];
            for ((dst, &x), &w) in input.iter_mut().zip(frame).zip(&self.window) {
                *dst = x * w;
            }
            fft.process_with_scratch(&mut input, &mut spectrum, &mut scratch)
                .expect("buffers sized by the plan");
            for (p, z) in power.iter_mut().zip(&spectrum) {
                *p = z.norm_sqr();
            }
            for m in 0..n_mels {
                let row = &self.filters[m * bins..(m + 1) * bins];
                let e: f64 = row.iter().zip(&power).map(|(a, b)| a * b).sum();
                log_spec[m * n_frames + t] = e.max(1e-10).log10();
            }
        }
        let max = log_spec.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        log_spec
            .iter()
            .map(|&v| ((v.max(max - 8.0) + 4.0) / 4.0) as f32)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_slaney_mel_scale_round_trips() {
        for f in [0.0, 300.0, 999.0, 1000.0, 4321.0, 8000.0] {
            assert!((mel_to_hz(hz_to_mel(f)) - f).abs() < 1e-9, "{f}");
        }
    }

    #[test]
    fn whisper_features_have_whispers_shape() {
        let mel = LogMel::new(LogMelConfig::default()).unwrap();
        let tone: Vec<f32> = (0..16_000)
            .map(|i| (i as f32 * 440.0 * std::f32::consts::TAU / 16_000.0).sin() * 0.5)
            .collect();
        let f = mel.compute(&tone);
        assert_eq!(f.len(), 80 * 3000);
        assert!(f.iter().all(|v| v.is_finite()));
    }

    #[test]
    fn more_than_two_channels_or_no_samples_are_refused() {
        assert!(Audio::from_interleaved(&[0.0; 6], 3, 16_000, "x").is_err());
        assert!(Audio::from_interleaved(&[], 1, 16_000, "x").is_err());
        assert!(Audio::from_interleaved(&[0.0; 4], 1, 0, "x").is_err());
        assert!(Audio::from_interleaved(&[0.0, f32::NAN], 1, 16_000, "x").is_err());
    }

    #[test]
    fn stereo_is_the_average_of_its_channels() {
        let a = Audio::from_interleaved(&[1.0, 0.0, 0.5, 0.5], 2, 16_000, "x").unwrap();
        assert_eq!(a.samples, vec![0.5, 0.5]);
    }

    #[test]
    fn resampling_keeps_a_tones_frequency_and_the_duration() {
        let tone: Vec<f32> = (0..44_100)
            .map(|i| (i as f32 * 1000.0 * std::f32::consts::TAU / 44_100.0).sin())
            .collect();
        let a = Audio {
            samples: tone,
            sample_rate: 44_100,
        }
        .resampled(16_000)
        .unwrap();
        assert_eq!(a.samples.len(), 16_000);
        // Away from the edges, the samples follow the same 1 kHz sine at 16 kHz.
        for i in 1000..15_000 {
            let want = (i as f32 * 1000.0 * std::f32::consts::TAU / 16_000.0).sin();
            assert!(
                (a.samples[i] - want).abs() < 1e-2,
                "{i}: {} vs {want}",
                a.samples[i]
            );
        }
    }
}
