//! Chat templates: turn a list of messages into the prompt text a chat model was trained
//! on, the way HF transformers' `apply_chat_template` does.
//!
//! Templates are Jinja, rendered with [minijinja] in the configuration HF uses (blocks
//! trimmed and left-stripped, loop controls, Python string and dict methods such as
//! `.strip()` and `.items()`, `raise_exception`, `strftime_now`, a `tojson` that writes
//! like Python's `json.dumps`). They come from a model's `chat_template.jinja` or
//! `tokenizer_config.json`, or are built in ([`ChatTemplate::llama3`],
//! [`ChatTemplate::llama2`]).
//!
//! [`Conversation`](crate::Conversation) keeps a multi-turn chat on a runner: each turn
//! feeds only the text the template adds for the new messages, so earlier turns stay in
//! the KV cache.

use std::path::Path;

use minijinja::value::Kwargs;
use minijinja::{AutoEscape, Environment, ErrorKind, Value};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::tokenizer::tokenizer_config;
use crate::tokenizer::{LlamaVersion, Tokenizer};

/// The name under which the template is stored in its environment.
const NAME: &str = "chat";

/// Meta's Llama 3 Instruct template (as in `Meta-Llama-3-8B-Instruct`'s
/// `tokenizer_config.json`).
pub const LLAMA3_TEMPLATE: &str = "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}";

/// Meta's Llama 2 Chat template (as in `Llama-2-7b-chat-hf`'s `tokenizer_config.json`).
pub const LLAMA2_TEMPLATE: &str = "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}";

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// Who speaks: usually "system", "user" or "assistant".
    pub role: String,
    /// What they say.
    pub content: String,
}

impl ChatMessage {
    /// A message from `role`.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }

    /// A "system" message.
    pub fn system(content: impl Into<String>) -> Self {
        Self::new("system", content)
    }

    /// A "user" message.
    pub fn user(content: impl Into<String>) -> Self {
        Self::new("user", content)
    }

    /// An "assistant" message.
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new("assistant", content)
    }
}

/// A compiled chat template and the special-token strings it is rendered with
/// (`bos_token`, `eos_token`, and any other `*_token` a `tokenizer_config.json` names).
///
/// ```
/// use etllm::{ChatMessage, ChatTemplate};
///
/// let template = ChatTemplate::new(
///     "{{ bos_token }}{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}\
///      {% if add_generation_prompt %}<assistant>{% endif %}",
/// )?
/// .with_token("bos_token", "<s>");
/// let messages = [ChatMessage::system("Be brief."), ChatMessage::user("Hi")];
/// assert_eq!(template.apply(&messages, true)?, "<s><system>Be brief.<user>Hi<assistant>");
///
/// // The built-in Llama 3 Instruct template, as HF transformers renders it.
/// let llama3 = ChatTemplate::llama3().apply(&[ChatMessage::user("Hi")], true)?;
/// assert!(llama3.starts_with("<|begin_of_text|><|start_header_id|>user<|end_header_id|>"));
/// # Ok::<(), etllm::Error>(())
/// ```
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    tokens: Vec<(String, String)>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("source", &self.source)
            .field("tokens", &self.tokens)
            .finish()
    }
}

impl Clone for ChatTemplate {
    fn clone(&self) -> Self {
        // Recompiling a source that compiled before cannot fail.
        let mut copy = Self::new(self.source.clone()).expect("template compiled before");
        copy.tokens = self.tokens.clone();
        copy
    }
}

impl ChatTemplate {
    /// Compiles a Jinja chat template. `bos_token` and `eos_token` render as empty text
    /// until set with [`with_token`](Self::with_token). Fails with
    /// [`Error::ChatTemplate`] on a syntax error.
    pub fn new(source: impl Into<String>) -> Result<Self> {
        let source = source.into();
        let mut env = Environment::new();
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(template_error)?;
        env.set_syntax(syntax);
        env.set_auto_escape_callback(|_| AutoEscape::None);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned(NAME, source.clone())
            .map_err(template_error)?;
        Ok(Self {
            env,
            source,
            tokens: Vec::new(),
        })
    }

    /// Sets a special-token variable, such as `("bos_token", "<s>")`.
    pub fn with_token(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.set_token(name, value);
        self
    }

    /// Sets a special-token variable in place (see [`with_token`](Self::with_token)).
    pub fn set_token(&mut self, name: impl Into<String>, value: impl Into<String>) {
        let name = name.into();
        self.tokens.retain(|(n, _)| *n != name);
        self.tokens.push((name, value.into()));
    }

    /// The built-in Llama 3 Instruct template, with `<|begin_of_text|>` as `bos_token` and
    /// `<|eot_id|>` as `eos_token`.
    pub fn llama3() -> Self {
        Self::new(LLAMA3_TEMPLATE)
            .expect("built-in template compiles")
            .with_token("bos_token", "<|begin_of_text|>")
            .with_token("eos_token", "<|eot_id|>")
    }

