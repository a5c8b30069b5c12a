//! OpenAI's request and response shapes, and how a request becomes a generation.
//!
//! A request body is parsed twice: first as a JSON object, to refuse the OpenAI parameters
//! EtLlm does not implement (by name, unless they hold their neutral value), then into the
//! typed request. Fields OpenAI does not define are ignored, as OpenAI ignores them.

use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::config::GenerationConfig;
use crate::grammar::GrammarType;
use crate::stats::{Stats, StopReason};

/// An error answered to the client as OpenAI shapes it:
/// `{"error": {"message", "type", "param", "code"}}` with an HTTP status.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ApiError {
    pub status: u16,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl ApiError {
    /// A 400 `invalid_request_error`.
    pub fn invalid(message: impl Into<String>, param: Option<&str>) -> Self {
        ApiError {
            status: 400,
            message: message.into(),
            kind: "invalid_request_error",
            param: param.map(str::to_string),
            code: None,
        }
    }

    /// A 400 `unsupported_parameter` naming `param`.
    pub fn unsupported(param: &str, why: &str) -> Self {
        ApiError {
            code: Some("unsupported_parameter"),
            ..Self::invalid(
                format!("Unsupported parameter: '{param}' {why}"),
                Some(param),
            )
        }
    }

    /// A 400 `context_length_exceeded` about `param` (`messages` or `prompt`).
    pub fn context_length(message: String, param: Option<&str>) -> Self {
        ApiError {
            code: Some("context_length_exceeded"),
            ..Self::invalid(message, param)
        }
    }

    /// An error of the server's (500 unless `status` says otherwise).
    pub fn server(status: u16, message: impl Into<String>, code: Option<&'static str>) -> Self {
        ApiError {
            status,
            message: message.into(),
            kind: "server_error",
            param: None,
            code,
        }
    }

    /// The JSON body.
    pub fn body(&self) -> Value {
        json!({ "error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }

    /// An error of the library, as the client should see it.
    pub fn from_error(e: &crate::Error) -> Self {
        use crate::Error;
        match e {
            Error::ContextFull { .. } => ApiError::context_length(e.to_string(), None),
            Error::InvalidArgument(m) => ApiError::invalid(m.clone(), None),
            Error::Grammar(m) => ApiError::invalid(
                format!("invalid response_format or grammar: {m}"),
                Some("response_format"),
            ),
            Error::Tokenizer(m) => ApiError::invalid(m.clone(), None),
            _ => ApiError::server(500, e.to_string(), None),
        }
    }
}

/// Which endpoint a request came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Endpoint {
    Chat,
    Completions,
}

/// `stop`: a string or a list of strings.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum StopField {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum ResponseFormat {
    Text,
    JsonObject,
    JsonSchema { json_schema: JsonSchemaFormat },
}

#[derive(Debug, Deserialize)]
struct JsonSchemaFormat {
    #[serde(default)]
    schema: Option<Value>,
}

/// The settings both endpoints share.
#[derive(Debug, Deserialize)]
struct Common {
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    max_tokens: Option<i64>,
    #[serde(default)]
    max_completion_tokens: Option<i64>,
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default)]
    top_p: Option<f32>,
    #[serde(default)]
    seed: Option<i64>,
    #[serde(default)]
    stop: Option<StopField>,
    #[serde(default)]
    response_format: Option<ResponseFormat>,
    // Extensions (llama.cpp's names).
    #[serde(default)]
    top_k: Option<i32>,
    #[serde(default)]
    min_p: Option<f32>,
    #[serde(default)]
    repetition_penalty: Option<f32>,
    #[serde(default)]
    ignore_eos: Option<bool>,
    /// A GBNF grammar the output must match.
    #[serde(default)]
    grammar: Option<String>,
}

/// One message's `content`: a string, or a list of parts of which EtLlm takes text parts.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Map<String, Value>>),
}

#[derive(Debug, Deserialize)]
struct Message {
    role: String,
    #[serde(default)]
    content: Option<Content>,
    #[serde(default)]
    tool_calls: Option<Vec<Value>>,
}

