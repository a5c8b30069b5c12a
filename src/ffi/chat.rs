//! `etllm_chat_template` and `etllm_conversation`: chat templates and multi-turn chat.

use std::ffi::{c_char, c_void};
use std::sync::{Mutex, MutexGuard};

use super::config::etllm_generation_config;
use super::error::{etllm_status, guard, FfiError};
use super::runner::{
    etllm_runner, etllm_stats_callback, etllm_token_callback, lock_runner, stream,
};
use super::session::{etllm_session, lock_session};
use super::stats::etllm_stats;
use super::{c_slice, c_str, out_arg, out_string};
use crate::chat::{ChatMessage, ChatTemplate};
use crate::conversation::{ChatTarget, Conversation};

/// One message of a conversation: `role` ("system", "user", "assistant", ...) and
/// `content`, both NUL-terminated UTF-8 that the caller owns. Used in arrays, so its
/// layout is fixed for good.
#[repr(C)]
#[allow(non_camel_case_types)]
pub struct etllm_chat_message {
    /// Who speaks.
    pub role: *const c_char,
    /// What they say.
    pub content: *const c_char,
}

/// A compiled chat template (Jinja, rendered as HF transformers renders chat templates)
/// with its special-token strings. Opaque; free with `etllm_chat_template_free`.
///
/// Thread rules: an `etllm_chat_template` is immutable except through
/// `etllm_chat_template_set_token`; concurrent `etllm_chat_template_apply` calls on one
/// template are safe as long as no call to `etllm_chat_template_set_token` races with them.
#[allow(non_camel_case_types)]
pub struct etllm_chat_template {
    inner: ChatTemplate,
}

/// A multi-turn chat over a runner that keeps earlier turns in the KV cache: each send
/// feeds only the text the template adds. Opaque; free with `etllm_conversation_free`.
///
/// Thread rules: one call at a time (another call meanwhile returns `ETLLM_ERR_BUSY`).
/// Pass the same runner to every call and do not generate on that runner between them.
#[allow(non_camel_case_types)]
pub struct etllm_conversation {
    inner: Mutex<Conversation>,
}

fn template_ref<'a>(t: *const etllm_chat_template) -> Result<&'a ChatTemplate, FfiError> {
    // Safety: non-null pointers come from an etllm_chat_template constructor and stay
    // valid until etllm_chat_template_free.
    unsafe { t.as_ref() }
        .map(|t| &t.inner)
        .ok_or(FfiError::Null("chat_template"))
}

fn lock_conversation<'a>(
    c: *const etllm_conversation,
) -> Result<MutexGuard<'a, Conversation>, FfiError> {
    // Safety: non-null pointers come from etllm_conversation_new and stay valid until
    // etllm_conversation_free, which the caller must not race with.
    let c = unsafe { c.as_ref() }.ok_or(FfiError::Null("conversation"))?;
    super::lock_call(&c.inner)
}

/// A copy of `chat_template`, or when it is NULL, of the runner's (loading it if needed).
fn template_for(
    runner: *mut etllm_runner,
    chat_template: *const etllm_chat_template,
) -> Result<ChatTemplate, FfiError> {
    if chat_template.is_null() {
        let mut r = lock_runner(runner)?;
        r.load()?;
        Ok(r.chat_template()?.clone())
    } else {
        Ok(template_ref(chat_template)?.clone())
    }
}

/// Reads a C array of messages.
fn read_messages(
    messages: *const etllm_chat_message,
    num_messages: usize,
) -> Result<Vec<ChatMessage>, FfiError> {
    c_slice(messages, num_messages, "messages")?
        .iter()
        .map(|m| {
            Ok(ChatMessage::new(
                c_str(m.role, "messages[].role")?,
                c_str(m.content, "messages[].content")?,
            ))
        })
        .collect()
}

