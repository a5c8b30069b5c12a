//! Speech to text on tests/fixtures/whisper (a tiny Whisper exported by optimum-executorch's
//! ASR exporter), against eager transformers (tools/fixtures/make_whisper.py): log-mel
//! features against `WhisperFeatureExtractor`, tokens against an eager greedy loop.

use std::ops::ControlFlow;
use std::path::PathBuf;

use etllm::media::audio::{Audio, LogMel, LogMelConfig};
use etllm::multimodal::AudioSource;
use etllm::{AsrOptions, AsrRunner, Error, Runner, RunnerOptions, StopReason, TranscribeConfig};
use serde_json::Value;

const EOT: u32 = 400;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/whisper")
}

fn reference() -> Value {
    serde_json::from_slice(&std::fs::read(dir().join("reference.json")).unwrap()).unwrap()
}

fn f32s(name: &str) -> Vec<f32> {
    std::fs::read(dir().join(name))
        .unwrap()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

fn open() -> AsrRunner {
    AsrRunner::open(
        dir().join("model.pte"),
        dir().join("tokenizer.json"),
        AsrOptions::default(),
    )
    .unwrap()
}

fn wav(name: &str) -> AudioSource {
    AudioSource::File(dir().join("audio").join(name))
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// The reference's full [80, 3000] features from a head file and the padding value.
fn full_from_head(name: &str, frames: usize, pad: f32) -> Vec<f32> {
    let head = f32s(name);
    let mut full = vec![pad; 80 * 3000];
    for bin in 0..80 {
        full[bin * 3000..bin * 3000 + frames]
            .copy_from_slice(&head[bin * frames..(bin + 1) * frames]);
    }
    full
}

#[test]
fn wav_samples_match_soundfile_exactly() {
    let audio = Audio::from_wav_file(&dir().join("audio/speech16k.wav")).unwrap();
    assert_eq!(audio.sample_rate, 16_000);
    assert_eq!(audio.samples, f32s("speech16k.samples.f32"));
}

/// The bytes of a WAV file's data chunk, found by hand.
fn data_chunk(name: &str) -> Vec<u8> {
    let bytes = std::fs::read(dir().join("audio").join(name)).unwrap();
    let at = bytes.windows(4).position(|w| w == b"data").unwrap();
    let len = u32::from_le_bytes(bytes[at + 4..at + 8].try_into().unwrap()) as usize;
    bytes[at + 8..at + 8 + len].to_vec()
}

#[test]
fn an_extensible_header_reads_as_speech16ks_signal() {
    let want = f32s("speech16k.samples.f32");
    let got = Audio::from_wav_file(&dir().join("audio/extensible16k.wav")).unwrap();
    assert_eq!(got.sample_rate, 16_000);
    assert_eq!(got.samples, want[..got.samples.len()]);
}

#[test]
fn unsigned_8_bit_samples_are_centered_and_scaled_as_soundfile_does() {
    let want: Vec<f32> = data_chunk("pcm8.wav")
        .iter()
        .map(|&u| (u as f32 - 128.0) / 128.0)
        .collect();
    let got = Audio::from_wav_file(&dir().join("audio/pcm8.wav")).unwrap();
    assert_eq!(got.samples, want);
}

#[test]
fn float_wavs_with_extra_chunks_read_the_stored_values() {
    let want: Vec<f32> = data_chunk("float32_16k.wav")
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    let got = Audio::from_wav_file(&dir().join("audio/float32_16k.wav")).unwrap();
    assert_eq!(got.samples, want);
}

#[test]
fn log_mel_matches_whisper_feature_extractor_within_1e_4() {
    let mel = LogMel::new(LogMelConfig::default()).unwrap();
    let got = mel.compute(&f32s("speech16k.samples.f32"));
    let numpy = max_diff(&got, &f32s("speech16k.mel.f32"));
    let call = max_diff(&got, &f32s("speech16k.mel_call.f32"));
    assert!(numpy < 1e-4, "numpy path: {numpy}");
    assert!(call < 1e-4, "__call__ path: {call}");
}

#[test]
fn stereo_is_averaged_before_the_features() {
    let r = reference();
    let f = &r["features"]["stereo16k"];
    let want = full_from_head(
        "stereo16k.mel_head.f32",
        f["audio_frames"].as_u64().unwrap() as usize,
        f["pad_value_numpy"].as_f64().unwrap() as f32,
    );
    let asr = open();
    let got = asr.features(&wav("stereo16k.wav")).unwrap();
    assert!(max_diff(&got, &want) < 1e-4);
}

#[test]
fn resampling_44k_to_16k_follows_scipys_polyphase_resampler() {
    let got = Audio::from_wav_file(&dir().join("audio/tone44k.wav"))
        .unwrap()
        .resampled(16_000)
        .unwrap();
    let want = f32s("tone44k.resampled16k.f32");
    assert_eq!(got.samples.len(), want.len());
    // Two different band-limited resamplers: close, not equal (edges excluded).
    let n = want.len();
    let inner = max_diff(&got.samples[200..n - 200], &want[200..n - 200]);
    assert!(inner < 2e-3, "{inner}");
    let f = &reference()["features"]["tone44k"];
    let want = full_from_head(
        "tone44k.mel_head.f32",
        f["audio_frames"].as_u64().unwrap() as usize,
        f["pad_value_numpy"].as_f64().unwrap() as f32,
    );
    let features = open().features(&wav("tone44k.wav")).unwrap();
    // The two resamplers' stopbands differ, which shows in the log of near-empty bins;
    // where the signal has energy (40 dB above the floor) the features agree.
    let pad = f["pad_value_numpy"].as_f64().unwrap() as f32;
    let worst = features
        .iter()
        .zip(&want)
        .filter(|(_, &w)| w > pad + 1.0)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(worst < 2e-2, "{worst}");
}

fn case(audio: &str, prompt: &str) -> Value {
    reference()["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["audio"] == format!("audio/{audio}") && c["prompt"] == prompt)
        .unwrap()
        .clone()
}

/// The reference's greedy ids without the end-of-text token.
fn expected(c: &Value) -> Vec<u32> {
    let mut v = ids(&c["greedy_ids"]);
    if v.last() == Some(&EOT) {
        v.pop();
    }
    v
}

fn greedy(max_new: i32) -> TranscribeConfig {
    let mut config = TranscribeConfig::default();
    config.generation.max_new_tokens = max_new;
    config
}

#[test]
fn english_transcription_matches_eager_greedy_tokens_and_text() {
    let mut asr = open();
    for audio in ["speech16k.wav", "stereo16k.wav"] {
        let c = case(audio, "sot_en_transcribe_notimestamps");
        let mut config = greedy(20);
        config.language = Some("en".into());
        let mut streamed = String::new();
        let t = asr
            .transcribe(&wav(audio), &config, |p| {
                streamed.push_str(p.text);
                ControlFlow::Continue(())
            })
            .unwrap();
        assert_eq!(t.prompt, ids(&c["prompt_ids"]), "{audio}");
        assert_eq!(t.tokens, expected(&c), "{audio}");
        assert_eq!(t.text, c["text"].as_str().unwrap(), "{audio}");
        assert_eq!(streamed, t.text);
        let stopped_on_eos = c["stopped_on_eos"].as_bool().unwrap();
        assert_eq!(
            t.stats.stop_reason == StopReason::Eos,
            stopped_on_eos,
            "{audio}"
        );
        assert_eq!(t.stats.num_prompt_tokens, 1500);
    }
}

#[test]
fn a_raw_decoder_prompt_matches_eager_greedy_tokens() {
    let mut asr = open();
    for audio in ["speech16k.wav", "stereo16k.wav"] {
        let c = case(audio, "sot_only");
        let mut config = greedy(20);
        config.decoder_prompt = Some(vec![401]);
        let t = asr
            .transcribe(&wav(audio), &config, |_| ControlFlow::Continue(()))
            .unwrap();
        assert_eq!(t.tokens, expected(&c), "{audio}");
        // Special tokens (here <|fr|>) are not part of the text.
        assert_eq!(t.text, c["text"].as_str().unwrap(), "{audio}");
    }
}

#[test]
fn the_language_is_detected_from_the_first_steps_language_logits() {
    let c = case("speech16k.wav", "sot_only");
    let logits = c["first_logits"].as_array().unwrap();
    let codes = ["en", "zh", "de", "es", "ru", "ko", "fr", "ja"];
    let best = (0..codes.len())
        .max_by(|&a, &b| {
            logits[402 + a]
                .as_f64()
                .unwrap()
                .total_cmp(&logits[402 + b].as_f64().unwrap())
        })
        .unwrap();
    let mut asr = open();
    let t = asr
        .transcribe(&wav("speech16k.wav"), &greedy(3), |_| {
            ControlFlow::Continue(())
        })
        .unwrap();
    assert_eq!(t.language.as_deref(), Some(codes[best]));
    assert_eq!(t.prompt, vec![401, 402 + best as u32, 411, 415]);
}

#[test]
fn sampling_with_a_seed_is_repeatable() {
    let mut asr = open();
    let mut config = greedy(12);
    config.language = Some("en".into());
    config.generation.temperature = 1.0;
    config.generation.seed = Some(7);
    let a = asr
        .transcribe(
            &wav("speech16k.wav"),
            &config,
            |_| ControlFlow::Continue(()),
        )
        .unwrap();
    let b = asr
        .transcribe(
            &wav("speech16k.wav"),
            &config,
            |_| ControlFlow::Continue(()),
        )
        .unwrap();
    assert_eq!(a.tokens, b.tokens);
    assert!(a.tokens.iter().all(|&t| t < 416));
}

#[test]
fn decoding_stops_at_the_decoders_context() {
    let mut asr = open();
    let mut config = greedy(-1);
    config.decoder_prompt = Some(vec![401]);
    let t = asr
        .transcribe(
            &wav("speech16k.wav"),
            &config,
            |_| ControlFlow::Continue(()),
        )
        .unwrap();
    // 64 decoder positions: the prompt and every generated token but the last fit.
    assert!(t.tokens.len() <= 64);
    if t.stats.stop_reason != StopReason::Eos {
        assert_eq!(t.stats.stop_reason, StopReason::ContextFull);
        assert_eq!(t.tokens.len(), 63);
    }
}

#[test]
fn bad_wav_files_are_invalid_media_and_the_runner_stays_usable() {
    let mut asr = open();
    for bad in [
        "truncated.wav",
        "not_a_wav.wav",
        "empty.wav",
        "six_channel.wav",
    ] {
        let err = asr
            .transcribe(&wav(bad), &greedy(2), |_| ControlFlow::Continue(()))
            .unwrap_err();
        assert!(matches!(err, Error::InvalidMedia { .. }), "{bad}: {err:?}");
    }
    let c = case("stereo16k.wav", "sot_en_transcribe_notimestamps");
    let mut config = greedy(20);
    config.language = Some("en".into());
    let t = asr
        .transcribe(
            &wav("stereo16k.wav"),
            &config,
            |_| ControlFlow::Continue(()),
        )
        .unwrap();
    assert_eq!(t.tokens, expected(&c));
}

#[test]
fn samples_with_a_bad_rate_or_channel_count_are_invalid_media() {
    let mut asr = open();
    for (rate, channels) in [(0, 1), (16_000, 3), (16_000, 0)] {
        let audio = AudioSource::Samples {
            samples: vec![0.0; 1600],
            sample_rate: rate,
            channels,
        };
        let err = asr
            .transcribe(&audio, &greedy(2), |_| ControlFlow::Continue(()))
            .unwrap_err();
        assert!(
            matches!(err, Error::InvalidMedia { .. }),
            "{rate} {channels}: {err:?}"
        );
    }
}

#[test]
fn an_unknown_language_is_an_invalid_argument() {
    let mut asr = open();
    let mut config = greedy(2);
    config.language = Some("xx".into());
    let err = asr
        .transcribe(
            &wav("speech16k.wav"),
            &config,
            |_| ControlFlow::Continue(()),
        )
        .unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)), "{err:?}");
}

#[test]
fn a_speech_model_is_refused_by_runner_and_a_text_model_by_asr_runner() {
    let err = Runner::open(
        dir().join("model.pte"),
        dir().join("tokenizer.json"),
        RunnerOptions::default(),
    )
    .unwrap_err();
    assert!(
        matches!(err, Error::UnsupportedModel(ref m) if m.contains("AsrRunner")),
        "{err:?}"
    );
    let fixtures = dir().parent().unwrap().to_path_buf();
    let err = AsrRunner::open(
        fixtures.join("dyn_xnnpack/model.pte"),
        fixtures.join("tokenizer.json"),
        AsrOptions::default(),
    )
    .unwrap_err();
    assert!(matches!(err, Error::UnsupportedModel(_)), "{err:?}");
}

#[test]
fn an_asr_runner_can_move_to_another_thread() {
    fn send<T: Send>(_: &T) {}
    let asr = open();
    send(&asr);
    let t = std::thread::spawn(move || {
        let mut asr = asr;
        asr.transcribe(&wav("stereo16k.wav"), &greedy(2), |_| {
            ControlFlow::Continue(())
        })
        .map(|t| t.tokens.len())
    });
    assert_eq!(t.join().unwrap().unwrap(), 2);
}
