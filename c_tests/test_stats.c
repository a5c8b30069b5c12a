/* Stats of a generation, their JSON form, the runner's getters and the version strings. */
#include <stddef.h>
#include <stdio.h>
#include <string.h>

#include "test_support.h"

#ifndef ETLLM_EXPECTED_VERSION
#error "ETLLM_EXPECTED_VERSION must be defined (the installed package's version)"
#endif

static void check_stats_consistent(const etllm_stats *s) {
  CHECK(s->struct_size == sizeof(etllm_stats));
  CHECK(s->model_load_start_us > 0);
  CHECK(s->model_load_start_us <= s->model_load_end_us);
  CHECK(s->model_load_end_us <= s->inference_start_us);
  CHECK(s->inference_start_us <= s->token_encode_end_us);
  CHECK(s->token_encode_end_us <= s->prompt_eval_end_us);
  CHECK(s->prompt_eval_end_us <= s->first_token_us);
  CHECK(s->first_token_us <= s->inference_end_us);
  CHECK(s->aggregate_model_execution_time_us <= s->inference_end_us - s->inference_start_us);
  /* Decode steps are part of the model time, and happen after prefill. */
  CHECK(s->decode_model_execution_time_us <= s->aggregate_model_execution_time_us);
  /* (+1: both sides are rounded down to microseconds separately.) */
  CHECK(s->decode_model_execution_time_us <= s->inference_end_us - s->prompt_eval_end_us + 1);
  /* 12 tokens means 11 decode steps, each of which takes some time. */
  CHECK(s->num_generated_tokens < 2 || s->decode_model_execution_time_us > 0);
}

/* out_stats and the stats callback get the same, consistent numbers. */
static void out_stats_filled(const char *arg) {
  (void)arg;
  etllm_runner *runner = open_runner(DEFAULT_MODEL);
  const etllm_ref_case *ref = &ref_model(DEFAULT_MODEL)->cases[3];
  static collector c;
  etllm_generation_config config = greedy_config(12);
  etllm_stats stats = etllm_stats_default();
  CHECK(stats.struct_size == sizeof(etllm_stats));
  CHECK(stats.num_generated_tokens == 0 && stats.stop_reason == ETLLM_STOP_NONE);
  CHECK_OK(etllm_runner_generate_tokens(runner, ref->prompt_ids, ref->num_prompt_ids, &config,
                                        collect_token, collect_stats, &c, &stats));
  CHECK(c.num_stats_calls == 1);
  CHECK(memcmp(&c.stats, &stats, sizeof stats) == 0);
  CHECK(stats.stop_reason == ETLLM_STOP_LENGTH);
  CHECK(stats.num_prompt_tokens == ref->num_prompt_ids);
  CHECK(stats.num_generated_tokens == 12);
  CHECK(stats.num_generated_tokens == c.num_ids);
  check_stats_consistent(&stats);

  /* With BOS/EOS added, the prompt count includes them. */
  memset(&c, 0, sizeof c);
  config.num_bos = 2;
  config.num_eos = 1;
  CHECK_OK(etllm_runner_reset(runner));
  CHECK_OK(etllm_runner_generate(runner, "Hello, world!", &config, collect_token, NULL, &c,
                                 &stats));
  /* The reference's prompt ids hold one BOS: 2 BOS + the text's ids + 1 EOS. */
  const etllm_ref_case *hello = &ref_model(DEFAULT_MODEL)->cases[4];
  CHECK(strcmp(hello->prompt, "Hello, world!") == 0);
  CHECK(stats.num_prompt_tokens == 2 + (hello->num_prompt_ids - 1) + 1);
  etllm_runner_free(runner);
}

/* The model's EOS ends generation: stop reason EOS, the EOS counted but not passed on. */
static void eos_stops_generation(const char *arg) {
  (void)arg;
  const etllm_ref_model *m = ref_model(DEFAULT_MODEL);
  /* The reference case whose greedy continuation contains the EOS (2). */
  const etllm_ref_case *ref = NULL;
  size_t eos_at = 0;
  for (size_t k = 0; k < m->num_cases && ref == NULL; k++) {
    for (size_t i = 0; i < m->cases[k].num_greedy_ids; i++) {
      if (m->cases[k].greedy_ids[i] == 2) {
        ref = &m->cases[k];
        eos_at = i;
        break;
      }
    }
  }
  CHECK_MSG(ref != NULL, "no reference continuation reaches EOS");
  etllm_runner *runner = open_runner(DEFAULT_MODEL);
  etllm_generation_config config = greedy_config(24);
  config.ignore_eos = false;
  static collector c;
  etllm_stats stats = etllm_stats_default();
  CHECK_OK(etllm_runner_generate_tokens(runner, ref->prompt_ids, ref->num_prompt_ids, &config,
                                        collect_token, NULL, &c, &stats));
  CHECK(stats.stop_reason == ETLLM_STOP_EOS);
  CHECK(stats.num_generated_tokens == eos_at + 1);
  CHECK(c.num_ids == eos_at);
  CHECK(memcmp(c.ids, ref->greedy_ids, eos_at * sizeof c.ids[0]) == 0);
  etllm_runner_free(runner);
}

