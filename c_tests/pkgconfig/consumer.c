/* A consumer built with `cc $(pkg-config --cflags --libs etllm)` (see consumer.sh): it
 * links, finds the ExecuTorch runtime through libetllm.so, and generates. */
#include <etllm.h>

#include <stdio.h>
#include <string.h>

int main(int argc, char **argv) {
  if (argc != 4) {
    fprintf(stderr, "usage: consumer MODEL TOKENIZER VERSION\n");
    return 2;
  }
  if (strcmp(etllm_version(), argv[3]) != 0) {
    fprintf(stderr, "linked EtLlm %s, pkg-config says %s\n", etllm_version(), argv[3]);
    return 1;
  }
  etllm_runner *runner = NULL;
  etllm_status status = etllm_runner_open(argv[1], argv[2], NULL, &runner);
  if (status != ETLLM_OK) {
    fprintf(stderr, "open: %s\n", etllm_last_error_message());
    return 1;
  }
  etllm_generation_config config = etllm_generation_config_default();
  config.max_new_tokens = 4;
  config.temperature = 0.0f;
  config.echo = false;
  config.ignore_eos = true;
  etllm_stats stats = etllm_stats_default();
  status = etllm_runner_generate(runner, "Hello", &config, NULL, NULL, NULL, &stats);
  etllm_runner_free(runner);
  if (status != ETLLM_OK || stats.num_generated_tokens != 4) {
    fprintf(stderr, "generate: %s (%llu tokens)\n", etllm_last_error_message(),
            (unsigned long long)stats.num_generated_tokens);
    return 1;
  }
  return 0;
}
