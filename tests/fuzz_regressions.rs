//! Inputs the fuzzer (examples/fuzz.rs, tools/fuzz.sh) found crashing, kept as
//! regression tests: each must now be a clean error. The files are in
//! tests/fixtures/corrupt/ (its README says how each was found).

use std::path::PathBuf;

use etllm::{Error, Tokenizer};

fn corrupt(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/corrupt")
        .join(name)
}

/// The `tokenizers` crate panics (`expect("Helper")`) when a `decoder` value is cut short.
#[test]
fn hf_tokenizer_with_a_truncated_decoder_is_an_invalid_tokenizer() {
    for name in [
        "hf_decoder_cut_short.json",
        "hf_decoder_cut_short_fuzzer.json",
    ] {
        let err = Tokenizer::from_file(corrupt(name)).expect_err(name);
        assert!(
            matches!(err, Error::InvalidTokenizer { .. }),
            "{name}: {err}"
        );
        assert!(
            err.to_string().contains("not a valid HF tokenizer.json"),
            "{name}: {err}"
        );
    }
}

/// The `tokenizers` crate panics (`expect("Precompiled")`) on a `Precompiled` normalizer
/// whose `precompiled_charsmap` does not parse, in syntactically valid JSON.
#[test]
fn hf_tokenizer_with_a_bad_precompiled_charsmap_is_an_invalid_tokenizer() {
    let name = "hf_bad_precompiled_charsmap.json";
    let err = Tokenizer::from_file(corrupt(name)).expect_err(name);
    assert!(matches!(err, Error::InvalidTokenizer { .. }), "{err}");
    assert!(err.to_string().contains("Precompiled"), "{err}");
}

/// Through the C ABI the same files are ETLLM_ERR_INVALID_TOKENIZER, not ETLLM_ERR_PANIC.
#[test]
fn c_abi_reports_them_as_invalid_tokenizers() {
    use etllm::ffi::error::etllm_status;
    use etllm::ffi::tokenizer::etllm_tokenizer_load;
    for name in [
        "hf_decoder_cut_short.json",
        "hf_bad_precompiled_charsmap.json",
    ] {
        let path = std::ffi::CString::new(corrupt(name).to_str().unwrap()).unwrap();
        let mut out = std::ptr::null_mut();
        let status = etllm_tokenizer_load(path.as_ptr(), 0, &mut out);
        assert_eq!(status, etllm_status::ETLLM_ERR_INVALID_TOKENIZER, "{name}");
        assert!(out.is_null());
    }
}

/// `num_bos = i32::MAX` (the c-abi target's find: "memory allocation of 8589934588 bytes
/// failed", an abort) is a context-full error before any prompt is built, and the runner
/// stays usable.
#[test]
fn huge_num_bos_or_num_eos_is_context_full_not_an_allocation() {
    use etllm::{GenerationConfig, Runner, RunnerOptions};
    let fixtures = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let mut runner = Runner::open(
        fixtures.join("dyn_portable/model.pte"),
        fixtures.join("tokenizer.json"),
        RunnerOptions::default(),
    )
    .unwrap();
    for (num_bos, num_eos) in [(i32::MAX, 0), (0, i32::MAX), (i32::MAX, i32::MAX)] {
        let config = GenerationConfig {
            num_bos,
            num_eos,
            max_new_tokens: 1,
            echo: false,
            ..Default::default()
        };
        let err = runner
            .generate(
                "Hi",
                &config,
                |_| std::ops::ControlFlow::Continue(()),
                |_| {},
            )
            .expect_err("cannot fit");
        assert!(matches!(err, Error::ContextFull { .. }), "{err}");
        assert_eq!(runner.position(), 0);
    }
    let config = GenerationConfig {
        num_bos: 1,
        max_new_tokens: 2,
        echo: false,
        temperature: 0.0,
        ..Default::default()
    };
    let stats = runner
        .generate(
            "Hi",
            &config,
            |_| std::ops::ControlFlow::Continue(()),
            |_| {},
        )
        .unwrap();
    assert_eq!(stats.num_generated_tokens, 2);
}

/// The tokenizer's own BOS/EOS counts: an impossible count is an error, not an abort.
#[test]
fn tokenizer_encode_with_impossible_counts_is_an_error() {
    let t = Tokenizer::from_file(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizer.json"),
    )
    .unwrap();
    let max = etllm::tokenizer::MAX_ADDED_TOKENS;
    for (bos, eos) in [
        (usize::MAX, 0),
        (0, usize::MAX),
        (usize::MAX / 2, usize::MAX / 2),
        (u32::MAX as usize, 0),
        (max, 1),
    ] {
        let err = t.encode_with("Hi", bos, eos).expect_err("cannot fit");
        assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
    }
    assert_eq!(
        t.encode_with("Hi", max, 0).unwrap().len(),
        max + t.encode("Hi").unwrap().len()
    );
    // Every format with the C ABI's largest count (the c-abi target's find: llama2.c's own
    // encode_with aborted with "memory allocation of 17179869180 bytes failed").
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizers");
    for file in ["llama2c.bin", "sp_bpe.model", "tiktoken.model", "hf"] {
        let t = Tokenizer::from_file(dir.join(file)).unwrap();
        let err = t.encode_with("Hi", u32::MAX as usize, 0).expect_err(file);
        assert!(matches!(err, Error::InvalidArgument(_)), "{file}: {err}");
    }
    assert_eq!(
        t.encode_with("Hi", 2, 1).unwrap().len(),
        t.encode("Hi").unwrap().len() + 3
    );
}

/// A SentencePiece model whose normalizer (precompiled charsmap) was corrupted: the
/// `sentencepiece` crate panicked decoding the library's reply ("Received invalid protobuf
/// from sentencepiece: DecodeError { description: InvalidString, ... }"). Encoding is now
/// an error.
#[test]
fn sentencepiece_reply_that_is_not_utf8_is_an_encoding_error() {
    let t = Tokenizer::from_file(corrupt("sp_piece_not_utf8.model")).expect("it loads");
    let text = "Hello, world! Once upon a time 123 4567 <s></s> <|begin_of_text|> \
                ünïcödé 日本語 🦀\t\n  end";
    let err = t.encode(text).expect_err("the reply is not UTF-8");
    assert!(matches!(err, Error::Tokenizer(_)), "{err}");
}
