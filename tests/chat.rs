//! Chat templates against HF transformers' own rendering (`tests/fixtures/chat`, made by
//! `tools/fixtures/make_chat_templates.py`), and multi-turn conversations that keep the
//! KV cache.

mod common;

use std::collections::BTreeMap;
use std::ops::ControlFlow;

use common::{fixtures_dir, model_path, tokenizer_path, COMPACT_TEMPLATE};
use etllm::{
    ChatMessage, ChatTemplate, Conversation, Error, GenerationConfig, Runner, RunnerOptions,
};
use serde::Deserialize;

#[derive(Deserialize)]
struct Cases {
    templates: BTreeMap<String, TemplateDef>,
    conversations: BTreeMap<String, Vec<Message>>,
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct TemplateDef {
    source: String,
    tokens: BTreeMap<String, String>,
}

#[derive(Deserialize)]
struct Message {
    role: String,
    content: String,
}

#[derive(Deserialize)]
struct Case {
    template: String,
    conversation: String,
    add_generation_prompt: bool,
    text: Option<String>,
    error: Option<String>,
}

#[derive(Deserialize)]
struct FolderCase {
    folder: String,
    conversation: String,
    text: String,
}

fn chat_dir() -> std::path::PathBuf {
    fixtures_dir().join("chat")
}

fn cases() -> Cases {
    let text = std::fs::read_to_string(chat_dir().join("cases.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn messages(c: &Cases, name: &str) -> Vec<ChatMessage> {
    c.conversations[name]
        .iter()
        .map(|m| ChatMessage::new(&m.role, &m.content))
        .collect()
}

fn template(def: &TemplateDef) -> ChatTemplate {
    let mut t = ChatTemplate::new(def.source.clone()).unwrap();
    for (name, value) in &def.tokens {
        t = t.with_token(name, value);
    }
    t
}

#[test]
fn every_template_renders_as_hf_transformers_does() {
    let c = cases();
    let mut checked = 0;
    for case in &c.cases {
        let what = format!(
            "{} / {} / add_generation_prompt={}",
            case.template, case.conversation, case.add_generation_prompt
        );
        let t = template(&c.templates[&case.template]);
        let got = t.apply(
            &messages(&c, &case.conversation),
            case.add_generation_prompt,
        );
        match (&case.text, &case.error) {
            (Some(want), None) => assert_eq!(&got.expect(&what), want, "{what}"),
            (None, Some(want)) => match got {
                Err(Error::ChatTemplate { message, .. }) => assert_eq!(&message, want, "{what}"),
                other => panic!("{what}: expected the template's exception, got {other:?}"),
            },
            _ => unreachable!("a case has a text or an error"),
        }
        checked += 1;
    }
    assert_eq!(checked, 48);
}

#[test]
fn built_in_llama_templates_render_as_meta_templates_do() {
    let c = cases();
    for (name, built_in) in [
        ("llama3", ChatTemplate::llama3()),
        ("llama2", ChatTemplate::llama2()),
    ] {
        for case in c.cases.iter().filter(|k| k.template == name) {
            let got = built_in.apply(
                &messages(&c, &case.conversation),
                case.add_generation_prompt,
            );
            match &case.text {
                Some(want) => assert_eq!(&got.unwrap(), want, "{name} / {}", case.conversation),
                None => assert!(got.is_err(), "{name} / {}", case.conversation),
            }
        }
    }
}

#[test]
fn model_folders_give_the_template_hf_would_load() {
    let c = cases();
    let text = std::fs::read_to_string(chat_dir().join("folders.json")).unwrap();
    let folders: Vec<FolderCase> = serde_json::from_str(&text).unwrap();
    assert_eq!(folders.len(), 3);
    for f in folders {
        let t = ChatTemplate::from_model_dir(chat_dir().join(&f.folder))
            .unwrap()
            .unwrap_or_else(|| panic!("{}: no template found", f.folder));
        let got = t.apply(&messages(&c, &f.conversation), true).unwrap();
        assert_eq!(got, f.text, "{}", f.folder);
    }
}

#[test]
fn special_tokens_come_from_tokenizer_config_including_added_token_objects() {
    let t = ChatTemplate::from_model_dir(chat_dir().join("config_string"))
        .unwrap()
        .unwrap();
    assert_eq!(t.token("bos_token"), Some("<s>"));
    assert_eq!(t.token("eos_token"), Some("</s>"));
    assert_eq!(t.token("unk_token"), Some("<unk>"));
    assert_eq!(t.token("pad_token"), None);
}

#[test]
fn a_folder_without_template_files_has_no_template() {
    let dir = std::env::temp_dir().join(format!("etllm-chat-empty-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    assert!(ChatTemplate::from_model_dir(&dir).unwrap().is_none());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_template_with_a_syntax_error_is_a_chat_template_error() {
    let err = ChatTemplate::new("{% for m in messages %}{{ m.content }}").unwrap_err();
    assert!(matches!(err, Error::ChatTemplate { .. }), "{err:?}");
}

#[test]
fn broken_tokenizer_config_is_an_error_naming_the_file() {
    let dir = std::env::temp_dir().join(format!("etllm-chat-broken-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("tokenizer_config.json"), "{ not json").unwrap();
    let err = ChatTemplate::from_model_dir(&dir).unwrap_err();
    std::fs::remove_dir_all(&dir).unwrap();
    match err {
        Error::ChatTemplate { source_path, .. } => {
            assert!(source_path.unwrap().ends_with("tokenizer_config.json"))
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn runner_without_template_files_uses_the_built_in_llama3_template() {
    let runner = Runner::open(
        model_path("dyn_xnnpack"),
        tokenizer_path(),
        RunnerOptions::default(),
    )
    .unwrap();
    let msgs = [ChatMessage::user("Hi")];
    assert_eq!(
        runner.apply_chat_template(&msgs, true).unwrap(),
        ChatTemplate::llama3().apply(&msgs, true).unwrap()
    );
}

#[test]
fn runner_reads_the_template_beside_its_tokenizer() {
    // A tokenizer folder holding tokenizer.json and chat_template.jinja.
    let dir = std::env::temp_dir().join(format!("etllm-chat-runner-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(tokenizer_path(), dir.join("tokenizer.json")).unwrap();
    std::fs::write(
        dir.join("chat_template.jinja"),
        "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}",
    )
    .unwrap();
    let runner = Runner::open(
        model_path("dyn_xnnpack"),
        dir.join("tokenizer.json"),
        RunnerOptions::default(),
    )
    .unwrap();
    let text = runner
        .apply_chat_template(&[ChatMessage::user("Hi")], false)
        .unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(text, "<user>Hi");
}

#[test]
fn a_template_set_on_the_runner_wins() {
    let mut runner = Runner::new(
        model_path("dyn_xnnpack"),
        tokenizer_path(),
        RunnerOptions::default(),
    );
    runner.set_chat_template(Some(
        ChatTemplate::new("[{{ messages[0].content }}]").unwrap(),
    ));
    assert_eq!(
        runner
            .apply_chat_template(&[ChatMessage::user("x")], true)
            .unwrap(),
        "[x]"
    );
}

/// A template short enough for the fixture models' 128-token context (the Llama 3 one
/// spells its special tokens out in this small tokenizer).
fn compact() -> ChatTemplate {
    ChatTemplate::new(COMPACT_TEMPLATE).unwrap()
}

fn greedy(max_new_tokens: i32) -> GenerationConfig {
    GenerationConfig {
        max_new_tokens,
        temperature: 0.0,
        ignore_eos: true,
        echo: false,
        ..Default::default()
    }
}

/// What a fresh runner generates from `ids`: the token ids and the text.
fn fresh_run(ids: &[u32], config: &GenerationConfig) -> (Vec<u32>, String) {
    let mut runner = open();
    let (mut out_ids, mut text) = (Vec::new(), String::new());
    runner
        .generate_from_ids(
            ids,
            config,
            |p| {
                out_ids.extend(p.token);
                text.push_str(p.text);
                ControlFlow::Continue(())
            },
            |_| {},
        )
        .unwrap();
    (out_ids, text)
}

fn open() -> Runner {
    Runner::open(
        model_path("dyn_xnnpack"),
        tokenizer_path(),
        RunnerOptions::default(),
    )
    .unwrap()
}

#[test]
fn second_turn_feeds_only_the_new_text_and_matches_a_fresh_run_over_the_same_tokens() {
    let mut runner = open();
    let config = greedy(6);
    let mut chat = Conversation::new(compact());
    let mut first_ids = Vec::new();
    chat.send(&mut runner, "Once upon", &config, |p| {
        first_ids.extend(p.token);
        ControlFlow::Continue(())
    })
    .unwrap();
    let mut second_ids = Vec::new();
    let (_, stats) = chat
        .send(&mut runner, "a time", &config, |p| {
            second_ids.extend(p.token);
            ControlFlow::Continue(())
        })
        .unwrap();
    assert_eq!(chat.refed_turns(), 0);
    // The second turn fed only the new text (plus the first reply's last token, which
    // every call feeds at the start of the next one).
    let tokenizer = runner.tokenizer().unwrap();
    let new_ids = tokenizer.encode("<user>a time<assistant>").unwrap();
    assert_eq!(stats.num_prompt_tokens as usize, new_ids.len());
    // A fresh run over the same tokens generates the same reply.
    let mut whole = tokenizer.encode("<user>Once upon<assistant>").unwrap();
    whole.extend(&first_ids);
    whole.extend(&new_ids);
    assert_eq!(second_ids, fresh_run(&whole, &config).0);
}

#[test]
fn rewinding_a_turn_and_sending_again_gives_the_same_reply() {
    let mut runner = open();
    let config = greedy(5);
    let mut chat = Conversation::new(compact());
    chat.send(&mut runner, "Hello", &config, |_| ControlFlow::Continue(()))
        .unwrap();
    let before = runner.position();
    let (reply, _) = chat
        .send(&mut runner, "Tell me more", &config, |_| {
            ControlFlow::Continue(())
        })
        .unwrap();
    assert!(chat.rewind(&mut runner).unwrap());
    assert_eq!(runner.position(), before);
    assert_eq!(chat.messages().len(), 2);
    let (again, _) = chat
        .send(&mut runner, "Tell me more", &config, |_| {
            ControlFlow::Continue(())
        })
        .unwrap();
    assert_eq!(again, reply);
}

#[test]
fn rewinding_the_only_turn_empties_the_conversation() {
    let mut runner = open();
    let config = greedy(3);
    let mut chat = Conversation::new(compact());
    chat.set_system("Be brief.").unwrap();
    let (reply, _) = chat
        .send(&mut runner, "Hi", &config, |_| ControlFlow::Continue(()))
        .unwrap();
    assert!(chat.rewind(&mut runner).unwrap());
    assert_eq!(runner.position(), 0);
    assert_eq!(chat.messages(), &[ChatMessage::system("Be brief.")]);
    assert!(!chat.rewind(&mut runner).unwrap());
    let (again, _) = chat
        .send(&mut runner, "Hi", &config, |_| ControlFlow::Continue(()))
        .unwrap();
    assert_eq!(again, reply);
}

#[test]
fn reset_keeps_the_system_message_and_starts_over() {
    let mut runner = open();
    let config = greedy(3);
    let mut chat = Conversation::new(compact());
    chat.set_system("Be brief.").unwrap();
    let (reply, _) = chat
        .send(&mut runner, "Hi", &config, |_| ControlFlow::Continue(()))
        .unwrap();
    chat.send(&mut runner, "More", &config, |_| ControlFlow::Continue(()))
        .unwrap();
    chat.reset(&mut runner).unwrap();
    assert_eq!(runner.position(), 0);
    assert_eq!(chat.turns(), 0);
    let (again, _) = chat
        .send(&mut runner, "Hi", &config, |_| ControlFlow::Continue(()))
        .unwrap();
    assert_eq!(again, reply);
    assert!(chat.set_system("late").is_err());
}

#[test]
fn a_template_that_rewrites_history_is_refed_from_the_start() {
    // Shows the message count up front, so each turn changes the earlier text.
    let t = ChatTemplate::new(
        "{{ messages|length }}:{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}",
    )
    .unwrap();
    let mut runner = open();
    let config = greedy(3);
    let mut chat = Conversation::new(t.clone());
    chat.send(&mut runner, "a", &config, |_| ControlFlow::Continue(()))
        .unwrap();
    let (reply, _) = chat
        .send(&mut runner, "b", &config, |_| ControlFlow::Continue(()))
        .unwrap();
    assert_eq!(chat.refed_turns(), 1);
    let whole = t.apply(&chat.messages()[..3], true).unwrap();
    let ids = runner.tokenizer().unwrap().encode(&whole).unwrap();
    assert_eq!(reply, fresh_run(&ids, &config).1);
}

#[test]
fn llama_preset_on_a_llama2_tokenizer_falls_back_to_the_llama2_template() {
    let sp = fixtures_dir().join("tokenizers/sp_unigram.model");
    let msgs = [ChatMessage::user("Hi")];
    let with_preset = Runner::open(
        model_path("dyn_xnnpack"),
        &sp,
        RunnerOptions {
            preset: Some(etllm::Preset::Llama),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(
        with_preset.apply_chat_template(&msgs, true).unwrap(),
        ChatTemplate::llama2().apply(&msgs, true).unwrap()
    );
    let without = Runner::open(model_path("dyn_xnnpack"), &sp, RunnerOptions::default()).unwrap();
    assert_eq!(
        without.apply_chat_template(&msgs, true).unwrap(),
        ChatTemplate::llama3().apply(&msgs, true).unwrap()
    );
}
