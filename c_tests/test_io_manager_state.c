/* Saved states of KV-cache managers written in C (etllm_io_manager.save_state and
 * restore_state, etllm_state_buffer): the example managers' states round-trip, a state
 * restored after another conversation took the model over continues token for token like
 * the run that never left, bad states are refused and leave the manager as it was, a
 * vtable of the older size (without the two callbacks) still loads, and one of the two
 * callbacks without the other is refused.
 *
 * The test calls the manager's callbacks itself, between the runner's calls, with buffers
 * of its own (etllm_state_buffer_new), as EtLlm does when it swaps a conversation out; it
 * rewinds the runner to the saved position by hand. */
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include "faulty_manager.h"
#include "kv_in_model_manager.h"
#include "manager_support.h"
#include "static_attention_manager.h"

#define STATIC_MODEL "static_attention"
#define KV_MODEL "dyn_xnnpack"
#define NEW_TOKENS 12
/* Where the example's state header (static_attention_manager.c) keeps the cache length:
 * after the tag, the version, the layer count and the head count. */
#define CACHE_LEN_AT (4 + 4 + 2 * 8)

static collector got, want, other;

/* The manager's state, saved through its own callback into a new buffer. */
static etllm_state_buffer *save(const etllm_io_manager *m) {
  etllm_state_buffer *buffer = NULL;
  CHECK_OK(etllm_state_buffer_new(&buffer));
  CHECK_MSG(m->save_state(m->user_data, buffer) == ETLLM_OK, "save_state failed");
  return buffer;
}

static void bytes_of(const etllm_state_buffer *buffer, const uint8_t **data, size_t *len) {
  CHECK_OK(etllm_state_buffer_data(buffer, data, len));
}

static etllm_status restore(const etllm_io_manager *m, const uint8_t *data, size_t len) {
  return m->restore_state(m->user_data, data, len);
}

/* Feeds `ids` without generating (the runner holds the last one back). */
static void prefill(etllm_runner *runner, const uint32_t *ids, size_t n) {
  etllm_generation_config config = greedy_config(1);
  config.num_bos = 0;
  CHECK_OK(etllm_runner_prefill_tokens(runner, ids, n, &config, NULL));
}

/* Another conversation as long as `ids`: reversed and shifted. */
static uint32_t *other_than(const uint32_t *ids, size_t n) {
  uint32_t *o = malloc(n * sizeof *o);
  CHECK(o != NULL);
  for (size_t i = 0; i < n; i++) o[i] = 3 + (ids[n - 1 - i] * 7) % 500;
  return o;
}

/* Prefills `ids`, saves the state and generates NEW_TOKENS (the reference); another
 * conversation of the same length then takes the manager and the model over; the runner
 * is rewound to the saved position and the state restored: the next tokens equal the
 * reference, and differ from the other conversation's. */
static void continues_after_another_conversation(const uint32_t *ids, size_t n) {
  etllm_io_manager manager = example_static_attention_manager();
  etllm_runner *runner = open_runner_with(STATIC_MODEL, &manager);
  prefill(runner, ids, n);
  etllm_state_buffer *state = save(&manager);
  greedy_ids(runner, NULL, 0, NEW_TOKENS, &want);
  CHECK(want.num_ids == NEW_TOKENS);

  uint32_t *o = other_than(ids, n);
  CHECK_OK(etllm_runner_reset(runner));
  prefill(runner, o, n);
  greedy_ids(runner, NULL, 0, NEW_TOKENS, &other);
  CHECK_OK(etllm_runner_reset(runner));
  prefill(runner, o, n);
  CHECK_OK(etllm_runner_rewind(runner, (int64_t)n - 1)); /* drops the held token */

  const uint8_t *data = NULL;
  size_t len = 0;
  bytes_of(state, &data, &len);
  CHECK(restore(&manager, data, len) == ETLLM_OK);
  greedy_ids(runner, &ids[n - 1], 1, NEW_TOKENS, &got);
  check_same_ids("after restore", got.ids, got.num_ids, want.ids, want.num_ids);
  CHECK_MSG(memcmp(other.ids, want.ids, sizeof want.ids[0] * NEW_TOKENS) != 0,
            "the other conversation must continue differently");
  free(o);
  etllm_state_buffer_free(state);
  etllm_runner_free(runner);
}

static void static_attention_state_continues_like_the_uninterrupted_run(const char *arg) {
  (void)arg;
  const etllm_ref_case *ref = ref_case_named(ref_model(STATIC_MODEL), "case2");
  continues_after_another_conversation(ref->prompt_ids, ref->num_prompt_ids);
}

/* The long case's prompt and 30 of its tokens: 77 positions in the 64-slot cache, so the
 * window has slid and the whole ring is the state. */