/* A caller compiled against an older, shorter etllm_stats gets no bytes past its size. */
static void short_stats_struct_written_partially(const char *arg) {
  (void)arg;
  etllm_runner *runner = open_runner(DEFAULT_MODEL);
  etllm_generation_config config = greedy_config(3);
  union {
    etllm_stats stats;
    unsigned char bytes[sizeof(etllm_stats)];
  } u;
  memset(u.bytes, 0xAB, sizeof u.bytes);
  const size_t short_size = offsetof(etllm_stats, num_prompt_tokens);
  u.stats.struct_size = (uint32_t)short_size;
  CHECK_OK(etllm_runner_generate(runner, "The", &config, NULL, NULL, NULL, &u.stats));
  CHECK(u.stats.struct_size == short_size);
  CHECK(u.stats.inference_end_us > 0 && u.stats.inference_end_us != 0xABABABABABABABABull);
  for (size_t i = short_size; i < sizeof u.bytes; i++) {
    CHECK_MSG(u.bytes[i] == 0xAB, "byte %zu past struct_size %zu was written", i, short_size);
  }
  etllm_runner_free(runner);
}

/* A caller compiled against an older, shorter config: fields past its size keep their
 * defaults (here max_new_tokens and everything after it). */
static void short_config_struct_uses_defaults(const char *arg) {
  (void)arg;
  etllm_runner *runner = open_runner(DEFAULT_MODEL);
  etllm_generation_config config = greedy_config(3);
  config.struct_size = (uint32_t)offsetof(etllm_generation_config, max_new_tokens);
  config.max_new_tokens = 1000000; /* unread: the default (-1, up to the context) applies */
  config.temperature = -5.0f;      /* unread too, would be invalid */
  etllm_stats stats = etllm_stats_default();
  CHECK_OK(etllm_runner_generate(runner, "The", &config, NULL, NULL, NULL, &stats));
  int64_t max_context = 0;
  CHECK_OK(etllm_runner_max_context_len(runner, &max_context));
  CHECK(stats.stop_reason == ETLLM_STOP_CONTEXT_FULL);
  CHECK(stats.num_prompt_tokens + stats.num_generated_tokens == (uint64_t)max_context);
  etllm_runner_free(runner);
}

static void stats_to_json(const char *arg) {
  (void)arg;
  etllm_runner *runner = open_runner(DEFAULT_MODEL);
  etllm_generation_config config = greedy_config(7);
  etllm_stats stats = etllm_stats_default();
  CHECK_OK(etllm_runner_generate(runner, "The", &config, NULL, NULL, NULL, &stats));
  char *json = NULL;
  CHECK_OK(etllm_stats_to_json(&stats, &json));
  CHECK(json != NULL);
  CHECK(utf8_valid(json, strlen(json)));
  CHECK_MSG(json[0] == '{' && json[strlen(json) - 1] == '}', "not a JSON object: %s", json);
  CHECK_MSG(strstr(json, "\"generated_tokens\"") != NULL, "no \"generated_tokens\" in %s", json);
  CHECK_MSG(strstr(json, "\"generated_tokens\":7") != NULL ||
                strstr(json, "\"generated_tokens\": 7") != NULL,
            "generated_tokens is not 7 in %s", json);
  etllm_string_free(json);
  etllm_string_free(NULL); /* documented as a no-op */

  /* Default stats convert too; an out-of-range stop reason does not. */
  etllm_stats empty = etllm_stats_default();
  CHECK_OK(etllm_stats_to_json(&empty, &json));
  etllm_string_free(json);
  empty.stop_reason = (etllm_stop_reason)99;
  json = NULL;
  CHECK_ERR(etllm_stats_to_json(&empty, &json), ETLLM_ERR_INVALID_ARGUMENT);
  CHECK(json == NULL);
  etllm_runner_free(runner);
}

