//! The routes, the request handlers, the API key check and the request counter.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use subtle::ConstantTimeEq;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};
use tokio_stream::Stream;

use super::api::{self, ApiError, Endpoint, Envelope, Plan, PromptInput};
use super::engine::{Engine, Event, JobGuard};
use super::metrics::Metrics;
use crate::chat::ChatTemplate;
use crate::session::Shared;

/// What the handlers share.
pub(crate) struct AppState {
    pub engine: Arc<Engine>,
    pub metrics: Arc<Metrics>,
    pub shared: Arc<Shared>,
    pub template: ChatTemplate,
    /// The most tokens a request may hold, prompt and output.
    pub context: usize,
    pub model_name: String,
    pub api_key: Option<String>,
    pub max_body_bytes: usize,
    pub slots: usize,
    pub log_requests: bool,
    pub started: u64,
    pub shutdown_timeout: std::time::Duration,
}

type AppRef = Arc<AppState>;

/// The server's routes.
pub(crate) fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), authorize))
        .layer(middleware::from_fn_with_state(state.clone(), count))
        .with_state(state)
}

/// An OpenAI-shaped error response; a 503 says when to retry.
fn error_response(e: ApiError) -> Response {
    let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = (status, Json(e.body())).into_response();
    if e.status == 503 {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    response
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        error_response(self)
    }
}

async fn not_found(request: Request) -> ApiError {
    ApiError {
        status: 404,
        code: Some("unknown_url"),
        ..ApiError::invalid(
            format!(
                "Unknown request URL: {} {}",
                request.method(),
                request.uri().path()
            ),
            None,
        )
    }
}

async fn method_not_allowed(request: Request) -> ApiError {
    ApiError {
        status: 405,
        code: Some("method_not_allowed"),
        ..ApiError::invalid(
            format!(
                "{} is not allowed on {}",
                request.method(),
                request.uri().path()
            ),
            None,
        )
    }
}

/// With an API key set, every route but `/health` needs `Authorization: Bearer KEY`; the
/// key is compared in constant time.
async fn authorize(State(state): State<AppRef>, request: Request, next: Next) -> Response {
    let Some(key) = state.api_key.as_deref() else {
        return next.run(request).await;
    };
    if request.uri().path() == "/health" {
        return next.run(request).await;
    }
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let error = |message: &str, code: Option<&'static str>| ApiError {
        status: 401,
        code,
        ..ApiError::invalid(message, None)
    };
    match given {
        None => error(
            "You didn't provide an API key. Give it in an Authorization header: \
             'Authorization: Bearer YOUR_KEY'.",
            None,
        )
        .into_response(),
        Some(given) if bool::from(given.as_bytes().ct_eq(key.as_bytes())) => {
            next.run(request).await
        }
        Some(_) => error("Incorrect API key provided.", Some("invalid_api_key")).into_response(),
    }
}

/// Counts every answer by endpoint and status (and logs it to stderr when asked).
async fn count(State(state): State<AppRef>, request: Request, next: Next) -> Response {
    let endpoint = match request.uri().path() {
        p
        @ ("/v1/chat/completions" | "/v1/completions" | "/v1/models" | "/health" | "/metrics") => {
            p.to_string()
        }
        _ => "other".to_string(),
    };
    let method = request.method().clone();
    let start = Instant::now();
    let response = next.run(request).await;
    let status = response.status().as_u16();
    state.metrics.count_request(&endpoint, status);
    if state.log_requests {
        eprintln!(
            "etllm serve: {method} {endpoint} {status} {:.1} ms",
            start.elapsed().as_secs_f64() * 1e3
        );
    }
    response
}

async fn models(State(state): State<AppRef>) -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [{
            "id": state.model_name,
            "object": "model",
            "created": state.started,
            "owned_by": "etllm",
        }],
    }))
}

async fn health(State(state): State<AppRef>) -> Json<Value> {
    Json(json!({
        "status": "ok",
        "slots": state.slots,
        "slots_busy": u8::from(state.engine.busy()),
        "queue_depth": state.engine.queue_depth(),
    }))
}

