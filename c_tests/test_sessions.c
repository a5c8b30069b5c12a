/* Sessions (etllm_session_*): conversations of their own over one loaded model, their saved
 * states and prefix reuse. Every continuation is checked against the eager-PyTorch greedy
 * reference of tests/fixtures/dyn_xnnpack/reference.json: a session that was set aside,
 * saved, restored (in the same runner or a freshly loaded one) or rewound must go on exactly
 * as the reference does. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "test_support.h"

/* Case `k` of the default model's reference. */
static const etllm_ref_case *ref_case(size_t k) {
  const etllm_ref_model *m = ref_model(DEFAULT_MODEL);
  CHECK(k < m->num_cases);
  return &m->cases[k];
}

/* The case with the longest prompt (most KV cache to set aside and restore). */
static const etllm_ref_case *long_case(void) {
  const etllm_ref_model *m = ref_model(DEFAULT_MODEL);
  const etllm_ref_case *best = &m->cases[0];
  for (size_t k = 1; k < m->num_cases; k++) {
    if (m->cases[k].num_prompt_ids > best->num_prompt_ids) best = &m->cases[k];
  }
  CHECK(best->num_prompt_ids > 8);
  return best;
}

/* The tokens `c` collected are the reference's greedy ids from index `from` on. */
static void check_continues(const char *what, const collector *c, const etllm_ref_case *ref,
                            size_t from) {
  CHECK_MSG(from + c->num_ids <= ref->num_greedy_ids, "%s: past the reference", what);
  check_ids(what, c->ids, c->num_ids, ref->greedy_ids + from, c->num_ids);
}

static int64_t position_of(const etllm_session *session) {
  int64_t pos = -1;
  CHECK_OK(etllm_session_position(session, &pos));
  return pos;
}

/* A session's state as bytes (etllm_session_save_state without user data). */
static uint8_t *save_state(const etllm_session *session, size_t *len) {
  uint8_t *state = NULL;
  *len = 0;
  CHECK_OK(etllm_session_save_state(session, NULL, 0, &state, len));
  CHECK(state != NULL && *len > 0);
  return state;
}

/* A temporary path for a state file (the file itself does not exist). */
static char *temp_state_path(void) {
  char *path = write_temp_file("", 0);
  CHECK(remove(path) == 0);
  return path;
}

/* Two sessions (and the runner's own conversation) take turns on one model: each switch
 * sets the other's KV cache aside and brings this one's back, and each conversation goes on
 * as the reference, as if it were alone. */
static void interleaved_sessions_match_reference(const char *arg) {
  (void)arg;
  const etllm_ref_case *a = long_case(), *b = ref_case(0);
  etllm_runner *runner = open_runner(DEFAULT_MODEL);
  etllm_session *sa = open_session(runner);
  etllm_session *sb = open_session(runner);
  static collector c;
  session_generate_ids(sa, a->prompt_ids, a->num_prompt_ids, 3, &c);
  check_continues("a, turn 1", &c, a, 0);
  session_generate_ids(sb, b->prompt_ids, b->num_prompt_ids, 3, &c);
  check_continues("b, turn 1", &c, b, 0);
  session_generate_ids(sa, NULL, 0, 3, &c);
  check_continues("a, turn 2", &c, a, 3);

  memset(&c, 0, sizeof c);
  etllm_generation_config config = greedy_config(4);
  CHECK_OK(etllm_runner_generate_tokens(runner, a->prompt_ids, a->num_prompt_ids, &config,
                                        collect_token, NULL, &c, NULL));
  check_continues("the runner's own conversation", &c, a, 0);

  session_generate_ids(sb, NULL, 0, 3, &c);
  check_continues("b, turn 2", &c, b, 3);
  session_generate_ids(sa, NULL, 0, 2, &c);
  check_continues("a, turn 3", &c, a, 6);

  /* A session's tokens: its prompt, then every token it generated. */
  CHECK(position_of(sa) == (int64_t)(a->num_prompt_ids + 8));
  uint32_t ids[128];
  size_t n = session_tokens(sa, ids, 128);
  CHECK(n == a->num_prompt_ids + 8);
  check_ids("a's tokens: the prompt", ids, a->num_prompt_ids, a->prompt_ids, a->num_prompt_ids);
  check_ids("a's tokens: the generated ones", ids + a->num_prompt_ids, 8, a->greedy_ids, 8);
  /* A buffer too small gets what fits, and the count of all. */
  uint32_t first[2] = {0, 0};
  size_t count = 0;
  CHECK_OK(etllm_session_tokens(sb, first, 2, &count));
  CHECK(count == b->num_prompt_ids + 6);
  CHECK(first[0] == b->prompt_ids[0] && first[1] == b->prompt_ids[1]);
  count = 0;
  CHECK_OK(etllm_session_tokens(sb, NULL, 0, &count));
  CHECK(count == b->num_prompt_ids + 6);

  etllm_session_free(sa);
  etllm_session_free(sb);
  etllm_runner_free(runner);
}

