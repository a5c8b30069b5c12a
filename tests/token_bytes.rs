//! `Tokenizer::token_bytes` (what each token adds to a text, for grammar engines) in every
//! format, against outside references only:
//! - the reference ids of `tests/fixtures/tokenizers/reference.json` (from each format's
//!   reference implementation): their token bytes must add up to the encoded text;
//! - every token as its reference implementation decodes it in the middle of a text
//!   (`tests/fixtures/token_bytes/reference.json`, from `tools/fixtures/make_token_bytes.py`);
//! - `llguidance::token_bytes_from_tokenizer_json` on plain HF `tokenizer.json` files;
//! - on real-size tokenizers in `/work/bench-models` when present (skipped otherwise):
//!   the same, with reference ids from the benchmark's `verify.json`.

mod common;

use std::path::{Path, PathBuf};
use std::time::Instant;

use common::{load_tokenizer_fixture, tokenizer_reference, tokenizers_dir, TOKENIZER_FORMATS};

use etllm::tokenizer::{Preset, TokenBytes, Tokenizer};
use etllm::Error;
use serde::Deserialize;
use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn token_bytes_dir() -> PathBuf {
    root().join("tests/fixtures/token_bytes")
}

#[derive(Debug, Deserialize)]
struct Format {
    file: String,
    bos_id: u32,
    eos_id: u32,
    cases: Vec<Case>,
}

#[derive(Debug, Deserialize)]
struct Case {
    text: String,
    ids: Option<Vec<u32>>,
    decoded: Option<String>,
}

/// A format of `tests/fixtures/tokenizers/reference.json` and its tokenizer.
fn load(format: &str) -> (Format, Tokenizer) {
    let r: Format = tokenizer_reference(format);
    let t = load_tokenizer_fixture(format, &r.file);
    (r, t)
}

#[derive(Debug, Deserialize)]
struct TbFormat {
    file: String,
    #[serde(default)]
    bos_id: Option<u32>,
    #[serde(default)]
    eos_id: Option<u32>,
    tokens: Vec<Vec<Value>>,
    #[serde(default)]
    cases: Vec<TbCase>,
}

#[derive(Debug, Deserialize)]
struct TbCase {
    text: String,
    ids: Vec<u32>,
    mid_decoded: String,
}

/// A tokenizer of `tests/fixtures/token_bytes/reference.json` and its reference.
fn load_tb(name: &str) -> (TbFormat, Tokenizer) {
    let text = std::fs::read_to_string(token_bytes_dir().join("reference.json")).unwrap();
    let mut all: serde_json::Map<String, Value> = serde_json::from_str(&text).unwrap();
    let r: TbFormat = serde_json::from_value(all.remove(name).unwrap()).unwrap();
    let t = Tokenizer::from_file(token_bytes_dir().join(&r.file))
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    (r, t)
}

fn token_bytes(t: &Tokenizer) -> Vec<TokenBytes> {
    let start = Instant::now();
    let tb = t.token_bytes().unwrap();
    let took = start.elapsed();
    assert_eq!(tb.len(), t.vocab_size());
    // Fixtures are tiny: a generous bound that only catches something badly quadratic.
    if t.vocab_size() < 5_000 {
        assert!(took.as_secs_f64() < 2.0, "{took:?} for {}", t.vocab_size());
    }
    tb
}

/// The bytes of `ids` together; special tokens as their names (they are written so in
/// the texts of formats that read special tokens in text), tokens without text as
/// `none`.
fn concat(tb: &[TokenBytes], ids: &[u32], none: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for &id in ids {
        match &tb[id as usize] {
            TokenBytes::Text(b) => out.extend_from_slice(b),
            TokenBytes::Special(name) => out.extend_from_slice(name.as_bytes()),
            TokenBytes::None => out.extend_from_slice(none),
        }
    }
    out
}

/// `text` with the one space SentencePiece-style encoders put before a non-empty text
/// (the dummy prefix), which decoders drop from a text's first token and token bytes keep.
fn with_dummy_prefix(text: &str) -> String {
    if text.is_empty() {
        String::new()
    } else {
        format!(" {text}")
    }
}

fn show(b: &[u8]) -> String {
    format!("{:?}", String::from_utf8_lossy(b))
}

