//! Every tokenizer format against the output of its reference implementation, recorded by
//! `tools/fixtures/make_tokenizers.py` in `tests/fixtures/tokenizers/reference.json`.

mod common;

use std::path::{Path, PathBuf};

use common::{load_tokenizer_fixture, tokenizer_reference, tokenizers_dir, TOKENIZER_FORMATS};

use etllm::tokenizer::{LlamaVersion, Preset, TiktokenOptions, Tokenizer, TokenizerFormat};
use etllm::Error;
use serde::Deserialize;

#[derive(Debug, Deserialize)]
struct Format {
    file: String,
    vocab_size: usize,
    bos_id: u32,
    eos_id: u32,
    #[serde(default)]
    pieces: Vec<String>,
    #[serde(default)]
    special_tokens: Vec<String>,
    #[serde(default)]
    pattern: String,
    #[serde(default)]
    chat_template: Option<String>,
    cases: Vec<Case>,
}

#[derive(Debug, Deserialize)]
struct Case {
    text: String,
    ids: Option<Vec<u32>>,
    ids_bos_eos: Option<Vec<u32>>,
    decoded: Option<String>,
    error: Option<String>,
}

fn dir() -> PathBuf {
    tokenizers_dir()
}

fn reference(format: &str) -> Format {
    tokenizer_reference(format)
}

fn load(format: &str) -> (Format, Tokenizer) {
    let r = reference(format);
    let t = load_tokenizer_fixture(format, &r.file);
    (r, t)
}