/* A state saved mid-prompt is restored into a session of a second, freshly loaded runner
 * (as another process would), which continues with the reference tokens; the first session,
 * moved on in between, goes back to it too. */
static void saved_state_continues_in_another_runner(const char *arg) {
  (void)arg;
  const etllm_ref_case *ref = long_case();
  const size_t n_prompt = ref->num_prompt_ids;
  const uint32_t *last = ref->prompt_ids + n_prompt - 1;
  etllm_runner *runner = open_runner(DEFAULT_MODEL);
  etllm_session *session = open_session(runner);
  etllm_generation_config config = greedy_config(1);
  etllm_stats stats = etllm_stats_default();
  CHECK_OK(etllm_session_prefill_tokens(session, ref->prompt_ids, n_prompt - 1, &config, &stats));
  CHECK(stats.num_prompt_tokens == n_prompt - 1);
  size_t len = 0;
  uint8_t *state = save_state(session, &len);

  /* The first session moves on... */
  static collector c;
  session_generate_ids(session, last, 1, 8, &c);
  check_continues("before restoring", &c, ref, 0);

  /* ...a second runner's session takes the state... */
  etllm_runner *fresh = open_runner(DEFAULT_MODEL);
  etllm_session *restored = open_session(fresh);
  uint8_t *user_data = NULL;
  size_t user_data_len = 99;
  CHECK_OK(etllm_session_load_state(restored, state, len, &user_data, &user_data_len));
  CHECK(user_data != NULL); /* an empty buffer, still freed by the caller */
  CHECK(user_data_len == 0);
  etllm_buffer_free(user_data);
  CHECK(position_of(restored) == (int64_t)(n_prompt - 1));
  uint32_t ids[128];
  size_t n = session_tokens(restored, ids, 128);
  check_ids("the restored tokens", ids, n, ref->prompt_ids, n_prompt - 1);
  session_generate_ids(restored, last, 1, 8, &c);
  check_continues("restored in a second runner", &c, ref, 0);

  /* ...and the first session goes back to where it was saved (user data ignored: NULL). */
  CHECK_OK(etllm_session_load_state(session, state, len, NULL, NULL));
  CHECK(position_of(session) == (int64_t)(n_prompt - 1));
  session_generate_ids(session, last, 1, 8, &c);
  check_continues("restored in the same session", &c, ref, 0);

  etllm_buffer_free(state);
  etllm_session_free(restored);
  etllm_runner_free(fresh);
  etllm_session_free(session);
  etllm_runner_free(runner);
}

/* A state file carries its user data (any bytes, a NUL included) to a session of another
 * runner, which continues the conversation; a missing file is ETLLM_ERR_FILE_ACCESS. */