static void static_attention_state_past_the_cache_continues_like_the_uninterrupted_run(
    const char *arg) {
  (void)arg;
  const etllm_ref_case *ref = ref_case_named(ref_model(STATIC_MODEL), "long");
  uint32_t ids[48 + 30];
  CHECK(ref->num_prompt_ids == 48 && ref->num_greedy_ids >= 30);
  memcpy(ids, ref->prompt_ids, 48 * sizeof ids[0]);
  memcpy(ids + 48, ref->greedy_ids, 30 * sizeof ids[0]);
  continues_after_another_conversation(ids, 78);
}

/* Every state the manager must refuse leaves it as it was: after them, the conversation
 * goes on as it would have. */
static void static_attention_refuses_bad_states_and_keeps_its_own(const char *arg) {
  (void)arg;
  const etllm_ref_case *ref = ref_case_named(ref_model(STATIC_MODEL), "case2");
  etllm_io_manager manager = example_static_attention_manager();
  etllm_runner *runner = open_runner_with(STATIC_MODEL, &manager);
  prefill(runner, ref->prompt_ids, ref->num_prompt_ids);
  greedy_ids(runner, NULL, 0, NEW_TOKENS, &want);
  CHECK_OK(etllm_runner_reset(runner));
  prefill(runner, ref->prompt_ids, ref->num_prompt_ids);

  etllm_state_buffer *state = save(&manager);
  const uint8_t *data = NULL;
  size_t len = 0;
  bytes_of(state, &data, &len);
  uint8_t *bad = malloc(len + 1);
  CHECK(bad != NULL);
  for (size_t n = 0; n < len; n++) {
    CHECK_MSG(restore(&manager, data, n) == ETLLM_ERR_IO_MANAGER, "%zu of %zu bytes", n, len);
  }
  memcpy(bad, data, len);
  bad[len] = 0;
  CHECK(restore(&manager, bad, len + 1) == ETLLM_ERR_IO_MANAGER); /* a byte too many */
  bad[0] = 'X';
  CHECK(restore(&manager, bad, len) == ETLLM_ERR_IO_MANAGER); /* another tag */
  memcpy(bad, data, len);
  bad[4] = 2;
  CHECK(restore(&manager, bad, len) == ETLLM_ERR_IO_MANAGER); /* a newer version */
  memcpy(bad, data, len);
  bad[CACHE_LEN_AT] ^= 1;
  CHECK(restore(&manager, bad, len) == ETLLM_ERR_IO_MANAGER); /* another cache length */
  CHECK(restore(&manager, NULL, 0) == ETLLM_ERR_IO_MANAGER);
  static const uint8_t kv_state[8] = {'e', 'x', 'K', 'V', 1, 0, 0, 0};
  CHECK(restore(&manager, kv_state, sizeof kv_state) == ETLLM_ERR_IO_MANAGER);

  greedy_ids(runner, NULL, 0, NEW_TOKENS, &got);
  check_same_ids("after refused states", got.ids, got.num_ids, want.ids, want.num_ids);
  free(bad);
  etllm_state_buffer_free(state);
  etllm_runner_free(runner);
}

/* The KV-in-model example keeps nothing between steps: its state is a tag and a version,
 * which restore accepts; a static-attention state and garbage are refused; the
 * conversation goes on as it would have. */
static void kv_in_model_state_is_a_tag_that_restore_checks(const char *arg) {
  (void)arg;
  const etllm_ref_case *ref = ref_case_named(ref_model(STATIC_MODEL), "case2");
  etllm_io_manager sa = example_static_attention_manager();
  etllm_runner *sa_runner = open_runner_with(STATIC_MODEL, &sa);
  etllm_state_buffer *sa_state = save(&sa);

  etllm_io_manager manager = example_kv_in_model_manager();
  etllm_runner *runner = open_runner_with(KV_MODEL, &manager);
  prefill(runner, ref->prompt_ids, ref->num_prompt_ids);
  greedy_ids(runner, NULL, 0, NEW_TOKENS, &want);
  CHECK_OK(etllm_runner_reset(runner));
  prefill(runner, ref->prompt_ids, ref->num_prompt_ids);
  etllm_state_buffer *state = save(&manager);
  const uint8_t *data = NULL;
  size_t len = 0;
  bytes_of(state, &data, &len);
  CHECK(len == 8 && memcmp(data, "exKV\1\0\0\0", 8) == 0);
  CHECK(restore(&manager, data, len) == ETLLM_OK);
  bytes_of(sa_state, &data, &len);
  CHECK(restore(&manager, data, len) == ETLLM_ERR_IO_MANAGER);
  CHECK(restore(&manager, (const uint8_t *)"garbage!", 8) == ETLLM_ERR_IO_MANAGER);
  greedy_ids(runner, NULL, 0, NEW_TOKENS, &got);
  check_same_ids("after restore", got.ids, got.num_ids, want.ids, want.num_ids);
  etllm_state_buffer_free(state);
  etllm_state_buffer_free(sa_state);
  etllm_runner_free(runner);
  etllm_runner_free(sa_runner);
}