async fn metrics(State(state): State<AppRef>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.encode(),
    )
        .into_response()
}

async fn chat(State(state): State<AppRef>, headers: HeaderMap, body: Body) -> Response {
    complete(state, Endpoint::Chat, headers, body).await
}

async fn completions(State(state): State<AppRef>, headers: HeaderMap, body: Body) -> Response {
    complete(state, Endpoint::Completions, headers, body).await
}

/// Reads the body, refusing one larger than the limit with a 413.
async fn read_body(headers: &HeaderMap, body: Body, limit: usize) -> Result<Vec<u8>, ApiError> {
    let too_large = || ApiError {
        status: 413,
        code: Some("request_too_large"),
        ..ApiError::invalid(
            format!("the request body is larger than this server's limit of {limit} bytes"),
            None,
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    match axum::body::to_bytes(body, limit).await {
        Ok(bytes) => Ok(bytes.to_vec()),
        Err(e) => {
            let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&e);
            while let Some(s) = source {
                if s.is::<http_body_util::LengthLimitError>() {
                    return Err(too_large());
                }
                source = s.source();
            }
            Err(ApiError::invalid(
                format!("cannot read the request body: {e}"),
                None,
            ))
        }
    }
}

/// A prepared request: its prompt's token ids and the text echoed before the output.
struct Prepared {
    ids: Vec<u32>,
    echo: String,
    /// A chat prompt with images: the input list it runs as.
    inputs: Option<Vec<crate::Input>>,
}

/// A rendered chat prompt with image markers, as an input list: the text between the
/// markers tokenized, each image decoded (a bad one is a 400 now) and counted at the rows
/// its encoder returns. Also the ids the prompt fills, `MEDIA_POSITION` for image rows.
fn image_prompt(
    state: &AppState,
    text: &str,
    images: &[Vec<u8>],
) -> Result<(Vec<u32>, Vec<crate::Input>), ApiError> {
    use crate::multimodal::{ImageSource, Input, MEDIA_POSITION};
    let rows = state
        .shared
        .info
        .methods
        .get(crate::model::VISION_ENCODER)
        .and_then(|m| m.outputs.first())
        .and_then(|o| o.tensor())
        .and_then(|t| match t.sizes.as_slice() {
            [1, n, _] | [n, _] => Some(*n),
            _ => None,
        })
        .ok_or_else(|| {
            ApiError::invalid(
                "this model takes no images (it has no vision_encoder)",
                Some("messages"),
            )
        })?;
    let pieces: Vec<&str> = text.split(api::IMAGE_MARKER).collect();
    if pieces.len() - 1 != images.len() {
        return Err(ApiError::invalid(
            format!(
                "the chat template kept {} of the {} images",
                pieces.len() - 1,
                images.len()
            ),
            Some("messages"),
        ));
    }
    let mut ids = Vec::new();
    let mut list = Vec::new();
    for (k, piece) in pieces.iter().enumerate() {
        if !piece.is_empty() {
            let tokens = state
                .shared
                .tokenizer
                .encode(piece)
                .map_err(|e| ApiError::invalid(e.to_string(), None))?;
            ids.extend_from_slice(&tokens);
            list.push(Input::Tokens(tokens));
        }
        if let Some(bytes) = images.get(k) {
            crate::media::image::decode(bytes, &format!("image {k}"))
                .map_err(|e| ApiError::invalid(e.to_string(), Some("messages")))?;
            ids.extend(std::iter::repeat_n(MEDIA_POSITION, rows));
            list.push(Input::Image(ImageSource::Encoded(bytes.clone())));
        }
    }
    Ok((ids, list))
}

/// Tokenizes the prompt and checks it against the context, and compiles the grammar (a
/// bad schema is a 400 before the request waits for the model).
fn prepare(state: &AppState, plan: &mut Plan) -> Result<Prepared, ApiError> {
    let tokenizer = &state.shared.tokenizer;
    let tokenize_error = |e: crate::Error| ApiError::invalid(e.to_string(), None);
    let mut inputs = None;
    let (ids, echo) = match &plan.prompt {
        PromptInput::Messages(messages) => {
            let text = state
                .template
                .apply(messages, true)
                .map_err(|e| ApiError::invalid(e.to_string(), Some("messages")))?;
            if plan.images.is_empty() {
                (
                    tokenizer.encode(&text).map_err(tokenize_error)?,
                    String::new(),
                )
            } else {
                let (ids, list) = image_prompt(state, &text, &plan.images)?;
                inputs = Some(list);
                (ids, String::new())
            }
        }
        PromptInput::Text(text) => {
            let bos = usize::from(state.shared.bos_id.is_some());
            let ids = tokenizer
                .encode_with(text, bos, 0)
                .map_err(tokenize_error)?;
            (ids, text.clone())
        }
        PromptInput::Ids(ids) => {
            if let Some(bad) = ids
                .iter()
                .find(|&&id| id as usize >= state.shared.vocab_size)
            {
                return Err(ApiError::invalid(
                    format!(
                        "token id {bad} is outside the model's vocabulary of {}",
                        state.shared.vocab_size
                    ),
                    Some("prompt"),
                ));
            }
            let echo = if plan.echo {
                tokenizer.decode(ids).map_err(tokenize_error)?
            } else {
                String::new()
            };
            (ids.clone(), echo)
        }
    };
    if ids.is_empty() {
        return Err(ApiError::invalid(
            "the prompt is empty",
            Some(match plan.endpoint {
                Endpoint::Chat => "messages",
                Endpoint::Completions => "prompt",
            }),
        ));
    }
    let context = state.context;
    let what = match plan.endpoint {
        Endpoint::Chat => "messages",
        Endpoint::Completions => "prompt",
    };
    if ids.len() >= context {
        return Err(ApiError::context_length(
            format!(
                "This model's maximum context length is {context} tokens. However, your {what} \
             resulted in {} tokens. Please reduce the length of the {what}.",
                ids.len()
            ),
            Some(what),
        ));
    }
    if let Some(max) = plan.max_tokens {
        if ids.len().saturating_add(max) > context {
            return Err(ApiError::context_length(
                format!(
                    "This model's maximum context length is {context} tokens. However, you \
                 requested {} tokens ({} in the {what}, {max} in the completion). Please \
                 reduce the length of the {what} or completion.",
                    ids.len().saturating_add(max),
                    ids.len()
                ),
                Some(what),
            ));
        }
    }
    if !plan.config.grammar.is_empty() {
        let compiler = state
            .shared
            .compiler()
            .map_err(|e| ApiError::from_error(&e))?;
        compiler
            .compile(plan.config.grammar_type, &plan.config.grammar)
            .map_err(|e| ApiError::from_error(&e))?;
    }
    plan.config.seq_len = i32::try_from(context).unwrap_or(i32::MAX);
    Ok(Prepared {
        ids,
        echo: if plan.echo { echo } else { String::new() },
        inputs,
    })
}

/// A new response id.
fn response_id(endpoint: Endpoint) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or_default();
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let prefix = match endpoint {
        Endpoint::Chat => "chatcmpl",
        Endpoint::Completions => "cmpl",
    };
    format!("{prefix}-{nanos:016x}{n:08x}")
}

