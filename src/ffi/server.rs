//! `etllm_server`: the OpenAI-compatible HTTP server, run on threads of its own.

use std::ffi::c_char;
use std::time::Duration;

use super::error::{etllm_status, guard, FfiError};
use super::runner::{etllm_runner, lock_runner};
use super::{c_str, free_handle, out_arg, read_versioned, versioned};
use crate::server::{RunningServer, Server, ServerOptions};

/// How `etllm_server_start` serves. Always start from `etllm_server_options_default()`,
/// then change the fields you need; later versions may add fields at the end.
#[repr(C)]
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy)]
pub struct etllm_server_options {
    /// `sizeof(etllm_server_options)` as the caller compiled it.
    pub struct_size: u32,
    /// The port to listen on; 0 picks a free one (`etllm_server_port` tells which).
    /// Default 8080.
    pub port: u16,
    /// Write one line a request (method, path, status, time) to stderr. Default false.
    pub log_requests: bool,
    /// The address to listen on (UTF-8, NUL-terminated); NULL means "127.0.0.1", which
    /// accepts connections from this machine only. Read during the call only.
    pub host: *const c_char,
    /// Slots: sessions of the model whose KV caches are kept (requests run one at a time;
    /// each goes to the slot whose cache its prompt continues). Default 1.
    pub parallel: u32,
    /// Requests that may wait for the model, at least 1; one more is answered 503.
    /// Default 64.
    pub queue_size: u32,
    /// The most tokens a request may hold, prompt and output; 0 (the default) means the
    /// model's context.
    pub context_length: u32,
    /// After `etllm_server_stop`, how long running and queued requests may go on before
    /// they are cancelled, in milliseconds. Default 10000.
    pub shutdown_timeout_ms: u32,
    /// Request bodies larger than this are answered 413. Default 8 MiB.
    pub max_body_bytes: u64,
    /// When not NULL, every route but /health needs `Authorization: Bearer <api_key>`.
    /// Read during the call only. Default NULL.
    pub api_key: *const c_char,
    /// The model id /v1/models lists; NULL means "etllm". Read during the call only.
    pub model_name: *const c_char,
}

versioned!(etllm_server_options, "etllm_server_options"; port);

impl Default for etllm_server_options {
    fn default() -> Self {
        let defaults = ServerOptions::default();
        etllm_server_options {
            struct_size: std::mem::size_of::<Self>() as u32,
            port: 8080,
            log_requests: defaults.log_requests,
            host: std::ptr::null(),
            parallel: defaults.parallel as u32,
            queue_size: defaults.queue_size as u32,
            context_length: 0,
            shutdown_timeout_ms: defaults.shutdown_timeout.as_millis() as u32,
            max_body_bytes: defaults.max_body_bytes as u64,
            api_key: std::ptr::null(),
            model_name: std::ptr::null(),
        }
    }
}

/// The default server options, with `struct_size` set.
#[no_mangle]
pub extern "C" fn etllm_server_options_default() -> etllm_server_options {
    etllm_server_options::default()
}

/// An OpenAI-compatible HTTP server over a runner's model (POST /v1/chat/completions,
/// POST /v1/completions, GET /v1/models, GET /health, GET /metrics; docs/server.md has
/// every parameter and status), serving on threads of its own. Opaque; made by
/// `etllm_server_start`, freed with `etllm_server_free`.
///
/// The server holds sessions of the runner's model (see `etllm_session`): it keeps the
/// model loaded after `etllm_runner_free`, and its requests take turns on the model with
/// the runner's and its sessions' calls. Thread rules: `etllm_server_port` may be called
/// from any thread; `etllm_server_stop` and `etllm_server_free` must not race with each
/// other.
#[allow(non_camel_case_types)]
pub struct etllm_server {
    running: RunningServer,
}

/// Starts serving `runner`'s model (loaded first if it is not) with `options` (NULL: the
/// defaults), and returns once the server listens. On success `*out_server` is a new
/// server the caller stops and frees with `etllm_server_free`; on failure it is set to NULL
/// (`ETLLM_ERR_SERVER` when the address cannot be bound, e.g. the port is in use;
/// `ETLLM_ERR_INVALID_ARGUMENT` for options out of range).
#[no_mangle]
pub extern "C" fn etllm_server_start(
    runner: *mut etllm_runner,
    options: *const etllm_server_options,
    out_server: *mut *mut etllm_server,
) -> etllm_status {
    guard(|| {
        let out = out_arg(out_server, "out_server")?;
        *out = std::ptr::null_mut();
        let o = read_versioned(options, etllm_server_options::default())?;
        let optional = |ptr: *const c_char, name: &'static str| {
            if ptr.is_null() {
                Ok(None)
            } else {
                c_str(ptr, name).map(|s| Some(s.to_string()))
            }
        };
        let host = optional(o.host, "options.host")?.unwrap_or_else(|| "127.0.0.1".into());
        let defaults = ServerOptions::default();
        let server_options = ServerOptions {
            parallel: o.parallel as usize,
            queue_size: o.queue_size as usize,
            context_length: (o.context_length > 0).then_some(o.context_length as usize),
            shutdown_timeout: Duration::from_millis(u64::from(o.shutdown_timeout_ms)),
            max_body_bytes: usize::try_from(o.max_body_bytes).unwrap_or(usize::MAX),
            log_requests: o.log_requests,
            api_key: optional(o.api_key, "options.api_key")?,
            model_name: optional(o.model_name, "options.model_name")?
                .unwrap_or(defaults.model_name.clone()),
            ..defaults
        };
        let server = Server::new(&mut *lock_runner(runner)?, server_options)?;
        // An IPv6 host needs brackets around it in an address with a port.
        let address = if host.contains(':') && !host.starts_with('[') {
            format!("[{host}]:{}", o.port)
        } else {
            format!("{host}:{}", o.port)
        };
        let running = server.spawn(&address)?;
        *out = Box::into_raw(Box::new(etllm_server { running }));
        Ok(())
    })
}

/// The port the server listens on (the one chosen when `options.port` was 0); 0 for NULL.
#[no_mangle]
pub extern "C" fn etllm_server_port(server: *const etllm_server) -> u16 {
    // Safety: non-null pointers come from etllm_server_start and stay valid until
    // etllm_server_free.
    unsafe { server.as_ref() }.map_or(0, |s| s.running.local_addr().port())
}

/// Stops the server: it stops accepting connections, lets running and queued requests
/// finish for `shutdown_timeout_ms`, cancels the rest (they are answered 503), and returns
/// when it has ended. A second call does nothing. The server is still freed with
/// `etllm_server_free`.
#[no_mangle]
pub extern "C" fn etllm_server_stop(server: *mut etllm_server) -> etllm_status {
    guard(|| {
        // Safety: as for etllm_server_port.
        let server = unsafe { server.as_mut() }.ok_or(FfiError::Null("server"))?;
        server.running.stop()?;
        Ok(())
    })
}

/// Stops the server as `etllm_server_stop` does (when it was not stopped yet) and frees it.
/// NULL is ignored.
#[no_mangle]
pub extern "C" fn etllm_server_free(server: *mut etllm_server) {
    free_handle(server);
}
