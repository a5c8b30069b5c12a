//! Behaviour of generate: multi-turn, stopping, EOS, seeds, echo, warm-up, streaming.

mod common;

use std::ops::ControlFlow;
use std::sync::mpsc;

use common::*;
use etllm::{GenerationConfig, StopReason, Tokenizer};

#[test]
fn two_generate_calls_equal_one_call_over_the_concatenated_tokens() {
    let cases = reference("dyn_xnnpack").cases;
    let (first, second) = (&cases[3].prompt_ids, &cases[4].prompt_ids[1..]);
    let mut runner = open("dyn_xnnpack");
    let (turn1, _) = generate_ids(&mut runner, first, &greedy(5));
    let (turn2, _) = generate_ids(&mut runner, second, &greedy(8));
    assert_eq!(runner.position(), first.len() + 5 + second.len() + 8);

    runner.reset().unwrap();
    let mut all = first.clone();
    all.extend(&turn1.tokens);
    all.extend(second);
    let (once, _) = generate_ids(&mut runner, &all, &greedy(8));
    assert_eq!(turn2.tokens, once.tokens);
}

#[test]
fn reset_starts_the_conversation_over() {
    let case = &reference("dyn_xnnpack").cases[0];
    let mut runner = open("dyn_xnnpack");
    generate_ids(&mut runner, &case.prompt_ids, &greedy(4));
    runner.reset().unwrap();
    assert_eq!(runner.position(), 0);
    assert_matches_reference(&mut runner, case);
}

#[test]
fn stop_from_another_thread_ends_generation_within_one_step() {
    let case = &reference("dyn_xnnpack").cases[1];
    let mut runner = open("dyn_xnnpack");
    let handle = runner.stop_handle();
    let (to_main, from_worker) = mpsc::channel::<()>();
    let (to_worker, from_main) = mpsc::channel::<()>();
    let main = std::thread::spawn(move || {
        from_worker.recv().unwrap();
        handle.stop();
        to_worker.send(()).unwrap();
    });
    let mut count = 0;
    let stats = runner
        .generate_from_ids(
            &case.prompt_ids,
            &greedy(-1),
            |piece| {
                if piece.token.is_some() {
                    count += 1;
                    if count == 5 {
                        // Let the other thread call stop(), and wait until it has.
                        to_main.send(()).unwrap();
                        from_main.recv().unwrap();
                    }
                }
                ControlFlow::Continue(())
            },
            |_| {},
        )
        .unwrap();
    main.join().unwrap();
    assert_eq!(stats.stop_reason, StopReason::Stopped);
    assert_eq!(stats.num_generated_tokens, 5);
    assert_eq!(count, 5);
}

#[test]
fn a_stop_before_generate_does_not_cancel_the_next_generation() {
    let case = &reference("dyn_xnnpack").cases[0];
    let mut runner = open("dyn_xnnpack");
    runner.stop();
    let (t, stats) = generate_ids(&mut runner, &case.prompt_ids, &greedy(6));
    assert_eq!(t.tokens.len(), 6);
    assert_eq!(stats.stop_reason, StopReason::Length);
}

#[test]
fn callback_break_stops_generation() {
    let case = &reference("dyn_xnnpack").cases[0];
    let mut runner = open("dyn_xnnpack");
    let mut seen = 0;
    let stats = runner
        .generate_from_ids(
            &case.prompt_ids,
            &greedy(20),
            |p| {
                seen += p.token.is_some() as usize;
                if seen == 3 {
                    ControlFlow::Break(())
                } else {
                    ControlFlow::Continue(())
                }
            },
            |_| {},
        )
        .unwrap();
    assert_eq!(stats.stop_reason, StopReason::Callback);
    assert_eq!(stats.num_generated_tokens, 3);
}

#[test]
fn the_first_generated_token_is_checked_against_eos() {
    let case = &reference("dyn_xnnpack").cases[0];
    let mut runner = open("dyn_xnnpack");
    let config = GenerationConfig {
        stop_token_ids: vec![case.greedy_ids[0]],
        ..greedy(10)
    };
    let (t, stats) = generate_ids(&mut runner, &case.prompt_ids, &config);
    assert_eq!(stats.stop_reason, StopReason::Eos);
    assert_eq!(stats.num_generated_tokens, 1);
    assert!(
        t.tokens.is_empty(),
        "an end token is not streamed: {:?}",
        t.tokens
    );
}

