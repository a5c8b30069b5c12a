//! Sessions over one loaded model, saved state and prefix reuse. Continuations are checked
//! against the fixtures' eager-PyTorch (or upstream runtime) greedy references: a session
//! that was set aside, saved, restored (in this runner or a freshly loaded one) must go on
//! exactly as the reference does.

mod common;

use std::ops::ControlFlow;
use std::path::PathBuf;

use common::*;
use etllm::{
    ChatTemplate, Conversation, Error, GenerationConfig, Runner, RunnerOptions, Session, TokenPiece,
};

/// Every export kind with a greedy reference: KV cache in the model (dynamic and static
/// shape, portable and XNNPACK, positions vector), upstream's custom ops, no KV cache,
/// static attention (ours and upstream's layout), a prefill/decode pair sharing its
/// cache, quantized, bf16 and external weights.
fn kinds() -> Vec<(String, PathBuf, Reference)> {
    let mut all: Vec<(String, PathBuf, Reference)> = FIXTURES
        .iter()
        .map(|f| (f.to_string(), model_path(f), reference(f)))
        .collect();
    for shipped in ["two_method", "q8da4w_kv8", "bf16", "fp32_ptd"] {
        let dir = fixtures_dir().join("shipped").join(shipped);
        let text = std::fs::read_to_string(dir.join("reference.json")).unwrap();
        let r: Reference = serde_json::from_str(&text).unwrap();
        all.push((format!("shipped/{shipped}"), dir.join("model.pte"), r));
    }
    all
}

fn open_path(path: &PathBuf) -> Runner {
    Runner::open(path, tokenizer_path(), RunnerOptions::default())
        .unwrap_or_else(|e| panic!("loading {}: {e}", path.display()))
}