static void state_file_round_trips_user_data(const char *arg) {
  (void)arg;
  const etllm_ref_case *ref = long_case();
  static const uint8_t app_data[] = {'c', 'h', 'a', 't', 0, 0xff, '{', '}', '\n'};
  char *path = temp_state_path();
  etllm_runner *runner = open_runner(DEFAULT_MODEL);
  etllm_session *session = open_session(runner);
  static collector c;
  session_generate_ids(session, ref->prompt_ids, ref->num_prompt_ids, 4, &c);
  check_continues("first turn", &c, ref, 0);
  CHECK_OK(etllm_session_save_state_file(session, path, app_data, sizeof app_data));

  etllm_runner *fresh = open_runner(DEFAULT_MODEL);
  etllm_session *restored = open_session(fresh);
  uint8_t *user_data = NULL;
  size_t user_data_len = 0;
  CHECK_OK(etllm_session_load_state_file(restored, path, &user_data, &user_data_len));
  CHECK(user_data_len == sizeof app_data);
  CHECK(memcmp(user_data, app_data, sizeof app_data) == 0);
  etllm_buffer_free(user_data);
  uint32_t want[128], got[128];
  size_t n_want = session_tokens(session, want, 128);
  size_t n_got = session_tokens(restored, got, 128);
  check_ids("the restored tokens", got, n_got, want, n_want);
  session_generate_ids(restored, NULL, 0, 4, &c);
  check_continues("restored from the file", &c, ref, 4);

  /* The file holds what etllm_session_load_state takes as bytes. */
  size_t file_len = 0;
  uint8_t *bytes = read_file(path, &file_len);
  user_data = NULL;
  CHECK_OK(etllm_session_load_state(restored, bytes, file_len, &user_data, &user_data_len));
  CHECK(user_data_len == sizeof app_data && memcmp(user_data, app_data, sizeof app_data) == 0);
  etllm_buffer_free(user_data);
  session_generate_ids(restored, NULL, 0, 4, &c);
  check_continues("restored from the file's bytes", &c, ref, 4);

  /* No such file, no such folder: file errors, and the session is as it was. */
  const int64_t before = position_of(restored);
  CHECK(remove(path) == 0);
  user_data = bytes; /* any non-NULL value: a failure sets it to NULL */
  CHECK_ERR(etllm_session_load_state_file(restored, path, &user_data, NULL),
            ETLLM_ERR_FILE_ACCESS);
  CHECK(user_data == NULL);
  char in_missing_folder[4096];
  snprintf(in_missing_folder, sizeof in_missing_folder, "%s/x.state", path);
  CHECK_ERR(etllm_session_save_state_file(restored, in_missing_folder, NULL, 0),
            ETLLM_ERR_FILE_ACCESS);
  CHECK(position_of(restored) == before);
  remove_temp_file(path);
  free(bytes);

  etllm_session_free(restored);
  etllm_runner_free(fresh);
  etllm_session_free(session);
  etllm_runner_free(runner);
}

/* A truncated, corrupt, foreign or non-state is ETLLM_ERR_INVALID_STATE, as bytes or as a
 * file; the session keeps its own state and continues with the reference tokens. */
static void bad_states_are_invalid_state(const char *arg) {
  (void)arg;
  const etllm_ref_case *ref = long_case();
  static collector c;

  /* A state of another model (same vocabulary, another export). */
  etllm_runner *other = open_runner("dyn_portable");
  etllm_session *foreign_session = open_session(other);
  session_generate_ids(foreign_session, ref->prompt_ids, ref->num_prompt_ids, 2, &c);
  size_t foreign_len = 0;
  uint8_t *foreign = save_state(foreign_session, &foreign_len);
  etllm_session_free(foreign_session);
  etllm_runner_free(other);

  etllm_runner *runner = open_runner(DEFAULT_MODEL);
  etllm_session *session = open_session(runner);
  session_generate_ids(session, ref->prompt_ids, ref->num_prompt_ids, 3, &c);
  check_continues("first turn", &c, ref, 0);
  size_t len = 0;
  uint8_t *good = save_state(session, &len);
  uint8_t *flipped = malloc(len);
  CHECK(flipped != NULL);
  memcpy(flipped, good, len);
  flipped[len / 2] ^= 1;
  static const char not_a_state[] = "hello, world";
  const struct {
    const char *what;
    const uint8_t *bytes;
    size_t len;
  } bad[] = {
      {"truncated", good, len / 3},
      {"one byte short", good, len - 1},
      {"a flipped bit", flipped, len},
      {"not a state", (const uint8_t *)not_a_state, sizeof not_a_state - 1},
      {"empty", NULL, 0},
      {"another model's", foreign, foreign_len},
  };
  const int64_t before = position_of(session);
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    uint8_t *user_data = (uint8_t *)good; /* any non-NULL value: a failure sets it to NULL */
    size_t user_data_len = 0;
    etllm_status s =
        etllm_session_load_state(session, bad[i].bytes, bad[i].len, &user_data, &user_data_len);
    CHECK_MSG(s == ETLLM_ERR_INVALID_STATE, "%s state: %s (%s)", bad[i].what,
              etllm_status_name((int32_t)s), etllm_last_error_message());
    CHECK(etllm_last_error_message()[0] != '\0');
    CHECK_MSG(user_data == NULL, "%s state: user data not cleared", bad[i].what);
    CHECK_MSG(position_of(session) == before, "%s state: the position changed", bad[i].what);
  }
  /* The same through a file. */
  char *path = write_temp_file(flipped, len);
  CHECK_ERR(etllm_session_load_state_file(session, path, NULL, NULL), ETLLM_ERR_INVALID_STATE);
  remove_temp_file(path);
  CHECK(position_of(session) == before);

  session_generate_ids(session, NULL, 0, 3, &c);
  check_continues("after the refused states", &c, ref, 3);

  free(flipped);
  etllm_buffer_free(good);
  etllm_buffer_free(foreign);
  etllm_session_free(session);
  etllm_runner_free(runner);
}

