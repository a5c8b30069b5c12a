//! ExecuTorch's thread pool is process-wide, and its XNNPACK delegate keeps the pool it was
//! loaded with: resizing the pool under a loaded model used to leave that model waiting
//! forever on a freed mutex at its next call. One test in its own process, so that no
//! other test's model is loaded meanwhile.

mod common;

use std::ops::ControlFlow;

use common::*;
use etllm::{Error, GenerationConfig, Runner, RunnerOptions};

fn generate_one(runner: &mut Runner) {
    let config = GenerationConfig {
        max_new_tokens: 2,
        temperature: 0.0,
        ..Default::default()
    };
    runner
        .generate_from_ids(&[1, 2, 3], &config, |_| ControlFlow::Continue(()), |_| {})
        .unwrap();
}

#[test]
fn the_pool_is_resized_only_while_no_model_is_loaded() {
    etllm::set_num_threads(1).unwrap();
    let model = fixtures_dir().join("dyn_xnnpack/model.pte");
    let mut runner = Runner::open(&model, tokenizer_path(), RunnerOptions::default()).unwrap();

    // The current size is always accepted; another one is refused while the model lives.
    etllm::set_num_threads(1).unwrap();
    match etllm::set_num_threads(2) {
        Err(Error::InvalidArgument(m)) => assert!(m.contains("while 1 model(s) are loaded"), "{m}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert_eq!(etllm::num_threads(), 1);
    // A second runner asking for another size fails to load, and the first still runs.
    let options = RunnerOptions {
        num_threads: Some(2),
        ..Default::default()
    };
    assert!(matches!(
        Runner::open(&model, tokenizer_path(), options),
        Err(Error::InvalidArgument(_))
    ));
    generate_one(&mut runner);

    // Once every model is gone the pool can be resized, and a new model runs on it.
    drop(runner);
    etllm::set_num_threads(2).unwrap();
    assert_eq!(etllm::num_threads(), 2);
    let options = RunnerOptions {
        num_threads: Some(2),
        ..Default::default()
    };
    let mut runner = Runner::open(&model, tokenizer_path(), options).unwrap();
    generate_one(&mut runner);
}
