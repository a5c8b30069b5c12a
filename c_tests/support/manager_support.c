#include "manager_support.h"

#include <string.h>

etllm_runner *open_runner_with(const char *model, const etllm_io_manager *manager) {
  etllm_runner *runner = NULL;
  etllm_runner_options options = etllm_runner_options_default();
  options.num_threads = 1;
  options.io_manager = manager;
  CHECK_OK(etllm_runner_open(fixture_model(model), TOKENIZER(), &options, &runner));
  CHECK(runner != NULL);
  return runner;
}

void greedy_ids(etllm_runner *runner, const uint32_t *ids, size_t num_ids, int32_t max_new,
                collector *c) {
  memset(c, 0, sizeof *c);
  etllm_generation_config config = greedy_config(max_new);
  config.num_bos = 0;
  CHECK_OK(etllm_runner_generate_tokens(runner, ids, num_ids, &config, collect_token, NULL, c,
                                        NULL));
}

void check_same_ids(const char *what, const uint32_t *got, size_t num_got, const uint32_t *want,
                    size_t num_want) {
  const size_t n = num_got < num_want ? num_got : num_want;
  for (size_t i = 0; i < n; i++) {
    CHECK_MSG(got[i] == want[i], "%s: token %zu is %u, expected %u", what, i, got[i], want[i]);
  }
  CHECK_MSG(num_got == num_want, "%s: %zu tokens, expected %zu", what, num_got, num_want);
}

const etllm_ref_case *ref_case_named(const etllm_ref_model *model, const char *name) {
  CHECK_MSG(name != NULL, "this case needs a reference case name argument");
  for (size_t i = 0; i < model->num_cases; i++) {
    const char *n = model->cases[i].name;
    if (n != NULL && strcmp(n, name) == 0) return &model->cases[i];
  }
  etllm_test_fail(__FILE__, __LINE__, "%s has no reference case `%s`", model->name, name);
}