    /// The built-in Llama 2 Chat template, with `<s>` as `bos_token` and `</s>` as
    /// `eos_token`.
    pub fn llama2() -> Self {
        Self::new(LLAMA2_TEMPLATE)
            .expect("built-in template compiles")
            .with_token("bos_token", "<s>")
            .with_token("eos_token", "</s>")
    }

    /// Reads a model's chat template the way HF transformers does: from
    /// `chat_template.jinja` if that file exists, else from the `chat_template` field of
    /// `tokenizer_config.json` (a string, or a list of named templates of which "default"
    /// is used). `path` is a folder holding those files, or the `tokenizer_config.json`
    /// itself. The special tokens (`bos_token`, `eos_token`, `unk_token`, `pad_token`, ...)
    /// come from `tokenizer_config.json`. Returns `Ok(None)` when neither file has a
    /// template; a file that exists but cannot be read or parsed is an error.
    pub fn from_model_dir(path: impl AsRef<Path>) -> Result<Option<Self>> {
        let path = path.as_ref();
        let (dir, config_path) = if path.is_dir() {
            (path.to_path_buf(), path.join("tokenizer_config.json"))
        } else {
            let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
            (dir, path.to_path_buf())
        };
        let config = if config_path.exists() {
            let text = read_text(&config_path)?;
            let json: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| Error::ChatTemplate {
                    source_path: Some(config_path.clone()),
                    message: format!("not valid JSON: {e}"),
                })?;
            Some(json)
        } else {
            None
        };
        let jinja_path = dir.join("chat_template.jinja");
        let source = if jinja_path.is_file() {
            Some(read_text(&jinja_path)?)
        } else {
            config
                .as_ref()
                .map(tokenizer_config::chat_template)
                .transpose()
                .map_err(|message| Error::ChatTemplate {
                    source_path: Some(config_path.clone()),
                    message: message.to_string(),
                })?
                .flatten()
                .map(str::to_string)
        };
        let Some(source) = source else {
            return Ok(None);
        };
        let mut template = Self::new(source).map_err(|e| match e {
            Error::ChatTemplate { message, .. } => Error::ChatTemplate {
                source_path: Some(if jinja_path.is_file() {
                    jinja_path.clone()
                } else {
                    config_path.clone()
                }),
                message,
            },
            other => other,
        })?;
        if let Some(config) = &config {
            for (name, text) in tokenizer_config::special_tokens(config) {
                template.set_token(name, text);
            }
        }
        Ok(Some(template))
    }

    /// The Jinja source.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The value of a special-token variable, if set.
    pub fn token(&self, name: &str) -> Option<&str> {
        self.tokens
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Renders `messages` into prompt text. With `add_generation_prompt`, the text ends
    /// with the header that starts the assistant's reply. The text already holds the BOS
    /// token when the template writes one, so generate from it with `num_bos = 0`. Fails
    /// with [`Error::ChatTemplate`] when the template raises an exception (such as
    /// "roles must alternate") or misuses a value.
    pub fn apply(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let template = self.env.get_template(NAME).map_err(template_error)?;
        let mut ctx: Vec<(String, Value)> = self
            .tokens
            .iter()
            .map(|(n, v)| (n.clone(), Value::from(v.as_str())))
            .collect();
        ctx.push((
            "messages".into(),
            Value::from(minijinja::value::Serde(messages)),
        ));
        ctx.push((
            "add_generation_prompt".into(),
            Value::from(add_generation_prompt),
        ));
        let ctx = Value::from_pairs(ctx);
        template.render(ctx).map_err(template_error)
    }
}

/// The built-in fallback templates, compiled once.
static LLAMA3: once_cell::sync::Lazy<ChatTemplate> =
    once_cell::sync::Lazy::new(ChatTemplate::llama3);
static LLAMA2: once_cell::sync::Lazy<ChatTemplate> =
    once_cell::sync::Lazy::new(ChatTemplate::llama2);

/// What a loaded tokenizer says about the chat template: the template files beside it, and
/// which Llama generation the `llama` preset recognised.
#[derive(Debug)]
pub(crate) struct TokenizerTemplate {
    /// The template beside the tokenizer (or the error reading it), if there is one.
    beside: Option<Result<ChatTemplate>>,
    llama_version: Option<LlamaVersion>,
}

