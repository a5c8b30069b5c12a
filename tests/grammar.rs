//! Constrained decoding: every constrained output is checked by an independent checker
//! (the `jsonschema` crate for JSON schemas, the `regex` crate's full match for regular
//! expressions), on random-weight fixtures whose unconstrained text is gibberish.

mod common;

use std::ops::ControlFlow;
use std::path::PathBuf;

use common::*;
use etllm::sampler::SamplerPlugin;
use etllm::{Error, GenerationConfig, GrammarType, Runner, RunnerOptions, Stats, StopReason};
use serde_json::{json, Value};

/// Greedy (seed None) or sampled at temperature 1 with `seed`, at most `max` tokens.
fn constrained(ty: GrammarType, grammar: &str, seed: Option<u64>, max: i32) -> GenerationConfig {
    GenerationConfig {
        echo: false,
        temperature: if seed.is_some() { 1.0 } else { 0.0 },
        seed,
        max_new_tokens: max,
        grammar: grammar.to_string(),
        grammar_type: ty,
        ..Default::default()
    }
}

/// Generates from `prompt` after a reset; returns the streamed text and the stats.
fn run(runner: &mut Runner, prompt: &str, config: &GenerationConfig) -> (String, Stats) {
    runner.reset().unwrap();
    let (t, stats) = generate_text(runner, prompt, config);
    (t.text, stats)
}

/// The seeds every sampled case runs with; `None` is greedy.
const SEEDS: [Option<u64>; 5] = [None, Some(1), Some(2), Some(3), Some(4)];

/// Schemas covering objects with required and optional fields, enums, bounded arrays,
/// nested objects, strings with patterns, integers and numbers.
fn schemas() -> Vec<(&'static str, Value)> {
    vec![
        (
            "required_and_optional",
            json!({
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 6},
                    "age": {"type": "integer", "minimum": 0, "maximum": 120},
                    "nick": {"type": "string", "maxLength": 4}
                },
                "required": ["name", "age"],
                "additionalProperties": false
            }),
        ),
        (
            "enum",
            json!({"type": "object",
                   "properties": {"color": {"enum": ["red", "green", "blue"]}},
                   "required": ["color"], "additionalProperties": false}),
        ),
        (
            "bounded_array",
            json!({"type": "array", "items": {"type": "integer", "minimum": -9, "maximum": 99},
                   "minItems": 2, "maxItems": 4}),
        ),
        (
            "nested",
            json!({"type": "object",
                   "properties": {
                       "id": {"type": "integer", "minimum": 1, "maximum": 999},
                       "owner": {"type": "object",
                                 "properties": {"ok": {"type": "boolean"},
                                                "tag": {"type": "string", "maxLength": 3}},
                                 "required": ["ok", "tag"], "additionalProperties": false}
                   },
                   "required": ["id", "owner"], "additionalProperties": false}),
        ),
        (
            "string_pattern",
            json!({"type": "object",
                   "properties": {"code": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"}},
                   "required": ["code"], "additionalProperties": false}),
        ),
        (
            "number",
            json!({"type": "object",
                   "properties": {"x": {"type": "number", "minimum": -5, "maximum": 5},
                                  "n": {"type": "null"}},
                   "required": ["x", "n"], "additionalProperties": false}),
        ),
    ]
}

#[test]
fn json_schema_outputs_validate_with_an_independent_validator() {
    let mut runner = open("dyn_xnnpack");
    for (name, schema) in schemas() {
        let validator = jsonschema::validator_for(&schema).expect("a valid schema");
        for seed in SEEDS {
            let config = constrained(GrammarType::JsonSchema, &schema.to_string(), seed, 100);
            let (text, stats) = run(&mut runner, "The", &config);
            assert_eq!(
                stats.stop_reason,
                StopReason::GrammarComplete,
                "{name} {seed:?}: {text:?}"
            );
            let value: Value = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("{name} {seed:?}: {text:?} is not JSON: {e}"));
            let errors: Vec<String> = validator
                .iter_errors(&value)
                .map(|e| e.to_string())
                .collect();
            assert!(errors.is_empty(), "{name} {seed:?}: {text:?}: {errors:?}");
        }
    }
}