#[derive(Debug, Deserialize)]
struct ChatRequest {
    messages: Vec<Message>,
    #[serde(flatten)]
    common: Common,
}

/// `prompt` of a completion: a string, or one string or one token list in a list.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum PromptField {
    Text(String),
    Ids(Vec<u32>),
    Texts(Vec<String>),
    IdLists(Vec<Vec<u32>>),
}

#[derive(Debug, Deserialize)]
struct CompletionRequest {
    prompt: PromptField,
    #[serde(default)]
    echo: Option<bool>,
    #[serde(flatten)]
    common: Common,
}

/// A completion's prompt, before tokenizing.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum PromptInput {
    /// Chat messages, for the chat template.
    Messages(Vec<crate::ChatMessage>),
    /// Text, tokenized with the model's BOS before it.
    Text(String),
    /// Token ids, fed as they are.
    Ids(Vec<u32>),
}

/// What a request asks for, checked, before its prompt is tokenized.
#[derive(Debug, Clone)]
pub(crate) struct Plan {
    pub endpoint: Endpoint,
    pub prompt: PromptInput,
    pub stream: bool,
    pub include_usage: bool,
    /// Completions' `echo`: the prompt text comes before the output.
    pub echo: bool,
    /// The tokens asked for at most, if the request says.
    pub max_tokens: Option<usize>,
    pub config: GenerationConfig,
    /// Chat's image parts, in order: the encoded files of their `data:` URLs. The
    /// messages hold [`IMAGE_MARKER`] where each was.
    pub images: Vec<Vec<u8>>,
}

/// What an image part becomes in the message text given to the chat template (the
/// placeholder Llava's templates use); the rendered prompt is split at it.
pub(crate) const IMAGE_MARKER: &str = "<image>";

/// A parameter OpenAI defines that EtLlm does not implement, with the values that mean
/// "off" (accepted and ignored). Any other value is refused by name.
type Unsupported = (&'static str, &'static [&'static str]);

/// Those of both endpoints.
const UNSUPPORTED_BOTH: &[Unsupported] = &[
    ("n", &["1", "null"]),
    ("logit_bias", &["{}", "null"]),
    ("presence_penalty", &["0", "0.0", "null"]),
    ("frequency_penalty", &["0", "0.0", "null"]),
];

const UNSUPPORTED_CHAT: &[Unsupported] = &[
    ("logprobs", &["false", "null"]),
    ("top_logprobs", &["0", "null"]),
    ("tools", &["[]", "null"]),
    ("tool_choice", &["\"none\"", "\"auto\"", "null"]),
    ("functions", &["[]", "null"]),
    ("function_call", &["\"none\"", "\"auto\"", "null"]),
    ("audio", &["null"]),
    ("modalities", &["[\"text\"]", "null"]),
    ("prediction", &["null"]),
    ("web_search_options", &["null"]),
    ("reasoning_effort", &["null"]),
];

const UNSUPPORTED_COMPLETIONS: &[Unsupported] = &[
    ("best_of", &["1", "null"]),
    ("logprobs", &["0", "null"]),
    ("suffix", &["\"\"", "null"]),
];

/// Parses a request body for `endpoint` into a [`Plan`].
pub(crate) fn parse(endpoint: Endpoint, body: &[u8]) -> Result<Plan, ApiError> {
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::invalid(
            format!("We could not parse the JSON body of your request: {e}"),
            None,
        )
    })?;
    let Value::Object(object) = value else {
        return Err(ApiError::invalid(
            "the request body must be a JSON object",
            None,
        ));
    };
    let refused = match endpoint {
        Endpoint::Chat => UNSUPPORTED_CHAT,
        Endpoint::Completions => UNSUPPORTED_COMPLETIONS,
    };
    for (name, neutral) in UNSUPPORTED_BOTH.iter().chain(refused) {
        if let Some(v) = object.get(*name) {
            let text = v.to_string();
            if !neutral.contains(&text.as_str()) {
                return Err(ApiError::unsupported(
                    name,
                    &format!("is not supported by this server (got {text})"),
                ));
            }
        }
    }
    let value = Value::Object(object);
    let typed_error = |e: serde_json::Error| ApiError::invalid(format!("{e}"), None);
    match endpoint {
        Endpoint::Chat => {
            let request: ChatRequest = serde_json::from_value(value).map_err(typed_error)?;
            let (messages, images) = chat_messages(request.messages)?;
            let mut plan = plan(
                endpoint,
                PromptInput::Messages(messages),
                false,
                request.common,
            )?;
            plan.images = images;
            Ok(plan)
        }
        Endpoint::Completions => {
            let request: CompletionRequest = serde_json::from_value(value).map_err(typed_error)?;
            let prompt = match request.prompt {
                PromptField::Text(text) => PromptInput::Text(text),
                PromptField::Ids(ids) => PromptInput::Ids(ids),
                PromptField::Texts(mut texts) if texts.len() == 1 => {
                    PromptInput::Text(texts.remove(0))
                }
                PromptField::IdLists(mut lists) if lists.len() == 1 => {
                    PromptInput::Ids(lists.remove(0))
                }
                _ => {
                    return Err(ApiError::unsupported(
                        "prompt",
                        "with several prompts is not supported: send one prompt a request",
                    ))
                }
            };
            if matches!(&prompt, PromptInput::Ids(ids) if ids.is_empty()) {
                return Err(ApiError::invalid("prompt is empty", Some("prompt")));
            }
            plan(
                endpoint,
                prompt,
                request.echo.unwrap_or(false),
                request.common,
            )
        }
    }
}