static void getters_report_model(const char *arg) {
  (void)arg;
  etllm_runner *runner = open_runner(DEFAULT_MODEL);
  bool loaded = false;
  CHECK_OK(etllm_runner_is_loaded(runner, &loaded));
  CHECK(loaded);
  int64_t v = 0;
  CHECK_OK(etllm_runner_max_context_len(runner, &v));
  CHECK_MSG(v == 128, "max context %lld", (long long)v);
  CHECK_OK(etllm_runner_max_seq_len(runner, &v));
  CHECK_MSG(v == 128, "max seq len %lld", (long long)v);
  CHECK_OK(etllm_runner_vocab_size(runner, &v));
  CHECK_MSG(v == 512, "vocab %lld", (long long)v);
  uint32_t bos = 0;
  CHECK_OK(etllm_runner_bos_id(runner, &bos));
  CHECK(bos == 1);
  size_t count = 99;
  CHECK_OK(etllm_runner_eos_ids(runner, NULL, 0, &count));
  CHECK(count == 1);
  uint32_t eos[4] = {0, 0, 0, 0};
  CHECK_OK(etllm_runner_eos_ids(runner, eos, 4, &count));
  CHECK(count == 1 && eos[0] == 2 && eos[1] == 0);
  etllm_runner_free(runner);
}

/* position counts prompts and generated tokens since the last reset. */
static void position_follows_conversation(const char *arg) {
  (void)arg;
  etllm_runner *runner = open_runner(DEFAULT_MODEL);
  int64_t position = -1;
  CHECK_OK(etllm_runner_position(runner, &position));
  CHECK(position == 0);
  etllm_generation_config config = greedy_config(5);
  config.num_bos = 1;
  etllm_stats stats = etllm_stats_default();
  CHECK_OK(etllm_runner_generate(runner, "Hello, world!", &config, NULL, NULL, NULL, &stats));
  CHECK_OK(etllm_runner_position(runner, &position));
  CHECK_MSG((uint64_t)position == stats.num_prompt_tokens + 5, "position %lld", (long long)position);
  const int64_t first = position;
  /* An empty prompt continues the conversation. */
  config.num_bos = 0;
  CHECK_OK(etllm_runner_generate(runner, "", &config, NULL, NULL, NULL, &stats));
  CHECK(stats.num_prompt_tokens == 0 && stats.num_generated_tokens == 5);
  CHECK_OK(etllm_runner_position(runner, &position));
  CHECK(position == first + 5);
  /* Prefill adds its prompt without generating. */
  CHECK_OK(etllm_runner_prefill(runner, "The", &config, &stats));
  CHECK_OK(etllm_runner_position(runner, &position));
  CHECK(position == first + 5 + (int64_t)stats.num_prompt_tokens);
  CHECK_OK(etllm_runner_reset(runner));
  CHECK_OK(etllm_runner_position(runner, &position));
  CHECK(position == 0);
  etllm_runner_free(runner);
}

static void version_strings(const char *arg) {
  (void)arg;
  CHECK_MSG(strcmp(etllm_version(), ETLLM_EXPECTED_VERSION) == 0, "etllm_version() is %s",
            etllm_version());
  CHECK(strcmp(etllm_executorch_version(), "1.5.1") == 0);
  CHECK(strcmp(etllm_status_name(ETLLM_OK), "ETLLM_OK") == 0);
  CHECK(strcmp(etllm_status_name(ETLLM_ERR_CONTEXT_FULL), "ETLLM_ERR_CONTEXT_FULL") == 0);
  CHECK(strcmp(etllm_status_name(ETLLM_ERR_PANIC), "ETLLM_ERR_PANIC") == 0);
  CHECK(strcmp(etllm_status_name(-1), "unknown status") == 0);
  CHECK(strcmp(etllm_status_name(ETLLM_ERR_SAMPLER), "ETLLM_ERR_SAMPLER") == 0);
  CHECK(strcmp(etllm_status_name(ETLLM_ERR_CHAT_TEMPLATE), "ETLLM_ERR_CHAT_TEMPLATE") == 0);
  CHECK(strcmp(etllm_status_name(ETLLM_ERR_GRAMMAR), "ETLLM_ERR_GRAMMAR") == 0);
  CHECK(strcmp(etllm_status_name(ETLLM_ERR_INVALID_STATE), "ETLLM_ERR_INVALID_STATE") == 0);
  CHECK(strcmp(etllm_status_name(ETLLM_ERR_SERVER), "ETLLM_ERR_SERVER") == 0);
  CHECK(strcmp(etllm_status_name(ETLLM_ERR_INVALID_MEDIA + 1), "unknown status") == 0);
}

int main(int argc, char **argv) {
  static const test_case cases[] = {
      {"out_stats_filled", out_stats_filled},
      {"eos_stops_generation", eos_stops_generation},
      {"short_stats_struct_written_partially", short_stats_struct_written_partially},
      {"short_config_struct_uses_defaults", short_config_struct_uses_defaults},
      {"to_json", stats_to_json},
      {"getters_report_model", getters_report_model},
      {"position_follows_conversation", position_follows_conversation},
      {"version_strings", version_strings},
  };
  return run_test_case(argc, argv, cases, NUM_CASES(cases));
}
