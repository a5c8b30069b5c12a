/* Constrained decoding through the C ABI: the config's grammar and grammar_type, the
 * grammar stop reasons, ETLLM_ERR_GRAMMAR for grammars that do not compile (the runner stays
 * usable), and the same seed giving the same constrained tokens as the `etllm` command-line
 * tool (the Rust API). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "test_support.h"

#define PROMPT "Once upon a time"
#define SCHEMA_FILE "grammar/person.schema.json"

/* The schema file's text, NUL-terminated (free it). */
static char *schema_text(void) {
  size_t len = 0;
  char *data = read_file(fixture(SCHEMA_FILE), &len);
  char *text = malloc(len + 1);
  CHECK(text != NULL);
  memcpy(text, data, len);
  text[len] = '\0';
  free(data);
  return text;
}

static etllm_generation_config constrained(const char *grammar, const char *type, uint64_t seed,
                                           int32_t max_new_tokens) {
  etllm_generation_config c = etllm_generation_config_default();
  c.echo = false;
  c.temperature = 1.0f;
  c.has_seed = true;
  c.seed = seed;
  c.max_new_tokens = max_new_tokens;
  c.num_bos = 1;
  c.grammar = grammar;
  c.grammar_type = type;
  return c;
}

/* Token ids the CLI prints for the schema file (`--json`: one {"id": N, ...} line a token). */
static size_t cli_ids(uint64_t seed, uint32_t *ids, size_t max) {
  char cmd[4096];
  snprintf(cmd, sizeof cmd,
           "'%s' generate --model '%s' --tokenizer '%s' --prompt '" PROMPT
           "' --seed %llu --temperature 1 --max-new-tokens 100 --bos 1 --json-schema '%s' --json",
           ETLLM_CLI, fixture(DEFAULT_MODEL "/model.pte"), TOKENIZER(),
           (unsigned long long)seed, fixture(SCHEMA_FILE));
  return cli_token_ids(cmd, ids, max);
}

static void c_abi_and_cli_draw_the_same_constrained_tokens(const char *arg) {
  (void)arg;
  char *schema = schema_text();
  etllm_runner *runner = open_runner(DEFAULT_MODEL);
  for (uint64_t seed = 1; seed <= 3; seed++) {
    uint32_t want[128];
    const size_t n = cli_ids(seed, want, 128);
    CHECK(n > 0);
    collector got;
    memset(&got, 0, sizeof got);
    etllm_generation_config config = constrained(schema, "json_schema", seed, 100);
    CHECK_OK(etllm_runner_reset(runner));
    CHECK_OK(etllm_runner_generate(runner, PROMPT, &config, collect_token, collect_stats, &got,
                                   NULL));
    CHECK_MSG(got.num_ids == n, "seed %llu: %zu tokens, the CLI %zu", (unsigned long long)seed,
              got.num_ids, n);
    CHECK_MSG(memcmp(got.ids, want, sizeof want[0] * n) == 0, "seed %llu differs",
              (unsigned long long)seed);
    CHECK_MSG(got.stats.stop_reason == ETLLM_STOP_GRAMMAR_COMPLETE, "seed %llu: stop reason %d",
              (unsigned long long)seed, (int)got.stats.stop_reason);
    CHECK_MSG(got.text_len > 0 && got.text[0] == '{', "seed %llu: %s", (unsigned long long)seed,
              got.text);
  }
  etllm_runner_free(runner);
  free(schema);
}

static void regex_output_matches_and_ends_with_grammar_complete(const char *arg) {
  (void)arg;
  etllm_runner *runner = open_runner(DEFAULT_MODEL);
  collector got;
  memset(&got, 0, sizeof got);
  etllm_generation_config config = constrained("(yes|no), (red|blue)\\.", "regex", 7, 40);
  CHECK_OK(etllm_runner_generate(runner, PROMPT, &config, collect_token, collect_stats, &got,
                                 NULL));
  got.text[got.text_len] = '\0';
  CHECK_MSG(strcmp(got.text, "yes, red.") == 0 || strcmp(got.text, "yes, blue.") == 0 ||
                strcmp(got.text, "no, red.") == 0 || strcmp(got.text, "no, blue.") == 0,
            "got %s", got.text);
  CHECK(got.stats.stop_reason == ETLLM_STOP_GRAMMAR_COMPLETE);
  etllm_runner_free(runner);
}