/// The messages as the chat template takes them.
fn chat_messages(
    messages: Vec<Message>,
) -> Result<(Vec<crate::ChatMessage>, Vec<Vec<u8>>), ApiError> {
    let mut images = Vec::new();
    if messages.is_empty() {
        return Err(ApiError::invalid(
            "messages must hold at least one message",
            Some("messages"),
        ));
    }
    let mut out = Vec::with_capacity(messages.len());
    for (i, message) in messages.into_iter().enumerate() {
        let role = match message.role.as_str() {
            "system" | "user" | "assistant" => message.role,
            // OpenAI's newer name for the system message.
            "developer" => "system".to_string(),
            "tool" | "function" => {
                return Err(ApiError::unsupported(
                    &format!("messages[{i}].role"),
                    &format!("'{}': tools are not supported", message.role),
                ))
            }
            other => {
                return Err(ApiError::invalid(
                    format!(
                    "messages[{i}].role '{other}' is not one of system, developer, user, assistant"
                ),
                    Some(&format!("messages[{i}].role")),
                ))
            }
        };
        if message.tool_calls.as_ref().is_some_and(|t| !t.is_empty()) {
            return Err(ApiError::unsupported(
                &format!("messages[{i}].tool_calls"),
                "is not supported: tools are not supported",
            ));
        }
        let content = match message.content {
            None => String::new(),
            Some(Content::Text(text)) => text,
            Some(Content::Parts(parts)) => {
                let mut text = String::new();
                for (j, part) in parts.iter().enumerate() {
                    match (part.get("type").and_then(Value::as_str), part.get("text")) {
                        (Some("text"), Some(Value::String(t))) => text.push_str(t),
                        (Some("text"), _) => {
                            return Err(ApiError::invalid(
                                format!("messages[{i}].content[{j}] has no text"),
                                Some(&format!("messages[{i}].content[{j}].text")),
                            ))
                        }
                        (Some("image_url"), _) => {
                            let param = format!("messages[{i}].content[{j}].image_url");
                            images.push(image_part(part, &param)?);
                            text.push_str(IMAGE_MARKER);
                        }
                        (ty, _) => {
                            return Err(ApiError::unsupported(
                                &format!("messages[{i}].content[{j}].type"),
                                &format!(
                                    "'{}' is not supported: this server takes text and \
                                     image_url parts",
                                    ty.unwrap_or("(missing)")
                                ),
                            ))
                        }
                    }
                }
                text
            }
        };
        out.push(crate::ChatMessage::new(role, content));
    }
    Ok((out, images))
}