// ---------------------------------------------------------------------------------------
// Reference ids add up to the text.

#[test]
fn sentencepiece_bpe_reference_ids_add_up_to_the_text() {
    // Identity normalization, whitespace kept: the text exactly, after the dummy prefix.
    let (r, t) = load("sentencepiece_bpe");
    let tb = token_bytes(&t);
    for c in &r.cases {
        let ids = c.ids.as_ref().unwrap();
        assert!(
            ids.iter()
                .all(|&id| matches!(tb[id as usize], TokenBytes::Text(_))),
            "{:?}",
            c.text
        );
        let got = concat(&tb, ids, b"");
        assert_eq!(show(&got), show(with_dummy_prefix(&c.text).as_bytes()));
    }
}

#[test]
fn sentencepiece_unigram_reference_ids_add_up_to_the_reference_decode() {
    // The unigram model normalizes (nmt_nfkc: NFKC, runs of spaces collapsed and trimmed)
    // and has no byte fallback: its ids add up to the normalized text, with <unk> for
    // what it cannot spell, not to the text. The reference is then `sentencepiece`'s
    // decode of the ids, which writes <unk> as " ⁇ " and drops the dummy prefix.
    let (r, t) = load("sentencepiece_unigram");
    let tb = token_bytes(&t);
    assert_eq!(tb[0], TokenBytes::None, "<unk>");
    let mut with_unk = 0;
    for c in &r.cases {
        let ids = c.ids.as_ref().unwrap();
        with_unk += ids.contains(&0) as usize;
        let got = concat(&tb, ids, " \u{2047} ".as_bytes());
        let decoded = c.decoded.as_ref().unwrap();
        let expected = if ids.is_empty() {
            String::new()
        } else {
            format!(" {decoded}")
        };
        assert_eq!(show(&got), show(expected.as_bytes()), "{:?}", c.text);
    }
    assert!(with_unk > 0, "the corpus should exercise <unk>");
}

#[test]
fn llama2c_reference_ids_add_up_to_the_text() {
    // Upstream's encoder puts a space token first (its dummy prefix).
    let (r, t) = load("llama2c");
    let tb = token_bytes(&t);
    let mut cases = 0;
    for c in &r.cases {
        let Some(ids) = &c.ids else { continue }; // upstream refuses ""
        cases += 1;
        let got = concat(&tb, ids, b"");
        assert_eq!(show(&got), show(with_dummy_prefix(&c.text).as_bytes()));
    }
    assert!(cases > 10);
}

#[test]
fn tiktoken_reference_ids_add_up_to_the_text() {
    // Special tokens written in the text are encoded as special tokens (as upstream's
    // C++ Tiktoken and `tiktoken` with allowed_special="all" do): their name is their text.
    let (r, t) = load("tiktoken");
    let tb = token_bytes(&t);
    let mut specials = 0;
    for c in &r.cases {
        let ids = c.ids.as_ref().unwrap();
        specials += ids
            .iter()
            .filter(|&&id| matches!(tb[id as usize], TokenBytes::Special(_)))
            .count();
        assert_eq!(show(&concat(&tb, ids, b"")), show(c.text.as_bytes()));
    }
    assert!(specials >= 4, "the corpus should exercise special tokens");
}

#[test]
fn hf_byte_level_reference_ids_add_up_to_the_text() {
    let (r, t) = load("hf");
    let tb = token_bytes(&t);
    for c in &r.cases {
        let ids = c.ids.as_ref().unwrap();
        assert_eq!(show(&concat(&tb, ids, b"")), show(c.text.as_bytes()));
    }
}

/// The SentencePiece-style HF files: their ids (from `tokenizers`) add up to `tokenizers`'
/// own decode of the ids after an anchor token, special tokens kept. (Not to the text: the
/// Llama 2 file's normalizer puts "▁" before every text segment between special tokens,
/// the unigram file's normalizes.)
fn check_hf_mid_decoded(name: &str) {
    let (r, t) = load_tb(name);
    let tb = token_bytes(&t);
    assert_eq!(r.cases.len(), 19);
    for c in &r.cases {
        assert_eq!(
            show(&concat(&tb, &c.ids, b"")),
            show(c.mid_decoded.as_bytes()),
            "{name}: {:?}",
            c.text
        );
    }
}

