/* Every bad input returns its own status and a non-empty etllm_last_error_message(), and
 * never crashes; a later successful call clears the message. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "test_support.h"

/* A non-NULL pointer that no runner lives at: a failing constructor must overwrite it. */
#define NOT_A_RUNNER ((etllm_runner *)(uintptr_t)0x1)

/* Both constructors must fail with `expected` for these arguments and leave *out NULL. */
static void check_open_fails(const char *model, const char *tokenizer,
                             const etllm_runner_options *options, etllm_status expected) {
  etllm_runner *runner = NOT_A_RUNNER;
  CHECK_ERR(etllm_runner_open(model, tokenizer, options, &runner), expected);
  CHECK(runner == NULL);
}

/* etllm_runner_new accepts paths it has not read yet; loading reports the problem, and the
 * runner stays unloaded (and can be freed). */
static void check_load_fails(const char *model, const char *tokenizer, etllm_status expected) {
  check_open_fails(model, tokenizer, NULL, expected);
  etllm_runner *runner = NULL;
  CHECK_OK(etllm_runner_new(model, tokenizer, NULL, &runner));
  CHECK_ERR(etllm_runner_load(runner), expected);
  bool loaded = true;
  CHECK_OK(etllm_runner_is_loaded(runner, &loaded));
  CHECK(!loaded);
  /* The first generate loads too, and fails the same way. */
  etllm_generation_config config = greedy_config(2);
  CHECK_ERR(etllm_runner_generate(runner, "The", &config, NULL, NULL, NULL, NULL), expected);
  etllm_runner_free(runner);
}

static void null_runner(const char *arg) {
  (void)arg;
  etllm_generation_config config = greedy_config(2);
  const uint32_t ids[] = {1, 2};
  int64_t i64 = 0;
  uint32_t u32 = 0;
  size_t count = 0;
  bool loaded = false;
  const etllm_status want = ETLLM_ERR_NULL_ARGUMENT;
  CHECK_ERR(etllm_runner_load(NULL), want);
  CHECK_ERR(etllm_runner_is_loaded(NULL, &loaded), want);
  CHECK_ERR(etllm_runner_generate(NULL, "The", &config, NULL, NULL, NULL, NULL), want);
  CHECK_ERR(etllm_runner_generate_tokens(NULL, ids, 2, &config, NULL, NULL, NULL, NULL), want);
  CHECK_ERR(etllm_runner_prefill(NULL, "The", &config, NULL), want);
  CHECK_ERR(etllm_runner_prefill_tokens(NULL, ids, 2, &config, NULL), want);
  CHECK_ERR(etllm_runner_stop(NULL), want);
  CHECK_ERR(etllm_runner_reset(NULL), want);
  CHECK_ERR(etllm_runner_max_context_len(NULL, &i64), want);
  CHECK_ERR(etllm_runner_max_seq_len(NULL, &i64), want);
  CHECK_ERR(etllm_runner_vocab_size(NULL, &i64), want);
  CHECK_ERR(etllm_runner_bos_id(NULL, &u32), want);
  CHECK_ERR(etllm_runner_eos_ids(NULL, NULL, 0, &count), want);
  CHECK_ERR(etllm_runner_position(NULL, &i64), want);
  etllm_runner_free(NULL); /* documented as a no-op */
}

static void null_paths(const char *arg) {
  (void)arg;
  const char *model = fixture_model(DEFAULT_MODEL);
  const char *tokenizer = TOKENIZER();
  etllm_runner *runner = NOT_A_RUNNER;
  CHECK_ERR(etllm_runner_new(NULL, tokenizer, NULL, &runner), ETLLM_ERR_NULL_ARGUMENT);
  CHECK(runner == NULL);
  runner = NOT_A_RUNNER;
  CHECK_ERR(etllm_runner_new(model, NULL, NULL, &runner), ETLLM_ERR_NULL_ARGUMENT);
  CHECK(runner == NULL);
  check_open_fails(NULL, tokenizer, NULL, ETLLM_ERR_NULL_ARGUMENT);
  check_open_fails(model, NULL, NULL, ETLLM_ERR_NULL_ARGUMENT);
}