/// Hands a new template to the caller.
fn give(
    out: *mut *mut etllm_chat_template,
    make: impl FnOnce() -> Result<ChatTemplate, FfiError>,
) -> etllm_status {
    guard(|| {
        if !out.is_null() {
            // Safety: non-null, and the caller guarantees it is writable.
            unsafe { *out = std::ptr::null_mut() };
        }
        let out = out_arg(out, "out_template")?;
        *out = Box::into_raw(Box::new(etllm_chat_template { inner: make()? }));
        Ok(())
    })
}

/// Compiles the Jinja chat template `source`. `bos_token` and `eos_token` render as empty
/// text until set with `etllm_chat_template_set_token`. On success `*out_template` is a
/// new template the caller frees with `etllm_chat_template_free`; on failure NULL
/// (`ETLLM_ERR_CHAT_TEMPLATE` for a syntax error).
#[no_mangle]
pub extern "C" fn etllm_chat_template_new(
    source: *const c_char,
    out_template: *mut *mut etllm_chat_template,
) -> etllm_status {
    give(out_template, || {
        Ok(ChatTemplate::new(c_str(source, "source")?)?)
    })
}

/// The built-in Llama 3 Instruct template (`bos_token` `<|begin_of_text|>`, `eos_token`
/// `<|eot_id|>`). Free with `etllm_chat_template_free`.
#[no_mangle]
pub extern "C" fn etllm_chat_template_llama3(
    out_template: *mut *mut etllm_chat_template,
) -> etllm_status {
    give(out_template, || Ok(ChatTemplate::llama3()))
}

/// The built-in Llama 2 Chat template (`bos_token` `<s>`, `eos_token` `</s>`). Free with
/// `etllm_chat_template_free`.
#[no_mangle]
pub extern "C" fn etllm_chat_template_llama2(
    out_template: *mut *mut etllm_chat_template,
) -> etllm_status {
    give(out_template, || Ok(ChatTemplate::llama2()))
}

/// Reads a model's template as HF transformers does: `chat_template.jinja`, else the
/// `chat_template` of `tokenizer_config.json` ("default" when it is a list), with the
/// special tokens of `tokenizer_config.json`. `path` is the folder, or the
/// `tokenizer_config.json` itself. `ETLLM_ERR_NOT_FOUND` when there is no template;
/// `ETLLM_ERR_FILE_ACCESS` or `ETLLM_ERR_CHAT_TEMPLATE` for unreadable or broken files.
/// Free the result with `etllm_chat_template_free`.
#[no_mangle]
pub extern "C" fn etllm_chat_template_from_model_dir(
    path: *const c_char,
    out_template: *mut *mut etllm_chat_template,
) -> etllm_status {
    give(out_template, || {
        let path = c_str(path, "path")?;
        ChatTemplate::from_model_dir(path)?.ok_or_else(|| {
            FfiError::NotFound(format!(
                "{path} has no chat_template.jinja and no chat_template in tokenizer_config.json"
            ))
        })
    })
}

/// Sets a special-token variable of the template, such as `bos_token` to `<s>`; the
/// strings are copied.
#[no_mangle]
pub extern "C" fn etllm_chat_template_set_token(
    chat_template: *mut etllm_chat_template,
    name: *const c_char,
    value: *const c_char,
) -> etllm_status {
    guard(|| {
        let name = c_str(name, "name")?;
        let value = c_str(value, "value")?;
        // Safety: non-null pointers come from a constructor and stay valid until free; the
        // caller guarantees no other call uses the template meanwhile.
        let t = unsafe { chat_template.as_mut() }.ok_or(FfiError::Null("chat_template"))?;
        t.inner.set_token(name, value);
        Ok(())
    })
}

