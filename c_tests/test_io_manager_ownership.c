/* The runner owns a C KV-cache manager's user_data from the moment it is passed in
 * etllm_runner_options.io_manager, and calls destroy exactly once on every path: when the
 * runner is freed, and before etllm_runner_new/etllm_runner_open return when they fail.
 * faulty_destroy_calls counts the calls (each case runs in its own process); AddressSanitizer
 * catches a missing destroy as a leak and a second one as a double free. */
#include <stdbool.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include "faulty_manager.h"
#include "manager_support.h"
#include "static_attention_manager.h"

#define MODEL "static_attention"

typedef etllm_status (*constructor)(const char *, const char *, const etllm_runner_options *,
                                    etllm_runner **);
static const constructor constructors[2] = {etllm_runner_new, etllm_runner_open};
static const char *const constructor_names[2] = {"etllm_runner_new", "etllm_runner_open"};

static etllm_io_manager counted_manager(faulty_control **control) {
  return faulty_manager(example_static_attention_manager(), control);
}

static void check_destroyed(int expected) {
  CHECK_MSG(faulty_destroy_calls == expected, "destroy ran %d time(s), expected %d",
            faulty_destroy_calls, expected);
}

/* A loaded runner that generated: destroy runs when, and only when, it is freed. */
static void destroy_runs_once_on_free(const char *arg) {
  (void)arg;
  etllm_io_manager manager = counted_manager(NULL);
  etllm_runner *runner = open_runner_with(MODEL, &manager);
  collector *c = calloc(1, sizeof *c);
  CHECK(c != NULL);
  const uint32_t prompt[] = {1, 293};
  greedy_ids(runner, prompt, 2, 4, c);
  free(c);
  CHECK_OK(etllm_runner_reset(runner));
  check_destroyed(0);
  etllm_runner_free(runner);
  check_destroyed(1);
}

/* etllm_runner_load fails in the manager's load: the runner keeps the manager (destroy
 * not called yet) and destroys it once when freed. */
static void destroy_runs_once_on_free_after_load_failure(const char *arg) {
  (void)arg;
  faulty_control *control = NULL;
  etllm_io_manager manager = counted_manager(&control);
  etllm_runner_options options = etllm_runner_options_default();
  options.io_manager = &manager;
  etllm_runner *runner = NULL;
  CHECK_OK(etllm_runner_new(fixture_model(MODEL), TOKENIZER(), &options, &runner));
  control->arm[FAULTY_LOAD] = 1;
  CHECK_ERR(etllm_runner_load(runner), ETLLM_ERR_IO_MANAGER);
  check_destroyed(0);
  etllm_runner_free(runner);
  check_destroyed(1);
}

/* etllm_runner_open fails because the manager's load fails: destroy has run once when it
 * returns, and there is no runner to free. */
static void destroy_runs_once_when_open_fails_in_load(const char *arg) {
  (void)arg;
  faulty_control *control = NULL;
  etllm_io_manager manager = counted_manager(&control);
  control->arm[FAULTY_LOAD] = 1;
  etllm_runner_options options = etllm_runner_options_default();
  options.io_manager = &manager;
  etllm_runner *runner = NULL;
  CHECK_ERR(etllm_runner_open(fixture_model(MODEL), TOKENIZER(), &options, &runner),
            ETLLM_ERR_IO_MANAGER);
  CHECK(runner == NULL);
  check_destroyed(1);
}

/* etllm_runner_open fails before the manager is ever loaded (no such model file). */
static void destroy_runs_once_when_model_is_missing(const char *arg) {
  (void)arg;
  faulty_control *control = NULL;
  etllm_io_manager manager = counted_manager(&control);
  etllm_runner_options options = etllm_runner_options_default();
  options.io_manager = &manager;
  etllm_runner *runner = NULL;
  CHECK_ERR(etllm_runner_open(fixture("does/not/exist.pte"), TOKENIZER(), &options, &runner),
            ETLLM_ERR_FILE_ACCESS);
  CHECK(runner == NULL);
  check_destroyed(1);
}

/* Each required function set to NULL in turn, with both constructors: each returns
 * ETLLM_ERR_NULL_ARGUMENT naming the function, and destroys the manager once. */