/* reuse_prefix: the prompt is the whole conversation; the tokens the session holds are not
 * fed again, etllm_stats.reused_prompt_tokens counts them, and the continuation is the
 * reference's. A prompt that diverges keeps the common prefix only. */
static void reuse_prefix_reports_reused_tokens(const char *arg) {
  (void)arg;
  /* Two reference prompts that share their first tokens, the second one longer. */
  const etllm_ref_model *m = ref_model(DEFAULT_MODEL);
  const etllm_ref_case *a = NULL, *b = NULL;
  size_t common = 0;
  for (size_t i = 0; i < m->num_cases && b == NULL; i++) {
    for (size_t j = 0; j < m->num_cases && b == NULL; j++) {
      const etllm_ref_case *x = &m->cases[i], *y = &m->cases[j];
      if (i == j || y->num_prompt_ids <= x->num_prompt_ids) continue;
      size_t k = 0;
      while (k < x->num_prompt_ids && x->prompt_ids[k] == y->prompt_ids[k]) k++;
      if (k >= 2) {
        a = x;
        b = y;
        common = k;
      }
    }
  }
  CHECK_MSG(b != NULL, "no two reference prompts share two tokens");

  etllm_runner *runner = open_runner(DEFAULT_MODEL);
  etllm_session *session = open_session(runner);
  etllm_generation_config config = greedy_config(4);
  config.reuse_prefix = true;
  static collector c;
  memset(&c, 0, sizeof c);
  etllm_stats stats = etllm_stats_default();
  CHECK_OK(etllm_session_generate_tokens(session, a->prompt_ids, a->num_prompt_ids, &config,
                                         collect_token, collect_stats, &c, &stats));
  check_continues("first call", &c, a, 0);
  CHECK(stats.reused_prompt_tokens == 0);
  CHECK(stats.num_prompt_tokens == a->num_prompt_ids);

  /* The whole conversation again, with the reply: only its last token is fed. */
  uint32_t history[128];
  const size_t n_history = a->num_prompt_ids + 4;
  memcpy(history, a->prompt_ids, a->num_prompt_ids * sizeof history[0]);
  memcpy(history + a->num_prompt_ids, c.ids, 4 * sizeof history[0]);
  memset(&c, 0, sizeof c);
  stats = etllm_stats_default();
  CHECK_OK(etllm_session_generate_tokens(session, history, n_history, &config, collect_token,
                                         collect_stats, &c, &stats));
  check_continues("the conversation resent", &c, a, 4);
  CHECK(stats.num_prompt_tokens == n_history);
  CHECK_MSG(stats.reused_prompt_tokens == n_history - 1, "reused %llu of %zu",
            (unsigned long long)stats.reused_prompt_tokens, n_history);
  CHECK(c.num_stats_calls == 1 && c.stats.reused_prompt_tokens == n_history - 1);

  /* Another prompt with the same start: the common prefix stays, the rest is fed. */
  memset(&c, 0, sizeof c);
  stats = etllm_stats_default();
  config.max_new_tokens = 5;
  CHECK_OK(etllm_session_generate_tokens(session, b->prompt_ids, b->num_prompt_ids, &config,
                                         collect_token, NULL, &c, &stats));
  check_continues("a prompt that diverges", &c, b, 0);
  CHECK_MSG(stats.reused_prompt_tokens == common, "reused %llu, the prompts share %zu",
            (unsigned long long)stats.reused_prompt_tokens, common);
  uint32_t ids[128];
  size_t n = session_tokens(session, ids, 128);
  CHECK(n == b->num_prompt_ids + 5);
  check_ids("the tokens after divergence", ids, b->num_prompt_ids, b->prompt_ids,
            b->num_prompt_ids);

  /* Without reuse_prefix the prompt continues the conversation, and nothing is reused. */
  config.reuse_prefix = false;
  stats = etllm_stats_default();
  CHECK_OK(etllm_session_generate_tokens(session, b->prompt_ids, 1, &config, NULL, NULL, NULL,
                                         &stats));
  CHECK(stats.reused_prompt_tokens == 0);
  CHECK(position_of(session) == (int64_t)(b->num_prompt_ids + 5 + 1 + 5));

  etllm_session_free(session);
  etllm_runner_free(runner);
}

