/* The token callback: complete UTF-8 pieces, stopping by return value, stopping from
 * another thread. */
#include <pthread.h>
#include <stdio.h>
#include <string.h>

#include "test_support.h"

static const etllm_ref_case *non_ascii_case(const etllm_ref_model *m) {
  for (size_t k = 0; k < m->num_cases; k++) {
    for (const unsigned char *p = (const unsigned char *)m->cases[k].prompt; *p; p++) {
      if (*p >= 0x80) return &m->cases[k];
    }
  }
  etllm_test_fail(__FILE__, __LINE__, "no reference prompt has non-ASCII text");
}

/* Every piece is complete UTF-8 whose len is its strlen; the echo is the prompt itself. */
static void pieces_are_complete_utf8(const char *arg) {
  (void)arg;
  const etllm_ref_model *m = ref_model(DEFAULT_MODEL);
  etllm_runner *runner = open_runner(DEFAULT_MODEL);
  static collector c;
  size_t held_back = 0, with_nul = 0;

  /* Greedy, every reference prompt, echo on. */
  for (size_t k = 0; k < m->num_cases; k++) {
    memset(&c, 0, sizeof c);
    etllm_generation_config config = greedy_config(24);
    config.echo = true;
    config.num_bos = 1;
    CHECK_OK(etllm_runner_reset(runner));
    CHECK_OK(etllm_runner_generate(runner, m->cases[k].prompt, &config, collect_token, NULL, &c,
                                   NULL));
    check_pieces_well_formed(&c);
    CHECK_MSG(strcmp(c.echo, m->cases[k].prompt) == 0, "case %zu: echo \"%s\"", k, c.echo);
    CHECK(utf8_valid(c.text, c.text_len));
    CHECK(c.num_ids == 24);
    held_back += c.num_empty_pieces;
  }

  /* Sampling on the non-ASCII prompt: random byte-level tokens split characters often. */
  const etllm_ref_case *ref = non_ascii_case(m);
  for (uint64_t seed = 1; seed <= 6; seed++) {
    memset(&c, 0, sizeof c);
    etllm_generation_config config = etllm_generation_config_default();
    config.temperature = 1.5f;
    config.has_seed = true;
    config.seed = seed;
    config.max_new_tokens = 64;
    config.num_bos = 1;
    config.ignore_eos = true;
    CHECK_OK(etllm_runner_reset(runner));
    CHECK_OK(etllm_runner_generate(runner, ref->prompt, &config, collect_token, NULL, &c, NULL));
    check_pieces_well_formed(&c);
    CHECK(strcmp(c.echo, ref->prompt) == 0);
    CHECK(utf8_valid(c.text, c.text_len));
    CHECK(c.num_ids == 64);
    held_back += c.num_empty_pieces;
    with_nul += c.num_embedded_nul;
  }
  printf("%zu pieces were held back while a character was incomplete, %zu held a U+0000\n",
         held_back, with_nul);
  etllm_runner_free(runner);
}

/* A non-zero return from the token callback ends generation after exactly that token. */
static void nonzero_return_stops(const char *arg) {
  (void)arg;
  etllm_runner *runner = open_runner(DEFAULT_MODEL);
  static collector c;
  c.stop_at_token = 3;
  etllm_generation_config config = greedy_config(20);
  config.num_bos = 1;
  etllm_stats stats = etllm_stats_default();
  CHECK_OK(etllm_runner_generate(runner, "Hello, world!", &config, collect_token, collect_stats,
                                 &c, &stats));
  CHECK_MSG(c.num_ids == 3, "%zu tokens", c.num_ids);
  CHECK(stats.stop_reason == ETLLM_STOP_CALLBACK);
  CHECK(stats.num_generated_tokens == 3);
  CHECK(c.num_stats_calls == 1);
  CHECK(c.stats.stop_reason == ETLLM_STOP_CALLBACK);
  int64_t position = 0;
  CHECK_OK(etllm_runner_position(runner, &position));
  CHECK((uint64_t)position == stats.num_prompt_tokens + 3);
  etllm_runner_free(runner);
}

static int32_t stop_on_first_piece(void *user_data, const char *piece, size_t len, int64_t id) {
  (void)piece;
  (void)len;
  int64_t *ids = user_data;
  ids[ids[0] + 1] = id;
  ids[0]++;
  return 1;
}

