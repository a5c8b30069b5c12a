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