fn record(tokens: &mut Vec<u32>) -> impl FnMut(TokenPiece<'_>) -> ControlFlow<()> + '_ {
    |piece| {
        tokens.extend(piece.token);
        ControlFlow::Continue(())
    }
}

fn gen(session: &mut Session, ids: &[u32], n: usize) -> Vec<u32> {
    let mut out = Vec::new();
    session
        .generate_from_ids(ids, &greedy(n as i32), record(&mut out), |_| {})
        .unwrap_or_else(|e| panic!("generate: {e}"));
    out
}

/// The prompt without its last token is prefilled, the last goes in with the generation:
/// the state saved between them is mid-prompt.
fn prefill_all_but_last(session: &mut Session, prompt: &[u32]) {
    session
        .prefill_ids(&prompt[..prompt.len() - 1], &greedy(1))
        .unwrap();
}

#[test]
fn a_restored_state_continues_like_the_reference_on_every_export_kind() {
    for (name, path, reference) in kinds() {
        let case = &reference.cases[0];
        let n = case.greedy_ids.len().min(8);
        let mut runner = open_path(&path);
        let mut session = runner.session().unwrap();
        prefill_all_but_last(&mut session, &case.prompt_ids);
        let saved = session
            .save_state()
            .unwrap_or_else(|e| panic!("{name}: saving: {e}"));
        // The session moves on (another conversation overwrites its cache)...
        session.reset().unwrap();
        let other = &reference.cases[reference.cases.len() - 1];
        gen(&mut session, &other.prompt_ids, 4);
        // ...and comes back.
        session.load_state(&saved).unwrap();
        let last = &case.prompt_ids[case.prompt_ids.len() - 1..];
        assert_eq!(
            gen(&mut session, last, n),
            case.greedy_ids[..n],
            "{name}: restored in the same session"
        );
        // In a freshly loaded model, as another process would.
        let mut fresh = open_path(&path);
        let mut restored = fresh.session().unwrap();
        restored.load_state(&saved).unwrap();
        assert_eq!(restored.position(), case.prompt_ids.len() - 1);
        assert_eq!(
            gen(&mut restored, last, n),
            case.greedy_ids[..n],
            "{name}: restored in a fresh runner"
        );
    }
}

#[test]
fn the_static_attention_layouts_restore_like_the_reference() {
    for fixture in ["static_attention", "upstream_static"] {
        let text =
            std::fs::read_to_string(fixtures_dir().join(fixture).join("reference.json")).unwrap();
        let reference: serde_json::Value = serde_json::from_str(&text).unwrap();
        let case = &reference["cases"][0];
        let ids = |k: &str| -> Vec<u32> {
            case[k]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect()
        };
        let (prompt, want) = (ids("prompt_ids"), ids("greedy_ids"));
        let n = want.len().min(6);
        let mut runner = open(fixture);
        let mut session = runner.session().unwrap();
        prefill_all_but_last(&mut session, &prompt);
        let saved = session
            .save_state()
            .unwrap_or_else(|e| panic!("{fixture}: {e}"));
        gen(&mut session, &prompt[prompt.len() - 1..], 3);
        let mut fresh = open(fixture);
        let mut restored = fresh.session().unwrap();
        restored.load_state(&saved).unwrap();
        assert_eq!(
            gen(&mut restored, &prompt[prompt.len() - 1..], n),
            want[..n],
            "{fixture}"
        );
    }
}

#[test]
fn two_sessions_interleaved_give_what_each_gives_alone() {
    let reference = reference("dyn_xnnpack");
    let (a, b) = (&reference.cases[0], &reference.cases[1]);
    let mut runner = open("dyn_xnnpack");
    let (mut sa, mut sb) = (runner.session().unwrap(), runner.session().unwrap());
    // Alternating turns: each switch sets the other's cache aside and brings this one's in.
    let mut got_a = gen(&mut sa, &a.prompt_ids, 3);
    let mut got_b = gen(&mut sb, &b.prompt_ids, 3);
    got_a.extend(gen(&mut sa, &[], 3));
    got_b.extend(gen(&mut sb, &[], 3));
    got_a.extend(gen(&mut sa, &[], 2));
    assert_eq!(got_a, a.greedy_ids[..8]);
    assert_eq!(got_b, b.greedy_ids[..6]);
    // The runner's own conversation is one more session.
    let (t, _) = generate_ids(&mut runner, &a.prompt_ids, &greedy(4));
    assert_eq!(t.tokens, a.greedy_ids[..4]);
    assert_eq!(gen(&mut sb, &[], 2), b.greedy_ids[6..8]);
}

#[test]
fn two_sessions_on_two_threads_give_what_each_gives_alone() {
    let reference = reference("dyn_xnnpack");
    let mut runner = open("dyn_xnnpack");
    let handles: Vec<_> = reference.cases[..2]
        .iter()
        .map(|case| {
            let mut session = runner.session().unwrap();
            let (prompt, want) = (case.prompt_ids.clone(), case.greedy_ids.clone());
            std::thread::spawn(move || {
                let mut got = gen(&mut session, &prompt, 4);
                for _ in 0..3 {
                    got.extend(gen(&mut session, &[], 2));
                }
                assert_eq!(got, want[..10]);
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
}

#[test]
fn a_session_outlives_its_runner() {
    let reference = reference("dyn_xnnpack");
    let case = &reference.cases[0];
    let mut runner = open("dyn_xnnpack");
    let mut session = runner.session().unwrap();
    drop(runner);
    assert_eq!(gen(&mut session, &case.prompt_ids, 5), case.greedy_ids[..5]);
}

#[test]
fn a_call_on_the_same_model_from_inside_a_callback_is_busy_and_changes_nothing() {
    let reference = reference("dyn_xnnpack");
    let (a, b) = (&reference.cases[0], &reference.cases[1]);
    let mut runner = open("dyn_xnnpack");
    let (mut sa, mut sb) = (runner.session().unwrap(), runner.session().unwrap());
    let mut got_b = gen(&mut sb, &b.prompt_ids, 3);
    let held = sb.tokens();
    let mut refused = Vec::new();
    sa.generate_from_ids(
        &a.prompt_ids,
        &greedy(2),
        |_| {
            if refused.is_empty() {
                let ignore = |_: TokenPiece<'_>| ControlFlow::Continue(());
                let reuse = GenerationConfig {
                    reuse_prefix: true,
                    ..greedy(1)
                };
                refused.push(
                    sb.generate_from_ids(&[1, 2], &greedy(1), ignore, |_| {})
                        .err(),
                );
                refused.push(
                    sb.generate_from_ids(&a.prompt_ids, &reuse, ignore, |_| {})
                        .err(),
                );
                refused.push(sb.reset().err());
                refused.push(sb.rewind(1).err());
                refused.push(sb.save_state().err());
            }
            ControlFlow::Continue(())
        },
        |_| {},
    )
    .unwrap();
    assert_eq!(refused.len(), 5);
    for (i, e) in refused.iter().enumerate() {
        assert!(matches!(e, Some(Error::Busy(_))), "call {i}: {e:?}");
    }
    // b is as it was, and goes on as the reference does.
    assert_eq!(sb.tokens(), held);
    got_b.extend(gen(&mut sb, &[], 3));
    assert_eq!(got_b, b.greedy_ids[..6]);
}

#[test]
fn a_state_of_another_model_is_refused_and_the_session_keeps_its_own() {
    let reference = reference("dyn_xnnpack");
    let case = &reference.cases[0];
    let mut other = open("dyn_portable");
    let mut foreign = other.session().unwrap();
    gen(&mut foreign, &case.prompt_ids, 2);
    let saved = foreign.save_state().unwrap();

    let mut runner = open("dyn_xnnpack");
    let mut session = runner.session().unwrap();
    let first = gen(&mut session, &case.prompt_ids, 3);
    let err = session.load_state(&saved).unwrap_err();
    assert!(
        matches!(&err, Error::InvalidState(m) if m.contains("another model")),
        "{err}"
    );
    let mut got = first;
    got.extend(gen(&mut session, &[], 3));
    assert_eq!(got, case.greedy_ids[..6]);
}

#[test]
fn truncated_and_corrupt_states_are_refused_and_the_session_keeps_its_own() {
    let reference = reference("dyn_xnnpack");
    let case = &reference.cases[0];
    let mut runner = open("dyn_xnnpack");
    let mut session = runner.session().unwrap();
    let first = gen(&mut session, &case.prompt_ids, 3);
    let saved = session.save_state().unwrap();
    let mut flipped = saved.clone();
    let middle = flipped.len() / 2;
    flipped[middle] ^= 1;
    for (what, bytes) in [
        ("truncated", &saved[..saved.len() / 3]),
        ("corrupt", &flipped[..]),
        ("not a state", &b"hello, world"[..]),
        ("empty", &[][..]),
    ] {
        let err = session.load_state(bytes).unwrap_err();
        assert!(matches!(err, Error::InvalidState(_)), "{what}: {err}");
    }
    let mut got = first;
    got.extend(gen(&mut session, &[], 3));
    assert_eq!(got, case.greedy_ids[..6]);
}

#[test]
fn a_state_file_round_trips_with_its_user_data() {
    let reference = reference("dyn_xnnpack");
    let case = &reference.cases[0];
    let dir = std::env::temp_dir().join(format!("etllm-state-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("chat.state");
    let mut runner = open("dyn_xnnpack");
    let mut session = runner.session().unwrap();
    let first = gen(&mut session, &case.prompt_ids, 4);
    session.save_state_file(&path, b"my app data").unwrap();
    let mut fresh = open("dyn_xnnpack");
    let mut restored = fresh.session().unwrap();
    assert_eq!(restored.load_state_file(&path).unwrap(), b"my app data");
    assert_eq!(restored.tokens(), session.tokens());
    let mut got = first;
    got.extend(gen(&mut restored, &[], 4));
    assert_eq!(got, case.greedy_ids[..8]);
    let missing = restored.load_state_file(dir.join("absent")).unwrap_err();
    assert!(matches!(missing, Error::FileAccess { .. }), "{missing}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn prefix_reuse_feeds_only_the_new_tokens() {
    let reference = reference("dyn_xnnpack");
    let case = &reference.cases[0];
    let reuse = GenerationConfig {
        reuse_prefix: true,
        ..greedy(4)
    };
    let mut runner = open("dyn_xnnpack");
    let mut session = runner.session().unwrap();
    let mut out = Vec::new();
    let stats = session
        .generate_from_ids(&case.prompt_ids, &reuse, record(&mut out), |_| {})
        .unwrap();
    assert_eq!(stats.reused_prompt_tokens, 0);
    // The whole conversation again, with what was generated: nothing to feed but the
    // last token, and the continuation is the reference's.
    let mut history = case.prompt_ids.clone();
    history.extend(&out);
    let mut more = Vec::new();
    let stats = session
        .generate_from_ids(&history, &reuse, record(&mut more), |_| {})
        .unwrap();
    assert_eq!(stats.num_prompt_tokens as usize, history.len());
    assert_eq!(stats.reused_prompt_tokens as usize, history.len() - 1);
    assert_eq!(more, case.greedy_ids[4..8]);
}

#[test]
fn prefix_reuse_after_a_divergence_matches_a_fresh_run() {
    let reference = reference("dyn_xnnpack");
    let (a, b) = (&reference.cases[0], &reference.cases[1]);
    let reuse = GenerationConfig {
        reuse_prefix: true,
        ..greedy(5)
    };
    let mut runner = open("dyn_xnnpack");
    let mut session = runner.session().unwrap();
    let mut ignored = Vec::new();
    session
        .generate_from_ids(&a.prompt_ids, &reuse, record(&mut ignored), |_| {})
        .unwrap();
    let common = a
        .prompt_ids
        .iter()
        .zip(&b.prompt_ids)
        .take_while(|(x, y)| x == y)
        .count();
    let mut got = Vec::new();
    let stats = session
        .generate_from_ids(&b.prompt_ids, &reuse, record(&mut got), |_| {})
        .unwrap();
    assert_eq!(stats.reused_prompt_tokens as usize, common);
    assert!(common >= 1, "the cases share at least BOS");
    assert_eq!(got, b.greedy_ids[..5]);
    assert_eq!(session.tokens()[..b.prompt_ids.len()], b.prompt_ids[..]);
}

#[test]
fn a_manager_that_cannot_save_serves_one_session_and_refuses_a_second() {
    use etllm::io_manager::{IoManager, KvCacheInModel, StepInputs};
    use etllm::{model::ModelInfo, tensor::TensorView};
    struct NoSave(KvCacheInModel);
    impl IoManager for NoSave {
        fn load(&mut self, m: &ModelInfo) -> etllm::Result<()> {
            self.0.load(m)
        }
        fn max_prefill_chunk(&self) -> usize {
            self.0.max_prefill_chunk()
        }
        fn max_context(&self) -> usize {
            self.0.max_context()
        }
        fn reset(&mut self) -> etllm::Result<()> {
            self.0.reset()
        }
        fn rewind(&mut self, pos: usize) -> etllm::Result<()> {
            self.0.rewind(pos)
        }
        fn prepare_prefill(&mut self, t: &[u64], s: usize) -> etllm::Result<StepInputs<'_>> {
            self.0.prepare_prefill(t, s)
        }
        fn update_prefill<'o>(&mut self, o: &[TensorView<'o>]) -> etllm::Result<&'o [f32]> {
            self.0.update_prefill(o)
        }
        fn prepare_decode(&mut self, t: u64, p: usize) -> etllm::Result<StepInputs<'_>> {
            self.0.prepare_decode(t, p)
        }
        fn update_decode<'o>(&mut self, o: &[TensorView<'o>]) -> etllm::Result<&'o [f32]> {
            self.0.update_decode(o)
        }
    }
    let reference = reference("dyn_xnnpack");
    let case = &reference.cases[0];
    let options = RunnerOptions {
        io_manager: Some(Box::new(NoSave(KvCacheInModel::new()))),
        ..Default::default()
    };
    let mut runner = Runner::open(model_path("dyn_xnnpack"), tokenizer_path(), options).unwrap();
    let (t, _) = generate_ids(&mut runner, &case.prompt_ids, &greedy(3));
    assert_eq!(t.tokens, case.greedy_ids[..3]);
    let mut second = runner.session().unwrap();
    let err = second
        .generate_from_ids(
            &case.prompt_ids,
            &greedy(1),
            |_| ControlFlow::Continue(()),
            |_| {},
        )
        .unwrap_err();
    assert!(
        matches!(&err, Error::IoManager(m) if m.contains("cannot save")),
        "{err}"
    );
    // The runner's conversation is untouched.
    let (t, _) = generate_ids(&mut runner, &[], &greedy(3));
    assert_eq!(t.tokens, case.greedy_ids[3..6]);
}

