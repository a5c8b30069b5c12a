/* Helpers shared by the tests of KV-cache managers written in C and C++. */
#ifndef ETLLM_MANAGER_SUPPORT_H
#define ETLLM_MANAGER_SUPPORT_H

#include "test_support.h"

/* Opens fixture `model` with the fixture tokenizer and one thread, through `manager` (NULL:
 * the built-in manager); fails the test on error. */
etllm_runner *open_runner_with(const char *model, const etllm_io_manager *manager);

/* Generates greedily from `ids` (no BOS added, EOS ignored, at most max_new tokens) into `c`
 * (cleared first); fails the test on error. */
void greedy_ids(etllm_runner *runner, const uint32_t *ids, size_t num_ids, int32_t max_new,
                collector *c);

/* Fails the test unless got[0..num_got) equals want[0..num_want), naming the first
 * difference. */
void check_same_ids(const char *what, const uint32_t *got, size_t num_got, const uint32_t *want,
                    size_t num_want);

/* The case of `model` whose `name` is `name`; fails the test when there is none. */
const etllm_ref_case *ref_case_named(const etllm_ref_model *model, const char *name);

#endif /* ETLLM_MANAGER_SUPPORT_H */