#[test]
fn regex_outputs_fully_match_the_pattern() {
    let mut runner = open("dyn_xnnpack");
    for pattern in [
        r"[a-z]{3,8}",
        r"(yes|no|maybe)",
        r"[0-9]{4}-[0-9]{2}-[0-9]{2}",
        r"\(\d{3}\) \d{3}-\d{4}",
        r"[A-Z][a-z]{1,6}( [A-Z][a-z]{1,6}){0,2}\.",
    ] {
        let full = regex::Regex::new(&format!("^(?:{pattern})$")).unwrap();
        for seed in SEEDS {
            let config = constrained(GrammarType::Regex, pattern, seed, 60);
            let (text, stats) = run(&mut runner, "Once upon a time", &config);
            assert!(
                matches!(
                    stats.stop_reason,
                    StopReason::GrammarComplete | StopReason::Length
                ),
                "{pattern} {seed:?}: {text:?} ended with {:?}",
                stats.stop_reason
            );
            assert!(full.is_match(&text), "{pattern} {seed:?}: {text:?}");
        }
    }
}

#[test]
fn the_same_seed_gives_the_same_constrained_tokens() {
    let mut runner = open("dyn_xnnpack");
    let schema = schemas()[0].1.to_string();
    let config = constrained(GrammarType::JsonSchema, &schema, Some(7), 100);
    let (a, _) = run(&mut runner, "The", &config);
    let (b, _) = run(&mut runner, "The", &config);
    assert_eq!(a, b);
}

#[test]
fn unconstrained_text_of_the_fixture_is_not_json() {
    // The fixture's own text is gibberish: without the grammar the checks above would fail.
    let mut runner = open("dyn_xnnpack");
    let config = GenerationConfig {
        grammar: String::new(),
        ..constrained(GrammarType::JsonSchema, "", None, 30)
    };
    let (text, _) = run(&mut runner, "The", &config);
    assert!(serde_json::from_str::<Value>(&text).is_err(), "{text:?}");
}

#[test]
fn too_few_tokens_for_a_complete_match_is_grammar_incomplete() {
    let mut runner = open("dyn_xnnpack");
    let schema = schemas()[3].1.to_string();
    let config = constrained(GrammarType::JsonSchema, &schema, None, 3);
    let (text, stats) = run(&mut runner, "The", &config);
    assert_eq!(stats.stop_reason, StopReason::GrammarIncomplete, "{text:?}");
    assert_eq!(stats.num_generated_tokens, 3);
    assert!(text.starts_with('{'), "{text:?}");
}

#[test]
fn the_token_limit_on_a_complete_match_is_length() {
    // `[a-z]+` matches after every letter: stopping there leaves a complete match.
    let mut runner = open("dyn_xnnpack");
    let config = constrained(GrammarType::Regex, "[a-z]+", None, 3);
    let (text, stats) = run(&mut runner, "The", &config);
    assert_eq!(stats.stop_reason, StopReason::Length, "{text:?}");
    assert!(text.chars().all(|c| c.is_ascii_lowercase()) && !text.is_empty());
}

#[test]
fn a_grammar_that_allows_nothing_more_ends_with_grammar_complete() {
    let mut runner = open("dyn_xnnpack");
    let config = constrained(GrammarType::Regex, "(hello|goodbye) world", None, 50);
    let (text, stats) = run(&mut runner, "The", &config);
    assert_eq!(stats.stop_reason, StopReason::GrammarComplete);
    assert!(text == "hello world" || text == "goodbye world", "{text:?}");
}

