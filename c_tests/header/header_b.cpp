#include "etllm.h"
#include "etllm.h"

int header_b_check();

int header_b_check() {
  etllm_runner *runner = nullptr;
  const etllm_status status = etllm_runner_new(nullptr, nullptr, nullptr, &runner);
  return status == ETLLM_ERR_NULL_ARGUMENT && runner == nullptr ? 0 : 1;
}
