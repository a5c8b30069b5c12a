#include "etllm.h"
#include "etllm.h"

int header_b_check(void);

int header_b_check(void) {
  etllm_stats stats = etllm_stats_default();
  etllm_token_callback on_token = 0;
  etllm_stats_callback on_stats = 0;
  (void)on_token;
  (void)on_stats;
  return stats.struct_size == sizeof stats && stats.stop_reason == ETLLM_STOP_NONE ? 0 : 1;
}