static void null_out_pointer(const char *arg) {
  (void)arg;
  const char *model = fixture_model(DEFAULT_MODEL);
  const etllm_status want = ETLLM_ERR_NULL_ARGUMENT;
  CHECK_ERR(etllm_runner_new(model, TOKENIZER(), NULL, NULL), want);
  CHECK_ERR(etllm_runner_open(model, TOKENIZER(), NULL, NULL), want);
  etllm_runner *runner = open_runner(DEFAULT_MODEL);
  CHECK_ERR(etllm_runner_is_loaded(runner, NULL), want);
  CHECK_ERR(etllm_runner_max_context_len(runner, NULL), want);
  CHECK_ERR(etllm_runner_max_seq_len(runner, NULL), want);
  CHECK_ERR(etllm_runner_vocab_size(runner, NULL), want);
  CHECK_ERR(etllm_runner_bos_id(runner, NULL), want);
  CHECK_ERR(etllm_runner_eos_ids(runner, NULL, 0, NULL), want);
  CHECK_ERR(etllm_runner_position(runner, NULL), want);
  /* An array pointer that is NULL while its length says otherwise. */
  size_t count = 0;
  CHECK_ERR(etllm_runner_eos_ids(runner, NULL, 4, &count), want);
  etllm_generation_config config = greedy_config(2);
  CHECK_ERR(etllm_runner_generate_tokens(runner, NULL, 3, &config, NULL, NULL, NULL, NULL), want);
  CHECK_ERR(etllm_runner_prefill_tokens(runner, NULL, 3, &config, NULL), want);
  CHECK_ERR(etllm_runner_generate(runner, NULL, &config, NULL, NULL, NULL, NULL), want);
  CHECK_ERR(etllm_runner_prefill(runner, NULL, &config, NULL), want);
  config.num_stop_token_ids = 2; /* stop_token_ids stays NULL */
  CHECK_ERR(etllm_runner_generate(runner, "The", &config, NULL, NULL, NULL, NULL), want);
  etllm_stats stats = etllm_stats_default();
  CHECK_ERR(etllm_stats_to_json(&stats, NULL), want);
  char *json = NULL;
  CHECK_ERR(etllm_stats_to_json(NULL, &json), want);
  CHECK(json == NULL);
  etllm_runner_free(runner);
}

static void missing_model_file(const char *arg) {
  (void)arg;
  check_load_fails(fixture("does-not-exist/model.pte"), TOKENIZER(), ETLLM_ERR_FILE_ACCESS);
  /* A folder is not a model file either. */
  check_load_fails(fixture("dyn_xnnpack"), TOKENIZER(), ETLLM_ERR_FILE_ACCESS);
}

static void corrupt_model_random_bytes(const char *arg) {
  (void)arg;
  static unsigned char junk[64 * 1024];
  uint32_t x = 12345;
  for (size_t i = 0; i < sizeof junk; i++) {
    x = x * 1664525u + 1013904223u;
    junk[i] = (unsigned char)(x >> 24);
  }
  char *path = write_temp_file(junk, sizeof junk);
  check_load_fails(path, TOKENIZER(), ETLLM_ERR_INVALID_MODEL);
  remove_temp_file(path);
  path = write_temp_file("", 0);
  check_load_fails(path, TOKENIZER(), ETLLM_ERR_INVALID_MODEL);
  remove_temp_file(path);
}

static void corrupt_model_truncated(const char *arg) {
  (void)arg;
  size_t len = 0;
  unsigned char *model = read_file(fixture_model(DEFAULT_MODEL), &len);
  const size_t cuts[] = {len / 2, len - 1024, 64};
  for (size_t i = 0; i < NUM_CASES(cuts); i++) {
    char *path = write_temp_file(model, cuts[i]);
    check_load_fails(path, TOKENIZER(), ETLLM_ERR_INVALID_MODEL);
    remove_temp_file(path);
  }
  free(model);
}

