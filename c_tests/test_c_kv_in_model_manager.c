/* The KV-in-model manager written in C (examples/c/kv_in_model_manager.c; the benchmark's
 * manager for models that keep their KV cache inside) reproduces the eager PyTorch
 * reference on every fixture model with a (tokens, input_pos) or (tokens, cache_positions)
 * forward, and refuses other signatures at load. */
#include <string.h>

#include "kv_in_model_manager.h"
#include "manager_support.h"

static collector got;

/* Every reference case of model `arg`, one runner, reset between cases. */
static void matches_eager_reference(const char *arg) {
  const etllm_ref_model *m = ref_model(arg);
  etllm_io_manager manager = example_kv_in_model_manager();
  etllm_runner *runner = open_runner_with(arg, &manager);
  for (size_t k = 0; k < m->num_cases; k++) {
    const etllm_ref_case *ref = &m->cases[k];
    CHECK_OK(etllm_runner_reset(runner));
    greedy_ids(runner, ref->prompt_ids, ref->num_prompt_ids, (int32_t)ref->num_greedy_ids, &got);
    check_same_ids(ref->prompt, got.ids, got.num_ids, ref->greedy_ids, ref->num_greedy_ids);
  }
  etllm_runner_free(runner);
}

/* The static-attention model's forward takes 9 inputs: load refuses it and says so. */
static void refuses_other_signatures(const char *arg) {
  (void)arg;
  etllm_io_manager manager = example_kv_in_model_manager();
  etllm_runner_options options = etllm_runner_options_default();
  options.io_manager = &manager;
  etllm_runner *runner = NULL;
  CHECK_ERR(etllm_runner_open(fixture_model("static_attention"), TOKENIZER(), &options, &runner),
            ETLLM_ERR_IO_MANAGER);
  const char *message = etllm_last_error_message();
  CHECK_MSG(strstr(message, "takes 9 inputs") != NULL, "message: \"%s\"", message);
}

int main(int argc, char **argv) {
  static const test_case cases[] = {
      {"matches_eager_reference", matches_eager_reference},
      {"refuses_other_signatures", refuses_other_signatures},
  };
  return run_test_case(argc, argv, cases, NUM_CASES(cases));
}
