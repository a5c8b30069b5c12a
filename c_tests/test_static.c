/* EtLlm::etllm_static: a program linked with libetllm.a (and the ExecuTorch runtime it
 * brings) generates the reference tokens. */
#include <string.h>

#include "test_support.h"

int main(void) {
  const etllm_ref_model *m = ref_model(DEFAULT_MODEL);
  const etllm_ref_case *ref = &m->cases[1];
  etllm_runner *runner = open_runner(DEFAULT_MODEL);
  static collector c;
  etllm_generation_config config = greedy_config((int32_t)ref->num_greedy_ids);
  CHECK_OK(etllm_runner_generate_tokens(runner, ref->prompt_ids, ref->num_prompt_ids, &config,
                                        collect_token, NULL, &c, NULL));
  CHECK(c.num_ids == ref->num_greedy_ids);
  CHECK(memcmp(c.ids, ref->greedy_ids, c.num_ids * sizeof c.ids[0]) == 0);
  etllm_runner_free(runner);
  return 0;
}