/* A non-zero return from the echo callback ends generation before any token. */
static void nonzero_return_on_echo_stops(const char *arg) {
  (void)arg;
  etllm_runner *runner = open_runner(DEFAULT_MODEL);
  etllm_generation_config config = greedy_config(20);
  config.echo = true;
  etllm_stats stats = etllm_stats_default();
  int64_t seen[8] = {0}; /* count, then the ids */
  CHECK_OK(etllm_runner_generate(runner, "The", &config, stop_on_first_piece, NULL, seen, &stats));
  CHECK(seen[0] == 1);
  CHECK(seen[1] == -1);
  CHECK(stats.stop_reason == ETLLM_STOP_CALLBACK);
  CHECK(stats.num_generated_tokens == 0);
  etllm_runner_free(runner);
}

/* ---- etllm_runner_stop from another thread -------------------------------------------- */

typedef struct stop_test {
  etllm_runner *runner;
  pthread_mutex_t mutex;
  pthread_cond_t cond;
  bool go;      /* the generating thread asks the stopper to stop */
  bool stopped; /* the stopper has called etllm_runner_stop */
  etllm_status stop_status;
  size_t tokens;
} stop_test;

static void *stopper(void *arg) {
  stop_test *t = arg;
  pthread_mutex_lock(&t->mutex);
  while (!t->go) pthread_cond_wait(&t->cond, &t->mutex);
  pthread_mutex_unlock(&t->mutex);
  etllm_status status = etllm_runner_stop(t->runner);
  pthread_mutex_lock(&t->mutex);
  t->stop_status = status;
  t->stopped = true;
  pthread_cond_broadcast(&t->cond);
  pthread_mutex_unlock(&t->mutex);
  return NULL;
}

static int32_t signal_stopper_at_5(void *user_data, const char *piece, size_t len, int64_t id) {
  (void)piece;
  (void)len;
  stop_test *t = user_data;
  if (id < 0) return 0;
  t->tokens++;
  if (t->tokens == 5) {
    /* Hand over to the other thread and wait until it has called stop: generation must
     * then end before the next model step, so exactly 5 tokens come out. */
    pthread_mutex_lock(&t->mutex);
    t->go = true;
    pthread_cond_broadcast(&t->cond);
    while (!t->stopped) pthread_cond_wait(&t->cond, &t->mutex);
    pthread_mutex_unlock(&t->mutex);
  }
  return 0;
}

static void stop_from_other_thread(const char *arg) {
  (void)arg;
  static stop_test t;
  t.runner = open_runner(DEFAULT_MODEL);
  CHECK(pthread_mutex_init(&t.mutex, NULL) == 0);
  CHECK(pthread_cond_init(&t.cond, NULL) == 0);
  pthread_t thread;
  CHECK(pthread_create(&thread, NULL, stopper, &t) == 0);
  etllm_generation_config config = greedy_config(50);
  config.num_bos = 1;
  etllm_stats stats = etllm_stats_default();
  CHECK_OK(etllm_runner_generate(t.runner, "Once upon a time", &config, signal_stopper_at_5, NULL,
                                 &t, &stats));
  CHECK(pthread_join(thread, NULL) == 0);
  CHECK_MSG(t.stop_status == ETLLM_OK, "etllm_runner_stop returned %s",
            etllm_status_name((int32_t)t.stop_status));
  CHECK_MSG(t.tokens == 5, "%zu tokens", t.tokens);
  CHECK(stats.num_generated_tokens == 5);
  CHECK(stats.stop_reason == ETLLM_STOP_REQUESTED);
  pthread_cond_destroy(&t.cond);
  pthread_mutex_destroy(&t.mutex);
  etllm_runner_free(t.runner);
}

/* A stop requested while nothing runs does not cut the next generate short. */
static void stop_before_generate_is_cleared(const char *arg) {
  (void)arg;
  etllm_runner *runner = open_runner(DEFAULT_MODEL);
  CHECK_OK(etllm_runner_stop(runner));
  static collector c;
  etllm_generation_config config = greedy_config(10);
  config.num_bos = 1;
  etllm_stats stats = etllm_stats_default();
  CHECK_OK(etllm_runner_generate(runner, "The", &config, collect_token, NULL, &c, &stats));
  CHECK(c.num_ids == 10);
  CHECK(stats.stop_reason == ETLLM_STOP_LENGTH);
  etllm_runner_free(runner);
}

int main(int argc, char **argv) {
  static const test_case cases[] = {
      {"pieces_are_complete_utf8", pieces_are_complete_utf8},
      {"nonzero_return_stops", nonzero_return_stops},
      {"nonzero_return_on_echo_stops", nonzero_return_on_echo_stops},
      {"stop_from_other_thread", stop_from_other_thread},
      {"stop_before_generate_is_cleared", stop_before_generate_is_cleared},
  };
  return run_test_case(argc, argv, cases, NUM_CASES(cases));
}
