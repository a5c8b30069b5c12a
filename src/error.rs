//! Errors returned by every fallible EtLlm operation.

use std::path::PathBuf;

/// Result type used throughout EtLlm.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong. Each variant carries a message meant for a person; the
/// C ABI maps each variant to its own status code.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file could not be opened or read.
    #[error("cannot read {path}: {message}")]
    FileAccess {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// The `.pte` file is not a program ExecuTorch can load.
    #[error("invalid model {path}: {message}")]
    InvalidModel {
        /// The model file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// The model loaded, but its methods do not have a signature EtLlm can drive.
    #[error("unsupported model: {0}")]
    UnsupportedModel(String),
    /// The tokenizer file could not be parsed, or does not fit the model.
    #[error("invalid tokenizer {path}: {message}")]
    InvalidTokenizer {
        /// The tokenizer file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// Encoding or decoding text failed.
    #[error("tokenizer error: {0}")]
    Tokenizer(String),
    /// An argument (prompt, configuration field, option) is not acceptable.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The prompt does not fit in the context that is left.
    #[error(
        "the prompt has {prompt_tokens} tokens but only {available} positions are left in the \
         context (max context {max_context}, current position {position}); call reset() or \
         shorten the prompt"
    )]
    ContextFull {
        /// Tokens in the encoded prompt, BOS/EOS included.
        prompt_tokens: usize,
        /// Positions left before the context is full.
        available: usize,
        /// The model's maximum context length.
        max_context: usize,
        /// The position before this call.
        position: usize,
    },
    /// ExecuTorch reported an error while loading or running a method.
    #[error("ExecuTorch error in {operation}: {code}{details}")]
    Runtime {
        /// What EtLlm was doing.
        operation: String,
        /// ExecuTorch's error code, spelled out.
        code: String,
        /// The ExecuTorch log lines captured while it failed (starting with ": "), or empty.
        details: String,
    },
    /// A KV-cache manager (IoManager) failed.
    #[error("KV-cache manager error: {0}")]
    IoManager(String),
    /// A sampler plugin failed or chose an impossible token.
    #[error("sampler plugin error: {0}")]
    Sampler(String),
    /// The operation needs a loaded runner and loading has not succeeded.
    #[error("the runner is not loaded: {0}")]
    NotLoaded(String),
    /// A chat template failed to compile or to render (a template's own
    /// `raise_exception` message included).
    #[error("chat template error{}: {message}", source_path.as_ref().map(|p| format!(" in {}", p.display())).unwrap_or_default())]
    ChatTemplate {
        /// The file the template came from, if any.
        source_path: Option<PathBuf>,
        /// What went wrong.
        message: String,
    },
    /// A constrained-decoding grammar (`GenerationConfig::grammar`) failed to compile, or
    /// the grammar engine failed during generation; the compiler's message included.
    #[error("grammar error: {0}")]
    Grammar(String),
    /// A saved session state was refused (not a state, truncated, corrupt, from another
    /// model or another format); the session keeps the state it had.
    #[error("invalid session state: {0}")]
    InvalidState(String),
    /// A call that cannot run now: a call on a session of the same model is in progress on
    /// this thread (the call comes from inside one of its callbacks).
    #[error("busy: {0}")]
    Busy(String),
    /// An image or audio input could not be used: not a supported format, corrupt or
    /// truncated, or a layout EtLlm does not take (e.g. more than two audio channels).
    #[error("invalid media {what}: {message}")]
    InvalidMedia {
        /// The input: its file, or its place in the input list.
        what: String,
        /// What is wrong with it.
        message: String,
    },
    /// The HTTP server could not start (its address cannot be bound, no thread or async
    /// runtime could be made) or failed while serving.
    #[error("server error: {0}")]
    Server(String),
}
