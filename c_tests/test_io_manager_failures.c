/* A KV-cache manager written in C that fails: each callback in turn makes the call that
 * drove it return ETLLM_ERR_IO_MANAGER with the manager's own message, the conversation
 * is rolled back, and the runner generates correctly again afterwards. The manager is the
 * C static-attention manager wrapped by c_tests/support/faulty_manager.c, which injects
 * one failure on command. */
#include <string.h>

#include "faulty_manager.h"
#include "manager_support.h"
#include "static_attention_manager.h"

#define MODEL "static_attention"

static collector got, want;

static etllm_runner *new_faulty_runner(faulty_control **control) {
  etllm_io_manager manager = faulty_manager(example_static_attention_manager(), control);
  etllm_runner_options options = etllm_runner_options_default();
  options.num_threads = 1;
  options.io_manager = &manager;
  etllm_runner *runner = NULL;
  CHECK_OK(etllm_runner_new(fixture_model(MODEL), TOKENIZER(), &options, &runner));
  return runner;
}

/* The last call failed with ETLLM_ERR_IO_MANAGER (checked by the caller) and its message
 * carries the manager's own message. */
static void check_message_has(const char *expected) {
  const char *message = etllm_last_error_message();
  CHECK_MSG(strstr(message, expected) != NULL, "message \"%s\" does not contain \"%s\"", message,
            expected);
}

/* Generates reference case 0 and checks it against eager PyTorch. */
static void generates_reference(etllm_runner *runner) {
  const etllm_ref_case *ref = ref_case_named(ref_model(MODEL), "case0");
  greedy_ids(runner, ref->prompt_ids, ref->num_prompt_ids, (int32_t)ref->num_greedy_ids, &got);
  check_same_ids("after the failure", got.ids, got.num_ids, ref->greedy_ids, ref->num_greedy_ids);
}

/* The manager fails once in callback `arg` (load, prepare_prefill, update_prefill,
 * prepare_decode or update_decode): the call returns ETLLM_ERR_IO_MANAGER with the
 * manager's message, the position is unchanged, and after etllm_runner_reset (a second
 * etllm_runner_load for load) generation matches the reference again. */
static void fails_in(const char *arg) {
  const faulty_point point = faulty_point_named(arg);
  CHECK_MSG(point != FAULTY_NUM_POINTS && point != FAULTY_RESET && point != FAULTY_REWIND &&
                point != FAULTY_SAVE_STATE && point != FAULTY_RESTORE_STATE,
            "fails_in takes a callback that a generate reports, not `%s`", arg ? arg : "");
  faulty_control *control = NULL;
  etllm_runner *runner = new_faulty_runner(&control);
  const etllm_ref_case *ref = ref_case_named(ref_model(MODEL), "case1"); /* 2 prefill chunks */
  etllm_generation_config config = greedy_config(4);
  config.num_bos = 0;
  control->arm[point] = 1;
  if (point == FAULTY_LOAD) {
    CHECK_ERR(etllm_runner_load(runner), ETLLM_ERR_IO_MANAGER);
    check_message_has(faulty_message(point));
    bool loaded = true;
    CHECK_OK(etllm_runner_is_loaded(runner, &loaded));
    CHECK(!loaded);
    CHECK_OK(etllm_runner_load(runner)); /* the runner kept the manager: loading again works */
    CHECK(control->calls[FAULTY_LOAD] == 2);
  } else {
    CHECK_OK(etllm_runner_load(runner));
    CHECK_ERR(etllm_runner_generate_tokens(runner, ref->prompt_ids, ref->num_prompt_ids, &config,
                                           NULL, NULL, NULL, NULL),
              ETLLM_ERR_IO_MANAGER);
    check_message_has(faulty_message(point));
    CHECK_MSG(control->calls[point] >= 1 && control->arm[point] == 0, "%s was never called",
              arg);
    int64_t position = -1;
    CHECK_OK(etllm_runner_position(runner, &position));
    CHECK_MSG(position == 0, "the failed generate left position %lld", (long long)position);
  }
  CHECK_OK(etllm_runner_reset(runner));
  generates_reference(runner);
  etllm_runner_free(runner);
}