/* A valid program without a `forward` method: an unsupported model (the message names the
 * methods the file has). */
static void model_without_forward(const char *arg) {
  (void)arg;
  check_load_fails(fixture("no_forward.pte"), TOKENIZER(), ETLLM_ERR_UNSUPPORTED_MODEL);
  etllm_runner *runner = NULL;
  CHECK_ERR(etllm_runner_open(fixture("no_forward.pte"), TOKENIZER(), NULL, &runner),
            ETLLM_ERR_UNSUPPORTED_MODEL);
  CHECK_MSG(strstr(etllm_last_error_message(), "forward") != NULL, "message: %s",
            etllm_last_error_message());
}

/* A model using an operator no kernel library provides fails to load, naming it. */
static void model_with_unsupported_operator(const char *arg) {
  (void)arg;
  etllm_runner *runner = NULL;
  CHECK_ERR(etllm_runner_open(fixture("unsupported_op/model.pte"), TOKENIZER(), NULL, &runner),
            ETLLM_ERR_UNSUPPORTED_MODEL);
  CHECK_MSG(runner == NULL, "no runner on failure");
  CHECK_MSG(strstr(etllm_last_error_message(), "llama::fast_hadamard_transform.out") != NULL,
            "message: %s", etllm_last_error_message());
}

/* Opening, loading and generating on `path` each fail with ETLLM_ERR_INVALID_MODEL, and the
 * message of a failed open names `needle`. */
static void check_invalid_model(const char *path, const char *needle) {
  check_load_fails(path, TOKENIZER(), ETLLM_ERR_INVALID_MODEL);
  etllm_runner *runner = NULL;
  CHECK_ERR(etllm_runner_open(path, TOKENIZER(), NULL, &runner), ETLLM_ERR_INVALID_MODEL);
  CHECK_MSG(runner == NULL, "no runner on failure");
  CHECK_MSG(strstr(etllm_last_error_message(), needle) != NULL, "message: %s",
            etllm_last_error_message());
}

/* A method name that is not UTF-8 is an invalid model, not an abort (the executorch crate's
 * method listing used to throw a C++ exception through the bridge). */
static void model_with_non_utf8_method_name(const char *arg) {
  (void)arg;
  check_invalid_model(fixture("corrupt/bad_method_name.pte"), "not valid UTF-8");
}

/* A KernelCall naming an operator past the operator table is refused at load time (ExecuTorch
 * only logs it, and executing it would call a null kernel). */
static void model_with_out_of_range_operator_index(const char *arg) {
  (void)arg;
  check_invalid_model(fixture("corrupt/op_index_out_of_range.pte"),
                      "Op index 1000000 out of range");
}

/* Memory-planned buffers larger than the machine are refused before ExecuTorch allocates them
 * (its std::bad_alloc used to terminate the process). */
static void model_with_impossible_planned_memory(const char *arg) {
  (void)arg;
  check_invalid_model(fixture("corrupt/planned_buffer_too_large.pte"), "memory-planned buffers");
}

static void missing_tokenizer_file(const char *arg) {
  (void)arg;
  check_load_fails(fixture_model(DEFAULT_MODEL), fixture("does-not-exist.json"),
                   ETLLM_ERR_FILE_ACCESS);
}

static void corrupt_tokenizer(const char *arg) {
  (void)arg;
  static const char not_json[] = "{\"model\": {\"type\": \"BPE\", \"vocab\": [";
  char *path = write_temp_file(not_json, sizeof not_json - 1);
  check_load_fails(fixture_model(DEFAULT_MODEL), path, ETLLM_ERR_INVALID_TOKENIZER);
  remove_temp_file(path);
}

