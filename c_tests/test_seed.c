/* The same seed gives the same tokens through the C ABI as through the `etllm` command-line
 * tool (the Rust API), with every sampling filter on: the seed and the sampling settings
 * cross the C boundary intact, and sampling does not depend on the binding. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "test_support.h"

#define PROMPT "Once upon a time"
#define NUM_TOKENS 24
/* Every setting below is also in config_for(). */
#define CLI_SAMPLING                                                                  \
  "--temperature 0.8 --top-k 40 --top-p 0.9 --min-p 0.02 --repetition-penalty 1.1 " \
  "--max-new-tokens 24 --ignore-eos --bos 1"

static etllm_generation_config config_for(uint64_t seed) {
  etllm_generation_config c = etllm_generation_config_default();
  c.echo = false;
  c.temperature = 0.8f;
  c.top_k = 40;
  c.top_p = 0.9f;
  c.min_p = 0.02f;
  c.repetition_penalty = 1.1f;
  c.max_new_tokens = NUM_TOKENS;
  c.ignore_eos = true;
  c.num_bos = 1;
  c.has_seed = true;
  c.seed = seed;
  return c;
}

/* Token ids the CLI prints (`--json`: one {"id": N, "text": ...} line a token). */
static size_t cli_ids(uint64_t seed, uint32_t *ids, size_t max) {
  char cmd[4096];
  snprintf(cmd, sizeof cmd,
           "'%s' generate --model '%s' --tokenizer '%s' --prompt '" PROMPT
           "' --seed %llu " CLI_SAMPLING " --json",
           ETLLM_CLI, fixture(DEFAULT_MODEL "/model.pte"), TOKENIZER(),
           (unsigned long long)seed);
  return cli_token_ids(cmd, ids, max);
}

static void c_abi_and_cli_draw_the_same_tokens(const char *arg) {
  (void)arg;
  etllm_runner *runner = open_runner(DEFAULT_MODEL);
  for (uint64_t seed = 1; seed <= 3; seed++) {
    uint32_t want[NUM_TOKENS + 1];
    const size_t n = cli_ids(seed, want, NUM_TOKENS + 1);
    CHECK(n == NUM_TOKENS);
    collector got;
    memset(&got, 0, sizeof got);
    etllm_generation_config config = config_for(seed);
    CHECK_OK(etllm_runner_reset(runner));
    CHECK_OK(etllm_runner_generate(runner, PROMPT, &config, collect_token, NULL, &got, NULL));
    CHECK(got.num_ids == NUM_TOKENS);
    CHECK_MSG(memcmp(got.ids, want, sizeof want[0] * NUM_TOKENS) == 0, "seed %llu differs",
              (unsigned long long)seed);
  }
  etllm_runner_free(runner);
}

static void different_seeds_draw_different_tokens(const char *arg) {
  (void)arg;
  uint32_t a[NUM_TOKENS + 1], b[NUM_TOKENS + 1];
  CHECK(cli_ids(1, a, NUM_TOKENS + 1) == NUM_TOKENS);
  CHECK(cli_ids(2, b, NUM_TOKENS + 1) == NUM_TOKENS);
  CHECK(memcmp(a, b, sizeof a[0] * NUM_TOKENS) != 0);
}

int main(int argc, char **argv) {
  static const test_case cases[] = {
      {"c_abi_and_cli_draw_the_same_tokens", c_abi_and_cli_draw_the_same_tokens},
      {"different_seeds_draw_different_tokens", different_seeds_draw_different_tokens},
  };
  return run_test_case(argc, argv, cases, NUM_CASES(cases));
}
