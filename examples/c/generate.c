/*
 * Streaming generation with the EtLlm C API.
 *
 *   generate MODEL.pte TOKENIZER.json "PROMPT" [MAX_NEW_TOKENS]
 *
 * The prompt and the generated text stream to stdout as they are produced; the stats go to
 * stderr. Build it against an installed EtLlm, with CMake (find_package(EtLlm) and
 * target_link_libraries(generate PRIVATE EtLlm::etllm)) or with pkg-config:
 *
 *   cc -std=c11 generate.c $(pkg-config --cflags --libs etllm) \
 *      -Wl,-rpath,$(pkg-config --variable=libdir etllm) -o generate
 */
#include <etllm.h>

#include <stdio.h>
#include <stdlib.h>

/* The token callback. `piece` is always complete UTF-8 (the library holds back the bytes of
 * a character split across tokens), NUL-terminated, and valid only during this call: copy
 * it to keep it. `token_id` is -1 for the echoed prompt. Returning non-zero stops the
 * generation after this piece; here, user_data counts the pieces. */
static int32_t print_piece(void *user_data, const char *piece, size_t len, int64_t token_id) {
  (void)token_id;
  size_t *pieces = user_data;
  (*pieces)++;
  fwrite(piece, 1, len, stdout);
  fflush(stdout); /* show each piece now, not when stdout's buffer fills */
  return 0;
}

/* Every fallible call returns an etllm_status; the thread's last error message says why. */
static int fail(const char *what, etllm_status status) {
  fprintf(stderr, "%s failed: %s: %s\n", what, etllm_status_name(status),
          etllm_last_error_message());
  return 1;
}

int main(int argc, char **argv) {
  if (argc < 4 || argc > 5) {
    fprintf(stderr, "usage: %s MODEL.pte TOKENIZER.json PROMPT [MAX_NEW_TOKENS]\n", argv[0]);
    return 2;
  }
  const char *model_path = argv[1];
  const char *tokenizer_path = argv[2];
  const char *prompt = argv[3];
  const int max_new_tokens = argc == 5 ? atoi(argv[4]) : 64;

  /* Options and configs are versioned structs: always start from their *_default()
   * function, then change the fields you need. */
  etllm_runner_options options = etllm_runner_options_default();
  options.num_threads = 1; /* ExecuTorch's thread pool; one is fastest for tiny models */

  /* etllm_runner_open creates and loads in one call. On failure the runner stays NULL and
   * there is nothing to free. */
  etllm_runner *runner = NULL;
  etllm_status status = etllm_runner_open(model_path, tokenizer_path, &options, &runner);
  if (status != ETLLM_OK) return fail("etllm_runner_open", status);

  int64_t max_context = 0;
  status = etllm_runner_max_context_len(runner, &max_context);
  if (status != ETLLM_OK) {
    etllm_runner_free(runner);
    return fail("etllm_runner_max_context_len", status);
  }
  fprintf(stderr, "EtLlm %s (ExecuTorch %s), context of %lld tokens\n", etllm_version(),
          etllm_executorch_version(), (long long)max_context);

  etllm_generation_config config = etllm_generation_config_default();
  config.max_new_tokens = max_new_tokens; /* exactly this many, unless EOS comes first */
  config.temperature = 0.0f;              /* greedy; > 0 samples */
  config.num_bos = 1;                     /* put the model's BOS token before the prompt */
  config.echo = true;                     /* pass the prompt to the callback first */

  /* etllm_runner_generate blocks until generation ends, calling print_piece on this thread
   * as text arrives. The stats struct, like the configs, starts from its default. (Another
   * thread could end it early with etllm_runner_stop(runner).) */
  size_t pieces = 0;
  etllm_stats stats = etllm_stats_default();
  status = etllm_runner_generate(runner, prompt, &config, print_piece, NULL, &pieces, &stats);
  printf("\n");
  if (status != ETLLM_OK) {
    etllm_runner_free(runner);
    return fail("etllm_runner_generate", status);
  }

  /* The stats as JSON: a string the library allocated, so the library frees it. */
  char *json = NULL;
  status = etllm_stats_to_json(&stats, &json);
  if (status == ETLLM_OK) {
    fprintf(stderr, "%s\n", json);
    etllm_string_free(json);
  }
  double decode_s = (double)(stats.inference_end_us - stats.prompt_eval_end_us) / 1e6;
  fprintf(stderr, "%llu prompt tokens, %llu generated in %zu pieces, %.1f tokens/s\n",
          (unsigned long long)stats.num_prompt_tokens,
          (unsigned long long)stats.num_generated_tokens, pieces,
          decode_s > 0 ? (double)stats.num_generated_tokens / decode_s : 0.0);

  etllm_runner_free(runner); /* every runner is freed exactly once */

  /* max_new_tokens is exact unless the model ends the text first (CI relies on this). */
  if (stats.stop_reason != ETLLM_STOP_EOS &&
      stats.num_generated_tokens != (uint64_t)max_new_tokens) {
    fprintf(stderr, "expected %d generated tokens\n", max_new_tokens);
    return 1;
  }
  return 0;
}