/// The encoded image of an `image_url` part: a `data:` URL with base64 data. Remote URLs
/// are refused: the server fetches nothing.
fn image_part(part: &serde_json::Map<String, Value>, param: &str) -> Result<Vec<u8>, ApiError> {
    use base64::Engine as _;
    let url = part
        .get("image_url")
        .and_then(|u| u.get("url").or(Some(u)))
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::invalid(format!("{param} has no url"), Some(param)))?;
    let Some(rest) = url.strip_prefix("data:") else {
        return Err(ApiError::invalid(
            format!(
                "{param}: only data: URLs are taken (data:image/png;base64,...); this \
                 server does not fetch remote images"
            ),
            Some(param),
        ));
    };
    let Some((_, data)) = rest.split_once(";base64,") else {
        return Err(ApiError::invalid(
            format!("{param}: the data: URL is not base64 (data:<type>;base64,<data>)"),
            Some(param),
        ));
    };
    base64::engine::general_purpose::STANDARD
        .decode(data.trim())
        .map_err(|e| ApiError::invalid(format!("{param}: bad base64: {e}"), Some(param)))
}

/// The checked plan of a request.
fn plan(
    endpoint: Endpoint,
    prompt: PromptInput,
    echo: bool,
    common: Common,
) -> Result<Plan, ApiError> {
    let stream = common.stream.unwrap_or(false);
    if common.stream_options.is_some() && !stream {
        return Err(ApiError::invalid(
            "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
            Some("stream_options"),
        ));
    }
    let include_usage = common.stream_options.is_some_and(|o| o.include_usage);
    let max_tokens = match (common.max_completion_tokens, common.max_tokens) {
        (Some(n), _) => Some(("max_completion_tokens", n)),
        (None, Some(n)) => Some(("max_tokens", n)),
        (None, None) => None,
    };
    let max_tokens = match max_tokens {
        Some((name, n)) if n < 1 => {
            return Err(ApiError::invalid(
                format!("{name} must be at least 1, got {n}"),
                Some(name),
            ))
        }
        Some((_, n)) => Some(usize::try_from(n).unwrap_or(usize::MAX)),
        None => None,
    };
    let temperature = common.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::invalid(
            format!("temperature must be between 0 and 2, got {temperature}"),
            Some("temperature"),
        ));
    }
    let top_p = common.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::invalid(
            format!("top_p must be above 0 and at most 1, got {top_p}"),
            Some("top_p"),
        ));
    }
    let stop_strings = match common.stop {
        None => Vec::new(),
        Some(StopField::One(s)) => vec![s],
        Some(StopField::Many(v)) => v,
    };
    if stop_strings.iter().any(String::is_empty) {
        return Err(ApiError::invalid(
            "stop strings must not be empty",
            Some("stop"),
        ));
    }
    let (grammar, grammar_type) = match (common.response_format, common.grammar) {
        (Some(ResponseFormat::Text) | None, None) => (String::new(), GrammarType::JsonSchema),
        (Some(ResponseFormat::Text) | None, Some(gbnf)) => (gbnf, GrammarType::Gbnf),
        (Some(_), Some(_)) => {
            return Err(ApiError::invalid(
                "give response_format or grammar, not both",
                Some("grammar"),
            ))
        }
        (Some(ResponseFormat::JsonObject), None) => {
            (r#"{"type": "object"}"#.to_string(), GrammarType::JsonSchema)
        }
        (Some(ResponseFormat::JsonSchema { json_schema }), None) => {
            let schema = json_schema.schema.unwrap_or_else(|| json!({}));
            (schema.to_string(), GrammarType::JsonSchema)
        }
    };
    let config = GenerationConfig {
        echo: false,
        max_new_tokens: max_tokens.map_or(-1, |n| n.min(i32::MAX as usize) as i32),
        temperature,
        top_p,
        top_k: common.top_k.unwrap_or(0),
        min_p: common.min_p.unwrap_or(0.0),
        repetition_penalty: common.repetition_penalty.unwrap_or(1.0),
        ignore_eos: common.ignore_eos.unwrap_or(false),
        // OpenAI's seed is an integer; negative ones keep their bits.
        seed: common.seed.map(|s| s as u64),
        stop_strings,
        grammar,
        grammar_type,
        num_bos: 0,
        reuse_prefix: true,
        ..Default::default()
    };
    config.validate().map_err(|e| {
        let message = e.to_string();
        let param = ["top_k", "min_p", "repetition_penalty"]
            .into_iter()
            .find(|p| message.contains(p));
        ApiError::invalid(message, param)
    })?;
    Ok(Plan {
        endpoint,
        prompt,
        stream,
        include_usage,
        echo,
        max_tokens,
        config,
        images: Vec::new(),
    })
}