#[test]
fn bad_grammars_of_each_type_are_grammar_errors_and_change_nothing() {
    let mut runner = open("dyn_xnnpack");
    let greedy4 = greedy(4);
    runner
        .prefill("Once upon", &GenerationConfig::default())
        .unwrap();
    let position = runner.position();
    for (ty, bad) in [
        (GrammarType::JsonSchema, "{\"type\": "),
        (GrammarType::JsonSchema, "{\"type\": \"no-such-type\"}"),
        (GrammarType::Regex, "(unclosed"),
        (GrammarType::Lark, "start: undefined_rule"),
        (GrammarType::Lark, "start: \"a\" ("),
        (GrammarType::Gbnf, "root ::= missing-rule"),
    ] {
        let config = constrained(ty, bad, None, 10);
        let mut called = false;
        let err = runner
            .generate(
                " a time",
                &config,
                |_| {
                    called = true;
                    ControlFlow::Continue(())
                },
                |_| {},
            )
            .expect_err(bad);
        assert!(matches!(err, Error::Grammar(_)), "{ty} {bad:?}: {err}");
        assert!(!called, "{ty} {bad:?}: a callback ran");
        assert_eq!(runner.position(), position, "{ty} {bad:?}");
    }
    // Still usable: the prefilled conversation continues.
    let (t, _) = generate_text(&mut runner, " a time", &greedy4);
    assert_eq!(t.tokens.len(), 4);
}

#[test]
fn an_unknown_grammar_type_name_is_an_invalid_argument() {
    let err = "yaml".parse::<GrammarType>().unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
    assert_eq!(
        "lark_grammar".parse::<GrammarType>().unwrap(),
        GrammarType::Lark
    );
}

#[test]
fn a_new_generate_call_starts_a_new_grammar_state_and_turns_continue() {
    let mut runner = open("dyn_xnnpack");
    let config = constrained(GrammarType::Regex, "(yes|no)\\.", Some(5), 10);
    runner.reset().unwrap();
    let turn = |runner: &mut Runner, prompt: &str| {
        let (t, stats) = generate_text(runner, prompt, &config);
        let text = t.text;
        assert_eq!(stats.stop_reason, StopReason::GrammarComplete, "{text:?}");
        assert!(text == "yes." || text == "no.", "{text:?}");
        text
    };
    turn(&mut runner, "Is it?");
    let after_first = runner.position();
    let second = turn(&mut runner, " And now?");
    assert!(runner.position() > after_first);
    // Rewinding to the first turn's end and asking again gives the same second turn.
    runner.rewind(after_first).unwrap();
    assert_eq!(turn(&mut runner, " And now?"), second);
}

/// Records the logits a plugin is shown.
struct Spy(std::sync::Arc<std::sync::Mutex<Vec<Vec<f32>>>>);

impl SamplerPlugin for Spy {
    fn apply(&mut self, logits: &mut [f32], _history: &[u32]) -> etllm::Result<Option<u32>> {
        self.0.lock().unwrap().push(logits.to_vec());
        Ok(None)
    }
}

#[test]
fn sampler_plugins_see_only_the_tokens_the_grammar_allows() {
    let mut runner = open("dyn_xnnpack");
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    runner.set_sampler_plugin(Some(Box::new(Spy(seen.clone()))));
    let config = constrained(GrammarType::Regex, "[0-9]{2,5}", Some(3), 10);
    let (text, _) = run(&mut runner, "The", &config);
    assert!(text.chars().all(|c| c.is_ascii_digit()), "{text:?}");
    let tokenizer = runner.tokenizer().unwrap();
    let seen = seen.lock().unwrap();
    assert!(!seen.is_empty());
    for logits in seen.iter() {
        for (id, &l) in logits.iter().enumerate() {
            if l == f32::NEG_INFINITY {
                continue;
            }
            // Every token the plugin may still choose is digits only, or EOS.
            let id = id as u32;
            if runner.eos_ids().contains(&id) {
                continue;
            }
            let piece = tokenizer.decode(&[id]).unwrap();
            assert!(
                !piece.is_empty() && piece.trim_start().chars().all(|c| c.is_ascii_digit()),
                "token {id} {piece:?} is allowed"
            );
        }
    }
}