#[test]
fn a_conversation_resumes_from_a_saved_state_and_its_json() {
    let template = ChatTemplate::new(COMPACT_TEMPLATE).unwrap();
    let config = GenerationConfig {
        max_new_tokens: 5,
        ..greedy(5)
    };
    let quiet = |_: TokenPiece<'_>| ControlFlow::Continue(());
    // Uninterrupted: two turns.
    let mut runner = open("dyn_xnnpack");
    let mut whole = runner.session().unwrap();
    let mut chat = Conversation::new(template.clone());
    chat.send(&mut whole, "Once upon", &config, quiet).unwrap();
    let (want, _) = chat.send(&mut whole, "a time", &config, quiet).unwrap();
    // Interrupted after the first turn, resumed elsewhere.
    let mut first = runner.session().unwrap();
    let mut chat = Conversation::new(template.clone());
    chat.send(&mut first, "Once upon", &config, quiet).unwrap();
    let saved = first.save_state_with(chat.to_json().as_bytes()).unwrap();
    let mut fresh = open("dyn_xnnpack");
    let mut resumed = fresh.session().unwrap();
    let json = resumed.load_state(&saved).unwrap();
    let mut chat = Conversation::from_json(template, std::str::from_utf8(&json).unwrap()).unwrap();
    let (got, stats) = chat.send(&mut resumed, "a time", &config, quiet).unwrap();
    assert_eq!(got, want);
    assert_eq!(chat.messages().len(), 4);
    assert!(stats.num_prompt_tokens > 0);
}

