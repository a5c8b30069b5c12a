//! An OpenAI-compatible HTTP server over one loaded model (`etllm serve`).
//!
//! Endpoints: `POST /v1/chat/completions`, `POST /v1/completions`, `GET /v1/models`,
//! `GET /health`, `GET /metrics`. Requests and responses have OpenAI's shapes; fields
//! OpenAI does not define are ignored, and OpenAI parameters this server does not implement
//! (`n` above 1, `logprobs`, `tools`, penalties other than `repetition_penalty`, ...) are
//! refused with a 400 `unsupported_parameter` that names them, unless they hold their
//! neutral value. Errors are OpenAI's `{"error": {"message", "type", "param", "code"}}`.
//! See `docs/server.md` for every parameter and status.
//!
//! **Slots.** The server holds [`ServerOptions::parallel`] [sessions](crate::Session) of
//! the model. The model has one set of buffers and runs one request at a time; slots keep
//! the KV caches of that many conversations. A request goes to the slot whose cache its
//! prompt continues (more than half of the slot's tokens are the prompt's start; the
//! longest such), else to the least recently used slot, so a chat client that resends its
//! history prefills only the new turn. Requests wait in a queue of
//! [`ServerOptions::queue_size`]; when it is full the answer is 503 with `Retry-After`.
//!
//! **Shutdown.** When the `shutdown` future given to [`Server::serve`] completes, the server
//! stops accepting connections and lets queued and running requests finish for
//! [`ServerOptions::shutdown_timeout`]; then it cancels what is left (those requests get a
//! 503) and returns.
//!
//! ```no_run
//! use etllm::server::{Server, ServerOptions};
//! use etllm::{Runner, RunnerOptions};
//!
//! let mut runner = Runner::open("model.pte", "tokenizer.json", RunnerOptions::default())?;
//! let mut options = ServerOptions::default();
//! options.parallel = 4;
//! let server = Server::new(&mut runner, options)?;
//! let rt = tokio::runtime::Runtime::new()?;
//! rt.block_on(async {
//!     let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
//!     server.serve(listener, etllm::server::shutdown_signal()).await
//! })?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod api;
mod engine;
mod http;
mod metrics;

use std::future::{Future, IntoFuture};
use std::sync::Arc;
use std::time::Duration;

use crate::chat::ChatTemplate;
use crate::error::{Error, Result};
use crate::runner::Runner;

/// How the server behaves. Start from `ServerOptions::default()` and set fields: fields
/// may be added.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ServerOptions {
    /// Slots: sessions kept over the model, each with its own KV cache. Default 1.
    pub parallel: usize,
    /// Requests that may wait for the model, at least 1 (every request passes through the
    /// queue); one more is answered 503. Default 64.
    pub queue_size: usize,
    /// When set, every route but `/health` needs `Authorization: Bearer <key>` (compared in
    /// constant time); otherwise 401. Default none.
    pub api_key: Option<String>,
    /// The most tokens a request may hold, prompt and output; at most (and by default) the
    /// model's context length.
    pub context_length: Option<usize>,
    /// The model id `/v1/models` lists and responses carry. Requests may name any model.
    /// Default "etllm".
    pub model_name: String,
    /// The chat template for `/v1/chat/completions`. Default: the model's (see
    /// [`Runner::chat_template`]).
    pub chat_template: Option<ChatTemplate>,
    /// Request bodies larger than this are answered 413. Default 8 MiB.
    pub max_body_bytes: usize,
    /// After the shutdown signal, how long requests may go on before they are cancelled.
    /// Default 10 s.
    pub shutdown_timeout: Duration,
    /// Write one line a request (method, path, status, time) to stderr. Default false.
    pub log_requests: bool,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            parallel: 1,
            queue_size: 64,
            api_key: None,
            context_length: None,
            model_name: "etllm".into(),
            chat_template: None,
            max_body_bytes: 8 << 20,
            shutdown_timeout: Duration::from_secs(10),
            log_requests: false,
        }
    }
}

/// A server over one model. Made by [`Server::new`], run by [`Server::serve`].
pub struct Server {
    state: Arc<http::AppState>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("model", &self.state.model_name)
            .field("slots", &self.state.slots)
            .finish()
    }
}

impl Server {
    /// Opens the slots (sessions of `runner`'s model, which is loaded if it is not) and
    /// starts the thread that runs them.
    pub fn new(runner: &mut Runner, options: ServerOptions) -> Result<Server> {
        if options.parallel == 0 {
            return Err(Error::InvalidArgument("parallel must be at least 1".into()));
        }
        if options.queue_size == 0 {
            return Err(Error::InvalidArgument(
                "queue_size must be at least 1: a request waits in the queue until the model \
                 takes it"
                    .into(),
            ));
        }
        let sessions = (0..options.parallel)
            .map(|_| runner.session())
            .collect::<Result<Vec<_>>>()?;
        let first = &sessions[0];
        let max_context = first.max_context();
        let context = match options.context_length {
            Some(0) => {
                return Err(Error::InvalidArgument(
                    "context_length must be at least 1".into(),
                ))
            }
            Some(n) if n > max_context => {
                return Err(Error::InvalidArgument(format!(
                    "context_length {n} is larger than the model's context of {max_context}"
                )))
            }
            Some(n) => n,
            None => max_context,
        };
        let template = match options.chat_template {
            Some(t) => t,
            None => first.chat_template()?.clone(),
        };
        let shared = first.shared().clone();
        let metrics = Arc::new(metrics::Metrics::new(options.parallel));
        let engine = engine::Engine::start(sessions, options.queue_size, metrics.clone())
            .map_err(|e| Error::Server(format!("cannot start a thread: {e}")))?;
        let started = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default();
        Ok(Server {
            state: Arc::new(http::AppState {
                engine,
                metrics,
                shared,
                template,
                context,
                model_name: options.model_name,
                api_key: options.api_key,
                max_body_bytes: options.max_body_bytes,
                slots: options.parallel,
                log_requests: options.log_requests,
                started,
                shutdown_timeout: options.shutdown_timeout,
            }),
        })
    }