#[test]
fn the_models_eos_ends_generation_and_is_not_streamed() {
    let cases = reference("dyn_xnnpack").cases;
    let case = cases
        .iter()
        .find(|c| c.greedy_first_eos_index.is_some())
        .expect("a reference case whose greedy continuation reaches EOS");
    let eos_at = case.greedy_first_eos_index.unwrap();
    assert_eq!(case.greedy_ids[eos_at], 2);
    let mut runner = open("dyn_xnnpack");
    let config = GenerationConfig {
        ignore_eos: false,
        ..greedy(24)
    };
    let (t, stats) = generate_ids(&mut runner, &case.prompt_ids, &config);
    assert_eq!(stats.stop_reason, StopReason::Eos);
    assert_eq!(t.tokens, case.greedy_ids[..eos_at]);
    assert_eq!(stats.num_generated_tokens as usize, eos_at + 1);
    // With ignore_eos the same prompt runs past it, exactly as eager PyTorch did.
    runner.reset().unwrap();
    let (t, _) = generate_ids(&mut runner, &case.prompt_ids, &greedy(24));
    assert_eq!(t.tokens, case.greedy_ids);
}

#[test]
fn a_later_end_token_ends_generation_there() {
    let case = &reference("dyn_xnnpack").cases[0];
    let stop_at = case
        .greedy_ids
        .iter()
        .position(|&id| {
            case.greedy_ids[..].iter().filter(|&&x| x == id).count() == 1
                && id != case.greedy_ids[0]
        })
        .unwrap();
    let mut runner = open("dyn_xnnpack");
    let config = GenerationConfig {
        stop_token_ids: vec![case.greedy_ids[stop_at]],
        ..greedy(20)
    };
    let (t, stats) = generate_ids(&mut runner, &case.prompt_ids, &config);
    assert_eq!(stats.stop_reason, StopReason::Eos);
    assert_eq!(t.tokens, case.greedy_ids[..stop_at]);
}

#[test]
fn the_same_seed_gives_the_same_sampled_tokens() {
    let case = &reference("dyn_xnnpack").cases[3];
    let mut runner = open("dyn_xnnpack");
    let sampled = |runner: &mut etllm::Runner, seed| {
        runner.reset().unwrap();
        let config = GenerationConfig {
            temperature: 1.0,
            seed: Some(seed),
            ..greedy(24)
        };
        generate_ids(runner, &case.prompt_ids, &config).0.tokens
    };
    let a = sampled(&mut runner, 1234);
    let b = sampled(&mut runner, 1234);
    let c = sampled(&mut runner, 999);
    assert_eq!(a, b);
    assert_ne!(a, c, "different seeds should give different samples");
    assert_ne!(a, case.greedy_ids, "temperature 1 should not be greedy");
}

#[test]
fn max_new_tokens_n_yields_exactly_n_tokens() {
    let case = &reference("dyn_xnnpack").cases[0];
    let mut runner = open("dyn_xnnpack");
    for n in [1, 2, 7] {
        runner.reset().unwrap();
        let (t, stats) = generate_ids(&mut runner, &case.prompt_ids, &greedy(n));
        assert_eq!(t.tokens.len(), n as usize);
        assert_eq!(stats.num_generated_tokens, n as u64);
    }
}

#[test]
fn max_new_tokens_zero_only_prefills() {
    let case = &reference("dyn_xnnpack").cases[0];
    let mut runner = open("dyn_xnnpack");
    let (t, stats) = generate_ids(&mut runner, &case.prompt_ids, &greedy(0));
    assert!(t.pieces.is_empty());
    assert_eq!(stats.num_generated_tokens, 0);
    assert_eq!(runner.position(), case.prompt_ids.len());
}

#[test]
fn echo_streams_the_prompt_first() {
    let mut runner = open("dyn_xnnpack");
    let config = GenerationConfig {
        echo: true,
        num_bos: 1,
        ..greedy(3)
    };
    let (t, _) = generate_text(&mut runner, "Hello, world!", &config);
    assert_eq!(t.pieces[0], (None, "Hello, world!".to_string()));
    assert_eq!(t.tokens.len(), 3);
}

#[test]
fn warming_calls_no_callback_and_leaves_no_state() {
    let case = &reference("dyn_xnnpack").cases[0];
    let mut runner = open("dyn_xnnpack");
    let config = GenerationConfig {
        warming: true,
        echo: true,
        ..greedy(5)
    };
    let (mut token_calls, mut stats_calls) = (0, 0);
    runner
        .generate_from_ids(
            &case.prompt_ids,
            &config,
            |_| {
                token_calls += 1;
                ControlFlow::Continue(())
            },
            |_| stats_calls += 1,
        )
        .unwrap();
    assert_eq!((token_calls, stats_calls), (0, 0));
    assert_eq!(runner.position(), 0);
    assert_matches_reference(&mut runner, case);
}