/* Freeing the runner keeps the model loaded for its sessions, which go on working. */
static void session_outlives_runner(const char *arg) {
  (void)arg;
  const etllm_ref_case *a = ref_case(0), *b = long_case();
  etllm_runner *runner = open_runner(DEFAULT_MODEL);
  etllm_session *sa = open_session(runner);
  etllm_session *sb = open_session(runner);
  static collector c;
  session_generate_ids(sb, b->prompt_ids, b->num_prompt_ids, 3, &c);
  etllm_runner_free(runner);

  /* From text, BOS added, with the stats callback and out_stats. */
  memset(&c, 0, sizeof c);
  etllm_generation_config config = greedy_config(6);
  config.num_bos = 1;
  etllm_stats stats = etllm_stats_default();
  CHECK_OK(etllm_session_generate(sa, a->prompt, &config, collect_token, collect_stats, &c,
                                  &stats));
  check_continues("a, after the runner was freed", &c, a, 0);
  CHECK(c.num_ids == 6 && stats.num_generated_tokens == 6);
  CHECK(stats.num_prompt_tokens == a->num_prompt_ids);
  CHECK(c.num_stats_calls == 1 && c.stats.num_generated_tokens == 6);
  session_generate_ids(sb, NULL, 0, 3, &c);
  check_continues("b, after the runner was freed", &c, b, 3);

  /* States move between them as before. */
  size_t len = 0;
  uint8_t *state = save_state(sb, &len);
  CHECK_OK(etllm_session_load_state(sa, state, len, NULL, NULL));
  etllm_buffer_free(state);
  etllm_session_free(sb);
  session_generate_ids(sa, NULL, 0, 3, &c);
  check_continues("b's state in a", &c, b, 6);
  etllm_session_free(sa);
}

/* Every pointer argument that must not be NULL is ETLLM_ERR_NULL_ARGUMENT, outputs are
 * cleared, and the session is usable afterwards. */