static void tokenizer_bigger_than_vocab(const char *arg) {
  (void)arg;
  check_load_fails(fixture_model(DEFAULT_MODEL), fixture("tokenizer_big.json"),
                   ETLLM_ERR_INVALID_TOKENIZER);
}

/* ---- ETLLM_ERR_BUSY ------------------------------------------------------------------- */

typedef struct busy_test {
  etllm_runner *runner;
  size_t tokens;
  etllm_status nested[4];
  char message[512];
  /* Second-thread variant. */
  pthread_mutex_t mutex;
  pthread_cond_t cond;
  bool go, done;
} busy_test;

static void copy_message(busy_test *t) {
  snprintf(t->message, sizeof t->message, "%s", etllm_last_error_message());
}

/* From inside the callback of a running generate, on the same thread. */
static int32_t call_again_from_callback(void *user_data, const char *piece, size_t len,
                                        int64_t id) {
  (void)piece;
  (void)len;
  busy_test *t = user_data;
  if (id < 0 || ++t->tokens != 2) return 0;
  etllm_generation_config config = greedy_config(2);
  const uint32_t ids[] = {1, 293};
  int64_t position = 0;
  t->nested[0] = etllm_runner_generate(t->runner, "The", &config, NULL, NULL, NULL, NULL);
  copy_message(t);
  t->nested[1] = etllm_runner_generate_tokens(t->runner, ids, 2, &config, NULL, NULL, NULL, NULL);
  t->nested[2] = etllm_runner_reset(t->runner);
  t->nested[3] = etllm_runner_position(t->runner, &position);
  return 0;
}

static void check_busy_results(busy_test *t) {
  for (size_t i = 0; i < NUM_CASES(t->nested); i++) {
    CHECK_MSG(t->nested[i] == ETLLM_ERR_BUSY, "nested call %zu returned %s", i,
              etllm_status_name((int32_t)t->nested[i]));
  }
  CHECK_MSG(t->message[0] != '\0', "ETLLM_ERR_BUSY came with an empty message");
}

static void busy_from_callback(const char *arg) {
  (void)arg;
  static busy_test t;
  t.runner = open_runner(DEFAULT_MODEL);
  etllm_generation_config config = greedy_config(6);
  config.num_bos = 1;
  etllm_stats stats = etllm_stats_default();
  CHECK_OK(etllm_runner_generate(t.runner, "Hello", &config, call_again_from_callback, NULL, &t,
                                 &stats));
  check_busy_results(&t);
  /* The outer call was unaffected, and its success cleared this thread's message. */
  CHECK(stats.num_generated_tokens == 6);
  CHECK(etllm_last_error_message()[0] == '\0');
  etllm_runner_free(t.runner);
}

static void *call_from_other_thread(void *arg) {
  busy_test *t = arg;
  pthread_mutex_lock(&t->mutex);
  while (!t->go) pthread_cond_wait(&t->cond, &t->mutex);
  pthread_mutex_unlock(&t->mutex);
  etllm_generation_config config = greedy_config(2);
  const uint32_t ids[] = {1, 293};
  int64_t position = 0;
  t->nested[0] = etllm_runner_generate(t->runner, "The", &config, NULL, NULL, NULL, NULL);
  copy_message(t);
  t->nested[1] = etllm_runner_generate_tokens(t->runner, ids, 2, &config, NULL, NULL, NULL, NULL);
  t->nested[2] = etllm_runner_reset(t->runner);
  t->nested[3] = etllm_runner_position(t->runner, &position);
  pthread_mutex_lock(&t->mutex);
  t->done = true;
  pthread_cond_broadcast(&t->cond);
  pthread_mutex_unlock(&t->mutex);
  return NULL;
}

/* The first generate blocks in its callback until the other thread's calls have returned. */
static int32_t block_until_other_thread_done(void *user_data, const char *piece, size_t len,
                                             int64_t id) {
  (void)piece;
  (void)len;
  busy_test *t = user_data;
  if (id < 0 || ++t->tokens != 2) return 0;
  pthread_mutex_lock(&t->mutex);
  t->go = true;
  pthread_cond_broadcast(&t->cond);
  while (!t->done) pthread_cond_wait(&t->cond, &t->mutex);
  pthread_mutex_unlock(&t->mutex);
  return 0;
}