fn unix_seconds() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

/// Both completion endpoints: parse, prepare, queue, then answer at once or stream.
async fn complete(state: AppRef, endpoint: Endpoint, headers: HeaderMap, body: Body) -> Response {
    let received = Instant::now();
    let body = match read_body(&headers, body, state.max_body_bytes).await {
        Ok(body) => body,
        Err(e) => return e.into_response(),
    };
    let mut plan = match api::parse(endpoint, &body) {
        Ok(plan) => plan,
        Err(e) => return e.into_response(),
    };
    let worker = state.clone();
    let prepared = tokio::task::spawn_blocking(move || {
        let prepared = prepare(&worker, &mut plan);
        (plan, prepared)
    })
    .await;
    let (plan, prepared) = match prepared {
        Ok((plan, Ok(prepared))) => (plan, prepared),
        Ok((_, Err(e))) => return e.into_response(),
        Err(_) => {
            return ApiError::server(500, "internal error while tokenizing", None).into_response()
        }
    };
    let (tx, rx) = unbounded_channel();
    let guard =
        match state
            .engine
            .submit((prepared.ids, prepared.inputs), plan.config, tx, received)
        {
            Ok(guard) => guard,
            Err(e) => return e.into_response(),
        };
    let envelope = Envelope {
        id: response_id(endpoint),
        created: unix_seconds(),
        model: state.model_name.clone(),
        endpoint,
    };
    if plan.stream {
        let stream = Chunks::new(rx, guard, envelope, plan.include_usage, prepared.echo);
        return Sse::new(stream).into_response();
    }
    collect(rx, guard, envelope, prepared.echo).await
}