impl TokenizerTemplate {
    /// Reads the `chat_template.jinja` or `tokenizer_config.json` beside the tokenizer file
    /// at `tokenizer_path` (or inside the tokenizer folder). A file that cannot be read or
    /// compiled is not an error here: it is kept, and reported by
    /// [`ChatTemplate::for_tokenizer`].
    pub(crate) fn find(tokenizer_path: &Path, tokenizer: &Tokenizer) -> Self {
        let dir = if tokenizer_path.is_dir() {
            tokenizer_path
        } else {
            tokenizer_path.parent().unwrap_or(Path::new(""))
        };
        let beside = if dir.join("chat_template.jinja").is_file()
            || dir.join("tokenizer_config.json").is_file()
        {
            ChatTemplate::from_model_dir(dir).transpose()
        } else {
            None
        };
        Self {
            beside,
            llama_version: tokenizer.llama_version(),
        }
    }
}

impl ChatTemplate {
    /// The template a runner renders with: `chosen` (the caller's) if set; else the one
    /// beside the tokenizer (an error when those files are unreadable or the template does
    /// not compile); else the built-in Llama 2 template when the `llama` preset recognised
    /// a Llama 2 tokenizer; else the built-in Llama 3 template. `None` when nothing was
    /// chosen and there is no `tokenizer` (not loaded yet) to go by.
    pub(crate) fn for_tokenizer<'a>(
        chosen: Option<&'a ChatTemplate>,
        tokenizer: Option<&'a TokenizerTemplate>,
    ) -> Option<Result<&'a ChatTemplate>> {
        if let Some(t) = chosen {
            return Some(Ok(t));
        }
        let tokenizer = tokenizer?;
        Some(match &tokenizer.beside {
            Some(Ok(t)) => Ok(t),
            Some(Err(e)) => Err(e.clone()),
            None if tokenizer.llama_version == Some(LlamaVersion::Llama2) => Ok(&LLAMA2),
            None => Ok(&LLAMA3),
        })
    }
}

fn read_text(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| Error::FileAccess {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// A minijinja error as ours, with the template's own message (for `raise_exception`).
fn template_error(e: minijinja::Error) -> Error {
    let message = match (e.kind(), e.detail()) {
        (ErrorKind::InvalidOperation, Some(detail)) if detail.starts_with("raised: ") => {
            detail["raised: ".len()..].to_string()
        }
        _ => {
            let mut m = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                m.push_str(": ");
                m.push_str(&s.to_string());
                source = s.source();
            }
            m
        }
    };
    Error::ChatTemplate {
        source_path: None,
        message,
    }
}

/// `raise_exception(message)`: templates call it to refuse a conversation.
fn raise_exception(message: String) -> std::result::Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(
        ErrorKind::InvalidOperation,
        format!("raised: {message}"),
    ))
}

/// `strftime_now(format)`: the local time, formatted like Python's `strftime`.
fn strftime_now(format: String) -> std::result::Result<String, minijinja::Error> {
    let now = jiff::Zoned::now();
    let mut out = String::new();
    jiff::fmt::strtime::format(format.as_bytes(), &now)
        .map(|s| out.push_str(&s))
        .map_err(|e| {
            minijinja::Error::new(ErrorKind::InvalidOperation, "bad strftime format").with_source(e)
        })?;
    Ok(out)
}

/// `tojson`: JSON written as Python's `json.dumps(value, ensure_ascii=False)` writes it
/// (`", "` and `": "` separators; with `indent`, one item a line), as HF's template
/// environment does.
fn tojson(value: &Value, kwargs: Kwargs) -> std::result::Result<Value, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    kwargs.assert_all_used()?;
    let mut out = Vec::new();
    let result = match indent {
        Some(n) => {
            let pad = vec![b' '; n];
            let mut ser = serde_json::Serializer::with_formatter(
                &mut out,
                serde_json::ser::PrettyFormatter::with_indent(&pad),
            );
            value.serialize(&mut ser)
        }
        None => {
            let mut ser = serde_json::Serializer::with_formatter(&mut out, PythonCompact);
            value.serialize(&mut ser)
        }
    };
    result.map_err(|e| {
        minijinja::Error::new(ErrorKind::InvalidOperation, "cannot serialize to JSON")
            .with_source(e)
    })?;
    Ok(Value::from_safe_string(
        String::from_utf8(out).expect("serde_json writes UTF-8"),
    ))
}

/// serde_json's compact output with Python's default separators.
struct PythonCompact;

/// Python's item separator, before every item but the first.
fn python_separator<W: ?Sized + std::io::Write>(
    writer: &mut W,
    first: bool,
) -> std::io::Result<()> {
    if first {
        Ok(())
    } else {
        writer.write_all(b", ")
    }
}

impl serde_json::ser::Formatter for PythonCompact {
    fn begin_array_value<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        python_separator(writer, first)
    }

    fn begin_object_key<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        python_separator(writer, first)
    }

    fn begin_object_value<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
    ) -> std::io::Result<()> {
        writer.write_all(b": ")
    }
}
