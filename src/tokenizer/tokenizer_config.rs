//! `tokenizer_config.json`, the HF file beside a `tokenizer.json`: it names the special
//! tokens (`bos_token`, `eos_token`, ...), adds tokens (`added_tokens_decoder`) and holds
//! the model's chat template. The tokenizer takes its tokens from it; the chat templates
//! (`chat`) take the template and the special-token strings the template renders with.

use serde_json::Value;

/// The text of a special-token entry: a plain string, or an AddedToken object
/// `{"content": "...", ...}`.
pub(crate) fn token_text(value: &Value) -> Option<&str> {
    match value {
        Value::String(s) => Some(s),
        Value::Object(o) => o.get("content")?.as_str(),
        _ => None,
    }
}

/// The `*_token` entries that have a text (`bos_token`, `eos_token`, `unk_token`,
/// `pad_token`, ...), as `(name, text)` in the file's order; none when `config` is not a
/// JSON object.
pub(crate) fn special_tokens(config: &Value) -> impl Iterator<Item = (&str, &str)> {
    config
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(name, _)| name.ends_with("_token"))
        .filter_map(|(name, value)| Some((name.as_str(), token_text(value)?)))
}

/// The `chat_template` field: a string, or a list of named templates of which "default"
/// is used. `Ok(None)` when the field is absent or null; the error says what is wrong
/// with a field of another shape.
pub(crate) fn chat_template(config: &Value) -> Result<Option<&str>, &'static str> {
    match config.get("chat_template") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(Value::Array(list)) => list
            .iter()
            .find_map(|entry| {
                (entry.get("name")?.as_str()? == "default")
                    .then(|| entry.get("template")?.as_str())
                    .flatten()
            })
            .map(Some)
            .ok_or("`chat_template` is a list without a \"default\" template"),
        Some(_) => Err("`chat_template` is neither a string nor a list"),
    }
}