/// OpenAI's `finish_reason` for how a generation ended.
pub(crate) fn finish_reason(reason: StopReason) -> &'static str {
    match reason {
        StopReason::Length | StopReason::ContextFull | StopReason::GrammarIncomplete => "length",
        _ => "stop",
    }
}

/// The `usage` object.
pub(crate) fn usage(stats: &Stats) -> Value {
    json!({
        "prompt_tokens": stats.num_prompt_tokens,
        "completion_tokens": stats.num_generated_tokens,
        "total_tokens": stats.num_prompt_tokens + stats.num_generated_tokens,
        "prompt_tokens_details": { "cached_tokens": stats.reused_prompt_tokens },
    })
}

/// What every response object starts with.
#[derive(Debug, Clone)]
pub(crate) struct Envelope {
    pub id: String,
    pub created: u64,
    pub model: String,
    pub endpoint: Endpoint,
}

/// `system_fingerprint`: this build of EtLlm.
const FINGERPRINT: &str = concat!("etllm-", env!("CARGO_PKG_VERSION"));

impl Envelope {
    /// An object of type `object` with `choices` (and `usage`, when given), under the
    /// fields every response and chunk starts with.
    fn object(&self, object: &str, choices: Value, usage: Option<Value>) -> Value {
        let mut value = json!({
            "id": self.id,
            "object": object,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": FINGERPRINT,
            "choices": choices,
        });
        if let Some(usage) = usage {
            value["usage"] = usage;
        }
        value
    }