static void null_arguments(const char *arg) {
  (void)arg;
  const etllm_ref_case *ref = ref_case(0);
  etllm_runner *runner = open_runner(DEFAULT_MODEL);
  etllm_session *session = (etllm_session *)runner; /* any non-NULL value */
  CHECK_ERR(etllm_session_new(NULL, &session), ETLLM_ERR_NULL_ARGUMENT);
  CHECK(session == NULL);
  CHECK_ERR(etllm_session_new(runner, NULL), ETLLM_ERR_NULL_ARGUMENT);
  etllm_session_free(NULL);

  etllm_generation_config config = greedy_config(2);
  const uint32_t *ids = ref->prompt_ids;
  const size_t n = ref->num_prompt_ids;
  int64_t pos = 0;
  size_t count = 0;
  uint8_t *bytes = (uint8_t *)runner;
  size_t len = 7;
  const uint8_t data[1] = {0};
  CHECK_ERR(etllm_session_generate(NULL, "x", &config, NULL, NULL, NULL, NULL),
            ETLLM_ERR_NULL_ARGUMENT);
  CHECK_ERR(etllm_session_generate_tokens(NULL, ids, n, &config, NULL, NULL, NULL, NULL),
            ETLLM_ERR_NULL_ARGUMENT);
  CHECK_ERR(etllm_session_prefill(NULL, "x", &config, NULL), ETLLM_ERR_NULL_ARGUMENT);
  CHECK_ERR(etllm_session_prefill_tokens(NULL, ids, n, &config, NULL), ETLLM_ERR_NULL_ARGUMENT);
  CHECK_ERR(etllm_session_stop(NULL), ETLLM_ERR_NULL_ARGUMENT);
  CHECK_ERR(etllm_session_rewind(NULL, 0), ETLLM_ERR_NULL_ARGUMENT);
  CHECK_ERR(etllm_session_reset(NULL), ETLLM_ERR_NULL_ARGUMENT);
  CHECK_ERR(etllm_session_position(NULL, &pos), ETLLM_ERR_NULL_ARGUMENT);
  CHECK_ERR(etllm_session_tokens(NULL, NULL, 0, &count), ETLLM_ERR_NULL_ARGUMENT);
  CHECK_ERR(etllm_session_save_state(NULL, NULL, 0, &bytes, &len), ETLLM_ERR_NULL_ARGUMENT);
  CHECK(bytes == NULL && len == 0);
  bytes = (uint8_t *)runner;
  CHECK_ERR(etllm_session_load_state(NULL, data, 1, &bytes, &len), ETLLM_ERR_NULL_ARGUMENT);
  CHECK(bytes == NULL);
  CHECK_ERR(etllm_session_save_state_file(NULL, "x.state", NULL, 0), ETLLM_ERR_NULL_ARGUMENT);
  CHECK_ERR(etllm_session_load_state_file(NULL, "x.state", NULL, NULL), ETLLM_ERR_NULL_ARGUMENT);

  session = open_session(runner);
  static collector c;
  session_generate_ids(session, ids, n, 2, &c);
  CHECK_ERR(etllm_session_generate(session, NULL, &config, NULL, NULL, NULL, NULL),
            ETLLM_ERR_NULL_ARGUMENT);
  CHECK_ERR(etllm_session_generate_tokens(session, NULL, 1, &config, NULL, NULL, NULL, NULL),
            ETLLM_ERR_NULL_ARGUMENT);
  CHECK_ERR(etllm_session_prefill(session, NULL, &config, NULL), ETLLM_ERR_NULL_ARGUMENT);
  CHECK_ERR(etllm_session_prefill_tokens(session, NULL, 1, &config, NULL),
            ETLLM_ERR_NULL_ARGUMENT);
  CHECK_ERR(etllm_session_position(session, NULL), ETLLM_ERR_NULL_ARGUMENT);
  CHECK_ERR(etllm_session_tokens(session, NULL, 4, &count), ETLLM_ERR_NULL_ARGUMENT);
  CHECK_ERR(etllm_session_tokens(session, NULL, 0, NULL), ETLLM_ERR_NULL_ARGUMENT);
  CHECK_ERR(etllm_session_save_state(session, NULL, 0, NULL, &len), ETLLM_ERR_NULL_ARGUMENT);
  bytes = (uint8_t *)runner;
  CHECK_ERR(etllm_session_save_state(session, NULL, 0, &bytes, NULL), ETLLM_ERR_NULL_ARGUMENT);
  CHECK(bytes == NULL);
  CHECK_ERR(etllm_session_save_state(session, NULL, 3, &bytes, &len), ETLLM_ERR_NULL_ARGUMENT);
  CHECK(bytes == NULL && len == 0);
  CHECK_ERR(etllm_session_load_state(session, NULL, 5, NULL, NULL), ETLLM_ERR_NULL_ARGUMENT);
  CHECK_ERR(etllm_session_save_state_file(session, NULL, NULL, 0), ETLLM_ERR_NULL_ARGUMENT);
  CHECK_ERR(etllm_session_save_state_file(session, "x.state", NULL, 3), ETLLM_ERR_NULL_ARGUMENT);
  CHECK_ERR(etllm_session_load_state_file(session, NULL, NULL, NULL), ETLLM_ERR_NULL_ARGUMENT);

  /* None of that changed the conversation. */
  CHECK(position_of(session) == (int64_t)(n + 2));
  session_generate_ids(session, NULL, 0, 3, &c);
  check_continues("after the NULL arguments", &c, ref, 2);
  etllm_session_free(session);
  etllm_runner_free(runner);
}

/* What the token callback of session a's generate does with session b and the runner. */
typedef struct nested_calls {
  etllm_runner *runner;
  etllm_session *a, *b;
  const etllm_ref_case *ref;
  bool done;
  etllm_status status[8];
  bool message[8];
  uint8_t *state; /* b's saved state, set by the test */
  size_t state_len;
  uint8_t *out_state; /* what a refused save left in its output */
  collector c;
} nested_calls;

