//! EtLlm runs decoder-only LLMs exported to ExecuTorch `.pte` files.
//!
//! The examples in this documentation run as doctests on the repository's tiny test model
//! (`tests/fixtures/`, random weights: its text is noise); put your own `.pte` and
//! tokenizer in their place.
//!
//! ```
//! use std::ops::ControlFlow;
//! use etllm::{GenerationConfig, Runner, RunnerOptions, StopReason};
//!
//! let mut runner = Runner::open(
//!     "tests/fixtures/dyn_xnnpack/model.pte",
//!     "tests/fixtures/tokenizer.json",
//!     RunnerOptions::default(),
//! )?;
//! let config = GenerationConfig {
//!     max_new_tokens: 8,
//!     temperature: 0.0, // greedy
//!     num_bos: 1,
//!     ..Default::default()
//! };
//! let mut text = String::new();
//! let stats = runner.generate("Once upon a time", &config, |piece| {
//!     text.push_str(piece.text); // complete UTF-8; print it to stream
//!     ControlFlow::Continue(())
//! }, |_| {})?;
//! assert!(text.starts_with("Once upon a time")); // `echo` is on by default
//! assert_eq!(stats.num_generated_tokens, 8); // exactly max_new_tokens
//! assert_eq!(stats.stop_reason, StopReason::Length);
//! eprintln!("{:.1} tokens/s", stats.decode_tokens_per_second());
//! # Ok::<(), etllm::Error>(())
//! ```
//!
//! The library never writes to stdout. ExecuTorch's own log lines are captured and
//! attached to errors; set `ETLLM_LOG=1` to also see them on stderr.

#![warn(missing_docs)]

pub mod asr;
pub mod chat;
pub mod config;
pub mod conversation;
pub mod error;
mod et;
pub mod ffi;
mod generate;
pub mod grammar;
pub mod io_manager;
pub mod media;
pub mod model;
pub mod multimodal;
pub mod runner;
pub mod sampler;
#[cfg(feature = "server")]
pub mod server;
pub mod session;
pub mod stats;
pub mod stop;
pub mod tensor;
pub mod tokenizer;

pub use asr::{AsrOptions, AsrRunner, TranscribeConfig, Transcript};
pub use chat::{ChatMessage, ChatTemplate};
pub use config::GenerationConfig;
pub use conversation::Conversation;
pub use error::{Error, Result};
pub use grammar::GrammarType;
pub use io_manager::IoManager;
pub use model::{ModelInfo, ModelMetadata};
pub use multimodal::Input;
pub use runner::{Runner, RunnerOptions, StopHandle, TokenPiece};
pub use session::Session;
pub use stats::{Stats, StopReason};
pub use tokenizer::{Preset, Tokenizer};

/// The ExecuTorch runtime version EtLlm is built against.
pub const EXECUTORCH_VERSION: &str = "1.5.1";

/// Threads in ExecuTorch's process-wide CPU thread pool.
pub fn num_threads() -> usize {
    et::num_threads()
}

/// Sets the threads of ExecuTorch's process-wide CPU thread pool. Asking for its current
/// size always succeeds; another size is an [`Error::InvalidArgument`] while any model is
/// loaded, because ExecuTorch's XNNPACK delegate keeps the pool it was loaded with (a
/// resize under it would leave it waiting on a freed pool).
pub fn set_num_threads(threads: usize) -> Result<()> {
    et::set_num_threads(threads)
}