/// A copy of `bytes` in a temporary file named `name` (to show the name does not matter).
fn temp_file(test: &str, name: &str, bytes: &[u8]) -> PathBuf {
    let d = std::env::temp_dir().join(format!("etllm-tok-{}-{test}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    let p = d.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

fn fixture_bytes(format: &str) -> Vec<u8> {
    std::fs::read(dir().join(reference(format).file)).unwrap()
}

fn check_encode(format: &str) {
    let (r, t) = load(format);
    for c in &r.cases {
        match (&c.ids, &c.error) {
            (Some(ids), _) => {
                assert_eq!(&t.encode(&c.text).unwrap(), ids, "{format}: {:?}", c.text)
            }
            (None, Some(_)) => assert!(t.encode(&c.text).is_err(), "{format}: {:?}", c.text),
            _ => unreachable!(),
        }
    }
}

fn check_encode_bos_eos(format: &str) {
    let (r, t) = load(format);
    for c in &r.cases {
        if let Some(ids) = &c.ids_bos_eos {
            assert_eq!(
                &t.encode_with(&c.text, 1, 1).unwrap(),
                ids,
                "{format}: {:?}",
                c.text
            );
        }
    }
}

fn check_decode(format: &str) {
    let (r, t) = load(format);
    for c in &r.cases {
        if let (Some(ids), Some(decoded)) = (&c.ids, &c.decoded) {
            assert_eq!(&t.decode(ids).unwrap(), decoded, "{format}: {:?}", c.text);
        }
    }
}

fn check_stream(format: &str) {
    let (r, t) = load(format);
    for c in &r.cases {
        if let (Some(ids), Some(decoded)) = (&c.ids, &c.decoded) {
            let mut stream = t.stream();
            let mut text = String::new();
            for &id in ids {
                text += &stream.push(id).unwrap();
            }
            text += &stream.flush().unwrap();
            assert_eq!(&text, decoded, "{format}: {:?}", c.text);
        }
    }
}

fn check_ids(format: &str) {
    let (r, t) = load(format);
    assert_eq!(t.vocab_size(), r.vocab_size);
    assert_eq!(t.bos_id(), Some(r.bos_id));
    assert_eq!(t.eos_ids().first(), Some(&r.eos_id));
}

fn check_detected(format: &str, expected: TokenizerFormat) {
    // Named as another format's file would be: only the content counts.
    let p = temp_file(
        &format!("detect-{format}"),
        "tokenizer.model",
        &fixture_bytes(format),
    );
    assert_eq!(Tokenizer::from_file(&p).unwrap().format(), expected);
}

fn expect_invalid(path: &Path, format: &str) {
    match Tokenizer::from_file(path) {
        Err(Error::InvalidTokenizer { message, .. }) => {
            assert!(!message.is_empty(), "{format}")
        }
        other => panic!("{format}: expected InvalidTokenizer, got {other:?}"),
    }
}

fn check_truncated(format: &str) {
    let bytes = fixture_bytes(format);
    let cut = &bytes[..bytes.len() / 2 - 3];
    expect_invalid(&temp_file(&format!("trunc-{format}"), "t", cut), format);
}

fn check_corrupt(format: &str) {
    // The first 16 bytes (the structure every format starts with) overwritten with 0xff.
    let mut bytes = fixture_bytes(format);
    bytes[..16].fill(0xff);
    expect_invalid(
        &temp_file(&format!("corrupt-{format}"), "t", &bytes),
        format,
    );
}

macro_rules! format_tests {
    ($module:ident, $name:literal, $format:expr) => {
        mod $module {
            use super::*;
            #[test]
            fn encode_matches_reference() {
                check_encode($name);
            }
            #[test]
            fn encode_with_bos_and_eos_matches_reference() {
                check_encode_bos_eos($name);
            }
            #[test]
            fn decode_matches_reference() {
                check_decode($name);
            }
            #[test]
            fn streamed_decode_matches_reference() {
                check_stream($name);
            }
            #[test]
            fn vocab_size_bos_and_eos_match_reference() {
                check_ids($name);
            }
            #[test]
            fn format_is_found_from_content() {
                check_detected($name, $format);
            }
            #[test]
            fn truncated_file_is_a_clear_error() {
                check_truncated($name);
            }
            #[test]
            fn corrupt_file_is_a_clear_error() {
                check_corrupt($name);
            }
        }
    };
}

format_tests!(
    sentencepiece_bpe,
    "sentencepiece_bpe",
    TokenizerFormat::SentencePiece
);
format_tests!(
    sentencepiece_unigram,
    "sentencepiece_unigram",
    TokenizerFormat::SentencePiece
);
format_tests!(llama2c, "llama2c", TokenizerFormat::Llama2c);
format_tests!(tiktoken, "tiktoken", TokenizerFormat::Tiktoken);

// HF: the folder form (format detection and corruption are covered with the file form).
mod hf {
    use super::*;
    #[test]
    fn encode_matches_reference() {
        check_encode("hf");
    }
    #[test]
    fn decode_matches_reference() {
        check_decode("hf");
    }
    #[test]
    fn streamed_decode_matches_reference() {
        check_stream("hf");
    }
    #[test]
    fn encode_with_bos_and_eos_uses_config_tokens() {
        check_encode_bos_eos("hf");
    }
    #[test]
    fn vocab_size_bos_and_eos_come_from_config() {
        check_ids("hf");
    }
    #[test]
    fn format_is_found_from_content() {
        check_detected("hf", TokenizerFormat::HuggingFace);
    }
    #[test]
    fn truncated_file_is_a_clear_error() {
        check_truncated("hf");
    }
    #[test]
    fn folder_gives_default_chat_template_and_token_strings() {
        let (r, t) = load("hf");
        let folder = dir().join(&r.file).parent().unwrap().to_path_buf();
        let template = etllm::ChatTemplate::from_model_dir(&folder).unwrap();
        assert_eq!(
            template.as_ref().map(|t| t.source()),
            r.chat_template.as_deref()
        );
        assert_eq!(t.bos_token(), Some("<s>"));
        assert_eq!(t.eos_token(), Some("</s>"));
    }
}

#[test]
fn sentencepiece_pieces_match_reference() {
    let (r, t) = load("sentencepiece_bpe");
    for (id, piece) in r.pieces.iter().enumerate() {
        assert_eq!(
            t.token_to_piece(id as u32).unwrap(),
            piece.as_bytes(),
            "id {id}"
        );
    }
}

#[test]
fn tiktoken_llama3_options_match_pytorch_tokenizers() {
    let r = reference("tiktoken");
    let o = TiktokenOptions::llama3();
    assert_eq!(o.special_tokens, r.special_tokens);
    assert_eq!(o.pattern, r.pattern);
}

#[test]
fn unknown_format_error_lists_every_format_tried() {
    let p = temp_file(
        "unknown",
        "tokenizer.json",
        b"\x00\x01not a tokenizer at all",
    );
    let Err(Error::InvalidTokenizer { message, .. }) = Tokenizer::from_file(&p) else {
        panic!("expected InvalidTokenizer");
    };
    for name in ["HF tokenizer.json", "tiktoken", "llama2.c", "SentencePiece"] {
        assert!(message.contains(name), "{name} missing from: {message}");
    }
}

#[test]
fn llama_preset_on_tiktoken_is_llama3_with_eot_as_eos() {
    let r = reference("tiktoken");
    let t = Tokenizer::load(dir().join(&r.file), Some(Preset::Llama)).unwrap();
    let id = |name: &str| {
        r.special_tokens.iter().position(|s| s == name).unwrap() as u32
            + (r.vocab_size - r.special_tokens.len()) as u32
    };
    assert_eq!(t.llama_version(), Some(LlamaVersion::Llama3));
    assert_eq!(t.bos_id(), Some(id("<|begin_of_text|>")));
    assert_eq!(t.eos_ids(), &[id("<|end_of_text|>"), id("<|eot_id|>")]);
}

#[test]
fn llama_preset_on_sentencepiece_is_llama2() {
    let r = reference("sentencepiece_bpe");
    let t = Tokenizer::load(dir().join(&r.file), Some(Preset::Llama)).unwrap();
    assert_eq!(t.llama_version(), Some(LlamaVersion::Llama2));
    assert_eq!(t.bos_id(), Some(r.bos_id));
    assert_eq!(t.eos_ids(), &[r.eos_id]);
    assert_eq!((t.bos_token(), t.eos_token()), (Some("<s>"), Some("</s>")));
}

#[test]
fn decode_of_an_id_outside_the_vocabulary_is_an_error_in_every_format() {
    for format in TOKENIZER_FORMATS {
        let (r, t) = load(format);
        let bad = r.vocab_size as u32 + 7;
        assert!(
            matches!(t.decode(&[bad]), Err(Error::Tokenizer(_))),
            "{format}"
        );
        assert!(t.token_to_piece(bad).is_err(), "{format}");
    }
}

#[test]
fn folder_without_tokenizer_json_is_a_clear_error() {
    let d = temp_file("nojson", "other.txt", b"x");
    expect_invalid(d.parent().unwrap(), "folder");
}

#[test]
fn stream_yields_nothing_for_ids_outside_the_vocabulary_and_goes_on() {
    // A model may pad its embedding table past the tokenizer's vocabulary (the benchmark
    // model has 32,000 rows for this 512-token tokenizer) and sample such a row.
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizer.json");
    let t = Tokenizer::from_file(&path).unwrap();
    let ids = t.encode("Hello, world").unwrap();
    let outside = t.vocab_size() as u32 + 100;
    assert!(t.decode(&[outside]).is_err());
    let mut stream = t.stream();
    let mut text = stream.push(outside).unwrap();
    for &id in &ids {
        text += &stream.push(id).unwrap();
        text += &stream.push(outside).unwrap();
    }
    text += &stream.flush().unwrap();
    assert_eq!(text, t.decode(&ids).unwrap());
}

/// A token that only `tokenizer_config.json` adds (the next free id) counts in the
/// vocabulary size, which the HF backend counts once at load: decoding, streaming and
/// encoding all see it.
#[test]
fn hf_token_added_by_the_config_is_in_the_vocabulary() {
    let (r, base) = load("hf");
    let src = dir().join(&r.file).parent().unwrap().to_path_buf();
    let tmp = std::env::temp_dir().join(format!("etllm-added-token-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    std::fs::copy(src.join("tokenizer.json"), tmp.join("tokenizer.json")).unwrap();
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(src.join("tokenizer_config.json")).unwrap()).unwrap();
    let new_id = base.vocab_size();
    config["added_tokens_decoder"][new_id.to_string()] =
        serde_json::json!({"content": "<|extra|>", "special": false});
    std::fs::write(tmp.join("tokenizer_config.json"), config.to_string()).unwrap();

    let t = Tokenizer::from_file(&tmp).unwrap();
    std::fs::remove_dir_all(&tmp).unwrap();
    assert_eq!(t.vocab_size(), new_id + 1);
    assert_eq!(t.token_id("<|extra|>"), Some(new_id as u32));
    assert_eq!(t.encode("<|extra|>").unwrap(), vec![new_id as u32]);
    assert_eq!(t.decode(&[new_id as u32]).unwrap(), "<|extra|>");
    let mut stream = t.stream();
    let text = stream.push(new_id as u32).unwrap() + &stream.flush().unwrap();
    assert_eq!(text, "<|extra|>");
    assert!(t.decode(&[new_id as u32 + 1]).is_err());
}