/* A caller built against the header before save_state existed: its struct_size ends at
 * destroy (whatever follows in memory is not read). It loads and generates the reference. */
static void older_struct_size_loads_and_generates(const char *arg) {
  (void)arg;
  const etllm_ref_case *ref = ref_case_named(ref_model(STATIC_MODEL), "case0");
  etllm_io_manager manager = example_static_attention_manager();
  manager.struct_size = (uint32_t)offsetof(etllm_io_manager, save_state);
  etllm_runner *runner = open_runner_with(STATIC_MODEL, &manager);
  greedy_ids(runner, ref->prompt_ids, ref->num_prompt_ids, (int32_t)ref->num_greedy_ids, &got);
  check_same_ids("old struct size", got.ids, got.num_ids, ref->greedy_ids, ref->num_greedy_ids);
  etllm_runner_free(runner);
}

/* save_state without restore_state (or the reverse) cannot work: opening the runner fails
 * with ETLLM_ERR_INVALID_ARGUMENT naming both, and the manager is destroyed once. */
static void one_state_callback_without_the_other_is_refused(const char *arg) {
  (void)arg;
  for (int missing = 0; missing < 2; missing++) {
    etllm_io_manager manager = faulty_manager(example_static_attention_manager(), NULL);
    CHECK(manager.save_state != NULL && manager.restore_state != NULL);
    if (missing == 0) {
      manager.restore_state = NULL;
    } else {
      manager.save_state = NULL;
    }
    etllm_runner_options options = etllm_runner_options_default();
    options.io_manager = &manager;
    etllm_runner *runner = NULL;
    CHECK_ERR(etllm_runner_open(fixture_model(STATIC_MODEL), TOKENIZER(), &options, &runner),
              ETLLM_ERR_INVALID_ARGUMENT);
    CHECK(runner == NULL);
    const char *message = etllm_last_error_message();
    CHECK_MSG(strstr(message, "save_state") && strstr(message, "restore_state"), "%s", message);
    CHECK_MSG(faulty_destroy_calls == missing + 1, "destroy ran %d times", faulty_destroy_calls);
  }
}

/* A buffer of one's own collects what is appended, in order; NULL arguments are errors. */
static void state_buffer_collects_appends(const char *arg) {
  (void)arg;
  etllm_state_buffer *buffer = NULL;
  CHECK_ERR(etllm_state_buffer_new(NULL), ETLLM_ERR_NULL_ARGUMENT);
  CHECK_OK(etllm_state_buffer_new(&buffer));
  const uint8_t *data = NULL;
  size_t len = 99;
  CHECK_OK(etllm_state_buffer_data(buffer, &data, &len));
  CHECK(len == 0);
  CHECK_OK(etllm_state_buffer_append(buffer, "head", 4));
  CHECK_OK(etllm_state_buffer_append(buffer, NULL, 0));
  CHECK_ERR(etllm_state_buffer_append(buffer, NULL, 1), ETLLM_ERR_NULL_ARGUMENT);
  CHECK_ERR(etllm_state_buffer_append(NULL, "x", 1), ETLLM_ERR_NULL_ARGUMENT);
  CHECK_OK(etllm_state_buffer_append(buffer, "|tail", 5));
  CHECK_OK(etllm_state_buffer_data(buffer, &data, &len));
  CHECK(len == 9 && memcmp(data, "head|tail", 9) == 0);
  CHECK_ERR(etllm_state_buffer_data(NULL, &data, &len), ETLLM_ERR_NULL_ARGUMENT);
  etllm_state_buffer_free(buffer);
  etllm_state_buffer_free(NULL);
}

int main(int argc, char **argv) {
  static const test_case cases[] = {
      {"static_attention_state_continues_like_the_uninterrupted_run",
       static_attention_state_continues_like_the_uninterrupted_run},
      {"static_attention_state_past_the_cache_continues_like_the_uninterrupted_run",
       static_attention_state_past_the_cache_continues_like_the_uninterrupted_run},
      {"static_attention_refuses_bad_states_and_keeps_its_own",
       static_attention_refuses_bad_states_and_keeps_its_own},
      {"kv_in_model_state_is_a_tag_that_restore_checks",
       kv_in_model_state_is_a_tag_that_restore_checks},
      {"older_struct_size_loads_and_generates", older_struct_size_loads_and_generates},
      {"one_state_callback_without_the_other_is_refused",
       one_state_callback_without_the_other_is_refused},
      {"state_buffer_collects_appends", state_buffer_collects_appends},
  };
  return run_test_case(argc, argv, cases, NUM_CASES(cases));
}