/// Renders `num_messages` messages into prompt text; with `add_generation_prompt` the text
/// ends with the header of the assistant's reply. The text holds the BOS token when the
/// template writes one, so generate from it with `num_bos = 0`. On success `*out_text` is
/// a NUL-terminated string the caller frees with `etllm_string_free`.
/// `ETLLM_ERR_CHAT_TEMPLATE` when the template raises (for example "roles must
/// alternate"); its message is the template's.
#[no_mangle]
pub extern "C" fn etllm_chat_template_apply(
    chat_template: *const etllm_chat_template,
    messages: *const etllm_chat_message,
    num_messages: usize,
    add_generation_prompt: bool,
    out_text: *mut *mut c_char,
) -> etllm_status {
    guard(|| {
        let out = out_arg(out_text, "out_text")?;
        let t = template_ref(chat_template)?;
        let messages = read_messages(messages, num_messages)?;
        out_string(out, t.apply(&messages, add_generation_prompt)?)
    })
}

/// Frees a template. NULL is ignored.
#[no_mangle]
pub extern "C" fn etllm_chat_template_free(chat_template: *mut etllm_chat_template) {
    super::free_handle(chat_template);
}

/// Sets the runner's chat template (copied: the caller still frees its own), or with NULL
/// goes back to the model's own (a `chat_template.jinja` or `tokenizer_config.json`
/// beside the tokenizer file, else the built-in Llama 3 template).
#[no_mangle]
pub extern "C" fn etllm_runner_set_chat_template(
    runner: *mut etllm_runner,
    chat_template: *const etllm_chat_template,
) -> etllm_status {
    guard(|| {
        let t = if chat_template.is_null() {
            None
        } else {
            Some(template_ref(chat_template)?.clone())
        };
        lock_runner(runner)?.set_chat_template(t);
        Ok(())
    })
}

/// Renders messages with the runner's chat template (see
/// `etllm_runner_set_chat_template`); like `etllm_chat_template_apply` otherwise. Needs a
/// loaded runner unless a template was set. Free `*out_text` with `etllm_string_free`.
#[no_mangle]
pub extern "C" fn etllm_runner_apply_chat_template(
    runner: *mut etllm_runner,
    messages: *const etllm_chat_message,
    num_messages: usize,
    add_generation_prompt: bool,
    out_text: *mut *mut c_char,
) -> etllm_status {
    guard(|| {
        let out = out_arg(out_text, "out_text")?;
        let messages = read_messages(messages, num_messages)?;
        let text = lock_runner(runner)?.apply_chat_template(&messages, add_generation_prompt)?;
        out_string(out, text)
    })
}

/// Starts an empty conversation that renders with a copy of `chat_template` (NULL: the
/// runner's template, read from `runner`, which is loaded if needed). On success
/// `*out_conversation` is new and freed with `etllm_conversation_free`; on failure NULL.
#[no_mangle]
pub extern "C" fn etllm_conversation_new(
    runner: *mut etllm_runner,
    chat_template: *const etllm_chat_template,
    out_conversation: *mut *mut etllm_conversation,
) -> etllm_status {
    guard(|| {
        if !out_conversation.is_null() {
            // Safety: non-null, and the caller guarantees it is writable.
            unsafe { *out_conversation = std::ptr::null_mut() };
        }
        let out = out_arg(out_conversation, "out_conversation")?;
        let template = template_for(runner, chat_template)?;
        *out = Box::into_raw(Box::new(etllm_conversation {
            inner: Mutex::new(Conversation::new(template)),
        }));
        Ok(())
    })
}

/// Adds a system message; only before the first turn (else `ETLLM_ERR_INVALID_ARGUMENT`).
#[no_mangle]
pub extern "C" fn etllm_conversation_set_system(
    conversation: *mut etllm_conversation,
    content: *const c_char,
) -> etllm_status {
    guard(|| {
        let content = c_str(content, "content")?;
        lock_conversation(conversation)?.set_system(content)?;
        Ok(())
    })
}