    /// The type of a streamed chunk.
    fn chunk_object(&self) -> &'static str {
        match self.endpoint {
            Endpoint::Chat => "chat.completion.chunk",
            Endpoint::Completions => "text_completion",
        }
    }

    /// The whole response of a request that did not stream.
    pub fn response(&self, text: &str, stats: &Stats) -> Value {
        let finish = finish_reason(stats.stop_reason);
        let (object, choice) = match self.endpoint {
            Endpoint::Chat => (
                "chat.completion",
                json!({
                    "index": 0,
                    "message": { "role": "assistant", "content": text, "refusal": null },
                    "logprobs": null,
                    "finish_reason": finish,
                }),
            ),
            Endpoint::Completions => (
                "text_completion",
                json!({ "index": 0, "text": text, "logprobs": null, "finish_reason": finish }),
            ),
        };
        self.object(object, json!([choice]), Some(usage(stats)))
    }

    /// A streamed chunk: `text` (chat: with the assistant role when `first`), or the end
    /// with `finish`; `usage: null` when the client asked for usage at the end.
    pub fn chunk(
        &self,
        text: Option<&str>,
        first: bool,
        finish: Option<&str>,
        include_usage: bool,
    ) -> Value {
        let choice = match self.endpoint {
            Endpoint::Chat => {
                let delta = match (text, first) {
                    (Some(t), true) => json!({ "role": "assistant", "content": t }),
                    (Some(t), false) => json!({ "content": t }),
                    (None, _) => json!({}),
                };
                json!({ "index": 0, "delta": delta, "logprobs": null, "finish_reason": finish })
            }
            Endpoint::Completions => json!({
                "index": 0,
                "text": text.unwrap_or(""),
                "logprobs": null,
                "finish_reason": finish,
            }),
        };
        let usage = include_usage.then_some(Value::Null);
        self.object(self.chunk_object(), json!([choice]), usage)
    }

    /// The last chunk when the client asked for usage: no choices, the usage.
    pub fn usage_chunk(&self, stats: &Stats) -> Value {
        self.object(self.chunk_object(), json!([]), Some(usage(stats)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(body: &str) -> Result<Plan, ApiError> {
        parse(Endpoint::Chat, body.as_bytes())
    }

    #[test]
    fn unknown_fields_are_ignored() {
        let plan =
            chat(r#"{"messages": [{"role": "user", "content": "hi"}], "not_openai": 3}"#).unwrap();
        assert_eq!(
            plan.prompt,
            PromptInput::Messages(vec![crate::ChatMessage::user("hi")])
        );
    }

    #[test]
    fn unsupported_parameters_are_refused_by_name_unless_neutral() {
        let e = chat(r#"{"messages": [{"role": "user", "content": "hi"}], "n": 2}"#).unwrap_err();
        assert_eq!(
            (e.status, e.code, e.param.as_deref()),
            (400, Some("unsupported_parameter"), Some("n"))
        );
        assert!(chat(r#"{"messages": [{"role": "user", "content": "hi"}], "n": 1}"#).is_ok());
        let e = chat(r#"{"messages": [{"role": "user", "content": "hi"}], "logprobs": true}"#)
            .unwrap_err();
        assert_eq!(e.param.as_deref(), Some("logprobs"));
    }

    #[test]
    fn max_completion_tokens_wins_over_max_tokens() {
        let plan = chat(
            r#"{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "max_completion_tokens": 7}"#,
        )
        .unwrap();
        assert_eq!(plan.config.max_new_tokens, 7);
    }

    #[test]
    fn text_parts_are_joined_and_other_parts_refused() {
        let plan = chat(
            r#"{"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]}"#,
        )
        .unwrap();
        assert_eq!(
            plan.prompt,
            PromptInput::Messages(vec![crate::ChatMessage::user("ab")])
        );
        let e = chat(
            r#"{"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]}"#,
        )
        .unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages[0].content[0].type"));
    }

    #[test]
    fn image_parts_become_markers_and_their_data_urls_are_decoded() {
        let plan = chat(
            r#"{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAEC"}}, {"type": "text", "text": "what?"}]}]}"#,
        )
        .unwrap();
        assert_eq!(
            plan.prompt,
            PromptInput::Messages(vec![crate::ChatMessage::user("<image>what?")])
        );
        assert_eq!(plan.images, vec![vec![0u8, 1, 2]]);
        for url in [
            "https://example.com/cat.png",
            "data:image/png,abc",
            "data:image/png;base64,!!",
        ] {
            let body = format!(
                r#"{{"messages": [{{"role": "user", "content": [{{"type": "image_url", "image_url": {{"url": "{url}"}}}}]}}]}}"#
            );
            let e = chat(&body).unwrap_err();
            assert_eq!(e.status, 400, "{url}");
            assert_eq!(
                e.param.as_deref(),
                Some("messages[0].content[0].image_url"),
                "{url}"
            );
        }
    }

    #[test]
    fn response_format_json_schema_becomes_the_grammar() {
        let plan = chat(
            r#"{"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "integer"}}}}"#,
        )
        .unwrap();
        assert_eq!(plan.config.grammar, r#"{"type":"integer"}"#);
        assert_eq!(plan.config.grammar_type, GrammarType::JsonSchema);
    }

    #[test]
    fn stream_options_without_stream_is_an_error() {
        let e = chat(
            r#"{"messages": [{"role": "user", "content": "hi"}], "stream_options": {"include_usage": true}}"#,
        )
        .unwrap_err();
        assert_eq!(e.param.as_deref(), Some("stream_options"));
    }

    #[test]
    fn out_of_range_sampling_values_name_their_parameter() {
        let e = chat(r#"{"messages": [{"role": "user", "content": "hi"}], "temperature": 3}"#)
            .unwrap_err();
        assert_eq!(e.param.as_deref(), Some("temperature"));
        let e =
            chat(r#"{"messages": [{"role": "user", "content": "hi"}], "min_p": 2}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("min_p"));
    }

    #[test]
    fn bad_json_is_an_invalid_request() {
        let e = chat("{not json").unwrap_err();
        assert_eq!((e.status, e.kind), (400, "invalid_request_error"));
    }
}