#[test]
fn stats_count_tokens_and_order_timestamps() {
    let case = &reference("dyn_xnnpack").cases[1];
    let mut runner = open("dyn_xnnpack");
    let mut from_callback = None;
    let stats = runner
        .generate_from_ids(
            &case.prompt_ids,
            &greedy(10),
            |_| ControlFlow::Continue(()),
            |s| from_callback = Some(*s),
        )
        .unwrap();
    assert_eq!(from_callback, Some(stats));
    assert_eq!(stats.num_prompt_tokens as usize, case.prompt_ids.len());
    assert_eq!(stats.num_generated_tokens, 10);
    assert!(stats.model_load_start_us <= stats.model_load_end_us);
    assert!(stats.model_load_end_us <= stats.inference_start_us);
    assert!(stats.inference_start_us <= stats.token_encode_end_us);
    assert!(stats.token_encode_end_us <= stats.prompt_eval_end_us);
    assert!(stats.prompt_eval_end_us <= stats.first_token_us);
    assert!(stats.first_token_us <= stats.inference_end_us);
    let total = stats.inference_end_us - stats.inference_start_us;
    assert!(stats.aggregate_model_execution_time_us > 0);
    assert!(stats.aggregate_model_execution_time_us <= total);
    assert!(stats.aggregate_sampling_time_us <= total);
    let json = stats.to_json();
    assert_eq!(json["generated_tokens"], 10);
    assert_eq!(
        json["decode_model_execution_time_ms"],
        stats.decode_model_execution_time_us as f64 / 1000.0
    );
    assert_eq!(json["prompt_tokens"], case.prompt_ids.len());
}

/// 10 generated tokens take 9 decode steps after prefill: their model time is part of the
/// total model time and of the decode wall time, and the rest of that wall time is the
/// share outside the model.
#[test]
fn stats_split_decode_model_time_from_prefill() {
    let case = &reference("dyn_xnnpack").cases[1];
    let mut runner = open("dyn_xnnpack");
    let stats = runner
        .generate_from_ids(
            &case.prompt_ids,
            &greedy(10),
            |_| ControlFlow::Continue(()),
            |_| {},
        )
        .unwrap();
    let decode_wall = stats.inference_end_us - stats.prompt_eval_end_us;
    assert!(stats.decode_model_execution_time_us > 0);
    assert!(stats.decode_model_execution_time_us < stats.aggregate_model_execution_time_us);
    assert!(stats.decode_model_execution_time_us <= decode_wall + 1);
    let share = stats.decode_outside_model_share();
    assert!((0.0..1.0).contains(&share), "{share}");

    // A single generated token has no decode step.
    runner.reset().unwrap();
    let one = runner
        .generate_from_ids(
            &case.prompt_ids,
            &greedy(1),
            |_| ControlFlow::Continue(()),
            |_| {},
        )
        .unwrap();
    assert_eq!(one.num_generated_tokens, 1);
    assert_eq!(one.decode_model_execution_time_us, 0);
    assert!(one.aggregate_model_execution_time_us > 0);
}

#[test]
fn streamed_pieces_are_whole_characters_even_when_tokens_split_them() {
    let tokenizer = Tokenizer::from_file(tokenizer_path()).unwrap();
    let text = "Café 東京の夜 🌙 crème brûlée 🍕!";
    let ids = tokenizer.encode(text).unwrap();
    let mut stream = tokenizer.stream();
    let mut pieces = Vec::new();
    for &id in &ids {
        pieces.push(stream.push(id).unwrap());
    }
    pieces.push(stream.flush().unwrap());
    assert_eq!(pieces.concat(), text);
    assert!(pieces.iter().all(|p| !p.contains('\u{FFFD}')), "{pieces:?}");
    assert!(
        pieces.iter().any(|p| p.is_empty()),
        "the fixture tokenizer should split some character across tokens: {pieces:?}"
    );
}

#[test]
fn streamed_generation_text_equals_the_decoded_tokens() {
    let case = &reference("dyn_xnnpack").cases[2];
    let mut runner = open("dyn_xnnpack");
    let (t, _) = generate_ids(&mut runner, &case.prompt_ids, &greedy(24));
    let decoded = runner.tokenizer().unwrap().decode(&t.tokens).unwrap();
    assert_eq!(t.text, decoded);
}

