/*
 * Generation with a KV-cache manager written in C: the static-attention manager of
 * static_attention_manager.c, plugged into the runner through etllm_runner_options.
 *
 *   custom_manager MODEL.pte TOKENIZER.json "PROMPT" [MAX_NEW_TOKENS]
 *
 * MODEL must be a static-attention export (tests/fixtures/static_attention/model.pte);
 * other models are refused by the manager's load with a message saying why. Build:
 *
 *   cc -std=c11 custom_manager.c static_attention_manager.c \
 *      $(pkg-config --cflags --libs etllm) -Wl,-rpath,$(pkg-config --variable=libdir etllm)
 */
#include <etllm.h>

#include <stdio.h>
#include <stdlib.h>

#include "static_attention_manager.h"

static int32_t print_piece(void *user_data, const char *piece, size_t len, int64_t token_id) {
  (void)user_data;
  (void)token_id;
  fwrite(piece, 1, len, stdout);
  fflush(stdout);
  return 0;
}

int main(int argc, char **argv) {
  if (argc < 4 || argc > 5) {
    fprintf(stderr, "usage: %s MODEL.pte TOKENIZER.json PROMPT [MAX_NEW_TOKENS]\n", argv[0]);
    return 2;
  }
  /* The manager: a vtable whose user_data the runner owns from the moment it is passed in,
   * whether etllm_runner_open succeeds or not (it calls destroy exactly once). */
  etllm_io_manager manager = example_static_attention_manager();
  etllm_runner_options options = etllm_runner_options_default();
  options.num_threads = 1;
  options.io_manager = &manager; /* copied during the call: `manager` may go out of scope */

  etllm_runner *runner = NULL;
  etllm_status status = etllm_runner_open(argv[1], argv[2], &options, &runner);
  if (status != ETLLM_OK) {
    /* A layout the manager refuses comes back as ETLLM_ERR_IO_MANAGER, with the message
     * the manager set through etllm_set_error_message. */
    fprintf(stderr, "etllm_runner_open failed: %s: %s\n", etllm_status_name(status),
            etllm_last_error_message());
    return 1;
  }

  etllm_generation_config config = etllm_generation_config_default();
  config.max_new_tokens = argc == 5 ? atoi(argv[4]) : 32;
  config.num_bos = 1;
  config.temperature = 0.0f;
  etllm_stats stats = etllm_stats_default();
  status = etllm_runner_generate(runner, argv[3], &config, print_piece, NULL, NULL, &stats);
  printf("\n");
  if (status != ETLLM_OK) {
    fprintf(stderr, "etllm_runner_generate failed: %s: %s\n", etllm_status_name(status),
            etllm_last_error_message());
    etllm_runner_free(runner);
    return 1;
  }
  fprintf(stderr, "%llu prompt tokens, %llu generated; model time %.1f ms\n",
          (unsigned long long)stats.num_prompt_tokens,
          (unsigned long long)stats.num_generated_tokens,
          (double)stats.aggregate_model_execution_time_us / 1000.0);
  etllm_runner_free(runner); /* calls the manager's destroy */
  return 0;
}