static int32_t call_other_session(void *user_data, const char *piece, size_t len,
                                  int64_t token_id) {
  nested_calls *t = user_data;
  collect_token(&t->c, piece, len, token_id);
  if (t->done) return 0;
  t->done = true;
  etllm_generation_config config = greedy_config(1);
  const uint32_t *ids = t->ref->prompt_ids;
  size_t i = 0;
#define NESTED(call)                                                  \
  do {                                                                \
    t->status[i] = (call);                                            \
    t->message[i] = etllm_last_error_message()[0] != '\0';            \
    i++;                                                              \
  } while (0)
  NESTED(etllm_session_generate_tokens(t->b, ids, 2, &config, NULL, NULL, NULL, NULL));
  NESTED(etllm_session_prefill_tokens(t->b, ids, 2, &config, NULL));
  NESTED(etllm_session_rewind(t->b, 1));
  size_t len_out = 0;
  t->out_state = (uint8_t *)t;
  NESTED(etllm_session_save_state(t->b, NULL, 0, &t->out_state, &len_out));
  NESTED(etllm_session_load_state(t->b, t->state, t->state_len, NULL, NULL));
  NESTED(etllm_runner_generate_tokens(t->runner, ids, 2, &config, NULL, NULL, NULL, NULL));
  /* The running session itself. */
  NESTED(etllm_session_generate_tokens(t->a, NULL, 0, &config, NULL, NULL, NULL, NULL));
  NESTED(etllm_session_rewind(t->a, 1));
#undef NESTED
  return 0;
}

/* A call on another session of the same model (or on the runner, or on the running session)
 * from inside a token callback is ETLLM_ERR_BUSY, where waiting would never end; the outer
 * generation and the other session's state are unaffected. */
static void call_from_callback_is_busy(const char *arg) {
  (void)arg;
  static nested_calls t;
  t.ref = long_case();
  t.runner = open_runner(DEFAULT_MODEL);
  t.a = open_session(t.runner);
  t.b = open_session(t.runner);
  static collector c;
  session_generate_ids(t.b, t.ref->prompt_ids, t.ref->num_prompt_ids, 2, &c);
  t.state = save_state(t.b, &t.state_len);

  etllm_generation_config config = greedy_config(5);
  etllm_stats stats = etllm_stats_default();
  CHECK_OK(etllm_session_generate_tokens(t.a, t.ref->prompt_ids, t.ref->num_prompt_ids, &config,
                                         call_other_session, NULL, &t, &stats));
  CHECK(t.done);
  for (size_t i = 0; i < sizeof t.status / sizeof t.status[0]; i++) {
    CHECK_MSG(t.status[i] == ETLLM_ERR_BUSY, "nested call %zu: %s", i,
              etllm_status_name((int32_t)t.status[i]));
    CHECK_MSG(t.message[i], "nested call %zu: no error message", i);
  }
  CHECK(t.out_state == NULL);
  /* The outer call went on, and its success cleared the thread's message. */
  CHECK(stats.num_generated_tokens == 5 && stats.stop_reason == ETLLM_STOP_LENGTH);
  CHECK(etllm_last_error_message()[0] == '\0');
  check_continues("the outer generation", &t.c, t.ref, 0);
  /* b is where it was: 2 tokens generated. */
  CHECK(position_of(t.b) == (int64_t)(t.ref->num_prompt_ids + 2));
  session_generate_ids(t.b, NULL, 0, 3, &c);
  check_continues("b afterwards", &c, t.ref, 2);
  session_generate_ids(t.a, NULL, 0, 3, &c);
  check_continues("a afterwards", &c, t.ref, 5);

  etllm_buffer_free(t.state);
  etllm_session_free(t.a);
  etllm_session_free(t.b);
  etllm_runner_free(t.runner);
}

typedef struct stopper {
  etllm_session *target;
  size_t at_token; /* 1-based */
  collector c;
} stopper;

static int32_t stop_session_at(void *user_data, const char *piece, size_t len, int64_t id) {
  stopper *s = user_data;
  collect_token(&s->c, piece, len, id);
  if (s->c.num_ids == s->at_token) CHECK_OK(etllm_session_stop(s->target));
  return 0; /* the stop request alone ends it */
}

/* etllm_session_stop from the token callback ends that session's generation after the
 * current token (ETLLM_STOP_REQUESTED); the conversation continues with the next call. A stop
 * of another session does not end this one, nor that session's next call. */