#[test]
fn runner_reports_the_model_metadata() {
    let runner = open("dyn_xnnpack");
    let meta = runner.metadata().unwrap();
    assert_eq!(meta.max_context_len, 128);
    assert_eq!(meta.vocab_size, Some(512));
    assert_eq!(meta.bos_id, Some(1));
    assert_eq!(meta.eos_ids, vec![2]);
    assert!(meta.use_kv_cache && meta.enable_dynamic_shape);
    assert_eq!(runner.bos_id(), Some(1));
    assert_eq!(runner.eos_ids(), &[2]);
}

#[test]
fn prefill_then_an_empty_prompt_continues_like_one_generate() {
    let case = &reference("dyn_xnnpack").cases[1];
    let mut runner = open("dyn_xnnpack");
    let stats = runner.prefill_ids(&case.prompt_ids, &greedy(-1)).unwrap();
    assert_eq!(stats.num_generated_tokens, 0);
    assert_eq!(runner.position(), case.prompt_ids.len());
    let (t, _) = generate_text(&mut runner, "", &greedy(case.greedy_ids.len() as i32));
    assert_eq!(t.tokens, case.greedy_ids);
}

#[test]
fn prefill_text_then_generate_equals_generating_over_both() {
    let cases = reference("dyn_xnnpack").cases;
    let mut runner = open("dyn_xnnpack");
    let config = GenerationConfig {
        num_bos: 1,
        ..greedy(6)
    };
    runner.prefill(&cases[3].prompt, &config).unwrap();
    let (two_calls, _) = generate_ids(&mut runner, &cases[4].prompt_ids[1..], &greedy(6));
    runner.reset().unwrap();
    let mut all = cases[3].prompt_ids.clone();
    all.extend(&cases[4].prompt_ids[1..]);
    let (one_call, _) = generate_ids(&mut runner, &all, &greedy(6));
    assert_eq!(two_calls.tokens, one_call.tokens);
}

#[test]
fn top_k_one_reproduces_the_greedy_reference() {
    let case = &reference("dyn_xnnpack").cases[1];
    let mut runner = open("dyn_xnnpack");
    let config = GenerationConfig {
        temperature: 1.3,
        top_k: 1,
        seed: Some(5),
        ..greedy(case.greedy_ids.len() as i32)
    };
    let (t, _) = generate_ids(&mut runner, &case.prompt_ids, &config);
    assert_eq!(t.tokens, case.greedy_ids);
}

#[test]
fn a_strong_repetition_penalty_avoids_repeating_prompt_tokens() {
    let case = &reference("dyn_xnnpack").cases[1];
    let mut runner = open("dyn_xnnpack");
    let config = GenerationConfig {
        repetition_penalty: 1000.0,
        ..greedy(12)
    };
    let (t, _) = generate_ids(&mut runner, &case.prompt_ids, &config);
    // With logits of this model's size (|l| < 20), a penalty of 1000 puts every seen
    // token with a positive logit below every unseen one with a positive logit.
    let mut seen: Vec<u32> = case.prompt_ids.clone();
    for &tok in &t.tokens {
        assert!(!seen.contains(&tok), "token {tok} repeated: {:?}", t.tokens);
        seen.push(tok);
    }
}

#[test]
fn a_stop_string_ends_generation_and_is_never_streamed() {
    let case = &reference("dyn_xnnpack").cases[1];
    let mut runner = open("dyn_xnnpack");
    let full = runner
        .tokenizer()
        .unwrap()
        .decode(&case.greedy_ids)
        .unwrap();
    // A stop string from the middle of the reference continuation.
    let chars: Vec<(usize, char)> = full.char_indices().collect();
    let (start, _) = chars[chars.len() / 2];
    let end = chars
        .get(chars.len() / 2 + 3)
        .map_or(full.len(), |&(i, _)| i);
    let stop = full[start..end].to_string();
    let first = full.find(&stop).unwrap();
    let config = GenerationConfig {
        stop_strings: vec![stop.clone()],
        ..greedy(case.greedy_ids.len() as i32)
    };
    let (t, stats) = generate_ids(&mut runner, &case.prompt_ids, &config);
    assert_eq!(
        stats.stop_reason,
        StopReason::StopString,
        "stop {stop:?} in {full:?}"
    );
    assert_eq!(t.text, full[..first], "stop {stop:?}");
    assert!(t.tokens.len() < case.greedy_ids.len());
}