#[test]
fn hf_llama2_reference_ids_add_up_to_the_reference_decode() {
    check_hf_mid_decoded("hf_llama2");
}

#[test]
fn hf_gemma_reference_ids_add_up_to_the_reference_decode() {
    check_hf_mid_decoded("hf_gemma");
}

#[test]
fn hf_unigram_reference_ids_add_up_to_the_reference_decode() {
    check_hf_mid_decoded("hf_unigram");
}

// ---------------------------------------------------------------------------------------
// Every token against its reference implementation's mid-text decode.

/// Checks every token against `tests/fixtures/token_bytes/reference.json`. `adjust` maps a
/// reference entry to the expected value where the format's rules decide it (ids the
/// reference writes as text but are special or textless); returns how many were checked.
fn check_every_token(name: &str, adjust: impl Fn(u32, TokenBytes) -> TokenBytes) -> usize {
    let (r, t) = load_tb(name);
    let tb = token_bytes(&t);
    assert_eq!(r.tokens.len(), tb.len(), "{name}: vocabulary size");
    let mut checked = 0;
    for (id, entry) in r.tokens.iter().enumerate() {
        let kind = entry[0].as_str().unwrap();
        let expected = match kind {
            "text" => TokenBytes::Text(entry[1].as_str().unwrap().as_bytes().to_vec()),
            "bytes" => {
                let hex = entry[1].as_str().unwrap();
                let bytes = (0..hex.len())
                    .step_by(2)
                    .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
                    .collect();
                TokenBytes::Text(bytes)
            }
            "byte" => TokenBytes::Text(vec![entry[1].as_u64().unwrap() as u8]),
            "special" => TokenBytes::Special(entry[1].as_str().unwrap().to_string()),
            "none" => TokenBytes::None,
            "lossy" => continue,
            other => panic!("unknown entry kind {other}"),
        };
        let expected = match adjust(id as u32, expected) {
            TokenBytes::Text(b) if b.is_empty() => TokenBytes::None,
            e => e,
        };
        assert_eq!(tb[id], expected, "{name}: id {id}");
        checked += 1;
    }
    checked
}

#[test]
fn sentencepiece_bpe_every_token_matches_sentencepiece() {
    let n = check_every_token("sentencepiece_bpe", |_, e| e);
    assert_eq!(n, 600);
}

#[test]
fn sentencepiece_unigram_every_token_matches_sentencepiece() {
    let n = check_every_token("sentencepiece_unigram", |_, e| e);
    assert_eq!(n, 200);
}

#[test]
fn llama2c_every_token_matches_upstream_decode() {
    // Upstream's decode writes every piece, "<unk>", "<s>" and "</s>" included; token
    // bytes make the BOS and EOS pieces special and <unk> textless.
    let (r, _) = load_tb("llama2c");
    let (bos, eos) = (1, 2);
    let n = check_every_token("llama2c", |id, e| match e {
        TokenBytes::Text(b) if id == bos || id == eos => {
            TokenBytes::Special(String::from_utf8(b).unwrap())
        }
        TokenBytes::Text(b) if b == b"<unk>" => TokenBytes::None,
        e => e,
    });
    assert_eq!(n, r.tokens.len());
}

#[test]
fn hf_llama2_every_token_matches_tokenizers() {
    let n = check_every_token("hf_llama2", |_, e| e);
    assert!(n > 400, "{n}");
}

#[test]
fn hf_gemma_every_token_matches_tokenizers() {
    // Includes "▁the", a non-special added token that is also a vocabulary piece: the
    // decoder's Replace makes its "▁" a space (as for Gemma's "▁▁" tokens).
    let (_, t) = load_tb("hf_gemma");
    let id = t.token_id("▁the").unwrap();
    assert_eq!(
        t.token_bytes().unwrap()[id as usize],
        TokenBytes::Text(b" the".to_vec())
    );
    let n = check_every_token("hf_gemma", |_, e| e);
    assert!(n > 400, "{n}");
}

#[test]
fn hf_unigram_every_token_matches_tokenizers() {
    let n = check_every_token("hf_unigram", |_, e| e);
    assert_eq!(n, 201);
}

