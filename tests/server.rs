//! The server as a library (`etllm::server`): requests sent to its router in process. The
//! OpenAI client's view, every error status and the load test are in
//! python/tests/test_server*.py.
#![cfg(feature = "server")]

mod common;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use etllm::server::{Server, ServerOptions};
use etllm::{ChatMessage, Runner};
use serde_json::{json, Value};
use tower::ServiceExt;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

fn server(runner: &mut Runner, parallel: usize) -> Server {
    let mut options = ServerOptions::default();
    options.parallel = parallel;
    Server::new(runner, options).expect("server")
}

/// POSTs `body` to `path` and returns the status and the JSON answer.
fn post(
    rt: &tokio::runtime::Runtime,
    server: &Server,
    path: &str,
    body: Value,
) -> (StatusCode, Value) {
    rt.block_on(async {
        let request = Request::post(path)
            .header("content-type", "application/json")
            .body(Body::from(body.to_string()))
            .expect("request");
        let response = server.router().oneshot(request).await.expect("infallible");
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .expect("body");
        (
            status,
            serde_json::from_slice(&bytes).expect("a JSON answer"),
        )
    })
}

fn chat_body(messages: &[(&str, &str)], max_tokens: u32) -> Value {
    let messages: Vec<Value> = messages
        .iter()
        .map(|(role, content)| json!({ "role": role, "content": content }))
        .collect();
    json!({ "messages": messages, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": true })
}

fn reply(answer: &Value) -> String {
    answer["choices"][0]["message"]["content"]
        .as_str()
        .expect("a reply")
        .to_string()
}

fn cached(answer: &Value) -> u64 {
    answer["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .expect("cached_tokens")
}

#[test]
fn greedy_chat_reply_is_the_runners_generation_from_the_chat_template() {
    let mut runner = common::open_demo();
    let messages = [ChatMessage::user("In the beginning")];
    let prompt = runner.apply_chat_template(&messages, true).unwrap();
    let (want, _) = common::generate_text(&mut runner, &prompt, &common::greedy(12));

    let server = server(&mut runner, 1);
    let rt = runtime();
    let (status, answer) = post(
        &rt,
        &server,
        "/v1/chat/completions",
        chat_body(&[("user", "In the beginning")], 12),
    );
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(reply(&answer), want.text);
    assert_eq!(answer["choices"][0]["finish_reason"], "length");
    assert_eq!(answer["usage"]["completion_tokens"], 12);
}

#[test]
fn a_conversation_resent_with_a_new_turn_reuses_its_slot() {
    let mut runner = common::open_demo();
    let server = server(&mut runner, 2);
    let rt = runtime();
    let first = [("user", "Who made the heaven?")];
    let (_, answer) = post(&rt, &server, "/v1/chat/completions", chat_body(&first, 8));
    let prompt_tokens = answer["usage"]["prompt_tokens"].as_u64().unwrap();
    let said = reply(&answer);
    let second = [
        ("user", "Who made the heaven?"),
        ("assistant", said.as_str()),
        ("user", "And the earth?"),
    ];
    let (status, answer) = post(&rt, &server, "/v1/chat/completions", chat_body(&second, 8));
    assert_eq!(status, StatusCode::OK, "{answer}");
    // The whole first prompt is in the slot's cache (its reply too, unless the template
    // spells it differently from the generated tokens).
    assert!(cached(&answer) >= prompt_tokens, "{answer}");
}

/// Two conversations take turns: with two slots each keeps its own cache; with one slot
/// each turn finds the other conversation there.
#[test]
fn two_slots_keep_two_interleaved_conversations_cached() {
    let cached_on_second_turns = |parallel: usize| {
        let mut runner = common::open_demo();
        let server = server(&mut runner, parallel);
        let rt = runtime();
        let a = "Tell me of Moses and the sea.";
        let b = "What did David sing?";
        let (_, ra) = post(
            &rt,
            &server,
            "/v1/chat/completions",
            chat_body(&[("user", a)], 6),
        );
        let (_, rb) = post(
            &rt,
            &server,
            "/v1/chat/completions",
            chat_body(&[("user", b)], 6),
        );
        let (ra, rb) = (reply(&ra), reply(&rb));
        let (_, a2) = post(
            &rt,
            &server,
            "/v1/chat/completions",
            chat_body(&[("user", a), ("assistant", &ra), ("user", "More.")], 6),
        );
        let (_, b2) = post(
            &rt,
            &server,
            "/v1/chat/completions",
            chat_body(&[("user", b), ("assistant", &rb), ("user", "More.")], 6),
        );
        (cached(&a2), cached(&b2))
    };
    let (one_a, one_b) = cached_on_second_turns(1);
    let (two_a, two_b) = cached_on_second_turns(2);
    assert!(
        two_a > one_a && two_b > one_b,
        "one slot: {one_a}, {one_b}; two: {two_a}, {two_b}"
    );
}

#[test]
fn the_reply_with_a_cached_prefix_equals_the_reply_without() {
    let mut runner = common::open_demo();
    let rt = runtime();
    let warm = server(&mut runner, 1);
    let history = [
        ("user", "Who made the heaven?"),
        ("assistant", "God"),
        ("user", "And the earth?"),
    ];
    // Warm the slot with the first turn, then send the longer conversation.
    post(
        &rt,
        &warm,
        "/v1/chat/completions",
        chat_body(&history[..1], 4),
    );
    let (_, with_cache) = post(&rt, &warm, "/v1/chat/completions", chat_body(&history, 10));
    assert!(cached(&with_cache) > 0);
    drop(warm);
    let mut fresh_runner = common::open_demo();
    let cold = server(&mut fresh_runner, 1);
    let (_, without) = post(&rt, &cold, "/v1/chat/completions", chat_body(&history, 10));
    assert_eq!(cached(&without), 0);
    assert_eq!(reply(&with_cache), reply(&without));
}

#[test]
fn completions_prompt_gets_the_models_bos_as_the_cli_does() {
    let mut runner = common::open_demo();
    let config = etllm::GenerationConfig {
        num_bos: 1,
        ..common::greedy(8)
    };
    let (want, stats) = common::generate_text(&mut runner, "And God said", &config);
    let server = server(&mut runner, 1);
    let rt = runtime();
    let (status, answer) = post(
        &rt,
        &server,
        "/v1/completions",
        json!({ "prompt": "And God said", "max_tokens": 8, "temperature": 0, "ignore_eos": true }),
    );
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["choices"][0]["text"], want.text.as_str());
    assert_eq!(answer["usage"]["prompt_tokens"], stats.num_prompt_tokens);
}

#[test]
fn options_out_of_range_are_refused() {
    let mut runner = common::open_demo();
    let mut options = ServerOptions::default();
    options.parallel = 0;
    assert!(Server::new(&mut runner, options).is_err());
    let mut options = ServerOptions::default();
    options.context_length = Some(1 << 20);
    let e = Server::new(&mut runner, options).unwrap_err().to_string();
    assert!(e.contains("context"), "{e}");
    let mut options = ServerOptions::default();
    options.queue_size = 0;
    assert!(Server::new(&mut runner, options).is_err());
}

#[test]
fn a_prompt_longer_than_the_context_option_is_context_length_exceeded() {
    let mut runner = common::open_demo();
    let mut options = ServerOptions::default();
    options.context_length = Some(32);
    let server = Server::new(&mut runner, options).unwrap();
    let rt = runtime();
    let long = "And it came to pass ".repeat(20);
    let (status, answer) = post(
        &rt,
        &server,
        "/v1/chat/completions",
        chat_body(&[("user", &long)], 4),
    );
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(answer["error"]["code"], "context_length_exceeded");
}

/// The multimodal fixture served with a chat template that renders exactly its reference
/// prompt: "<s>USER: " + the message + "ASSISTANT:".
fn multimodal_server() -> (Server, Value) {
    let dir =
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/multimodal");
    let mut runner = Runner::open(
        dir.join("model.pte"),
        dir.join("tokenizer.json"),
        etllm::RunnerOptions::default(),
    )
    .unwrap();
    let mut options = ServerOptions::default();
    options.chat_template = Some(
        // The fixture's tokenizer names no BOS token for templates: "<s>" is written out.
        etllm::ChatTemplate::new("<s>USER: {{ messages[0]['content'] }}ASSISTANT:").unwrap(),
    );
    let server = Server::new(&mut runner, options).expect("server");
    let reference: Value =
        serde_json::from_slice(&std::fs::read(dir.join("reference.json")).unwrap()).unwrap();
    (server, reference)
}

fn image_message(path: &str, text: &str) -> Value {
    use base64::Engine as _;
    let dir =
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/multimodal");
    let data =
        base64::engine::general_purpose::STANDARD.encode(std::fs::read(dir.join(path)).unwrap());
    json!({"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": format!("data:image/png;base64,{data}")}},
        {"type": "text", "text": text},
    ]})
}

