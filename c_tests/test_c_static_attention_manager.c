/* The static-attention KV-cache manager written in C (examples/c/static_attention_manager.c),
 * plugged in through etllm_runner_options.io_manager, generates exactly what EtLlm's
 * built-in static-attention manager generates on tests/fixtures/static_attention, and
 * matches the fixture's references: the eager PyTorch greedy ids while the sequence fits in
 * the cache, and the spec's reference driver (static_driver_greedy_ids) past it. */
#include <stdio.h>
#include <string.h>

#include "manager_support.h"
#include "static_attention_manager.h"

#define MODEL "static_attention"

/* Tokens 0..17 of the long case still have full attention (last input position <= 64). */
#define LONG_CASE_FULL_ATTENTION_TOKENS 18

static collector got, want;

static etllm_runner *open_c_manager(void) {
  etllm_io_manager manager = example_static_attention_manager();
  return open_runner_with(MODEL, &manager);
}

/* Both runners generate `max_new` tokens from `ids`; their ids must be equal. Returns them
 * in `got` (C manager) and `want` (built-in). */
static void same_as_builtin(const char *what, etllm_runner *c_runner, etllm_runner *builtin,
                            const uint32_t *ids, size_t num_ids, int32_t max_new) {
  greedy_ids(builtin, ids, num_ids, max_new, &want);
  greedy_ids(c_runner, ids, num_ids, max_new, &got);
  check_same_ids(what, got.ids, got.num_ids, want.ids, want.num_ids);
}

/* The C manager's greedy ids for reference case `name` equal the built-in manager's, for
 * as many tokens as the reference has (24; 100 for the long case, past the cache). */
static void matches_builtin(const char *name) {
  const etllm_ref_case *ref = ref_case_named(ref_model(MODEL), name);
  etllm_runner *c_runner = open_c_manager();
  etllm_runner *builtin = open_runner_with(MODEL, NULL);
  same_as_builtin(name, c_runner, builtin, ref->prompt_ids, ref->num_prompt_ids,
                  (int32_t)ref->num_greedy_ids);
  CHECK(got.num_ids == ref->num_greedy_ids);
  etllm_runner_free(c_runner);
  etllm_runner_free(builtin);
}

/* Within the cache, the C manager reproduces eager PyTorch's greedy ids. */
static void matches_eager_reference(const char *name) {
  const etllm_ref_case *ref = ref_case_named(ref_model(MODEL), name);
  CHECK_MSG(!ref->beyond_cache, "case %s goes past the cache: see long_case_* instead", name);
  etllm_runner *runner = open_c_manager();
  greedy_ids(runner, ref->prompt_ids, ref->num_prompt_ids, (int32_t)ref->num_greedy_ids, &got);
  check_same_ids(name, got.ids, got.num_ids, ref->greedy_ids, ref->num_greedy_ids);
  etllm_runner_free(runner);
}

static const etllm_ref_case *long_case(void) {
  const etllm_ref_case *ref = ref_case_named(ref_model(MODEL), "long");
  CHECK(ref->beyond_cache && ref->static_driver_greedy_ids != NULL);
  return ref;
}

/* Past the cache (48 + 100 positions, cache 64), the sliding window gives exactly the
 * fixture spec's reference driver ids. */
static void long_case_matches_static_driver(const char *arg) {
  (void)arg;
  const etllm_ref_case *ref = long_case();
  etllm_runner *runner = open_c_manager();
  greedy_ids(runner, ref->prompt_ids, ref->num_prompt_ids,
             (int32_t)ref->num_static_driver_greedy_ids, &got);
  check_same_ids("long (static driver)", got.ids, got.num_ids, ref->static_driver_greedy_ids,
                 ref->num_static_driver_greedy_ids);
  etllm_runner_free(runner);
}

/* The long case's tokens that still see the whole sequence equal eager PyTorch's. */
static void long_case_matches_eager_while_within_cache(const char *arg) {
  (void)arg;
  const etllm_ref_case *ref = long_case();
  etllm_runner *runner = open_c_manager();
  greedy_ids(runner, ref->prompt_ids, ref->num_prompt_ids, LONG_CASE_FULL_ATTENTION_TOKENS, &got);
  check_same_ids("long (eager, full attention)", got.ids, got.num_ids, ref->greedy_ids,
                 LONG_CASE_FULL_ATTENTION_TOKENS);
  etllm_runner_free(runner);
}

/* One runner, every case in turn with etllm_runner_reset between them (the caches keep
 * the previous case's rows, hidden by the mask): every case still matches its reference. */
static void reset_reuses_runner(const char *arg) {
  (void)arg;
  const etllm_ref_model *m = ref_model(MODEL);
  etllm_runner *runner = open_c_manager();
  for (int round = 0; round < 2; round++) {
    for (size_t k = 0; k < m->num_cases; k++) {
      const etllm_ref_case *ref = &m->cases[k];
      const uint32_t *ids = ref->beyond_cache ? ref->static_driver_greedy_ids : ref->greedy_ids;
      const size_t n = ref->beyond_cache ? ref->num_static_driver_greedy_ids : ref->num_greedy_ids;
      CHECK_OK(etllm_runner_reset(runner));
      greedy_ids(runner, ref->prompt_ids, ref->num_prompt_ids, (int32_t)n, &got);
      check_same_ids(ref->name, got.ids, got.num_ids, ids, n);
    }
  }
  etllm_runner_free(runner);
}