static void token_limit_before_a_complete_match_is_grammar_incomplete(const char *arg) {
  (void)arg;
  char *schema = schema_text();
  etllm_runner *runner = open_runner(DEFAULT_MODEL);
  collector got;
  memset(&got, 0, sizeof got);
  etllm_generation_config config = constrained(schema, "json_schema", 1, 2);
  CHECK_OK(etllm_runner_generate(runner, PROMPT, &config, collect_token, collect_stats, &got,
                                 NULL));
  CHECK(got.num_ids == 2);
  CHECK(got.stats.stop_reason == ETLLM_STOP_GRAMMAR_INCOMPLETE);
  etllm_runner_free(runner);
  free(schema);
}

static void bad_grammars_fail_with_grammar_error_and_leave_the_runner_usable(const char *arg) {
  (void)arg;
  static const char *const bad[][2] = {
      {"{\"type\": ", "json_schema"},
      {"(unclosed", "regex"},
      {"start: missing_rule", "lark"},
      {"start: missing_rule", "lark_grammar"},
      {"root ::= missing-rule", "gbnf"},
  };
  etllm_runner *runner = open_runner(DEFAULT_MODEL);
  for (size_t i = 0; i < NUM_CASES(bad); i++) {
    collector got;
    memset(&got, 0, sizeof got);
    etllm_generation_config config = constrained(bad[i][0], bad[i][1], 1, 10);
    CHECK_ERR(etllm_runner_generate(runner, PROMPT, &config, collect_token, NULL, &got, NULL),
              ETLLM_ERR_GRAMMAR);
    CHECK_MSG(strstr(etllm_last_error_message(), bad[i][1][0] == 'l' ? "lark" : bad[i][1]) != NULL,
              "%s: %s", bad[i][1], etllm_last_error_message());
    CHECK_MSG(got.num_pieces == 0, "%s: a callback ran", bad[i][1]);
    int64_t position = 1;
    CHECK_OK(etllm_runner_position(runner, &position));
    CHECK(position == 0);
  }
  collector got;
  memset(&got, 0, sizeof got);
  etllm_generation_config config = greedy_config(4);
  CHECK_OK(etllm_runner_generate(runner, PROMPT, &config, collect_token, NULL, &got, NULL));
  CHECK(got.num_ids == 4);
  etllm_runner_free(runner);
}

static void unknown_grammar_type_is_an_invalid_argument(const char *arg) {
  (void)arg;
  etllm_runner *runner = open_runner(DEFAULT_MODEL);
  etllm_generation_config config = constrained("[a-z]+", "yaml", 1, 4);
  CHECK_ERR(etllm_runner_generate(runner, PROMPT, &config, collect_token, NULL, NULL, NULL),
            ETLLM_ERR_INVALID_ARGUMENT);
  CHECK(strstr(etllm_last_error_message(), "yaml") != NULL);
  etllm_runner_free(runner);
}

static void fast_forward_off_still_matches(const char *arg) {
  (void)arg;
  etllm_runner *runner = open_runner(DEFAULT_MODEL);
  collector got;
  memset(&got, 0, sizeof got);
  etllm_generation_config config = constrained("(yes|no), (red|blue)\\.", "regex", 7, 40);
  config.grammar_no_fast_forward = true;
  CHECK_OK(etllm_runner_generate(runner, PROMPT, &config, collect_token, collect_stats, &got,
                                 NULL));
  CHECK_MSG(strcmp(got.text, "yes, red.") == 0 || strcmp(got.text, "yes, blue.") == 0 ||
                strcmp(got.text, "no, red.") == 0 || strcmp(got.text, "no, blue.") == 0,
            "got %s", got.text);
  CHECK(got.stats.stop_reason == ETLLM_STOP_GRAMMAR_COMPLETE);
  etllm_runner_free(runner);
}

static void grammar_error_has_a_status_name(const char *arg) {
  (void)arg;
  CHECK(strcmp(etllm_status_name(ETLLM_ERR_GRAMMAR), "ETLLM_ERR_GRAMMAR") == 0);
}

int main(int argc, char **argv) {
  static const test_case cases[] = {
      {"c_abi_and_cli_draw_the_same_constrained_tokens",
       c_abi_and_cli_draw_the_same_constrained_tokens},
      {"regex_output_matches_and_ends_with_grammar_complete",
       regex_output_matches_and_ends_with_grammar_complete},
      {"token_limit_before_a_complete_match_is_grammar_incomplete",
       token_limit_before_a_complete_match_is_grammar_incomplete},
      {"bad_grammars_fail_with_grammar_error_and_leave_the_runner_usable",
       bad_grammars_fail_with_grammar_error_and_leave_the_runner_usable},
      {"unknown_grammar_type_is_an_invalid_argument", unknown_grammar_type_is_an_invalid_argument},
      {"fast_forward_off_still_matches", fast_forward_off_still_matches},
      {"grammar_error_has_a_status_name", grammar_error_has_a_status_name},
  };
  return run_test_case(argc, argv, cases, NUM_CASES(cases));
}