#[test]
fn a_chat_image_part_runs_through_the_vision_encoder_and_matches_eager_transformers() {
    let rt = runtime();
    let (server, reference) = multimodal_server();
    let case = &reference["cases"][0];
    assert_eq!(case["name"], "one_image");
    let body = json!({
        "messages": [image_message("images/rgb.png", "\nDescribe.")],
        "max_tokens": 16, "temperature": 0,
    });
    let (status, answer) = post(&rt, &server, "/v1/chat/completions", body);
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(reply(&answer), case["greedy_text"].as_str().unwrap());
    assert_eq!(
        answer["usage"]["prompt_tokens"].as_u64(),
        case["prompt_len"].as_u64()
    );
}

#[test]
fn a_corrupt_image_part_is_a_400_and_the_server_keeps_serving() {
    let rt = runtime();
    let (server, reference) = multimodal_server();
    let body = json!({
        "messages": [image_message("images/corrupt.jpg", "\nDescribe.")],
        "max_tokens": 4, "temperature": 0,
    });
    let (status, answer) = post(&rt, &server, "/v1/chat/completions", body);
    assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
    assert!(
        answer["error"]["message"]
            .as_str()
            .unwrap()
            .contains("image"),
        "{answer}"
    );
    let body = json!({
        "messages": [image_message("images/rgb.png", "\nDescribe.")],
        "max_tokens": 16, "temperature": 0,
    });
    let (status, answer) = post(&rt, &server, "/v1/chat/completions", body);
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        reply(&answer),
        reference["cases"][0]["greedy_text"].as_str().unwrap()
    );
}

#[test]
fn an_image_part_for_a_text_only_model_is_a_400() {
    let rt = runtime();
    let mut runner = common::open_demo();
    let server = server(&mut runner, 1);
    let body = json!({
        "messages": [image_message("images/rgb.png", "hi")],
        "max_tokens": 4,
    });
    let (status, answer) = post(&rt, &server, "/v1/chat/completions", body);
    assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
    assert!(
        answer["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no images"),
        "{answer}"
    );
}