static void busy_from_other_thread(const char *arg) {
  (void)arg;
  static busy_test t;
  t.runner = open_runner(DEFAULT_MODEL);
  CHECK(pthread_mutex_init(&t.mutex, NULL) == 0);
  CHECK(pthread_cond_init(&t.cond, NULL) == 0);
  pthread_t thread;
  CHECK(pthread_create(&thread, NULL, call_from_other_thread, &t) == 0);
  etllm_generation_config config = greedy_config(6);
  config.num_bos = 1;
  etllm_stats stats = etllm_stats_default();
  CHECK_OK(etllm_runner_generate(t.runner, "Hello", &config, block_until_other_thread_done, NULL,
                                 &t, &stats));
  CHECK(pthread_join(thread, NULL) == 0);
  check_busy_results(&t);
  CHECK(stats.num_generated_tokens == 6);
  /* Once the first generate has returned, the runner takes calls again. */
  int64_t position = 0;
  CHECK_OK(etllm_runner_position(t.runner, &position));
  CHECK((uint64_t)position == stats.num_prompt_tokens + 6);
  pthread_cond_destroy(&t.cond);
  pthread_mutex_destroy(&t.mutex);
  etllm_runner_free(t.runner);
}

/* ---- Prompts ---------------------------------------------------------------------------- */

static void prompt_longer_than_context(const char *arg) {
  (void)arg;
  etllm_runner *runner = open_runner(DEFAULT_MODEL);
  int64_t max_context = 0;
  CHECK_OK(etllm_runner_max_context_len(runner, &max_context));
  /* A first turn, so that the conversation has a position to keep. */
  etllm_generation_config config = greedy_config(4);
  config.num_bos = 1;
  config.echo = true;
  CHECK_OK(etllm_runner_generate(runner, "Hello", &config, NULL, NULL, NULL, NULL));
  int64_t before = 0;
  CHECK_OK(etllm_runner_position(runner, &before));
  CHECK(before > 0);

  /* Token ids: one more than the whole context. */
  static uint32_t ids[1024];
  CHECK((size_t)max_context + 1 <= NUM_CASES(ids));
  for (size_t i = 0; i < (size_t)max_context + 1; i++) ids[i] = 65 + (uint32_t)(i % 100);
  static collector c;
  CHECK_ERR(etllm_runner_generate_tokens(runner, ids, (size_t)max_context + 1, &config,
                                         collect_token, collect_stats, &c, NULL),
            ETLLM_ERR_CONTEXT_FULL);
  /* Fits an empty context, but not what is left of this one. */
  CHECK_ERR(etllm_runner_generate_tokens(runner, ids, (size_t)(max_context - before + 1), &config,
                                         collect_token, collect_stats, &c, NULL),
            ETLLM_ERR_CONTEXT_FULL);
  /* Text, with echo on: not even the echo is passed on. */
  static char text[8192];
  text[0] = '\0';
  for (int i = 0; i < 40; i++) strcat(text, "Once upon a time, ");
  CHECK_ERR(etllm_runner_generate(runner, text, &config, collect_token, collect_stats, &c, NULL),
            ETLLM_ERR_CONTEXT_FULL);
  CHECK_ERR(etllm_runner_prefill(runner, text, &config, NULL), ETLLM_ERR_CONTEXT_FULL);
  CHECK_MSG(c.num_pieces == 0 && c.num_stats_calls == 0,
            "%zu pieces and %zu stats callbacks for prompts that do not fit", c.num_pieces,
            c.num_stats_calls);
  int64_t after = -1;
  CHECK_OK(etllm_runner_position(runner, &after));
  CHECK_MSG(after == before, "position %lld before, %lld after", (long long)before,
            (long long)after);
  etllm_runner_free(runner);
}