static void stop_from_callback_stops(const char *arg) {
  (void)arg;
  const etllm_ref_case *ref = long_case();
  etllm_runner *runner = open_runner(DEFAULT_MODEL);
  etllm_session *session = open_session(runner);
  etllm_session *other = open_session(runner);
  static stopper s;
  s.target = session;
  s.at_token = 3;
  etllm_generation_config config = greedy_config(10);
  etllm_stats stats = etllm_stats_default();
  CHECK_OK(etllm_session_generate_tokens(session, ref->prompt_ids, ref->num_prompt_ids, &config,
                                         stop_session_at, NULL, &s, &stats));
  CHECK_MSG(s.c.num_ids == 3, "%zu tokens after a stop at the third", s.c.num_ids);
  CHECK(stats.stop_reason == ETLLM_STOP_REQUESTED);
  CHECK(stats.num_generated_tokens == 3);
  check_continues("until the stop", &s.c, ref, 0);
  static collector c;
  session_generate_ids(session, NULL, 0, 4, &c);
  check_continues("the next call", &c, ref, 3);

  memset(&s, 0, sizeof s);
  s.target = other;
  s.at_token = 1;
  stats = etllm_stats_default();
  CHECK_OK(etllm_session_generate_tokens(session, NULL, 0, &config, stop_session_at, NULL, &s,
                                         &stats));
  CHECK(s.c.num_ids == 10 && stats.stop_reason == ETLLM_STOP_LENGTH);
  check_continues("a stop of another session", &s.c, ref, 7);
  session_generate_ids(other, ref->prompt_ids, ref->num_prompt_ids, 4, &c);
  check_continues("that session's next call", &c, ref, 0);

  etllm_session_free(session);
  etllm_session_free(other);
  etllm_runner_free(runner);
}

/* A prefilled prompt is continued by an empty one; rewind goes back to a position and the
 * same tokens come again; reset empties the session. */
static void prefill_rewind_and_reset(const char *arg) {
  (void)arg;
  const etllm_ref_case *ref = long_case();
  const int64_t n_prompt = (int64_t)ref->num_prompt_ids;
  etllm_runner *runner = open_runner(DEFAULT_MODEL);
  etllm_session *session = open_session(runner);
  etllm_session *other = open_session(runner);
  etllm_generation_config config = greedy_config(1);
  CHECK_OK(etllm_session_prefill_tokens(session, ref->prompt_ids, ref->num_prompt_ids, &config,
                                        NULL));
  CHECK(position_of(session) == n_prompt);
  static collector c;
  session_generate_ids(session, NULL, 0, 6, &c);
  check_continues("after the prefill", &c, ref, 0);

  /* Another session runs in between: the rewind brings this one's cache back first. */
  session_generate_ids(other, ref->prompt_ids, 2, 2, &c);
  CHECK_OK(etllm_session_rewind(session, n_prompt + 2));
  CHECK(position_of(session) == n_prompt + 2);
  session_generate_ids(session, ref->greedy_ids + 2, 1, 4, &c);
  check_continues("after rewinding", &c, ref, 3);
  CHECK_ERR(etllm_session_rewind(session, n_prompt + 100), ETLLM_ERR_INVALID_ARGUMENT);
  CHECK_ERR(etllm_session_rewind(session, -1), ETLLM_ERR_INVALID_ARGUMENT);
  CHECK(position_of(session) == n_prompt + 3 + 4);

  CHECK_OK(etllm_session_reset(session));
  CHECK(position_of(session) == 0);
  size_t count = 99;
  CHECK_OK(etllm_session_tokens(session, NULL, 0, &count));
  CHECK(count == 0);
  CHECK_ERR(etllm_session_generate_tokens(session, NULL, 0, &config, NULL, NULL, NULL, NULL),
            ETLLM_ERR_INVALID_ARGUMENT);
  session_generate_ids(session, ref->prompt_ids, ref->num_prompt_ids, 5, &c);
  check_continues("after a reset", &c, ref, 0);

  etllm_session_free(other);
  etllm_session_free(session);
  etllm_runner_free(runner);
}

int main(int argc, char **argv) {
  static const test_case cases[] = {
      {"interleaved_sessions_match_reference", interleaved_sessions_match_reference},
      {"saved_state_continues_in_another_runner", saved_state_continues_in_another_runner},
      {"state_file_round_trips_user_data", state_file_round_trips_user_data},
      {"bad_states_are_invalid_state", bad_states_are_invalid_state},
      {"reuse_prefix_reports_reused_tokens", reuse_prefix_reports_reused_tokens},
      {"session_outlives_runner", session_outlives_runner},
      {"null_arguments", null_arguments},
      {"call_from_callback_is_busy", call_from_callback_is_busy},
      {"stop_from_callback_stops", stop_from_callback_stops},
      {"prefill_rewind_and_reset", prefill_rewind_and_reset},
  };
  return run_test_case(argc, argv, cases, NUM_CASES(cases));
}