// ---------------------------------------------------------------------------------------
// HF against llguidance's own reading of tokenizer.json.

/// llguidance's token bytes for a tokenizer.json, in [`TokenBytes`] form (its 0xFF marker
/// for special tokens, an empty string for no token).
fn llguidance_bytes(path: &Path) -> Vec<TokenBytes> {
    let json: Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    llguidance::token_bytes_from_tokenizer_json(&json)
        .unwrap()
        .into_iter()
        .map(|b| match b.split_first() {
            // A byte-level token can be the byte 0xFF itself (the marker never starts text
            // that is UTF-8, so llguidance only ever takes it for a special token).
            Some((0xFF, name)) if !name.is_empty() && std::str::from_utf8(name).is_ok() => {
                TokenBytes::Special(String::from_utf8(name.to_vec()).unwrap())
            }
            Some(_) => TokenBytes::Text(b),
            None => TokenBytes::None,
        })
        .collect()
}

/// Ours equals llguidance's for the tokenizer.json at `path`, except at `exceptions`
/// (id, ours, llguidance's).
fn check_llguidance(path: &Path, exceptions: &[(u32, TokenBytes, TokenBytes)]) {
    let t = Tokenizer::from_file(path).unwrap();
    let ours = token_bytes(&t);
    let theirs = llguidance_bytes(path);
    assert_eq!(ours.len(), theirs.len(), "{}", path.display());
    for (id, (a, b)) in ours.iter().zip(&theirs).enumerate() {
        match exceptions.iter().find(|e| e.0 == id as u32) {
            Some((_, ours, theirs)) => assert_eq!((a, b), (ours, theirs), "id {id}"),
            None => assert_eq!(a, b, "{}: id {id}", path.display()),
        }
    }
}

#[test]
fn hf_byte_level_matches_llguidance() {
    for file in [
        "tests/fixtures/tokenizer.json",
        "tests/fixtures/tokenizer_big.json",
        "tests/fixtures/tokenizers/hf/tokenizer.json",
    ] {
        check_llguidance(&root().join(file), &[]);
    }
}

#[test]
fn hf_llama2_matches_llguidance() {
    check_llguidance(&token_bytes_dir().join("hf_llama2/tokenizer.json"), &[]);
}

#[test]
fn hf_gemma_matches_llguidance_but_for_added_tokens_with_a_metaspace() {
    // llguidance writes every added token as its content; the tokenizers crate's decode
    // (and so ours) passes non-special added tokens through the decoder, whose Replace
    // makes "▁" a space.
    let path = token_bytes_dir().join("hf_gemma/tokenizer.json");
    let id = Tokenizer::from_file(&path)
        .unwrap()
        .token_id("▁the")
        .unwrap();
    check_llguidance(
        &path,
        &[(
            id,
            TokenBytes::Text(b" the".to_vec()),
            TokenBytes::Text("▁the".as_bytes().to_vec()),
        )],
    );
}

// ---------------------------------------------------------------------------------------
// Special tokens, sizes, odd tokenizers.

#[test]
fn bos_and_eos_are_special_in_every_format() {
    for format in TOKENIZER_FORMATS {
        let (r, t) = load(format);
        let tb = token_bytes(&t);
        assert_eq!(t.bos_id(), Some(r.bos_id), "{format}");
        assert_eq!(t.eos_ids().first(), Some(&r.eos_id), "{format}");
        for id in [r.bos_id, r.eos_id] {
            assert!(
                matches!(&tb[id as usize], TokenBytes::Special(name) if !name.is_empty()),
                "{format}: id {id} is {:?}",
                tb[id as usize]
            );
        }
    }
    for name in ["hf_llama2", "hf_gemma", "hf_unigram"] {
        let (r, t) = load_tb(name);
        let tb = token_bytes(&t);
        for id in [r.bos_id.unwrap(), r.eos_id.unwrap()] {
            assert!(
                matches!(&tb[id as usize], TokenBytes::Special(_)),
                "{name}: {id}"
            );
        }
    }
}