    /// The routes, for embedding the server in an application's own axum router. Requests
    /// keep being served until [`Server::serve`]'s shutdown or the server is dropped.
    pub fn router(&self) -> axum::Router {
        http::router(self.state.clone())
    }

    /// Serves on `listener` until `shutdown` completes; then stops accepting, gives running
    /// and queued requests [`ServerOptions::shutdown_timeout`] to finish, cancels the rest
    /// and returns once the model's thread has ended.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let engine = self.state.engine.clone();
        let timeout = self.state.shutdown_timeout;
        let (signalled, mut on_signalled) = tokio::sync::watch::channel(false);
        let graceful = {
            let engine = engine.clone();
            async move {
                shutdown.await;
                engine.close();
                let _ = signalled.send(true);
                tokio::spawn(async move {
                    tokio::time::sleep(timeout).await;
                    engine.cancel_all();
                });
            }
        };
        // Without TCP_NODELAY the first chunk of a stream waits for the client's delayed
        // ACK of the headers (about 40 ms on Linux).
        let listener = axum::serve::ListenerExt::tap_io(listener, |stream| {
            let _ = stream.set_nodelay(true);
        });
        let server = axum::serve(listener, self.router()).with_graceful_shutdown(graceful);
        // Connections that stay open after their requests were cancelled do not hold the
        // process: it returns a few seconds after the cancellation in any case.
        let deadline = async move {
            if on_signalled.wait_for(|s| *s).await.is_err() {
                std::future::pending::<()>().await;
            }
            tokio::time::sleep(timeout + Duration::from_secs(3)).await;
        };
        let result = tokio::select! {
            result = server.into_future() => result,
            () = deadline => Ok(()),
        };
        engine.cancel_all();
        let _ = tokio::task::spawn_blocking(move || engine.join()).await;
        result
    }
}

impl Server {
    /// Listens on `address` (`host:port`; port 0 picks a free one) and serves on a thread
    /// of its own with its own async runtime, for callers without one (the C API). The
    /// returned handle tells the bound address; [`RunningServer::stop`] (or dropping it)
    /// shuts the server down as [`Server::serve`] does.
    pub fn spawn(self, address: &str) -> Result<RunningServer> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("etllm-server")
            .enable_all()
            .build()
            .map_err(|e| Error::Server(format!("cannot start the async runtime: {e}")))?;
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind(address))
            .map_err(|e| Error::Server(format!("cannot listen on {address}: {e}")))?;
        let local = listener
            .local_addr()
            .map_err(|e| Error::Server(format!("cannot listen on {address}: {e}")))?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("etllm-server-main".into())
            .spawn(move || {
                let shutdown = async move {
                    let _ = stopped.await;
                };
                runtime.block_on(self.serve(listener, shutdown))
            })
            .map_err(|e| Error::Server(format!("cannot start a thread: {e}")))?;
        Ok(RunningServer {
            address: local,
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

/// A server serving on its own thread, made by [`Server::spawn`]. Dropping it stops it
/// (as [`stop`](Self::stop) does).
#[derive(Debug)]
pub struct RunningServer {
    address: std::net::SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<std::io::Result<()>>>,
}

impl RunningServer {
    /// The address it listens on (with the port chosen when 0 was asked for).
    pub fn local_addr(&self) -> std::net::SocketAddr {
        self.address
    }

    /// Stops accepting connections, lets running and queued requests finish for the
    /// shutdown timeout, cancels the rest, and returns when the server has ended. A second
    /// call does nothing.
    pub fn stop(&mut self) -> Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match self.thread.take().map(|t| t.join()) {
            None | Some(Ok(Ok(()))) => Ok(()),
            Some(Ok(Err(e))) => Err(Error::Server(format!("the server failed: {e}"))),
            Some(Err(_)) => Err(Error::Server("the server's thread panicked".into())),
        }
    }
}

impl Drop for RunningServer {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // Ends the model's thread once the queue is empty (handlers still holding the
        // state keep it alive until then).
        self.state.engine.close();
    }
}

/// Completes on SIGINT (Ctrl-C) or, on Unix, SIGTERM: the usual `shutdown` for
/// [`Server::serve`].
pub async fn shutdown_signal() {
    let interrupt = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = interrupt => {}
        () = terminate => {}
    }
}