/// Waits for the whole output of a request that does not stream.
async fn collect(
    mut rx: UnboundedReceiver<Event>,
    guard: JobGuard,
    envelope: Envelope,
    mut text: String,
) -> Response {
    let _guard = guard;
    while let Some(event) = rx.recv().await {
        match event {
            Event::Text(piece) => text.push_str(&piece),
            Event::Done(Ok(stats)) => {
                return Json(envelope.response(&text, &stats)).into_response()
            }
            Event::Done(Err(e)) => return e.into_response(),
        }
    }
    ApiError::server(
        500,
        "internal error: the generation ended without a result",
        None,
    )
    .into_response()
}

/// The server-sent events of a streamed request: OpenAI's chunks, then `[DONE]`. Dropping
/// it (the client went away) cancels the request.
struct Chunks {
    rx: UnboundedReceiver<Event>,
    _guard: JobGuard,
    envelope: Envelope,
    include_usage: bool,
    /// Events ready to send.
    ready: std::collections::VecDeque<SseEvent>,
    /// Whether the next text chunk is the first (chat: it carries the role).
    first: bool,
    done: bool,
}

impl Chunks {
    fn new(
        rx: UnboundedReceiver<Event>,
        guard: JobGuard,
        envelope: Envelope,
        include_usage: bool,
        echo: String,
    ) -> Self {
        let mut chunks = Chunks {
            rx,
            _guard: guard,
            envelope,
            include_usage,
            ready: Default::default(),
            first: true,
            done: false,
        };
        // Chat streams open with the assistant's role; completions with the echoed prompt.
        if envelope_is_chat(&chunks.envelope) || !echo.is_empty() {
            chunks.push_text(&echo);
        }
        chunks
    }

    fn push(&mut self, value: Value) {
        self.ready
            .push_back(SseEvent::default().data(value.to_string()));
    }

    fn push_text(&mut self, text: &str) {
        let chunk = self
            .envelope
            .chunk(Some(text), self.first, None, self.include_usage);
        self.first = false;
        self.push(chunk);
    }
}

fn envelope_is_chat(envelope: &Envelope) -> bool {
    envelope.endpoint == Endpoint::Chat
}

impl Stream for Chunks {
    type Item = Result<SseEvent, Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            if let Some(event) = self.ready.pop_front() {
                return Poll::Ready(Some(Ok(event)));
            }
            if self.done {
                return Poll::Ready(None);
            }
            match self.rx.poll_recv(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Event::Text(text))) => self.push_text(&text),
                Poll::Ready(Some(Event::Done(Ok(stats)))) => {
                    let finish = api::finish_reason(stats.stop_reason);
                    let include_usage = self.include_usage;
                    let end = self
                        .envelope
                        .chunk(None, false, Some(finish), include_usage);
                    self.push(end);
                    if include_usage {
                        let usage = self.envelope.usage_chunk(&stats);
                        self.push(usage);
                    }
                    self.ready.push_back(SseEvent::default().data("[DONE]"));
                    self.done = true;
                }
                Poll::Ready(Some(Event::Done(Err(e)))) => {
                    self.push(e.body());
                    self.done = true;
                }
                Poll::Ready(None) => {
                    let e = ApiError::server(
                        500,
                        "internal error: the generation ended without a result",
                        None,
                    );
                    self.push(e.body());
                    self.done = true;
                }
            }
        }
    }
}