/// Rewinding to a position and generating again equals a fresh run over the same tokens.
fn check_rewind(fixture: &str) {
    let cases = reference(fixture).cases;
    let (a, b, c) = (
        &cases[0].prompt_ids,
        &cases[3].prompt_ids[1..],
        &cases[4].prompt_ids[1..],
    );
    let mut runner = open(fixture);
    let (turn1, _) = generate_ids(&mut runner, a, &greedy(4));
    let keep = runner.position();
    generate_ids(&mut runner, b, &greedy(6));
    runner.rewind(keep).unwrap();
    assert_eq!(runner.position(), keep);
    let (after_rewind, _) = generate_ids(&mut runner, c, &greedy(8));

    runner.reset().unwrap();
    let mut fresh = a.clone();
    fresh.extend(&turn1.tokens);
    fresh.extend(c);
    let (once, _) = generate_ids(&mut runner, &fresh, &greedy(8));
    assert_eq!(after_rewind.tokens, once.tokens, "{fixture}");
}

#[test]
fn rewind_then_generate_equals_a_fresh_run_over_the_same_tokens() {
    for fixture in [
        "dyn_xnnpack",
        "static_xnnpack",
        "no_kv_cache",
        "static_attention",
    ] {
        check_rewind(fixture);
    }
}

#[test]
fn rewind_past_the_position_is_an_error_and_changes_nothing() {
    let case = &reference("dyn_xnnpack").cases[0];
    let mut runner = open("dyn_xnnpack");
    generate_ids(&mut runner, &case.prompt_ids, &greedy(3));
    let position = runner.position();
    let err = runner.rewind(position + 1).expect_err("past the end");
    assert!(matches!(err, etllm::Error::InvalidArgument(_)), "{err}");
    assert_eq!(runner.position(), position);
}

#[test]
fn warmup_loads_runs_and_leaves_an_empty_conversation() {
    let case = &reference("dyn_xnnpack").cases[0];
    let mut runner = etllm::Runner::new(
        model_path("dyn_xnnpack"),
        tokenizer_path(),
        Default::default(),
    );
    runner.warmup().unwrap();
    assert!(runner.is_loaded());
    assert_eq!(runner.position(), 0);
    assert_matches_reference(&mut runner, case);
}

/// Forbids one token by setting its logit to -inf.
struct Ban(u32);

impl etllm::sampler::SamplerPlugin for Ban {
    fn apply(&mut self, logits: &mut [f32], _: &[u32]) -> etllm::Result<Option<u32>> {
        logits[self.0 as usize] = f32::NEG_INFINITY;
        Ok(None)
    }
}

#[test]
fn a_sampler_plugin_can_edit_the_logits() {
    let case = &reference("dyn_xnnpack").cases[0];
    let (best, second) = (case.first_logits_top[0].0, case.first_logits_top[1].0);
    assert_eq!(best, case.greedy_ids[0]);
    let mut runner = open("dyn_xnnpack");
    runner.set_sampler_plugin(Some(Box::new(Ban(best))));
    let (t, _) = generate_ids(&mut runner, &case.prompt_ids, &greedy(1));
    // With the greedy choice banned, eager PyTorch's second choice wins.
    assert_eq!(t.tokens, vec![second]);
    runner.set_sampler_plugin(None);
    runner.reset().unwrap();
    assert_matches_reference(&mut runner, case);
}

/// Always picks the same token; fails on request.
struct Fixed(u32, bool);

impl etllm::sampler::SamplerPlugin for Fixed {
    fn apply(&mut self, _: &mut [f32], _: &[u32]) -> etllm::Result<Option<u32>> {
        if self.1 {
            return Err(etllm::Error::Sampler("plugin refused".into()));
        }
        Ok(Some(self.0))
    }
}

#[test]
fn a_sampler_plugin_can_pick_the_token_or_fail() {
    let case = &reference("dyn_xnnpack").cases[0];
    let mut runner = open("dyn_xnnpack");
    runner.set_sampler_plugin(Some(Box::new(Fixed(42, false))));
    let (t, _) = generate_ids(&mut runner, &case.prompt_ids, &greedy(5));
    assert_eq!(t.tokens, vec![42; 5]);
    runner.reset().unwrap();
    runner.set_sampler_plugin(Some(Box::new(Fixed(42, true))));
    let err = runner
        .generate_from_ids(
            &case.prompt_ids,
            &greedy(5),
            |_| ControlFlow::Continue(()),
            |_| {},
        )
        .expect_err("the plugin fails");
    assert!(err.to_string().contains("plugin refused"), "{err}");
    assert_eq!(runner.position(), 0);
    runner.set_sampler_plugin(Some(Box::new(Fixed(9999, false))));
    let err = runner
        .generate_from_ids(
            &case.prompt_ids,
            &greedy(5),
            |_| ControlFlow::Continue(()),
            |_| {},
        )
        .expect_err("token outside the vocabulary");
    assert!(matches!(err, etllm::Error::Sampler(_)), "{err}");
}