static void invalid_utf8_prompt(const char *arg) {
  (void)arg;
  etllm_runner *runner = open_runner(DEFAULT_MODEL);
  etllm_generation_config config = greedy_config(2);
  static collector c;
  static const char *bad[] = {"caf\xc3", "\xff\xfe", "\xed\xa0\x80" /* a surrogate */,
                              "\xc0\xaf" /* overlong '/' */};
  for (size_t i = 0; i < NUM_CASES(bad); i++) {
    CHECK(!utf8_valid(bad[i], strlen(bad[i])));
    CHECK_ERR(etllm_runner_generate(runner, bad[i], &config, collect_token, NULL, &c, NULL),
              ETLLM_ERR_INVALID_UTF8);
    CHECK_ERR(etllm_runner_prefill(runner, bad[i], &config, NULL), ETLLM_ERR_INVALID_UTF8);
  }
  CHECK(c.num_pieces == 0);
  /* Paths are UTF-8 too. */
  check_open_fails("\xff.pte", TOKENIZER(), NULL, ETLLM_ERR_INVALID_UTF8);
  etllm_runner_free(runner);
}

static void empty_prompt(const char *arg) {
  (void)arg;
  etllm_runner *runner = open_runner(DEFAULT_MODEL);
  etllm_generation_config config = greedy_config(2);
  static collector c;
  CHECK_ERR(etllm_runner_generate(runner, "", &config, collect_token, NULL, &c, NULL),
            ETLLM_ERR_INVALID_ARGUMENT);
  CHECK_ERR(etllm_runner_generate_tokens(runner, NULL, 0, &config, collect_token, NULL, &c, NULL),
            ETLLM_ERR_INVALID_ARGUMENT);
  CHECK_ERR(etllm_runner_prefill(runner, "", &config, NULL), ETLLM_ERR_INVALID_ARGUMENT);
  CHECK(c.num_pieces == 0);
  int64_t position = -1;
  CHECK_OK(etllm_runner_position(runner, &position));
  CHECK(position == 0);
  etllm_runner_free(runner);
}

static void token_id_outside_vocab(const char *arg) {
  (void)arg;
  etllm_runner *runner = open_runner(DEFAULT_MODEL);
  etllm_generation_config config = greedy_config(2);
  const uint32_t ids[] = {1, 512};
  CHECK_ERR(etllm_runner_generate_tokens(runner, ids, 2, &config, NULL, NULL, NULL, NULL),
            ETLLM_ERR_INVALID_ARGUMENT);
  etllm_runner_free(runner);
}

static void invalid_config_values(const char *arg) {
  (void)arg;
  etllm_runner *runner = open_runner(DEFAULT_MODEL);
  etllm_generation_config config = greedy_config(2);
  config.temperature = -1.0f;
  CHECK_ERR(etllm_runner_generate(runner, "The", &config, NULL, NULL, NULL, NULL),
            ETLLM_ERR_INVALID_ARGUMENT);
  config = greedy_config(2);
  config.num_bos = -1;
  CHECK_ERR(etllm_runner_generate(runner, "The", &config, NULL, NULL, NULL, NULL),
            ETLLM_ERR_INVALID_ARGUMENT);
  /* A KV-cache manager without its functions. */
  etllm_io_manager manager;
  memset(&manager, 0, sizeof manager);
  manager.struct_size = sizeof manager;
  etllm_runner_options options = etllm_runner_options_default();
  options.io_manager = &manager;
  check_open_fails(fixture_model(DEFAULT_MODEL), TOKENIZER(), &options,
                   ETLLM_ERR_NULL_ARGUMENT);
  etllm_runner_free(runner);
}

/* ---- Versioned structs ------------------------------------------------------------------ */