/// Sends the user message `user` and generates the reply on `runner`, streaming it to
/// `on_token` like `etllm_runner_generate` (same callbacks, `config`, `user_data` and
/// `out_stats` rules). Only the text the template adds for this turn is fed; the reply is
/// added to the conversation. `config.num_bos`, `num_eos` and `echo` are ignored: the
/// template places special tokens, and only the reply streams. On error the conversation and runner are as before the call.
#[no_mangle]
pub extern "C" fn etllm_conversation_send(
    conversation: *mut etllm_conversation,
    runner: *mut etllm_runner,
    user: *const c_char,
    config: *const etllm_generation_config,
    on_token: etllm_token_callback,
    on_stats: etllm_stats_callback,
    user_data: *mut c_void,
    out_stats: *mut etllm_stats,
) -> etllm_status {
    let callbacks = (on_token, on_stats, user_data, out_stats);
    send_on(
        conversation,
        || lock_runner(runner),
        user,
        config,
        callbacks,
    )
}

/// `etllm_conversation_send` on whatever `lock` gives: a runner or a session.
fn send_on<'a, T: ChatTarget + 'a>(
    conversation: *mut etllm_conversation,
    lock: impl FnOnce() -> Result<MutexGuard<'a, T>, FfiError>,
    user: *const c_char,
    config: *const etllm_generation_config,
    (on_token, on_stats, user_data, out_stats): (
        etllm_token_callback,
        etllm_stats_callback,
        *mut c_void,
        *mut etllm_stats,
    ),
) -> etllm_status {
    guard(|| {
        let user = c_str(user, "user")?;
        let mut conv = lock_conversation(conversation)?;
        stream(
            lock,
            config,
            on_token,
            on_stats,
            user_data,
            out_stats,
            |target, c, t, s| {
                let (_, stats) = conv.send(target, user, c, t)?;
                s(&stats);
                Ok(stats)
            },
        )
    })
}

/// Drops the last turn (user message and reply) and rewinds `runner` to where it began.
/// `*out_dropped` (may be NULL) is set to whether there was a turn to drop.
#[no_mangle]
pub extern "C" fn etllm_conversation_rewind(
    conversation: *mut etllm_conversation,
    runner: *mut etllm_runner,
    out_dropped: *mut bool,
) -> etllm_status {
    rewind_on(conversation, || lock_runner(runner), out_dropped)
}

/// `etllm_conversation_rewind` on whatever `lock` gives: a runner or a session.
fn rewind_on<'a, T: ChatTarget + 'a>(
    conversation: *mut etllm_conversation,
    lock: impl FnOnce() -> Result<MutexGuard<'a, T>, FfiError>,
    out_dropped: *mut bool,
) -> etllm_status {
    guard(|| {
        let mut conv = lock_conversation(conversation)?;
        let dropped = conv.rewind(&mut *lock()?)?;
        if let Ok(out) = out_arg(out_dropped, "out_dropped") {
            *out = dropped;
        }
        Ok(())
    })
}

/// Forgets every turn (a system message stays) and resets `runner`.
#[no_mangle]
pub extern "C" fn etllm_conversation_reset(
    conversation: *mut etllm_conversation,
    runner: *mut etllm_runner,
) -> etllm_status {
    guard(|| {
        let mut conv = lock_conversation(conversation)?;
        conv.reset(&mut *lock_runner(runner)?)?;
        Ok(())
    })
}

/// Sets `*out_count` to the number of messages so far (system, user and assistant).
#[no_mangle]
pub extern "C" fn etllm_conversation_num_messages(
    conversation: *const etllm_conversation,
    out_count: *mut usize,
) -> etllm_status {
    guard(|| {
        let out = out_arg(out_count, "out_count")?;
        *out = lock_conversation(conversation)?.messages().len();
        Ok(())
    })
}

