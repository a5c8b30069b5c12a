// etllm.h compiles on its own as C++ and survives double inclusion; with header_b.cpp, two
// translation units include it without a duplicate definition, and its functions have C
// linkage (they link against the C library).
#include "etllm.h"
#include "etllm.h"

#include <cstring>
#include <type_traits>

static_assert(std::is_standard_layout<etllm_generation_config>::value, "C layout");
static_assert(std::is_trivially_copyable<etllm_stats>::value, "C layout");

int header_b_check();

int main() {
  etllm_runner_options options = etllm_runner_options_default();
  if (options.struct_size != sizeof options) return 1;
  if (std::strcmp(etllm_status_name(ETLLM_OK), "ETLLM_OK") != 0) return 1;
  return header_b_check();
}