#[test]
fn constrained_generation_works_with_every_tokenizer_format() {
    // Each format's tokenizer with a model whose vocabulary holds it (the text is
    // gibberish: the grammar alone makes it match).
    let dir = fixtures_dir().join("tokenizers");
    let demo = demo_dir().join("model.pte");
    let cases: [(PathBuf, PathBuf); 4] = [
        (model_path("dyn_xnnpack"), tokenizer_path()),
        (demo.clone(), dir.join("sp_bpe.model")),
        (demo.clone(), dir.join("llama2c.bin")),
        (demo, dir.join("tiktoken.model")),
    ];
    let full = regex::Regex::new(r"^(?:[a-z]{2,6}( [a-z]{2,6}){1,3}\.)$").unwrap();
    for (model, tokenizer) in cases {
        let mut runner = Runner::open(&model, &tokenizer, RunnerOptions::default())
            .unwrap_or_else(|e| panic!("{}: {e}", tokenizer.display()));
        for seed in SEEDS {
            let config = constrained(
                GrammarType::Regex,
                "[a-z]{2,6}( [a-z]{2,6}){1,3}\\.",
                seed,
                60,
            );
            let (text, stats) = run(&mut runner, "Once upon a time", &config);
            assert_eq!(
                stats.stop_reason,
                StopReason::GrammarComplete,
                "{} {seed:?}: {text:?}",
                tokenizer.display()
            );
            assert!(
                full.is_match(&text),
                "{} {seed:?}: {text:?}",
                tokenizer.display()
            );
        }
    }
}

/// The built-in KV-cache manager, counting the model steps it prepares.
struct CountSteps {
    inner: Box<dyn etllm::IoManager>,
    steps: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl etllm::IoManager for CountSteps {
    fn load(&mut self, model: &etllm::ModelInfo) -> etllm::Result<()> {
        self.inner = etllm::io_manager::default_manager_for(model)?;
        self.inner.load(model)
    }
    fn max_prefill_chunk(&self) -> usize {
        self.inner.max_prefill_chunk()
    }
    fn max_context(&self) -> usize {
        self.inner.max_context()
    }
    fn reset(&mut self) -> etllm::Result<()> {
        self.inner.reset()
    }
    fn rewind(&mut self, pos: usize) -> etllm::Result<()> {
        self.inner.rewind(pos)
    }
    fn prepare_prefill(
        &mut self,
        tokens: &[u64],
        start_pos: usize,
    ) -> etllm::Result<etllm::io_manager::StepInputs<'_>> {
        self.steps
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.inner.prepare_prefill(tokens, start_pos)
    }
    fn update_prefill<'o>(
        &mut self,
        outputs: &[etllm::tensor::TensorView<'o>],
    ) -> etllm::Result<&'o [f32]> {
        self.inner.update_prefill(outputs)
    }
    fn prepare_decode(
        &mut self,
        token: u64,
        pos: usize,
    ) -> etllm::Result<etllm::io_manager::StepInputs<'_>> {
        self.steps
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.inner.prepare_decode(token, pos)
    }
    fn update_decode<'o>(
        &mut self,
        outputs: &[etllm::tensor::TensorView<'o>],
    ) -> etllm::Result<&'o [f32]> {
        self.inner.update_decode(outputs)
    }
}