/* A failure in the second turn rolls the conversation back to the end of the first: the
 * manager is rewound, and the same turn run again gives the built-in manager's tokens. */
static void failure_rolls_back_to_previous_turn(const char *arg) {
  (void)arg;
  const etllm_ref_model *m = ref_model(MODEL);
  const etllm_ref_case *first = ref_case_named(m, "case0"), *second = ref_case_named(m, "case4");
  faulty_control *control = NULL;
  etllm_runner *runner = new_faulty_runner(&control);
  etllm_runner *builtin = open_runner_with(MODEL, NULL);
  greedy_ids(runner, first->prompt_ids, first->num_prompt_ids, 24, &got);
  greedy_ids(builtin, first->prompt_ids, first->num_prompt_ids, 24, &want);
  check_same_ids("first turn", got.ids, got.num_ids, want.ids, want.num_ids);
  int64_t before = -1, after = -2;
  CHECK_OK(etllm_runner_position(runner, &before));

  control->arm[FAULTY_UPDATE_DECODE] = 1;
  etllm_generation_config config = greedy_config(24);
  config.num_bos = 0;
  CHECK_ERR(etllm_runner_generate_tokens(runner, second->prompt_ids, second->num_prompt_ids,
                                         &config, NULL, NULL, NULL, NULL),
            ETLLM_ERR_IO_MANAGER);
  check_message_has(faulty_message(FAULTY_UPDATE_DECODE));
  CHECK(control->calls[FAULTY_REWIND] == 1);
  CHECK_OK(etllm_runner_position(runner, &after));
  CHECK_MSG(after == before, "position %lld after the failure, %lld before", (long long)after,
            (long long)before);

  greedy_ids(runner, second->prompt_ids, second->num_prompt_ids, 24, &got);
  greedy_ids(builtin, second->prompt_ids, second->num_prompt_ids, 24, &want);
  check_same_ids("second turn, run again", got.ids, got.num_ids, want.ids, want.num_ids);
  etllm_runner_free(runner);
  etllm_runner_free(builtin);
}

/* When the rewind that rolls a failed generate back fails too, the generate still reports
 * the first failure (the manager's message), and etllm_runner_reset brings the runner back
 * to correct generation. */
static void failed_rewind_is_recovered_by_reset(const char *arg) {
  (void)arg;
  faulty_control *control = NULL;
  etllm_runner *runner = new_faulty_runner(&control);
  generates_reference(runner);
  control->arm[FAULTY_UPDATE_DECODE] = 1;
  control->arm[FAULTY_REWIND] = 1;
  const etllm_ref_case *ref = ref_case_named(ref_model(MODEL), "case4");
  etllm_generation_config config = greedy_config(8);
  config.num_bos = 0;
  CHECK_ERR(etllm_runner_generate_tokens(runner, ref->prompt_ids, ref->num_prompt_ids, &config,
                                         NULL, NULL, NULL, NULL),
            ETLLM_ERR_IO_MANAGER);
  check_message_has(faulty_message(FAULTY_UPDATE_DECODE));
  CHECK(control->calls[FAULTY_REWIND] == 1 && control->arm[FAULTY_REWIND] == 0);
  CHECK_OK(etllm_runner_reset(runner));
  generates_reference(runner);
  etllm_runner_free(runner);
}

int main(int argc, char **argv) {
  static const test_case cases[] = {
      {"fails_in", fails_in},
      {"failure_rolls_back_to_previous_turn", failure_rolls_back_to_previous_turn},
      {"failed_rewind_is_recovered_by_reset", failed_rewind_is_recovered_by_reset},
  };
  return run_test_case(argc, argv, cases, NUM_CASES(cases));
}