static void bad_struct_size(const char *arg) {
  (void)arg;
  etllm_runner *runner = open_runner(DEFAULT_MODEL);
  /* Sizes no version of the struct has: too small to hold a field after struct_size,
   * ending inside a field (9 cuts an 8-byte field of every struct below), or bigger
   * than this library's struct (a newer caller's fields this library cannot know). */
  const uint32_t bad_sizes[] = {0, 4, 9, 0xFFFFFFFFu, 0};
  for (size_t i = 0; i < NUM_CASES(bad_sizes); i++) {
    const bool too_big = i == NUM_CASES(bad_sizes) - 1;
    etllm_generation_config config = greedy_config(2);
    config.struct_size = too_big ? (uint32_t)sizeof config + 8 : bad_sizes[i];
    CHECK_ERR(etllm_runner_generate(runner, "The", &config, NULL, NULL, NULL, NULL),
              ETLLM_ERR_STRUCT_SIZE);
    CHECK_ERR(etllm_runner_prefill(runner, "The", &config, NULL), ETLLM_ERR_STRUCT_SIZE);

    etllm_runner_options options = etllm_runner_options_default();
    options.struct_size = too_big ? (uint32_t)sizeof options + 8 : bad_sizes[i];
    check_open_fails(fixture_model(DEFAULT_MODEL), TOKENIZER(), &options, ETLLM_ERR_STRUCT_SIZE);

    etllm_stats stats = etllm_stats_default();
    stats.struct_size = too_big ? (uint32_t)sizeof stats + 8 : bad_sizes[i];
    char *json = NULL;
    CHECK_ERR(etllm_stats_to_json(&stats, &json), ETLLM_ERR_STRUCT_SIZE);
    CHECK(json == NULL);
  }
  int64_t position = -1;
  CHECK_OK(etllm_runner_position(runner, &position));
  CHECK(position == 0);
  etllm_runner_free(runner);
}

/* out_stats with a bad struct_size: reported as ETLLM_ERR_STRUCT_SIZE before anything
 * runs (no callback, position unchanged), and the struct is left alone. */
static int32_t count_pieces(void *user_data, const char *piece, size_t len, int64_t token_id) {
  (void)piece;
  (void)len;
  (void)token_id;
  ++*(int *)user_data;
  return 0;
}

static void bad_out_stats_struct_size(const char *arg) {
  (void)arg;
  etllm_runner *runner = open_runner(DEFAULT_MODEL);
  etllm_generation_config config = greedy_config(2);
  etllm_stats stats = etllm_stats_default();
  stats.struct_size = 0;
  int pieces = 0;
  CHECK_ERR(etllm_runner_generate(runner, "The", &config, count_pieces, NULL, &pieces, &stats),
            ETLLM_ERR_STRUCT_SIZE);
  CHECK(stats.struct_size == 0 && stats.num_generated_tokens == 0);
  CHECK(pieces == 0);
  int64_t position = -1;
  CHECK_OK(etllm_runner_position(runner, &position));
  CHECK(position == 0);
  etllm_runner_free(runner);
}

/* ---- The message itself ------------------------------------------------------------------ */

static void message_cleared_by_success(const char *arg) {
  (void)arg;
  etllm_runner *runner = NULL;
  CHECK_ERR(etllm_runner_open(fixture("does-not-exist.pte"), TOKENIZER(), NULL, &runner),
            ETLLM_ERR_FILE_ACCESS);
  /* The message stays until the next call, however often it is read. */
  CHECK(strlen(etllm_last_error_message()) > 0);
  CHECK(strlen(etllm_last_error_message()) > 0);
  runner = open_runner(DEFAULT_MODEL); /* succeeds: CHECK_OK checks the message is "" */
  CHECK_ERR(etllm_runner_generate(runner, "", NULL, NULL, NULL, NULL, NULL),
            ETLLM_ERR_INVALID_ARGUMENT);
  int64_t position = 0;
  CHECK_OK(etllm_runner_position(runner, &position));
  CHECK(strcmp(etllm_last_error_message(), "") == 0);
  etllm_runner_free(runner);
}