#[test]
fn fast_forward_feeds_forced_text_in_fewer_model_steps() {
    let schema = schemas()[0].1.to_string();
    let validator = jsonschema::validator_for(&schemas()[0].1).unwrap();
    let mut steps_per_token = Vec::new();
    for fast_forward in [true, false] {
        let steps = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let manager = CountSteps {
            inner: Box::new(etllm::io_manager::NoKvCache::default()),
            steps: steps.clone(),
        };
        let options = RunnerOptions {
            io_manager: Some(Box::new(manager)),
            ..Default::default()
        };
        let mut runner =
            Runner::open(model_path("dyn_xnnpack"), tokenizer_path(), options).unwrap();
        let config = GenerationConfig {
            grammar_fast_forward: fast_forward,
            ..constrained(GrammarType::JsonSchema, &schema, Some(3), 100)
        };
        let (text, stats) = run(&mut runner, "The", &config);
        assert_eq!(stats.stop_reason, StopReason::GrammarComplete, "{text:?}");
        let value: Value = serde_json::from_str(&text).unwrap();
        assert!(validator.is_valid(&value), "{text:?}");
        let steps = steps.load(std::sync::atomic::Ordering::Relaxed) as f64;
        steps_per_token.push(steps / stats.num_generated_tokens as f64);
    }
    // `{"name":"` and `","age":` are forced: with fast-forward each goes in one step.
    assert!(
        steps_per_token[0] < 0.8 * steps_per_token[1],
        "model steps per generated token with/without: {steps_per_token:?}"
    );
}

/// After a constrained generation, the model's cache holds exactly the streamed tokens:
/// continuing greedily gives what feeding the prompt and those tokens from scratch gives.
fn assert_cache_holds_the_streamed_tokens(runner: &mut Runner, config: &GenerationConfig) {
    let prompt = runner
        .tokenizer()
        .unwrap()
        .encode("Once upon a time")
        .unwrap();
    runner.reset().unwrap();
    let (constrained, _) = generate_ids(runner, &prompt, config);
    let (after, _) = generate_ids(runner, &[], &greedy(6));
    runner.reset().unwrap();
    let mut all = prompt.clone();
    all.extend(&constrained.tokens);
    let (fresh, _) = generate_ids(runner, &all, &greedy(6));
    assert_eq!(after.tokens, fresh.tokens, "{:?}", constrained.text);
}

#[test]
fn fast_forwarded_tokens_land_in_the_cache_in_order() {
    let schema = schemas()[3].1.to_string();
    let mut runner = open("dyn_xnnpack");
    for max in [100, 7, 12] {
        // 7 and 12 stop inside forced text: the forced tokens before the last go to the
        // model before the call returns.
        let config = GenerationConfig {
            ignore_eos: true,
            ..constrained(GrammarType::JsonSchema, &schema, None, max)
        };
        assert_cache_holds_the_streamed_tokens(&mut runner, &config);
    }
}

#[test]
fn fast_forward_uses_the_tokenizer_s_own_tokens_with_tiktoken() {
    // tiktoken spells forced text exactly as its encoder does (no prefix space).
    let tokenizer = fixtures_dir().join("tokenizers/tiktoken.model");
    let mut runner = Runner::open(
        demo_dir().join("model.pte"),
        &tokenizer,
        RunnerOptions::default(),
    )
    .unwrap();
    let schema = schemas()[3].1.to_string();
    let config = constrained(GrammarType::JsonSchema, &schema, Some(2), 100);
    let (text, stats) = run(&mut runner, "Once upon a time", &config);
    assert_eq!(stats.stop_reason, StopReason::GrammarComplete, "{text:?}");
    let value: Value = serde_json::from_str(&text).unwrap();
    assert!(jsonschema::validator_for(&schemas()[3].1)
        .unwrap()
        .is_valid(&value));
    assert_cache_holds_the_streamed_tokens(&mut runner, &config);
}

/// A grammar on which llguidance's first step never ends (found while testing the GBNF
/// translation: a greedy lexeme followed by a literal it can also match).
const ENDLESS: &str = "start: A \"ab\"\nA: /a+/";