/* Three turns of one conversation (2 + 24, 6 + 24, 10 + 24 positions: the third prefill
 * starts at 56 and crosses the cache length), each equal to the built-in's. */
static void continues_conversation_like_builtin(const char *arg) {
  (void)arg;
  const etllm_ref_model *m = ref_model(MODEL);
  const char *turns[] = {"case0", "case4", "case2"};
  etllm_runner *c_runner = open_c_manager();
  etllm_runner *builtin = open_runner_with(MODEL, NULL);
  for (size_t t = 0; t < 3; t++) {
    const etllm_ref_case *ref = ref_case_named(m, turns[t]);
    char what[64];
    snprintf(what, sizeof what, "turn %zu (%s)", t + 1, turns[t]);
    same_as_builtin(what, c_runner, builtin, ref->prompt_ids, ref->num_prompt_ids, 24);
    int64_t c_pos = -1, builtin_pos = -2;
    CHECK_OK(etllm_runner_position(c_runner, &c_pos));
    CHECK_OK(etllm_runner_position(builtin, &builtin_pos));
    CHECK_MSG(c_pos == builtin_pos, "turn %zu: position %lld, built-in %lld", t + 1,
              (long long)c_pos, (long long)builtin_pos);
  }
  etllm_runner_free(c_runner);
  etllm_runner_free(builtin);
}

/* A 90-token prompt (more than the 64 cache slots): the prefill chunks wrap the ring
 * buffer, and generation goes on like the built-in's. */
static void long_prompt_wraps_ring_like_builtin(const char *arg) {
  (void)arg;
  const etllm_ref_model *m = ref_model(MODEL);
  uint32_t prompt[90];
  size_t n = 0;
  for (size_t k = 0; n < 90; k = (k + 1) % m->num_cases) {
    for (size_t i = 0; i < m->cases[k].num_prompt_ids && n < 90; i++) {
      prompt[n++] = m->cases[k].prompt_ids[i];
    }
  }
  etllm_runner *c_runner = open_c_manager();
  etllm_runner *builtin = open_runner_with(MODEL, NULL);
  same_as_builtin("90-token prompt", c_runner, builtin, prompt, n, 40);
  CHECK(got.num_ids == 40);
  etllm_runner_free(c_runner);
  etllm_runner_free(builtin);
}

/* Generating until the context is full: 208 tokens after the 48-token prompt reach the
 * RoPE table's 256 positions, the same tokens and the same stop as the built-in. */
static void fills_context_like_builtin(const char *arg) {
  (void)arg;
  const etllm_ref_case *ref = long_case();
  etllm_runner *c_runner = open_c_manager();
  etllm_runner *builtin = open_runner_with(MODEL, NULL);
  int64_t context = 0;
  CHECK_OK(etllm_runner_max_context_len(c_runner, &context));
  CHECK_MSG(context == 256, "max context %lld", (long long)context);
  etllm_generation_config config = greedy_config(-1);
  config.num_bos = 0;
  etllm_stats c_stats = etllm_stats_default(), builtin_stats = etllm_stats_default();
  memset(&got, 0, sizeof got);
  memset(&want, 0, sizeof want);
  CHECK_OK(etllm_runner_generate_tokens(builtin, ref->prompt_ids, ref->num_prompt_ids, &config,
                                        collect_token, NULL, &want, &builtin_stats));
  CHECK_OK(etllm_runner_generate_tokens(c_runner, ref->prompt_ids, ref->num_prompt_ids, &config,
                                        collect_token, NULL, &got, &c_stats));
  check_same_ids("to the end of the context", got.ids, got.num_ids, want.ids, want.num_ids);
  CHECK_MSG(got.num_ids == (size_t)context - ref->num_prompt_ids, "%zu tokens", got.num_ids);
  CHECK(c_stats.stop_reason == ETLLM_STOP_CONTEXT_FULL);
  CHECK(builtin_stats.stop_reason == ETLLM_STOP_CONTEXT_FULL);
  etllm_runner_free(c_runner);
  etllm_runner_free(builtin);
}

/* etllm_runner_prefill_tokens, then a generate with no prompt of its own, continue from
 * the prefilled text like the built-in. */
