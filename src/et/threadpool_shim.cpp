// Sets the size of ExecuTorch's global thread pool (used by XNNPACK and the optimized
// kernels). The prebuilt runtime ships no threadpool header, so the two members used
// here are declared by hand; their symbols live in libexecutorch_threadpool.so.
#include <cstddef>
#include <cstdint>

namespace executorch {
namespace extension {
namespace threadpool {
class ThreadPool {
 public:
  size_t get_thread_count() const;
  bool _unsafe_reset_threadpool(uint32_t num_threads);
};
ThreadPool* get_threadpool();
}  // namespace threadpool
}  // namespace extension
}  // namespace executorch

extern "C" {

// Returns the pool's thread count, or 0 when there is no pool.
size_t etllm_threadpool_thread_count() noexcept {
  auto* pool = executorch::extension::threadpool::get_threadpool();
  return pool ? pool->get_thread_count() : 0;
}

// Resizes the pool. Returns false when there is no pool or the resize failed.
bool etllm_threadpool_set_threads(uint32_t num_threads) noexcept {
  auto* pool = executorch::extension::threadpool::get_threadpool();
  return pool && pool->_unsafe_reset_threadpool(num_threads);
}
}