#[test]
fn tiktoken_special_tokens_are_named_and_llama3_ones_found() {
    let (r, _) = load("tiktoken");
    let t = Tokenizer::load(tokenizers_dir().join(&r.file), Some(Preset::Llama)).unwrap();
    let tb = token_bytes(&t);
    let eot = t.token_id("<|eot_id|>").unwrap();
    assert_eq!(tb[eot as usize], TokenBytes::Special("<|eot_id|>".into()));
    for &id in t.eos_ids() {
        assert!(matches!(tb[id as usize], TokenBytes::Special(_)));
    }
    // The 256 special tokens follow the 400 ranks; every rank is text.
    let specials = tb
        .iter()
        .filter(|b| matches!(b, TokenBytes::Special(_)))
        .count();
    assert_eq!(specials, 256);
    assert!(tb[..400].iter().all(|b| matches!(b, TokenBytes::Text(_))));
}

#[test]
fn sentencepiece_and_llama2c_agree() {
    // llama2c.bin is converted from sp_bpe.model: the same bytes for every token, but for
    // <0x00> (upstream's C-string decode writes nothing for it).
    let (_, sp) = load("sentencepiece_bpe");
    let (_, l2c) = load("llama2c");
    let (a, b) = (token_bytes(&sp), token_bytes(&l2c));
    let nul = sp.token_id("<0x00>").unwrap() as usize;
    for id in 0..a.len() {
        if id == nul {
            assert_eq!(
                (&a[id], &b[id]),
                (&TokenBytes::Text(vec![0]), &TokenBytes::None)
            );
        } else {
            assert_eq!(a[id], b[id], "id {id}");
        }
    }
}