static void *fail_on_this_thread(void *arg) {
  (void)arg;
  CHECK_ERR(etllm_runner_reset(NULL), ETLLM_ERR_NULL_ARGUMENT);
  return NULL;
}

/* A failure on one thread leaves another thread's message alone. */
static void message_is_per_thread(const char *arg) {
  (void)arg;
  int64_t position = 0;
  etllm_runner *runner = open_runner(DEFAULT_MODEL);
  CHECK_OK(etllm_runner_position(runner, &position));
  pthread_t thread;
  CHECK(pthread_create(&thread, NULL, fail_on_this_thread, NULL) == 0);
  CHECK(pthread_join(thread, NULL) == 0);
  CHECK(strcmp(etllm_last_error_message(), "") == 0);
  CHECK_ERR(etllm_runner_load(NULL), ETLLM_ERR_NULL_ARGUMENT);
  etllm_runner_free(runner);
}

static void getters_need_loaded_runner(const char *arg) {
  (void)arg;
  etllm_runner *runner = NULL;
  CHECK_OK(etllm_runner_new(fixture_model(DEFAULT_MODEL), TOKENIZER(), NULL, &runner));
  int64_t i64 = 0;
  uint32_t u32 = 0;
  size_t count = 0;
  CHECK_ERR(etllm_runner_max_context_len(runner, &i64), ETLLM_ERR_NOT_LOADED);
  CHECK_ERR(etllm_runner_vocab_size(runner, &i64), ETLLM_ERR_NOT_LOADED);
  CHECK_ERR(etllm_runner_bos_id(runner, &u32), ETLLM_ERR_NOT_LOADED);
  CHECK_ERR(etllm_runner_eos_ids(runner, NULL, 0, &count), ETLLM_ERR_NOT_LOADED);
  CHECK_ERR(etllm_runner_position(runner, &i64), ETLLM_ERR_NOT_LOADED);
  CHECK_OK(etllm_runner_load(runner));
  CHECK_OK(etllm_runner_load(runner)); /* loading again does nothing */
  CHECK_OK(etllm_runner_vocab_size(runner, &i64));
  CHECK(i64 == 512);
  etllm_runner_free(runner);
}

int main(int argc, char **argv) {
  static const test_case cases[] = {
      {"null_runner", null_runner},
      {"null_paths", null_paths},
      {"null_out_pointer", null_out_pointer},
      {"missing_model_file", missing_model_file},
      {"corrupt_model_random_bytes", corrupt_model_random_bytes},
      {"corrupt_model_truncated", corrupt_model_truncated},
      {"model_without_forward", model_without_forward},
      {"model_with_unsupported_operator", model_with_unsupported_operator},
      {"model_with_non_utf8_method_name", model_with_non_utf8_method_name},
      {"model_with_out_of_range_operator_index", model_with_out_of_range_operator_index},
      {"model_with_impossible_planned_memory", model_with_impossible_planned_memory},
      {"missing_tokenizer_file", missing_tokenizer_file},
      {"corrupt_tokenizer", corrupt_tokenizer},
      {"tokenizer_bigger_than_vocab", tokenizer_bigger_than_vocab},
      {"busy_from_callback", busy_from_callback},
      {"busy_from_other_thread", busy_from_other_thread},
      {"prompt_longer_than_context", prompt_longer_than_context},
      {"invalid_utf8_prompt", invalid_utf8_prompt},
      {"empty_prompt", empty_prompt},
      {"token_id_outside_vocab", token_id_outside_vocab},
      {"invalid_config_values", invalid_config_values},
      {"bad_struct_size", bad_struct_size},
      {"bad_out_stats_struct_size", bad_out_stats_struct_size},
      {"message_cleared_by_success", message_cleared_by_success},
      {"message_is_per_thread", message_is_per_thread},
      {"getters_need_loaded_runner", getters_need_loaded_runner},
  };
  return run_test_case(argc, argv, cases, NUM_CASES(cases));
}