/// With prefix reuse the prompt is the whole conversation: the repetition penalty sees
/// its reused tokens as it sees the tokens of a prompt fed in full, so a session that
/// already holds the prompt generates what a fresh one does.
#[test]
fn prefix_reuse_penalizes_the_reused_prompt_tokens_like_a_fresh_run() {
    let reference = reference("dyn_xnnpack");
    // A long prompt that shares tokens with the greedy continuation.
    let case = &reference.cases[1];
    let penalized = GenerationConfig {
        repetition_penalty: 3.0,
        reuse_prefix: true,
        ..greedy(12)
    };
    let mut runner = open("dyn_xnnpack");
    let mut fresh = runner.session().unwrap();
    let want = gen_with(&mut fresh, &case.prompt_ids, &penalized);
    // The same prompt again in a session that holds all of it but its last token...
    let mut cached = runner.session().unwrap();
    prefill_all_but_last(&mut cached, &case.prompt_ids);
    assert_eq!(gen_with(&mut cached, &case.prompt_ids, &penalized), want);
    // ...or all of it, the last token pending (a prefill, as `etllm --prompt-cache` does).
    let mut cached = runner.session().unwrap();
    cached.prefill_ids(&case.prompt_ids, &penalized).unwrap();
    assert_eq!(gen_with(&mut cached, &case.prompt_ids, &penalized), want);
    // Without the penalty's history the reused tokens would go unpenalized: the case
    // must be one where that changes the output.
    let mut plain = runner.session().unwrap();
    prefill_all_but_last(&mut plain, &case.prompt_ids);
    let last = &case.prompt_ids[case.prompt_ids.len() - 1..];
    let continuation = GenerationConfig {
        reuse_prefix: false,
        ..penalized.clone()
    };
    assert_ne!(gen_with(&mut plain, last, &continuation), want);
}