static void prefill_then_generate_like_builtin(const char *arg) {
  (void)arg;
  const etllm_ref_case *ref = ref_case_named(ref_model(MODEL), "case1");
  etllm_runner *runners[2] = {open_c_manager(), open_runner_with(MODEL, NULL)};
  collector *out[2] = {&got, &want};
  for (int r = 0; r < 2; r++) {
    etllm_generation_config config = greedy_config(24);
    config.num_bos = 0;
    CHECK_OK(etllm_runner_prefill_tokens(runners[r], ref->prompt_ids, ref->num_prompt_ids,
                                         &config, NULL));
    memset(out[r], 0, sizeof *out[r]);
    const uint32_t none[1] = {0};
    CHECK_OK(etllm_runner_generate_tokens(runners[r], none, 0, &config, collect_token, NULL,
                                          out[r], NULL));
  }
  check_same_ids("prefill then generate", got.ids, got.num_ids, want.ids, want.num_ids);
  check_same_ids("prefill then generate (eager)", got.ids, got.num_ids, ref->greedy_ids,
                 ref->num_greedy_ids);
  etllm_runner_free(runners[0]);
  etllm_runner_free(runners[1]);
}

/* Opening `model` with the C manager fails with ETLLM_ERR_IO_MANAGER and a message that
 * contains `expected`. */
static void check_refused(const char *model_path, const char *expected) {
  etllm_io_manager manager = example_static_attention_manager();
  etllm_runner_options options = etllm_runner_options_default();
  options.io_manager = &manager;
  etllm_runner *runner = NULL;
  CHECK_ERR(etllm_runner_open(model_path, TOKENIZER(), &options, &runner), ETLLM_ERR_IO_MANAGER);
  CHECK(runner == NULL);
  const char *message = etllm_last_error_message();
  CHECK_MSG(strstr(message, expected) != NULL, "message \"%s\" does not mention \"%s\"", message,
            expected);
}

/* A model whose KV cache lives inside it has no static-attention layout: load says which
 * constant method is missing. */
static void refuses_model_without_static_layout(const char *arg) {
  (void)arg;
  check_refused(fixture_model("dyn_xnnpack"), "constant method `cache_len`");
}

/* Two sessions over the C manager take turns (each switch sets one's caches aside through
 * the manager's save_state and brings the other's back through restore_state), and a
 * state saved through it restores into a session of another runner with another manager:
 * every continuation is eager PyTorch's. */
static void sessions_take_turns_and_restore_through_the_c_manager(const char *arg) {
  (void)arg;
  const etllm_ref_model *m = ref_model(MODEL);
  const etllm_ref_case *a = &m->cases[0], *b = &m->cases[1];
  CHECK(!a->beyond_cache && !b->beyond_cache && a->num_greedy_ids >= 8 && b->num_greedy_ids >= 8);
  etllm_runner *runner = open_c_manager();
  etllm_session *sa = open_session(runner), *sb = open_session(runner);
  uint32_t ids_a[8], ids_b[8];
  session_generate_ids(sa, a->prompt_ids, a->num_prompt_ids, 4, &got);
  memcpy(ids_a, got.ids, sizeof(uint32_t) * 4);
  session_generate_ids(sb, b->prompt_ids, b->num_prompt_ids, 4, &got);
  memcpy(ids_b, got.ids, sizeof(uint32_t) * 4);
  uint8_t *state = NULL;
  size_t len = 0;
  CHECK_OK(etllm_session_save_state(sa, NULL, 0, &state, &len));
  session_generate_ids(sa, NULL, 0, 4, &got);
  memcpy(ids_a + 4, got.ids, sizeof(uint32_t) * 4);
  session_generate_ids(sb, NULL, 0, 4, &got);
  memcpy(ids_b + 4, got.ids, sizeof(uint32_t) * 4);
  check_ids("a, taking turns", ids_a, 8, a->greedy_ids, 8);
  check_ids("b, taking turns", ids_b, 8, b->greedy_ids, 8);

  etllm_runner *other = open_c_manager();
  etllm_session *restored = open_session(other);
  CHECK_OK(etllm_session_load_state(restored, state, len, NULL, NULL));
  session_generate_ids(restored, NULL, 0, 4, &got);
  check_ids("a, restored in another runner", got.ids, got.num_ids, a->greedy_ids + 4, 4);

  etllm_buffer_free(state);
  etllm_session_free(sa);
  etllm_session_free(sb);
  etllm_session_free(restored);
  etllm_runner_free(runner);
  etllm_runner_free(other);
}

int main(int argc, char **argv) {
  static const test_case cases[] = {
      {"matches_builtin", matches_builtin},
      {"matches_eager_reference", matches_eager_reference},
      {"long_case_matches_static_driver", long_case_matches_static_driver},
      {"long_case_matches_eager_while_within_cache", long_case_matches_eager_while_within_cache},
      {"reset_reuses_runner", reset_reuses_runner},
      {"continues_conversation_like_builtin", continues_conversation_like_builtin},
      {"long_prompt_wraps_ring_like_builtin", long_prompt_wraps_ring_like_builtin},
      {"fills_context_like_builtin", fills_context_like_builtin},
      {"prefill_then_generate_like_builtin", prefill_then_generate_like_builtin},
      {"refuses_model_without_static_layout", refuses_model_without_static_layout},
      {"sessions_take_turns_and_restore_through_the_c_manager",
       sessions_take_turns_and_restore_through_the_c_manager},
  };
  return run_test_case(argc, argv, cases, NUM_CASES(cases));
}