/// Copies message `index` into new strings `*out_role` and `*out_content`, which the caller
/// frees with `etllm_string_free`. `ETLLM_ERR_NOT_FOUND` if `index` is out of range.
#[no_mangle]
pub extern "C" fn etllm_conversation_message(
    conversation: *const etllm_conversation,
    index: usize,
    out_role: *mut *mut c_char,
    out_content: *mut *mut c_char,
) -> etllm_status {
    guard(|| {
        let role = out_arg(out_role, "out_role")?;
        let content = out_arg(out_content, "out_content")?;
        let conv = lock_conversation(conversation)?;
        let m = conv.messages().get(index).ok_or_else(|| {
            FfiError::NotFound(format!(
                "message {index} does not exist; the conversation has {}",
                conv.messages().len()
            ))
        })?;
        out_string(role, m.role.clone())?;
        if let Err(e) = out_string(content, m.content.clone()) {
            super::etllm_string_free(std::mem::replace(role, std::ptr::null_mut()));
            return Err(e);
        }
        Ok(())
    })
}

/// `etllm_conversation_send` on a session (`etllm_session_new`) instead of a runner's own
/// conversation: pass the same session to every call of this conversation.
#[no_mangle]
pub extern "C" fn etllm_conversation_send_session(
    conversation: *mut etllm_conversation,
    session: *mut etllm_session,
    user: *const c_char,
    config: *const etllm_generation_config,
    on_token: etllm_token_callback,
    on_stats: etllm_stats_callback,
    user_data: *mut c_void,
    out_stats: *mut etllm_stats,
) -> etllm_status {
    let callbacks = (on_token, on_stats, user_data, out_stats);
    send_on(
        conversation,
        || lock_session(session),
        user,
        config,
        callbacks,
    )
}

/// `etllm_conversation_rewind` on a session.
#[no_mangle]
pub extern "C" fn etllm_conversation_rewind_session(
    conversation: *mut etllm_conversation,
    session: *mut etllm_session,
    out_dropped: *mut bool,
) -> etllm_status {
    rewind_on(conversation, || lock_session(session), out_dropped)
}

/// `etllm_conversation_reset` on a session.
#[no_mangle]
pub extern "C" fn etllm_conversation_reset_session(
    conversation: *mut etllm_conversation,
    session: *mut etllm_session,
) -> etllm_status {
    guard(|| {
        let mut conv = lock_conversation(conversation)?;
        conv.reset(&mut *lock_session(session)?)?;
        Ok(())
    })
}

/// The conversation as JSON (its messages, the text fed and its turns) in a new string the
/// caller frees with `etllm_string_free`: save it as the user data of
/// `etllm_session_save_state` to resume the chat with `etllm_conversation_from_json` after
/// `etllm_session_load_state`.
#[no_mangle]
pub extern "C" fn etllm_conversation_to_json(
    conversation: *const etllm_conversation,
    out_json: *mut *mut c_char,
) -> etllm_status {
    guard(|| {
        let out = out_arg(out_json, "out_json")?;
        *out = std::ptr::null_mut();
        let json = lock_conversation(conversation)?.to_json();
        out_string(out, json)
    })
}

/// A conversation from `etllm_conversation_to_json`'s text (UTF-8, NUL-terminated),
/// rendered with a copy of `chat_template` (NULL: the runner's template, read from
/// `runner`, as in `etllm_conversation_new`). Text that is not such JSON is
/// `ETLLM_ERR_INVALID_STATE`. On success `*out_conversation` is new and freed with
/// `etllm_conversation_free`; on failure NULL.
#[no_mangle]
pub extern "C" fn etllm_conversation_from_json(
    runner: *mut etllm_runner,
    chat_template: *const etllm_chat_template,
    json: *const c_char,
    out_conversation: *mut *mut etllm_conversation,
) -> etllm_status {
    guard(|| {
        let out = out_arg(out_conversation, "out_conversation")?;
        *out = std::ptr::null_mut();
        let json = c_str(json, "json")?;
        let template = template_for(runner, chat_template)?;
        let conversation = Conversation::from_json(template, json)?;
        *out = Box::into_raw(Box::new(etllm_conversation {
            inner: Mutex::new(conversation),
        }));
        Ok(())
    })
}

/// Frees a conversation (the runner is untouched). NULL is ignored.
#[no_mangle]
pub extern "C" fn etllm_conversation_free(conversation: *mut etllm_conversation) {
    super::free_handle(conversation);
}