fn gen_with(session: &mut Session, ids: &[u32], config: &GenerationConfig) -> Vec<u32> {
    let mut out = Vec::new();
    session
        .generate_from_ids(ids, config, record(&mut out), |_| {})
        .unwrap_or_else(|e| panic!("generate: {e}"));
    out
}

#[test]
fn a_state_restores_into_a_copy_of_the_model_file() {
    // Another file (another inode, another stamp) with the same bytes: the identity is
    // then checked by hashing the files, and they are the same model.
    let reference = reference("dyn_xnnpack");
    let case = &reference.cases[0];
    let dir = std::env::temp_dir().join(format!("etllm-copy-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let copy = dir.join("model.pte");
    std::fs::copy(model_path("dyn_xnnpack"), &copy).unwrap();
    let mut runner = open("dyn_xnnpack");
    let mut session = runner.session().unwrap();
    let first = gen(&mut session, &case.prompt_ids, 4);
    let saved = session.save_state().unwrap();
    let mut other = open_path(&copy);
    let mut restored = other.session().unwrap();
    restored.load_state(&saved).unwrap();
    let mut got = first;
    got.extend(gen(&mut restored, &[], 4));
    assert_eq!(got, case.greedy_ids[..8]);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_new_sessions_state_holds_nothing_a_dropped_session_left() {
    // The buffers a dropped session used are cleaned before the next one comes in, so the
    // next one's saved state is as small as if the model were freshly loaded.
    let reference = reference("dyn_xnnpack");
    let case = &reference.cases[0];
    let fresh_size = {
        let mut runner = open("dyn_xnnpack");
        let mut s = runner.session().unwrap();
        gen(&mut s, &case.prompt_ids, 2);
        s.save_state().unwrap().len()
    };
    let mut runner = open("dyn_xnnpack");
    let mut long = runner.session().unwrap();
    gen(&mut long, &case.prompt_ids, 60);
    let long_size = long.save_state().unwrap().len();
    drop(long);
    let mut short = runner.session().unwrap();
    gen(&mut short, &case.prompt_ids, 2);
    let short_size = short.save_state().unwrap().len();
    assert!(long_size > fresh_size, "{long_size} vs {fresh_size}");
    assert_eq!(short_size, fresh_size);
}