#[test]
fn a_grammar_the_engine_cannot_finish_is_an_error_after_the_step_budget() {
    let mut runner = open("dyn_xnnpack");
    let t0 = std::time::Instant::now();
    let err = runner
        .generate(
            "Once",
            &constrained(GrammarType::Lark, ENDLESS, None, 5),
            |_| ControlFlow::Continue(()),
            |_| {},
        )
        .unwrap_err();
    let waited = t0.elapsed();
    assert!(matches!(err, Error::Grammar(_)), "{err}");
    assert!(err.to_string().contains("longer than"), "{err}");
    assert!(
        waited >= etllm::grammar::STEP_BUDGET && waited < etllm::grammar::STEP_BUDGET * 3,
        "{waited:?}"
    );
    assert_eq!(runner.position(), 0);
    let (t, _) = generate_text(&mut runner, "Once", &greedy(3));
    assert_eq!(t.tokens.len(), 3);
}

#[test]
fn stop_cancels_the_grammar_engine_s_work_in_progress() {
    let mut runner = open("dyn_xnnpack");
    let handle = runner.stop_handle();
    let stopper = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(300));
        handle.stop();
    });
    let t0 = std::time::Instant::now();
    let err = runner
        .generate(
            "Once",
            &constrained(GrammarType::Lark, ENDLESS, None, 5),
            |_| ControlFlow::Continue(()),
            |_| {},
        )
        .unwrap_err();
    stopper.join().unwrap();
    assert!(err.to_string().contains("stopped"), "{err}");
    assert!(
        t0.elapsed() < etllm::grammar::STEP_BUDGET,
        "{:?}",
        t0.elapsed()
    );
}

#[test]
fn a_conversation_constrains_every_reply_and_rewinds() {
    // The demo model (context 256) holds two templated turns of the fixture tokenizer.
    let mut runner = open_demo();
    let template = runner.chat_template().unwrap().clone();
    let mut chat = etllm::Conversation::new(template);
    let config = constrained(GrammarType::Regex, "(yes|no)\\.", Some(4), 10);
    let mut replies = Vec::new();
    for user in ["Is it?", "And now?"] {
        let (reply, stats) = chat
            .send(&mut runner, user, &config, |_| ControlFlow::Continue(()))
            .unwrap();
        assert_eq!(stats.stop_reason, StopReason::GrammarComplete, "{reply:?}");
        assert!(reply == "yes." || reply == "no.", "{reply:?}");
        replies.push(reply);
    }
    // Dropping the last turn and sending it again gives the same constrained reply.
    assert!(chat.rewind(&mut runner).unwrap());
    let (again, _) = chat
        .send(&mut runner, "And now?", &config, |_| {
            ControlFlow::Continue(())
        })
        .unwrap();
    assert_eq!(again, replies[1]);
}

/// A GBNF grammar with a bounded language: a small JSON object.
const ANSWER_GBNF: &str = r#"
# A yes/no answer with a score, as a JSON object.
root   ::= "{\"answer\": " answer ", \"score\": " score "}"
answer ::= "\"yes\"" | "\"no\"" | "\"maybe\""
score  ::= [0-9] | "10"
"#;

#[test]
fn a_gbnf_grammar_constrains_generation() {
    let mut runner = open("dyn_xnnpack");
    for seed in SEEDS {
        let config = constrained(GrammarType::Gbnf, ANSWER_GBNF, seed, 60);
        let (text, stats) = run(&mut runner, "Is it?", &config);
        assert_eq!(stats.stop_reason, StopReason::GrammarComplete, "{text:?}");
        let v: Value = serde_json::from_str(&text).unwrap();
        assert!(
            ["yes", "no", "maybe"].contains(&v["answer"].as_str().unwrap()),
            "{text}"
        );
        assert!(v["score"].as_u64().unwrap() <= 10, "{text}");
    }
}

#[test]
fn a_bad_gbnf_grammar_is_a_grammar_error_naming_the_place() {
    let mut runner = open("dyn_xnnpack");
    let config = constrained(GrammarType::Gbnf, "root ::= \"a\" missing", None, 5);
    let err = runner
        .generate("x", &config, |_| ControlFlow::Continue(()), |_| {})
        .unwrap_err();
    let message = err.to_string();
    assert!(matches!(err, Error::Grammar(_)), "{message}");
    assert!(
        message.contains("line 1") && message.contains("missing"),
        "{message}"
    );
}
