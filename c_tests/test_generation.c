/* Generation reproduces the reference (tests/fixtures/<model>/reference.json: eager PyTorch,
 * or upstream's runtime for the quantized and bf16 exports in shipped/ and the fp16
 * upstream_static_f16, which also accepts its eager-fp32 tokens: see check_reference_ids)
 * token for token, for every fixture model and every prompt (each prompt on a fresh runner,
 * with the case's method). */
#include <stdio.h>
#include <string.h>

#include "test_support.h"

/* The tokens equal the reference's (for an fp16 export: either of its two references; see
 * check_reference_ids). */
static void check_same_ids(const char *model, size_t case_index, const collector *c,
                           const etllm_ref_case *ref) {
  char what[256];
  snprintf(what, sizeof what, "%s, case %zu", model, case_index);
  check_reference_ids(what, c->ids, c->num_ids, ref);
}

/* From the reference's prompt ids (BOS included, so num_bos 0), greedy, EOS ignored. */
static void reference_tokens(const char *model) {
  const etllm_ref_model *m = ref_model(model);
  for (size_t k = 0; k < m->num_cases; k++) {
    const etllm_ref_case *ref = &m->cases[k];
    etllm_runner *runner = open_runner_case(model, ref);
    static collector c;
    memset(&c, 0, sizeof c);
    etllm_generation_config config = greedy_config((int32_t)ref->num_greedy_ids);
    config.num_bos = 0;
    etllm_stats stats = etllm_stats_default();
    CHECK_OK(etllm_runner_reset(runner));
    CHECK_OK(etllm_runner_generate_tokens(runner, ref->prompt_ids, ref->num_prompt_ids, &config,
                                          collect_token, collect_stats, &c, &stats));
    check_same_ids(model, k, &c, ref);
    CHECK(stats.num_prompt_tokens == ref->num_prompt_ids);
    CHECK(stats.num_generated_tokens == ref->num_greedy_ids);
    CHECK(stats.stop_reason == ETLLM_STOP_LENGTH);
    etllm_runner_free(runner);
  }
}

/* From the prompt text with num_bos 1: the tokenizer and the BOS give the same ids. */
static void reference_text(const char *model) {
  const etllm_ref_model *m = ref_model(model);
  for (size_t k = 0; k < m->num_cases; k++) {
    const etllm_ref_case *ref = &m->cases[k];
    etllm_runner *runner = open_runner_case(model, ref);
    static collector c;
    memset(&c, 0, sizeof c);
    etllm_generation_config config = greedy_config((int32_t)ref->num_greedy_ids);
    config.num_bos = 1;
    etllm_stats stats = etllm_stats_default();
    CHECK_OK(etllm_runner_reset(runner));
    CHECK_OK(etllm_runner_generate(runner, ref->prompt, &config, collect_token, collect_stats, &c,
                                   &stats));
    check_same_ids(model, k, &c, ref);
    CHECK_MSG(stats.num_prompt_tokens == ref->num_prompt_ids,
              "%s, case %zu: %llu prompt tokens, the reference has %zu", model, k,
              (unsigned long long)stats.num_prompt_tokens, ref->num_prompt_ids);
    CHECK(stats.num_generated_tokens == ref->num_greedy_ids);
    etllm_runner_free(runner);
  }
}

/* A second turn continues the conversation (the position grows by its prompt and tokens),
 * and a reset brings back the first turn's exact tokens. */
static void reset_restarts_conversation(const char *arg) {
  (void)arg;
  const etllm_ref_model *m = ref_model(DEFAULT_MODEL);
  const etllm_ref_case *ref = &m->cases[0];
  etllm_runner *runner = open_runner(DEFAULT_MODEL);
  etllm_generation_config config = greedy_config((int32_t)ref->num_greedy_ids);
  const int64_t turn = (int64_t)(ref->num_prompt_ids + ref->num_greedy_ids);
  static collector c;
  for (int64_t i = 0; i < 3; i++) {
    memset(&c, 0, sizeof c);
    if (i == 2) {
      CHECK_OK(etllm_runner_reset(runner));
      int64_t position = -1;
      CHECK_OK(etllm_runner_position(runner, &position));
      CHECK(position == 0);
    }
    CHECK_OK(etllm_runner_generate_tokens(runner, ref->prompt_ids, ref->num_prompt_ids, &config,
                                          collect_token, NULL, &c, NULL));
    CHECK(c.num_ids == ref->num_greedy_ids);
    if (i != 1) check_same_ids(DEFAULT_MODEL, 0, &c, ref);
    int64_t position = -1;
    CHECK_OK(etllm_runner_position(runner, &position));
    CHECK_MSG(position == (i == 1 ? 2 : 1) * turn, "turn %lld: position %lld", (long long)i,
              (long long)position);
  }
  etllm_runner_free(runner);
}

int main(int argc, char **argv) {
  static const test_case cases[] = {
      {"reference_tokens", reference_tokens},
      {"reference_text", reference_text},
      {"reset_restarts_conversation", reset_restarts_conversation},
  };
  return run_test_case(argc, argv, cases, NUM_CASES(cases));
}
