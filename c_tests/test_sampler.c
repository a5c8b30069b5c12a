/* Sampler plugins written in C (etllm_sampler): editing logits, choosing tokens, failing,
 * and the ownership rules (destroy exactly once). */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "test_support.h"

/* Plugin state: forbid one token, or always pick one, or fail. */
typedef struct plugin {
  int64_t ban;     /* token whose logit becomes -inf, or -1 */
  int64_t pick;    /* token to choose, or -1 */
  bool fail;
  int resets;
} plugin;

static int destroyed = 0;

static etllm_status apply(void *user_data, float *logits, size_t num_logits,
                          const uint32_t *history, size_t num_history, int64_t *out_token) {
  plugin *p = user_data;
  (void)history;
  CHECK(num_history > 0);
  if (p->fail) {
    etllm_set_error_message("constraint violated");
    return ETLLM_ERR_INVALID_ARGUMENT;
  }
  if (p->ban >= 0 && (size_t)p->ban < num_logits) logits[p->ban] = -INFINITY;
  *out_token = p->pick;
  return ETLLM_OK;
}

static etllm_status reset(void *user_data) {
  ((plugin *)user_data)->resets++;
  return ETLLM_OK;
}

static void destroy(void *user_data) {
  destroyed++;
  free(user_data);
}

static etllm_sampler make_sampler(int64_t ban, int64_t pick, bool fail) {
  plugin *p = calloc(1, sizeof *p);
  CHECK(p != NULL);
  p->ban = ban;
  p->pick = pick;
  p->fail = fail;
  etllm_sampler s;
  memset(&s, 0, sizeof s);
  s.struct_size = sizeof s;
  s.user_data = p;
  s.apply = apply;
  s.reset = reset;
  s.destroy = destroy;
  return s;
}

static void generate(etllm_runner *runner, const etllm_ref_case *c, int32_t n, collector *out) {
  etllm_generation_config config = greedy_config(n);
  memset(out, 0, sizeof *out);
  CHECK_OK(etllm_runner_generate_tokens(runner, c->prompt_ids, c->num_prompt_ids, &config,
                                        collect_token, NULL, out, NULL));
}

/* Banning the greedy choice changes the first token; removing the plugin restores the
 * eager-PyTorch reference. */
static void plugin_edits_logits(const char *arg) {
  (void)arg;
  const etllm_ref_case *c = &ref_model(DEFAULT_MODEL)->cases[0];
  etllm_runner *runner = open_runner(DEFAULT_MODEL);
  etllm_sampler s = make_sampler(c->greedy_ids[0], -1, false);
  CHECK_OK(etllm_runner_set_sampler(runner, &s));
  collector got;
  generate(runner, c, 1, &got);
  CHECK(got.num_ids == 1 && got.ids[0] != c->greedy_ids[0]);
  CHECK(((plugin *)s.user_data)->resets == 1);
  CHECK_OK(etllm_runner_set_sampler(runner, NULL));
  CHECK(destroyed == 1);
  CHECK_OK(etllm_runner_reset(runner));
  generate(runner, c, (int32_t)c->num_greedy_ids, &got);
  CHECK(got.num_ids == c->num_greedy_ids);
  CHECK(memcmp(got.ids, c->greedy_ids, got.num_ids * sizeof got.ids[0]) == 0);
  etllm_runner_free(runner);
}

static void plugin_picks_tokens(const char *arg) {
  (void)arg;
  const etllm_ref_case *c = &ref_model(DEFAULT_MODEL)->cases[0];
  etllm_runner *runner = open_runner(DEFAULT_MODEL);
  etllm_sampler s = make_sampler(-1, 42, false);
  CHECK_OK(etllm_runner_set_sampler(runner, &s));
  collector got;
  generate(runner, c, 4, &got);
  CHECK(got.num_ids == 4);
  for (size_t i = 0; i < got.num_ids; i++) CHECK(got.ids[i] == 42);
  etllm_runner_free(runner);
  CHECK(destroyed == 1); /* freed with the runner */
}

static void plugin_failure_is_reported_and_rolled_back(const char *arg) {
  (void)arg;
  const etllm_ref_case *c = &ref_model(DEFAULT_MODEL)->cases[0];
  etllm_runner *runner = open_runner(DEFAULT_MODEL);
  etllm_sampler s = make_sampler(-1, -1, true);
  CHECK_OK(etllm_runner_set_sampler(runner, &s));
  etllm_generation_config config = greedy_config(3);
  CHECK_ERR(etllm_runner_generate_tokens(runner, c->prompt_ids, c->num_prompt_ids, &config,
                                         NULL, NULL, NULL, NULL),
            ETLLM_ERR_SAMPLER);
  CHECK(strstr(etllm_last_error_message(), "constraint violated") != NULL);
  int64_t position = -1;
  CHECK_OK(etllm_runner_position(runner, &position));
  CHECK(position == 0);
  /* A plugin choosing a token outside the vocabulary is an error too. */
  etllm_sampler bad = make_sampler(-1, 100000, false);
  CHECK_OK(etllm_runner_set_sampler(runner, &bad));
  CHECK(destroyed == 1); /* the replaced plugin */
  CHECK_ERR(etllm_runner_generate_tokens(runner, c->prompt_ids, c->num_prompt_ids, &config,
                                         NULL, NULL, NULL, NULL),
            ETLLM_ERR_SAMPLER);
  etllm_runner_free(runner);
  CHECK(destroyed == 2);
}

static void plugin_without_apply_is_refused_and_destroyed(const char *arg) {
  (void)arg;
  etllm_runner *runner = open_runner(DEFAULT_MODEL);
  etllm_sampler s = make_sampler(-1, -1, false);
  s.apply = NULL;
  CHECK_ERR(etllm_runner_set_sampler(runner, &s), ETLLM_ERR_NULL_ARGUMENT);
  CHECK(destroyed == 1);
  CHECK_ERR(etllm_runner_set_sampler(NULL, NULL), ETLLM_ERR_NULL_ARGUMENT);
  etllm_runner_free(runner);
}

int main(int argc, char **argv) {
  static const test_case cases[] = {
      {"plugin_edits_logits", plugin_edits_logits},
      {"plugin_picks_tokens", plugin_picks_tokens},
      {"plugin_failure_is_reported_and_rolled_back", plugin_failure_is_reported_and_rolled_back},
      {"plugin_without_apply_is_refused_and_destroyed", plugin_without_apply_is_refused_and_destroyed},
  };
  return run_test_case(argc, argv, cases, NUM_CASES(cases));
}
