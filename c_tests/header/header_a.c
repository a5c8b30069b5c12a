/* etllm.h compiles on its own (it is the first include) and survives double inclusion;
 * with header_b.c, two translation units include it without a duplicate definition. */
#include "etllm.h"
#include "etllm.h"

#include <stdio.h>
#include <string.h>

int header_b_check(void);

int main(void) {
  etllm_generation_config config = etllm_generation_config_default();
  if (config.struct_size != sizeof config) return 1;
  if (strcmp(etllm_status_name(ETLLM_ERR_BUSY), "ETLLM_ERR_BUSY") != 0) return 1;
  return header_b_check();
}
