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

/// A data file (`.ptd`) whose flatbuffer has one byte changed (offset 2096 of
/// `shipped/fp32_ptd/model.ptd`, 0x7c -> 0xeb, inside the `segments` vector): ExecuTorch's
/// `FlatTensorDataMap::get_tensor_layout` read out of bounds (SIGSEGV, in upstream's
/// pybindings too). Found by the `data-file` fuzz target; the file is rebuilt here from the
/// fixture rather than committed (1.7 MB).
#[test]
fn a_data_file_with_a_corrupt_flatbuffer_is_an_invalid_model_naming_it() {
    let fixtures = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let mut bytes = std::fs::read(fixtures.join("shipped/fp32_ptd/model.ptd")).unwrap();
    assert_eq!(bytes[2096], 0x7c, "the fixture changed; rebuild this case");
    bytes[2096] = 0xeb;
    let dir = std::env::temp_dir().join(format!("etllm-ptd-regression-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let data = dir.join("one_byte.ptd");
    std::fs::write(&data, &bytes).unwrap();
    let err = etllm::Runner::open(
        fixtures.join("shipped/fp32_ptd/model.pte"),
        fixtures.join("tokenizer.json"),
        etllm::RunnerOptions {
            data_paths: vec![data.clone()],
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(
        matches!(&err, Error::InvalidModel { path, .. } if *path == data),
        "{err}"
    );
    assert!(err.to_string().contains("flatbuffer is corrupt"), "{err}");
    std::fs::remove_dir_all(dir).unwrap();
}

/// `llama_ops/model.pte` with byte 162 changed (0x00 -> 0x40): reading its method names
/// before the program was verified crashed in `Program::get_method_name` (SIGSEGV). Found
/// by the `model` fuzz target after the names were read first (for the shared-arena
/// decision); they are now read from an internally verified program.
#[test]
fn a_program_with_a_corrupt_method_table_is_an_invalid_model() {
    let fixtures = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let mut bytes = std::fs::read(fixtures.join("llama_ops/model.pte")).unwrap();
    assert_eq!(bytes[162], 0x00, "the fixture changed; rebuild this case");
    bytes[162] = 0x40;
    let dir = std::env::temp_dir().join(format!("etllm-pte-regression-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let model = dir.join("model.pte");
    std::fs::write(&model, &bytes).unwrap();
    let err = etllm::Runner::open(
        &model,
        fixtures.join("tokenizer.json"),
        etllm::RunnerOptions::default(),
    )
    .unwrap_err();
    assert!(matches!(err, Error::InvalidModel { .. }), "{err}");
    std::fs::remove_dir_all(dir).unwrap();
}