/// A temporary folder holding `files`.
fn temp_dir(test: &str, files: &[(&str, &[u8])]) -> PathBuf {
    let d = std::env::temp_dir().join(format!("etllm-tb-{}-{test}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    for (name, bytes) in files {
        std::fs::write(d.join(name), bytes).unwrap();
    }
    d
}

fn fixture_json(file: &str) -> Value {
    serde_json::from_slice(&std::fs::read(root().join(file)).unwrap()).unwrap()
}

/// `tests/fixtures/tokenizer.json` with another decoder.
fn with_decoder(test: &str, decoder: Value) -> Tokenizer {
    let mut json = fixture_json("tests/fixtures/tokenizer.json");
    json["decoder"] = decoder;
    let d = temp_dir(test, &[("tokenizer.json", json.to_string().as_bytes())]);
    let t = Tokenizer::from_file(d.join("tokenizer.json")).unwrap();
    std::fs::remove_dir_all(&d).unwrap();
    t
}

#[test]
fn hf_decoders_that_depend_on_neighbouring_tokens_are_a_clear_error() {
    let cases = [
        (
            "wordpiece",
            serde_json::json!({"type": "WordPiece", "prefix": "##", "cleanup": true}),
            "WordPiece",
        ),
        (
            "ctc",
            serde_json::json!({"type": "CTC", "pad_token": "<pad>", "word_delimiter_token": "|", "cleanup": true}),
            "CTC",
        ),
        (
            "regex",
            serde_json::json!({"type": "Replace", "pattern": {"Regex": "\\s+"}, "content": " "}),
            "Regex",
        ),
        (
            "nested",
            serde_json::json!({"type": "Sequence", "decoders": [
                {"type": "ByteFallback"},
                {"type": "WordPiece", "prefix": "##", "cleanup": false}
            ]}),
            "WordPiece",
        ),
        (
            "after-fuse",
            serde_json::json!({"type": "Sequence", "decoders": [
                {"type": "Fuse"},
                {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": true}
            ]}),
            "Metaspace",
        ),
    ];
    for (test, decoder, named) in cases {
        let t = with_decoder(test, decoder);
        match t.token_bytes() {
            Err(Error::Tokenizer(m)) => assert!(m.contains(named), "{test}: {m}"),
            other => panic!("{test}: expected Error::Tokenizer, got {other:?}"),
        }
        // Nothing else about the tokenizer is affected.
        assert!(t.encode("hello").is_ok());
    }
}

#[test]
fn hf_without_decoder_joins_tokens_with_spaces() {
    // The tokenizers crate decodes with no decoder as the tokens joined by spaces: in the
    // middle of a text, each token adds a space and its piece.
    let t = with_decoder("nodecoder", Value::Null);
    let tb = token_bytes(&t);
    for id in 3..t.vocab_size() as u32 {
        let piece = t.token_to_piece(id).unwrap();
        let mut expected = b" ".to_vec();
        expected.extend_from_slice(&piece);
        assert_eq!(tb[id as usize], TokenBytes::Text(expected), "id {id}");
    }
    assert_eq!(tb[1], TokenBytes::Special("<s>".into()));
}

#[test]
fn hf_bpe_decoder_suffix_is_a_space() {
    // BPEDecoder writes its end-of-word suffix as a space (but at the end of a text).
    let t = with_decoder(
        "bpedecoder",
        serde_json::json!({"type": "BPEDecoder", "suffix": "ing"}),
    );
    let tb = token_bytes(&t);
    let id = (0..t.vocab_size() as u32)
        .find(|&id| t.token_to_piece(id).unwrap().ends_with(b"ing"))
        .expect("a piece ending in \"ing\"");
    let piece = t.token_to_piece(id).unwrap();
    let mut expected = piece[..piece.len() - 3].to_vec();
    expected.push(b' ');
    assert_eq!(tb[id as usize], TokenBytes::Text(expected));
}

#[test]
fn hf_tokens_added_by_tokenizer_config_are_included() {
    // llguidance reads tokenizer.json only; tokens that tokenizer_config.json adds count.
    let src = tokenizers_dir().join("hf");
    let base = Tokenizer::from_file(&src).unwrap();
    let n = base.vocab_size();
    let mut config: Value =
        serde_json::from_slice(&std::fs::read(src.join("tokenizer_config.json")).unwrap()).unwrap();
    config["added_tokens_decoder"][n.to_string()] =
        serde_json::json!({"content": "<|extra|>", "special": false});
    config["added_tokens_decoder"][(n + 1).to_string()] =
        serde_json::json!({"content": "<|turn|>", "special": true});
    config["added_tokens_decoder"][(n + 2).to_string()] =
        serde_json::json!({"content": "naïve é", "special": false});
    let d = temp_dir(
        "config-tokens",
        &[
            (
                "tokenizer.json",
                &std::fs::read(src.join("tokenizer.json")).unwrap(),
            ),
            ("tokenizer_config.json", config.to_string().as_bytes()),
        ],
    );
    let t = Tokenizer::from_file(&d).unwrap();
    std::fs::remove_dir_all(&d).unwrap();
    let tb = token_bytes(&t);
    assert_eq!(tb.len(), n + 3);
    assert_eq!(tb[n], TokenBytes::Text(b"<|extra|>".to_vec()));
    assert_eq!(tb[n + 1], TokenBytes::Special("<|turn|>".into()));
    // Added tokens are plain text, not byte-level characters (é is not byte 0xE9).
    assert_eq!(tb[n + 2], TokenBytes::Text("naïve é".as_bytes().to_vec()));
    assert_eq!(tb[..n], token_bytes(&base)[..]);
}

/// The top-level fields of a protobuf message, as (field, wire type, whole field bytes,
/// payload of a length-delimited field).
fn proto_fields(bytes: &[u8]) -> Vec<(u64, u8, &[u8], &[u8])> {
    fn varint(b: &[u8], pos: &mut usize) -> u64 {
        let mut v = 0;
        for shift in (0..64).step_by(7) {
            let byte = b[*pos];
            *pos += 1;
            v |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                break;
            }
        }
        v
    }
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < bytes.len() {
        let start = pos;
        let key = varint(bytes, &mut pos);
        let (payload_start, end) = match key & 7 {
            0 => {
                varint(bytes, &mut pos);
                (pos, pos)
            }
            1 => (pos, pos + 8),
            5 => (pos, pos + 4),
            2 => {
                let len = varint(bytes, &mut pos) as usize;
                (pos, pos + len)
            }
            t => panic!("wire type {t}"),
        };
        out.push((
            key >> 3,
            (key & 7) as u8,
            &bytes[start..end],
            &bytes[payload_start..end],
        ));
        pos = end;
    }
    out
}

#[test]
fn sentencepiece_with_denormalization_rules_is_a_clear_error() {
    // sp_bpe.model with the unigram model's normalizer spec (nmt_nfkc) as its
    // denormalizer_spec (field 5): the library then rewrites decoded text as a whole.
    let bpe = std::fs::read(tokenizers_dir().join("sp_bpe.model")).unwrap();
    let uni = std::fs::read(tokenizers_dir().join("sp_unigram.model")).unwrap();
    let spec = proto_fields(&uni)
        .into_iter()
        .find(|f| f.0 == 3 && f.1 == 2)
        .unwrap()
        .3;
    let mut model = bpe.clone();
    model.push((5 << 3) | 2);
    let mut len = spec.len();
    loop {
        let b = (len & 0x7f) as u8;
        len >>= 7;
        if len == 0 {
            model.push(b);
            break;
        }
        model.push(b | 0x80);
    }
    model.extend_from_slice(spec);
    let d = temp_dir("denormalizer", &[("t.model", &model)]);
    let t = Tokenizer::from_file(d.join("t.model")).unwrap();
    std::fs::remove_dir_all(&d).unwrap();
    match t.token_bytes() {
        Err(Error::Tokenizer(m)) => assert!(m.contains("denormalization"), "{m}"),
        other => panic!("expected Error::Tokenizer, got {other:?}"),
    }
    // Without the spec, the same model is fine.
    assert!(load("sentencepiece_bpe").1.token_bytes().is_ok());
}

// ---------------------------------------------------------------------------------------
// Real-size vocabularies.

const BENCH: &str = "/work/bench-models/tokenizers";

#[derive(Debug, Deserialize)]
struct Verify {
    sample: String,
    #[serde(flatten)]
    tokenizers: std::collections::HashMap<String, Value>,
}

#[test]
fn real_size_tokenizers() {
    let dir = Path::new(BENCH);
    let Ok(verify) = std::fs::read(dir.join("verify.json")) else {
        eprintln!("skipped: no real-size tokenizers in {BENCH}");
        return;
    };
    let verify: Verify = serde_json::from_slice(&verify).unwrap();
    let mixed = std::fs::read_to_string(dir.join("mixed.txt")).unwrap_or_default();
    let lines: Vec<&str> = mixed.lines().filter(|l| !l.is_empty()).take(20).collect();
    for (name, path, dummy_prefix) in [
        ("sp_32k", "sp_32k/tokenizer.model", true),
        ("hf_32k", "hf_32k", false),
        ("tiktoken_128k", "tiktoken_128k/tokenizer.model", false),
        ("hf_128k", "hf_128k", false),
        ("hf_152k", "hf_152k", false),
    ] {
        let path = dir.join(path);
        if !path.exists() {
            eprintln!("{name}: skipped, {} is absent", path.display());
            continue;
        }
        let t = Tokenizer::from_file(&path).unwrap();
        let start = Instant::now();
        let tb = t.token_bytes().unwrap();
        let took = start.elapsed();
        eprintln!(
            "{name}: token_bytes of {} tokens in {:.1} ms",
            tb.len(),
            took.as_secs_f64() * 1e3
        );
        assert_eq!(tb.len(), t.vocab_size(), "{name}");
        for &id in t.bos_id().iter().chain(t.eos_ids()) {
            assert!(
                matches!(tb[id as usize], TokenBytes::Special(_)),
                "{name}: {id}"
            );
        }
        let expected = |text: &str| {
            if dummy_prefix {
                with_dummy_prefix(text)
            } else {
                text.to_string()
            }
        };
        // The reference implementation's ids of the benchmark's sample text.
        let ids: Vec<u32> =
            serde_json::from_value(verify.tokenizers[name]["sample_ids"].clone()).unwrap();
        assert_eq!(
            show(&concat(&tb, &ids, b"")),
            show(expected(&verify.sample).as_bytes()),
            "{name}"
        );
        // Lines of the benchmark's mixed text (our encoder's ids, checked against the
        // reference's in the benchmark): the bytes are the original text.
        for line in &lines {
            let ids = t.encode(line).unwrap();
            assert_eq!(
                show(&concat(&tb, &ids, b"")),
                show(expected(line).as_bytes()),
                "{name}"
            );
        }
        if path.is_dir() {
            // The folder's tokenizer_config.json adds no tokens: llguidance's reading of
            // the tokenizer.json alone applies.
            check_llguidance(&path.join("tokenizer.json"), &[]);
        }
    }
}