static void destroy_runs_once_when_a_function_is_missing(const char *arg) {
  (void)arg;
  static const char *const fields[] = {"load",           "reset",          "rewind",
                                       "prepare_prefill", "update_prefill", "prepare_decode",
                                       "update_decode"};
  int expected = 0;
  for (size_t k = 0; k < 2; k++) {
    for (size_t f = 0; f < NUM_CASES(fields); f++) {
      etllm_io_manager manager = counted_manager(NULL);
      switch (f) {
        case 0: manager.load = NULL; break;
        case 1: manager.reset = NULL; break;
        case 2: manager.rewind = NULL; break;
        case 3: manager.prepare_prefill = NULL; break;
        case 4: manager.update_prefill = NULL; break;
        case 5: manager.prepare_decode = NULL; break;
        default: manager.update_decode = NULL; break;
      }
      etllm_runner_options options = etllm_runner_options_default();
      options.io_manager = &manager;
      etllm_runner *runner = NULL;
      CHECK_ERR(constructors[k](fixture_model(MODEL), TOKENIZER(), &options, &runner),
                ETLLM_ERR_NULL_ARGUMENT);
      const char *message = etllm_last_error_message();
      CHECK_MSG(strstr(message, fields[f]) != NULL, "%s without %s: message \"%s\"",
                constructor_names[k], fields[f], message);
      CHECK(runner == NULL);
      check_destroyed(++expected);
    }
  }
}

/* out_runner NULL, with both constructors: ETLLM_ERR_NULL_ARGUMENT, destroy runs once. */
static void destroy_runs_once_when_out_runner_is_null(const char *arg) {
  (void)arg;
  for (size_t k = 0; k < 2; k++) {
    etllm_io_manager manager = counted_manager(NULL);
    etllm_runner_options options = etllm_runner_options_default();
    options.io_manager = &manager;
    CHECK_ERR(constructors[k](fixture_model(MODEL), TOKENIZER(), &options, NULL),
              ETLLM_ERR_NULL_ARGUMENT);
    check_destroyed((int)k + 1);
  }
}

/* The documented exception: with a struct_size the library does not know, nothing in the
 * struct is trusted, destroy is not called, and the caller still owns user_data. */
static void destroy_not_called_for_unknown_struct_size(const char *arg) {
  (void)arg;
  /* Too small, inside the last function pointer, too big; then a valid manager carried by
   * options whose own struct_size ends inside the io_manager pointer. */
  const uint32_t sizes[] = {0, (uint32_t)sizeof(etllm_io_manager) - 4,
                            (uint32_t)sizeof(etllm_io_manager) + 8, 0};
  for (size_t i = 0; i < NUM_CASES(sizes); i++) {
    const bool bad_options = i == NUM_CASES(sizes) - 1;
    etllm_io_manager manager = counted_manager(NULL);
    manager.struct_size = bad_options ? (uint32_t)sizeof manager : sizes[i];
    etllm_runner_options options = etllm_runner_options_default();
    options.io_manager = &manager;
    if (bad_options) {
      options.struct_size = (uint32_t)offsetof(etllm_runner_options, io_manager) + 4;
    }
    etllm_runner *runner = NULL;
    CHECK_ERR(etllm_runner_new(fixture_model(MODEL), TOKENIZER(), &options, &runner),
              ETLLM_ERR_STRUCT_SIZE);
    CHECK(runner == NULL);
    check_destroyed((int)i);
    manager.destroy(manager.user_data); /* still ours */
    check_destroyed((int)i + 1);
  }
}

/* destroy may be NULL: the runner then frees nothing, and the caller frees user_data after
 * the runner is gone. */
static void null_destroy_leaves_user_data_to_caller(const char *arg) {
  (void)arg;
  etllm_io_manager manager = counted_manager(NULL);
  void (*destroy)(void *) = manager.destroy;
  void *user_data = manager.user_data;
  manager.destroy = NULL;
  etllm_runner *runner = open_runner_with(MODEL, &manager);
  etllm_runner_free(runner);
  check_destroyed(0);
  destroy(user_data);
  check_destroyed(1);
}

int main(int argc, char **argv) {
  static const test_case cases[] = {
      {"destroy_runs_once_on_free", destroy_runs_once_on_free},
      {"destroy_runs_once_on_free_after_load_failure",
       destroy_runs_once_on_free_after_load_failure},
      {"destroy_runs_once_when_open_fails_in_load", destroy_runs_once_when_open_fails_in_load},
      {"destroy_runs_once_when_model_is_missing", destroy_runs_once_when_model_is_missing},
      {"destroy_runs_once_when_a_function_is_missing",
       destroy_runs_once_when_a_function_is_missing},
      {"destroy_runs_once_when_out_runner_is_null", destroy_runs_once_when_out_runner_is_null},
      {"destroy_not_called_for_unknown_struct_size", destroy_not_called_for_unknown_struct_size},
      {"null_destroy_leaves_user_data_to_caller", null_destroy_leaves_user_data_to_caller},
  };
  return run_test_case(argc, argv, cases, NUM_CASES(cases));
}
