// Kernels for the `llama::` custom operators that upstream's LLM export emits with
// `use_sdpa_with_kv_cache=True`, registered with ExecuTorch's kernel registry.
//
// Upstream's only kernels for these ops live in libcustom_ops_aot_lib.so, which needs
// libtorch and libpython; these need nothing but the prebuilt runtime. Semantics follow
// the registered schemas and upstream's 1.5.1 kernels:
//
//   llama::update_cache.out(Tensor value, Tensor(a!) cache, SymInt start_pos, *,
//                           Tensor(b!) out) -> Tensor(b!)
//     cache[:, start_pos:start_pos+S] = value  (value [B,S,Hkv,D], cache [B,C,Hkv,D]);
//     `out` is a dummy nothing reads.
//   llama::update_cache_with_indices.out(Tensor value, Tensor(a!) cache, SymInt start_pos,
//                           Tensor indices, *, Tensor(b!) out) -> Tensor(b!)
//     cache[b, indices[b, s]] = value[b, s]  (indices i64 [B,S]; start_pos is unused).
//   llama::custom_sdpa.out(Tensor query, Tensor key, Tensor value, SymInt start_pos,
//                           Tensor? attn_mask=None, float drpout_p=0., bool is_causal=False,
//                           float? scale=None, *, Tensor(a!) out) -> Tensor(a!)
//     query [B,S,H,D]; key/value are the caches [B,C,Hkv,D]; out [B,S,H,D].
//     Query head h reads kv head h / (H / Hkv) (grouped-query attention).
//     Without a mask the keys are rows 0..start_pos+S-1; with is_causal, query row i sees
//     rows 0..start_pos+i. With a mask (float [S, C], added to the scores) every cache row
//     is a key; a mask together with is_causal is an error, as upstream.
//     scale defaults to 1/sqrt(D). Dropout must be 0 (inference).
//   llama::sdpa_with_kv_cache.out(Tensor query, Tensor key, Tensor value,
//                           Tensor(a!) key_cache, Tensor(b!) value_cache, SymInt start_pos,
//                           SymInt seq_len, Tensor? attn_mask=None, float drpout_p=0.,
//                           bool is_causal=False, float? scale=None, *, Tensor(c!) out)
//     update_cache for key and value, then custom_sdpa over the caches.
//   llama::custom_quantized_sdpa.out(Tensor query, Tensor key, Tensor value, SymInt start_pos,
//                           Tensor? attn_mask=None, float drpout_p=0., bool is_causal=False,
//                           float? scale=None, Tensor? q_zero_points=None,
//                           Tensor? q_scales=None, Tensor? k_zero_points=None,
//                           Tensor? k_scales=None, Tensor? v_zero_points=None,
//                           Tensor? v_scales=None, bool is_seq_at_dim_2=False, *,
//                           Tensor(a!) out) -> Tensor(a!)
//     custom_sdpa on int8 (Char) query, key and value, each row of each head quantized on
//     its own: x = (x_q - zero_point) * scale, with Float scales and Char zero points of the
//     tensor's shape but a last dimension of 1 ([B,S,H,1] for the query, [B,C,Hkv,1] for
//     the caches). out is Float. With is_seq_at_dim_2 every tensor (and its scales and zero
//     points) is [B,H,S,D] instead. A Float, Half or BFloat16 query makes it custom_sdpa
//     (the quantization parameters are then ignored), as upstream.
//     update_cache copies rows of any dtype, so it also writes the int8 caches and their
//     scale and zero-point buffers.
//
// Dtypes: Float, Half and BFloat16 (accumulation in float), and the int8 query, key and
// value above (dequantized to float, then float attention). Bad arguments are reported
// through ctx.fail() with an Error-level log line, never by aborting.
#include <executorch/runtime/core/evalue.h>
#include <executorch/runtime/core/exec_aten/util/tensor_util.h>
#include <executorch/runtime/kernel/kernel_runtime_context.h>
#include <executorch/runtime/kernel/operator_registry.h>
#include <executorch/runtime/kernel/thread_parallel_interface.h>
#include <executorch/runtime/platform/log.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && defined(__linux__)
#include <immintrin.h>
#endif

namespace {

using executorch::aten::BFloat16;
using executorch::aten::Half;
using executorch::aten::ScalarType;
using executorch::aten::Tensor;
using executorch::runtime::Error;
using executorch::runtime::EValue;
using executorch::runtime::Kernel;
using executorch::runtime::KernelRuntimeContext;
using executorch::runtime::Span;

// Below this many multiply-adds a call runs on the calling thread: handing tiny work to
// the pool costs more than it saves.
constexpr int64_t kMinParallelWork = 1 << 15;

// Fails the kernel with InvalidArgument and an Error-level log line naming the op.
#define ETLLM_OP_CHECK(ctx, op, cond, fmt, ...)                             \
  do {                                                                      \
    if (!(cond)) {                                                          \
      ET_LOG(Error, "%s: " fmt, op, ##__VA_ARGS__);                         \
      (ctx).fail(Error::InvalidArgument);                                   \
      return;                                                               \
    }                                                                       \
  } while (0)

// A 4-D tensor viewed through its strides; the last dimension must be dense.
struct View4 {
  int64_t size[4];
  int64_t stride[4];
};

// With `seq_at_dim_2` the tensor is [B, H, S, D] and the view swaps dimensions 1 and 2,
// so that the view is always [B, S, H, D].
bool view4(const Tensor& t, View4& v, bool seq_at_dim_2 = false) {
  if (t.dim() != 4 || t.strides()[3] != 1) {
    return false;
  }
  for (int i = 0; i < 4; ++i) {
    const int from = seq_at_dim_2 && (i == 1 || i == 2) ? 3 - i : i;
    v.size[i] = t.size(from);
    v.stride[i] = t.strides()[from];
  }
  return true;
}

bool is_float_type(ScalarType t) {
  return t == ScalarType::Float || t == ScalarType::Half || t == ScalarType::BFloat16;
}

const char* dtype_name(ScalarType t) {
  switch (t) {
    case ScalarType::Float:
      return "Float";
    case ScalarType::Half:
      return "Half";
    case ScalarType::BFloat16:
      return "BFloat16";
    case ScalarType::Long:
      return "Long";
    case ScalarType::Int:
      return "Int";
    case ScalarType::Char:
      return "Char";
    case ScalarType::Byte:
      return "Byte";
    default:
      return "an unsupported dtype";
  }
}

// Reads argument `i` of the boxed stack as the type the schema gives it; false when the
// program passed something else.
bool arg_tensor(Span<EValue*> stack, size_t i, Tensor*& out) {
  if (!stack[i]->isTensor()) return false;
  out = &stack[i]->toTensor();
  return true;
}
bool arg_opt_tensor(Span<EValue*> stack, size_t i, Tensor*& out) {
  if (stack[i]->isNone()) {
    out = nullptr;
    return true;
  }
  return arg_tensor(stack, i, out);
}
bool arg_int(Span<EValue*> stack, size_t i, int64_t& out) {
  if (!stack[i]->isInt()) return false;
  out = stack[i]->toInt();
  return true;
}
bool arg_double(Span<EValue*> stack, size_t i, double& out) {
  if (!stack[i]->isDouble()) return false;
  out = stack[i]->toDouble();
  return true;
}
bool arg_opt_double(Span<EValue*> stack, size_t i, std::optional<double>& out) {
  if (stack[i]->isNone()) {
    out.reset();
    return true;
  }
  double d = 0;
  if (!arg_double(stack, i, d)) return false;
  out = d;
  return true;
}
bool arg_bool(Span<EValue*> stack, size_t i, bool& out) {
  if (!stack[i]->isBool()) return false;
  out = stack[i]->toBool();
  return true;
}

// The boxed stack holds the schema's arguments, then (as the runtime emits it) one more
// entry for the returned value. True when `stack` has that shape for `n` arguments.
bool has_arity(Span<EValue*> stack, size_t n) {
  return stack.size() == n || stack.size() == n + 1;
}

// Sets the returned value (the stack's entry past the arguments, when present) to `out`,
// which an out-variant op returns.
void set_return(Span<EValue*> stack, size_t n, const Tensor& out) {
  if (stack.size() == n + 1) *stack[n] = EValue(out);
}

// ---------------------------------------------------------------------------------------
// update_cache

// Copies value [B,S,Hkv,D] into cache rows; row_of(b, s) gives the cache row of (b, s).
template <typename RowOf>
void copy_rows(const Tensor& value, const View4& vv, Tensor& cache, const View4& cv,
               RowOf row_of) {
  const size_t elem = value.element_size();
  const char* src = static_cast<const char*>(value.const_data_ptr());
  char* dst = static_cast<char*>(cache.mutable_data_ptr());
  const int64_t heads = vv.size[2], dim = vv.size[3];
  const bool dense_rows =
      vv.stride[2] == dim && cv.stride[2] == dim;  // a row's heads are one block
  for (int64_t b = 0; b < vv.size[0]; ++b) {
    for (int64_t s = 0; s < vv.size[1]; ++s) {
      const int64_t row = row_of(b, s);
      const char* from = src + (b * vv.stride[0] + s * vv.stride[1]) * elem;
      char* to = dst + (b * cv.stride[0] + row * cv.stride[1]) * elem;
      if (dense_rows) {
        std::memcpy(to, from, heads * dim * elem);
      } else {
        for (int64_t h = 0; h < heads; ++h) {
          std::memcpy(to + h * cv.stride[2] * elem, from + h * vv.stride[2] * elem,
                      dim * elem);
        }
      }
    }
  }
}

// Checks that value [B,S,Hkv,D] fits cache [B,C,Hkv,D]; logs and returns false if not.
bool check_cache_pair(const char* op, const Tensor& value, const Tensor& cache, View4& vv,
                      View4& cv) {
  if (!view4(value, vv) || !view4(cache, cv)) {
    ET_LOG(Error,
           "%s: value and cache must be 4-D [batch, seq, kv_heads, head_dim] with a dense "
           "last dimension (got %d-D and %d-D)",
           op, (int)value.dim(), (int)cache.dim());
    return false;
  }
  if (value.scalar_type() != cache.scalar_type()) {
    ET_LOG(Error, "%s: value is %s but cache is %s", op, dtype_name(value.scalar_type()),
           dtype_name(cache.scalar_type()));
    return false;
  }
  for (int d : {0, 2, 3}) {
    if (vv.size[d] != cv.size[d]) {
      ET_LOG(Error, "%s: value and cache differ in dimension %d (%lld vs %lld)", op, d,
             (long long)vv.size[d], (long long)cv.size[d]);
      return false;
    }
  }
  return true;
}

// Writes value rows at start_pos; logs and returns false when they do not fit.
bool update_cache_at(const char* op, const Tensor& value, Tensor& cache, int64_t start_pos) {
  View4 vv, cv;
  if (!check_cache_pair(op, value, cache, vv, cv)) return false;
  if (start_pos < 0 || start_pos + vv.size[1] > cv.size[1]) {
    ET_LOG(Error, "%s: rows %lld..%lld do not fit a cache of %lld rows", op,
           (long long)start_pos, (long long)(start_pos + vv.size[1]), (long long)cv.size[1]);
    return false;
  }
  copy_rows(value, vv, cache, cv, [start_pos](int64_t, int64_t s) { return start_pos + s; });
  return true;
}

void update_cache_out(KernelRuntimeContext& ctx, Span<EValue*> stack) {
  const char* op = "llama::update_cache.out";
  ETLLM_OP_CHECK(ctx, op, has_arity(stack, 4), "expected 4 arguments, got %zu", stack.size());
  Tensor *value, *cache, *out;
  int64_t start_pos;
  ETLLM_OP_CHECK(ctx, op,
                 arg_tensor(stack, 0, value) && arg_tensor(stack, 1, cache) &&
                     arg_int(stack, 2, start_pos) && arg_tensor(stack, 3, out),
                 "arguments do not match the schema");
  if (!update_cache_at(op, *value, *cache, start_pos)) {
    ctx.fail(Error::InvalidArgument);
    return;
  }
  set_return(stack, 4, *out);
}

void update_cache_with_indices_out(KernelRuntimeContext& ctx, Span<EValue*> stack) {
  const char* op = "llama::update_cache_with_indices.out";
  ETLLM_OP_CHECK(ctx, op, has_arity(stack, 5), "expected 5 arguments, got %zu", stack.size());
  Tensor *value, *cache, *indices, *out;
  int64_t start_pos;
  ETLLM_OP_CHECK(ctx, op,
                 arg_tensor(stack, 0, value) && arg_tensor(stack, 1, cache) &&
                     arg_int(stack, 2, start_pos) && arg_tensor(stack, 3, indices) &&
                     arg_tensor(stack, 4, out),
                 "arguments do not match the schema");
  (void)start_pos;
  View4 vv, cv;
  if (!check_cache_pair(op, *value, *cache, vv, cv)) {
    ctx.fail(Error::InvalidArgument);
    return;
  }
  ETLLM_OP_CHECK(ctx, op,
                 indices->dim() == 2 && indices->scalar_type() == ScalarType::Long &&
                     indices->size(0) == vv.size[0] && indices->size(1) == vv.size[1],
                 "indices must be Long [batch, seq] matching value (got %s, %d-D)",
                 dtype_name(indices->scalar_type()), (int)indices->dim());
  const int64_t* idx = indices->const_data_ptr<int64_t>();
  const int64_t is0 = indices->strides()[0], is1 = indices->strides()[1];
  for (int64_t b = 0; b < vv.size[0]; ++b) {
    for (int64_t s = 0; s < vv.size[1]; ++s) {
      const int64_t row = idx[b * is0 + s * is1];
      ETLLM_OP_CHECK(ctx, op, row >= 0 && row < cv.size[1],
                     "index %lld is outside the cache's %lld rows", (long long)row,
                     (long long)cv.size[1]);
    }
  }
  copy_rows(*value, vv, *cache, cv,
            [idx, is0, is1](int64_t b, int64_t s) { return idx[b * is0 + s * is1]; });
  set_return(stack, 5, *out);
}

// ---------------------------------------------------------------------------------------
// Attention

struct SdpaArgs {
  const Tensor* q;
  const Tensor* k;
  const Tensor* v;
  const Tensor* mask;  // nullptr when absent
  Tensor* out;
  int64_t start_pos;
  bool is_causal;
  float scale;
  View4 qv, kv, vv, ov;
};

inline float to_float(float x) { return x; }
inline float to_float(Half x) { return static_cast<float>(x); }
inline float to_float(BFloat16 x) { return static_cast<float>(x); }

// The hot loops, for float data: compiled twice on x86-64 (AVX2+FMA and the baseline),
// the best one picked at load time, so a prebuilt library is fast on new CPUs and still
// runs on old ones. Float attention also has hand-written AVX2+FMA versions of its loops,
// picked at run time when the CPU has them (see f32_loops): GCC 12 leaves the exp-sum and
// max loops below scalar even in their AVX2 clone, and the score and weighted-sum loops
// gain from working eight keys (or 64 floats of the output) at a time.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && defined(__linux__)
#define ETLLM_MULTIVERSION __attribute__((target_clones("arch=haswell", "default")))
#define ETLLM_AVX2 1
#define ETLLM_TARGET_AVX2 __attribute__((target("avx2,fma")))
#else
#define ETLLM_MULTIVERSION
#define ETLLM_AVX2 0
#endif

// exp(x) for x <= 0 (Cephes' expf polynomial, about 1 ulp), written so that loops over it
// vectorize; exactly 0 below -87 (and for -inf, a masked-out score).
inline __attribute__((always_inline)) float exp_nonpositive(float x) {
  const float clamped = x < -87.f ? -87.f : x;
  const float n = __builtin_floorf(clamped * 1.44269504088896341f + 0.5f);
  float r = clamped - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return x < -87.f ? 0.f : p * scale;
}

// out[j] = scale * dot(q, k row j) for the `keys` rows of k (rows `k_stride` apart).
// Four rows at a time: q is loaded once for four dot products.
ETLLM_MULTIVERSION void qk_scores(const float* q, const float* k, int64_t k_stride,
                                  int64_t keys, int64_t dim, float scale, float* out) {
  int64_t j = 0;
  for (; j + 4 <= keys; j += 4) {
    const float* k0 = k + j * k_stride;
    const float* k1 = k0 + k_stride;
    const float* k2 = k1 + k_stride;
    const float* k3 = k2 + k_stride;
    float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
    for (int64_t d = 0; d < dim; ++d) {
      a0 += q[d] * k0[d];
      a1 += q[d] * k1[d];
      a2 += q[d] * k2[d];
      a3 += q[d] * k3[d];
    }
    out[j] = a0 * scale;
    out[j + 1] = a1 * scale;
    out[j + 2] = a2 * scale;
    out[j + 3] = a3 * scale;
  }
  for (; j < keys; ++j) {
    const float* kj = k + j * k_stride;
    float acc = 0.f;
#pragma omp simd reduction(+ : acc)
    for (int64_t d = 0; d < dim; ++d) acc += q[d] * kj[d];
    out[j] = acc * scale;
  }
}

// s[j] = exp(s[j] - max); returns their sum.
ETLLM_MULTIVERSION float exp_and_sum(float* s, int64_t n, float max) {
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j) {
    const float e = exp_nonpositive(s[j] - max);
    s[j] = e;
    sum += e;
  }
  return sum;
}

// The largest of s[0..n) (-inf when n is 0).
ETLLM_MULTIVERSION float max_of(const float* s, int64_t n) {
  float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < n; ++j) m = std::max(m, s[j]);
  return m;
}

// x[0..n) *= c.
ETLLM_MULTIVERSION void scale_in_place(float* x, int64_t n, float c) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) x[j] *= c;
}

// acc += sum over j of p[j] * (v row j). Four rows at a time: acc is loaded and stored
// once for four rows.
ETLLM_MULTIVERSION void weighted_sum_acc(const float* p, const float* v, int64_t v_stride,
                                         int64_t keys, int64_t dim, float* acc) {
  int64_t j = 0;
  for (; j + 4 <= keys; j += 4) {
    const float* v0 = v + j * v_stride;
    const float* v1 = v0 + v_stride;
    const float* v2 = v1 + v_stride;
    const float* v3 = v2 + v_stride;
    const float p0 = p[j], p1 = p[j + 1], p2 = p[j + 2], p3 = p[j + 3];
#pragma omp simd
    for (int64_t d = 0; d < dim; ++d) {
      acc[d] += p0 * v0[d] + p1 * v1[d] + p2 * v2[d] + p3 * v3[d];
    }
  }
  for (; j < keys; ++j) {
    const float pj = p[j];
    const float* vj = v + j * v_stride;
#pragma omp simd
    for (int64_t d = 0; d < dim; ++d) acc[d] += pj * vj[d];
  }
}

// Int8 rows quantized one (batch, row, head) at a time: x = (data - zero_point) * scale.
// Element strides s[0] batch, s[1] sequence or cache row, s[2] head (the last dimension of
// data is dense); scales and zero points hold one value per row.
struct Q8Rows {
  const int8_t* data;
  const float* scales;
  const int8_t* zero_points;
  int64_t stride[3], scale_stride[3], zero_point_stride[3];
};

// The int8 values, scales and zero points of row `first` of head `h` in batch `b`.
struct Q8Block {
  const int8_t* data;
  const float* scales;
  const int8_t* zero_points;
};

inline Q8Block q8_block(const Q8Rows& x, int64_t b, int64_t first, int64_t h) {
  return {x.data + b * x.stride[0] + first * x.stride[1] + h * x.stride[2],
          x.scales + b * x.scale_stride[0] + first * x.scale_stride[1] + h * x.scale_stride[2],
          x.zero_points + b * x.zero_point_stride[0] + first * x.zero_point_stride[1] +
              h * x.zero_point_stride[2]};
}

// out[r * dim + d] = (x row r [d] - zero point r) * scale r, for `rows` rows of one head
// from `first` (the rows `x.stride[1]` apart), into a dense [rows, dim] block.
ETLLM_MULTIVERSION void dequantize_rows(const Q8Rows& x, int64_t b, int64_t first, int64_t h,
                                        int64_t rows, int64_t dim, float* out) {
  const auto [data, scales, zero_points] = q8_block(x, b, first, h);
  for (int64_t r = 0; r < rows; ++r) {
    const int8_t* row = data + r * x.stride[1];
    const float scale = scales[r * x.scale_stride[1]];
    const int32_t zero_point = zero_points[r * x.zero_point_stride[1]];
    float* o = out + r * dim;
#pragma omp simd
    for (int64_t d = 0; d < dim; ++d) {
      o[d] = static_cast<float>(static_cast<int32_t>(row[d]) - zero_point) * scale;
    }
  }
}

#if ETLLM_AVX2
// The sums of the lanes of a0..a7, as one vector (lane j: the sum of aj).
ETLLM_TARGET_AVX2 inline __m256 lane_sums8(__m256 a0, __m256 a1, __m256 a2, __m256 a3,
                                            __m256 a4, __m256 a5, __m256 a6, __m256 a7) {
  const __m256 s01 = _mm256_hadd_ps(a0, a1);
  const __m256 s23 = _mm256_hadd_ps(a2, a3);
  const __m256 s45 = _mm256_hadd_ps(a4, a5);
  const __m256 s67 = _mm256_hadd_ps(a6, a7);
  const __m256 s0123 = _mm256_hadd_ps(s01, s23);  // low half: 0 1 2 3, high half: 0 1 2 3
  const __m256 s4567 = _mm256_hadd_ps(s45, s67);
  return _mm256_add_ps(_mm256_permute2f128_ps(s0123, s4567, 0x20),
                       _mm256_permute2f128_ps(s0123, s4567, 0x31));
}

ETLLM_TARGET_AVX2 inline float lane_sum(__m256 a) {
  const __m128 h = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  const __m128 q = _mm_add_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_add_ss(q, _mm_shuffle_ps(q, q, 1)));
}

// qk_scores for dim a multiple of 8: eight keys at a time, eight dot products reduced
// together (no per-key horizontal sum).
ETLLM_TARGET_AVX2 void qk_scores_avx2(const float* q, const float* k, int64_t k_stride,
                                      int64_t keys, int64_t dim, float scale, float* out) {
  const __m256 vscale = _mm256_set1_ps(scale);
  int64_t j = 0;
  for (; j + 8 <= keys; j += 8) {
    const float* k0 = k + j * k_stride;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0,
           a7 = a0;
    for (int64_t d = 0; d < dim; d += 8) {
      const __m256 qd = _mm256_loadu_ps(q + d);
      const float* kd = k0 + d;
      a0 = _mm256_fmadd_ps(_mm256_loadu_ps(kd), qd, a0);
      a1 = _mm256_fmadd_ps(_mm256_loadu_ps(kd + k_stride), qd, a1);
      a2 = _mm256_fmadd_ps(_mm256_loadu_ps(kd + 2 * k_stride), qd, a2);
      a3 = _mm256_fmadd_ps(_mm256_loadu_ps(kd + 3 * k_stride), qd, a3);
      a4 = _mm256_fmadd_ps(_mm256_loadu_ps(kd + 4 * k_stride), qd, a4);
      a5 = _mm256_fmadd_ps(_mm256_loadu_ps(kd + 5 * k_stride), qd, a5);
      a6 = _mm256_fmadd_ps(_mm256_loadu_ps(kd + 6 * k_stride), qd, a6);
      a7 = _mm256_fmadd_ps(_mm256_loadu_ps(kd + 7 * k_stride), qd, a7);
    }
    _mm256_storeu_ps(out + j,
                     _mm256_mul_ps(lane_sums8(a0, a1, a2, a3, a4, a5, a6, a7), vscale));
  }
  for (; j < keys; ++j) {
    const float* kj = k + j * k_stride;
    __m256 a = _mm256_setzero_ps();
    for (int64_t d = 0; d < dim; d += 8) {
      a = _mm256_fmadd_ps(_mm256_loadu_ps(kj + d), _mm256_loadu_ps(q + d), a);
    }
    out[j] = lane_sum(a) * scale;
  }
}

// acc[0..8W) += sum over j of p[j] * v row j [0..8W), acc held in W registers.
template <int W>
ETLLM_TARGET_AVX2 void weighted_sum_acc_avx2_w(const float* p, const float* v,
                                               int64_t v_stride, int64_t keys, float* acc) {
  __m256 a[W];
#pragma GCC unroll 8
  for (int w = 0; w < W; ++w) a[w] = _mm256_loadu_ps(acc + 8 * w);
  int64_t j = 0;
  for (; j + 2 <= keys; j += 2) {
    const __m256 p0 = _mm256_broadcast_ss(p + j);
    const __m256 p1 = _mm256_broadcast_ss(p + j + 1);
    const float* v0 = v + j * v_stride;
    const float* v1 = v0 + v_stride;
#pragma GCC unroll 8
    for (int w = 0; w < W; ++w) {
      a[w] = _mm256_fmadd_ps(_mm256_loadu_ps(v0 + 8 * w), p0, a[w]);
      a[w] = _mm256_fmadd_ps(_mm256_loadu_ps(v1 + 8 * w), p1, a[w]);
    }
  }
  for (; j < keys; ++j) {
    const __m256 pj = _mm256_broadcast_ss(p + j);
    const float* vj = v + j * v_stride;
#pragma GCC unroll 8
    for (int w = 0; w < W; ++w) a[w] = _mm256_fmadd_ps(_mm256_loadu_ps(vj + 8 * w), pj, a[w]);
  }
#pragma GCC unroll 8
  for (int w = 0; w < W; ++w) _mm256_storeu_ps(acc + 8 * w, a[w]);
}

// weighted_sum_acc for dim a multiple of 8, in slices of at most 64 floats.
ETLLM_TARGET_AVX2 void weighted_sum_acc_avx2(const float* p, const float* v, int64_t v_stride,
                                             int64_t keys, int64_t dim, float* acc) {
  for (int64_t d = 0; d < dim; d += 64) {
    const float* vd = v + d;
    float* ad = acc + d;
    switch (std::min<int64_t>(dim - d, 64) / 8) {
      case 1: weighted_sum_acc_avx2_w<1>(p, vd, v_stride, keys, ad); break;
      case 2: weighted_sum_acc_avx2_w<2>(p, vd, v_stride, keys, ad); break;
      case 3: weighted_sum_acc_avx2_w<3>(p, vd, v_stride, keys, ad); break;
      case 4: weighted_sum_acc_avx2_w<4>(p, vd, v_stride, keys, ad); break;
      case 5: weighted_sum_acc_avx2_w<5>(p, vd, v_stride, keys, ad); break;
      case 6: weighted_sum_acc_avx2_w<6>(p, vd, v_stride, keys, ad); break;
      case 7: weighted_sum_acc_avx2_w<7>(p, vd, v_stride, keys, ad); break;
      default: weighted_sum_acc_avx2_w<8>(p, vd, v_stride, keys, ad); break;
    }
  }
}

// exp_nonpositive on eight lanes (the same polynomial; NaN stays NaN).
ETLLM_TARGET_AVX2 inline __m256 exp_nonpositive8(__m256 x) {
  const __m256 low = _mm256_set1_ps(-87.f);
  const __m256 clamped = _mm256_max_ps(low, x);  // NaN in x: NaN
  const __m256 n = _mm256_floor_ps(
      _mm256_fmadd_ps(clamped, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), clamped);
  r = _mm256_fmadd_ps(n, _mm256_set1_ps(2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_add_ps(_mm256_fmadd_ps(_mm256_mul_ps(p, r), r, r), _mm256_set1_ps(1.f));
  const __m256i bits =
      _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(n), _mm256_set1_epi32(127)), 23);
  const __m256 e = _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
  return _mm256_andnot_ps(_mm256_cmp_ps(x, low, _CMP_LT_OQ), e);  // 0 below -87
}

// exp_and_sum, eight lanes at a time.
ETLLM_TARGET_AVX2 float exp_and_sum_avx2(float* s, int64_t n, float max) {
  const __m256 vmax = _mm256_set1_ps(max);
  __m256 sum = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 e = exp_nonpositive8(_mm256_sub_ps(_mm256_loadu_ps(s + j), vmax));
    _mm256_storeu_ps(s + j, e);
    sum = _mm256_add_ps(sum, e);
  }
  float total = lane_sum(sum);
  for (; j < n; ++j) {
    s[j] = exp_nonpositive(s[j] - max);
    total += s[j];
  }
  return total;
}

// max_of, eight lanes at a time.
ETLLM_TARGET_AVX2 float max_of_avx2(const float* s, int64_t n) {
  __m256 m = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) m = _mm256_max_ps(m, _mm256_loadu_ps(s + j));
  const __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
  const __m128 q = _mm_max_ps(h, _mm_movehl_ps(h, h));
  float result = _mm_cvtss_f32(_mm_max_ss(q, _mm_shuffle_ps(q, q, 1)));
  for (; j < n; ++j) result = std::max(result, s[j]);
  return result;
}

// to[0..8) = (the low eight bytes of `bytes` - zero) * scale.
ETLLM_TARGET_AVX2 inline void dequantize8(__m128i bytes, __m256i zero, __m256 scale,
                                          float* to) {
  const __m256i ints = _mm256_sub_epi32(_mm256_cvtepi8_epi32(bytes), zero);
  _mm256_storeu_ps(to, _mm256_mul_ps(_mm256_cvtepi32_ps(ints), scale));
}

// dequantize_rows, sixteen (then eight) elements at a time; the same values.
ETLLM_TARGET_AVX2 void dequantize_rows_avx2(const Q8Rows& x, int64_t b, int64_t first,
                                            int64_t h, int64_t rows, int64_t dim, float* out) {
  const auto [data, scales, zero_points] = q8_block(x, b, first, h);
  for (int64_t r = 0; r < rows; ++r) {
    const int8_t* row = data + r * x.stride[1];
    const float scale = scales[r * x.scale_stride[1]];
    const int32_t zero_point = zero_points[r * x.zero_point_stride[1]];
    const __m256 vscale = _mm256_set1_ps(scale);
    const __m256i vzero = _mm256_set1_epi32(zero_point);
    float* o = out + r * dim;
    int64_t d = 0;
    for (; d + 16 <= dim; d += 16) {
      const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + d));
      dequantize8(bytes, vzero, vscale, o + d);
      dequantize8(_mm_srli_si128(bytes, 8), vzero, vscale, o + d + 8);
    }
    for (; d + 8 <= dim; d += 8) {
      dequantize8(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + d)), vzero, vscale,
                  o + d);
    }
    for (; d < dim; ++d) {
      o[d] = static_cast<float>(static_cast<int32_t>(row[d]) - zero_point) * scale;
    }
  }
}

bool cpu_has_avx2_fma() {
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return has;
}
#endif

// The inner loops of float attention, for one head dimension.
struct F32Loops {
  void (*qk)(const float*, const float*, int64_t, int64_t, int64_t, float, float*);
  void (*pv)(const float*, const float*, int64_t, int64_t, int64_t, float*);
  float (*exp_sum)(float*, int64_t, float);
  float (*max)(const float*, int64_t);
  void (*dequantize)(const Q8Rows&, int64_t, int64_t, int64_t, int64_t, int64_t, float*);
};

// The AVX2+FMA loops when the CPU has them and `portable` is false (the two over the head
// dimension only when it is a multiple of 8); else the portable ones.
F32Loops f32_loops(int64_t dim, bool portable) {
#if ETLLM_AVX2
  if (!portable && cpu_has_avx2_fma()) {
    if (dim % 8 == 0) {
      return {qk_scores_avx2, weighted_sum_acc_avx2, exp_and_sum_avx2, max_of_avx2,
              dequantize_rows_avx2};
    }
    return {qk_scores, weighted_sum_acc, exp_and_sum_avx2, max_of_avx2, dequantize_rows_avx2};
  }
#endif
  (void)dim;
  (void)portable;
  return {qk_scores, weighted_sum_acc, exp_and_sum, max_of, dequantize_rows};
}

// Float attention, laid out for the kernel: pointers and element strides
// (s[0] batch, s[1] sequence or cache row, s[2] head; the last dimension is dense).
// With k8 and v8 set, keys and values are int8 rows instead of k and v: each block of
// keys and values is dequantized into scratch once per tile, then the float loops run on
// it.
struct F32Attention {
  const float* q;
  const float* k;
  const float* v;
  const Q8Rows* k8;  // nullptr: float keys in k
  const Q8Rows* v8;  // nullptr: float values in v
  const float* mask;  // [seq, cache_rows] float, added to the scores; nullptr when absent
  float* out;
  int64_t mask_stride[2];
  int64_t q_stride[3], k_stride[3], v_stride[3], o_stride[3];
  int64_t batch, seq, heads, kv_heads, dim, cache_rows, start_pos;
  bool is_causal;
  float scale;

  int64_t group() const { return heads / kv_heads; }
  // Keys query row i sees: rows 0..keys_for(i)-1 of the cache.
  int64_t keys_for(int64_t i) const {
    if (mask != nullptr) return cache_rows;
    return is_causal ? start_pos + i + 1 : start_pos + seq;
  }
};

// Keys per block of the online softmax: a block's key and value rows of one head stay in
// L1 while every query head that reads them goes over them.
constexpr int64_t kKeyBlock = 64;

// A share of the work: batch entry b, kv heads [kh0, kh1) with all the query heads that
// read them, query rows [i0, i1), keys [n0, n1).
struct Tile {
  int64_t b, kh0, kh1, i0, i1, n0, n1;
};

// Attention for one tile, flash-attention style: key blocks in order, each query vector
// keeping a running max m, sum l and unnormalized output acc (rescaled when m grows).
// With `partial` null it writes the tile's outputs; else, for each query vector (b, i, h),
// its (m, l, acc[dim]) at partial + ((b * seq + i) * heads + h) * (dim + 2), for the caller
// to merge with the other key ranges.
void attend_tile(const F32Attention& a, const F32Loops& loops, const Tile& t, float* partial) {
  const int64_t dim = a.dim, group = a.group();
  const int64_t nkh = t.kh1 - t.kh0, vectors = (t.i1 - t.i0) * nkh * group;
  thread_local std::vector<float> scratch;
  const int64_t kv_block = kKeyBlock * dim;  // one dequantized block of keys or values
  const int64_t blocks = (a.k8 != nullptr) + (a.v8 != nullptr);
  const size_t need = static_cast<size_t>(vectors * (dim + 2) + kKeyBlock + blocks * kv_block);
  if (scratch.size() < need) scratch.resize(need);
  float* m = scratch.data();
  float* l = m + vectors;
  float* acc = l + vectors;
  float* s = acc + vectors * dim;
  float* k_block = s + kKeyBlock;
  float* v_block = k_block + (a.k8 != nullptr ? kv_block : 0);
  std::fill(m, m + vectors, -std::numeric_limits<float>::infinity());
  std::fill(l, acc + vectors * dim, 0.f);
  // Query vector r of the tile: row i, kv head kh, query head kh * group + g.
  auto index = [&](int64_t i, int64_t kh, int64_t g) {
    return ((i - t.i0) * nkh + (kh - t.kh0)) * group + g;
  };

  const int64_t keys_end = std::min(t.n1, a.keys_for(t.i1 - 1));
  for (int64_t j0 = t.n0; j0 < keys_end; j0 += kKeyBlock) {
    const int64_t n = std::min(kKeyBlock, keys_end - j0);
    for (int64_t kh = t.kh0; kh < t.kh1; ++kh) {
      // The n key (value) rows from j0 of head kh: in place for a float cache, or
      // dequantized into the tile's scratch block (rows `dim` apart) for an int8 one.
      int64_t k_row = a.k_stride[1], v_row = a.v_stride[1];
      auto rows_of = [&](const Q8Rows* q8, const float* f, const int64_t* stride,
                         float* scratch, int64_t& row) -> const float* {
        if (q8 == nullptr) return f + t.b * stride[0] + j0 * stride[1] + kh * stride[2];
        loops.dequantize(*q8, t.b, j0, kh, n, dim, scratch);
        row = dim;
        return scratch;
      };
      const float* kb = rows_of(a.k8, a.k, a.k_stride, k_block, k_row);
      const float* vb = rows_of(a.v8, a.v, a.v_stride, v_block, v_row);
      for (int64_t i = t.i0; i < t.i1; ++i) {
        const int64_t visible = std::min(n, a.keys_for(i) - j0);
        if (visible <= 0) continue;
        for (int64_t g = 0; g < group; ++g) {
          const int64_t h = kh * group + g, r = index(i, kh, g);
          const float* q = a.q + t.b * a.q_stride[0] + i * a.q_stride[1] + h * a.q_stride[2];
          loops.qk(q, kb, k_row, visible, dim, a.scale, s);
          if (a.mask != nullptr) {
            const float* mask_row = a.mask + i * a.mask_stride[0] + j0 * a.mask_stride[1];
            for (int64_t j = 0; j < visible; ++j) s[j] += mask_row[j * a.mask_stride[1]];
          }
          const float block_max = loops.max(s, visible);
          // Every key of the block masked out: nothing to add.
          if (!(block_max > -std::numeric_limits<float>::infinity())) continue;
          float* acc_r = acc + r * dim;
          if (block_max > m[r]) {
            if (l[r] != 0.f) {
              const float c = std::exp(m[r] - block_max);
              l[r] *= c;
              scale_in_place(acc_r, dim, c);
            }
            m[r] = block_max;
          }
          l[r] += loops.exp_sum(s, visible, m[r]);
          loops.pv(s, vb, v_row, visible, dim, acc_r);
        }
      }
    }
  }

  for (int64_t kh = t.kh0; kh < t.kh1; ++kh) {
    for (int64_t i = t.i0; i < t.i1; ++i) {
      for (int64_t g = 0; g < group; ++g) {
        const int64_t h = kh * group + g, r = index(i, kh, g);
        const float* acc_r = acc + r * dim;
        if (partial != nullptr) {
          float* p = partial + ((t.b * a.seq + i) * a.heads + h) * (dim + 2);
          p[0] = m[r];
          p[1] = l[r];
          std::memcpy(p + 2, acc_r, dim * sizeof(float));
          continue;
        }
        float* o = a.out + t.b * a.o_stride[0] + i * a.o_stride[1] + h * a.o_stride[2];
        // A row whose every score is -inf (or NaN) has no defined softmax; like torch, NaN.
        if (!(m[r] > -std::numeric_limits<float>::infinity())) {
          std::fill(o, o + dim, std::numeric_limits<float>::quiet_NaN());
          continue;
        }
        const float inv = 1.f / l[r];
        for (int64_t d = 0; d < dim; ++d) o[d] = acc_r[d] * inv;
      }
    }
  }
}

// How a call is cut into tiles.
struct F32Plan {
  // true: one tile per (batch entry, key range) over every head and query row (decode);
  // false: one tile per (batch entry, kv head, block of query rows) over every key.
  bool all_heads;
  int64_t key_splits;  // all_heads: key ranges per batch entry, merged afterwards
  int64_t row_block;   // !all_heads: query rows per tile
  bool threaded;       // hand tiles to the thread pool
  bool portable;       // no hand-written AVX2 loops
};

// Query vectors (rows x heads) up to which a call is treated as decode: every head in
// one pass over the cache rows.
constexpr int64_t kDecodeVectors = 64;

F32Plan plan_f32(const F32Attention& a) {
  F32Plan p{};
  const int64_t threads = std::max<int64_t>(1, executorch::extension::get_thread_count());
  const int64_t max_keys = a.keys_for(a.seq - 1);
  const int64_t work = a.batch * a.seq * a.heads * max_keys * a.dim * 2;
  p.threaded = threads > 1 && work >= kMinParallelWork;
  p.all_heads = a.seq * a.heads <= kDecodeVectors;
  p.key_splits = 1;
  if (p.all_heads && p.threaded && a.batch < threads) {
    // Few tiles for the pool: cut the keys too, each share at least kMinParallelWork.
    const int64_t per_batch = (threads + a.batch - 1) / a.batch;
    const int64_t by_work = std::max<int64_t>(1, work / a.batch / kMinParallelWork);
    const int64_t by_keys = std::max<int64_t>(1, max_keys / kKeyBlock);
    p.key_splits = std::min({per_batch, by_work, by_keys});
  }
  // Rows per tile: about eight query vectors share each pass over a block of keys; with
  // int8 keys and values about 32, as each tile dequantizes every block it reads (at 8,
  // dequantizing took about as long as attending in multi-head prefill).
  p.row_block = std::max<int64_t>(1, (a.k8 != nullptr ? 32 : 8) / a.group());
  return p;
}

// Runs float attention with plan `p`.
void run_f32(const F32Attention& a, const F32Plan& p) {
  if (a.batch == 0 || a.seq == 0 || a.heads == 0) return;
  const F32Loops loops = f32_loops(a.dim, p.portable);
  if (p.all_heads && p.key_splits > 1) {
    const int64_t splits = p.key_splits, vectors = a.batch * a.seq * a.heads;
    const int64_t max_keys = a.keys_for(a.seq - 1);
    // Key ranges of whole blocks, as even as blocks allow.
    const int64_t blocks = (max_keys + kKeyBlock - 1) / kKeyBlock;
    thread_local std::vector<float> partials;
    const size_t need = static_cast<size_t>(splits * vectors * (a.dim + 2));
    if (partials.size() < need) partials.resize(need);
    float* base = partials.data();
    auto body = [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / splits, sp = task % splits;
        const int64_t n0 = std::min(max_keys, blocks * sp / splits * kKeyBlock);
        const int64_t n1 = std::min(max_keys, blocks * (sp + 1) / splits * kKeyBlock);
        // Key ranges past some rows' last key leave those rows at m = -inf, l = 0.
        attend_tile(a, loops, {b, 0, a.kv_heads, 0, a.seq, n0, n1},
                    base + sp * vectors * (a.dim + 2));
      }
    };
    const int64_t tasks = a.batch * splits;
    if (p.threaded) {
      executorch::extension::parallel_for(0, tasks, 1, body);
    } else {
      body(0, tasks);
    }
    // Merge: out = sum_s e^(m_s - M) acc_s / sum_s e^(m_s - M) l_s, M the largest m_s.
    const int64_t stride = vectors * (a.dim + 2);
    for (int64_t b = 0; b < a.batch; ++b) {
      for (int64_t i = 0; i < a.seq; ++i) {
        for (int64_t h = 0; h < a.heads; ++h) {
          const int64_t r = (b * a.seq + i) * a.heads + h;
          float* o = a.out + b * a.o_stride[0] + i * a.o_stride[1] + h * a.o_stride[2];
          float top = -std::numeric_limits<float>::infinity();
          for (int64_t sp = 0; sp < splits; ++sp) {
            top = std::max(top, base[sp * stride + r * (a.dim + 2)]);
          }
          if (!(top > -std::numeric_limits<float>::infinity())) {
            std::fill(o, o + a.dim, std::numeric_limits<float>::quiet_NaN());
            continue;
          }
          float sum = 0.f;
          std::fill(o, o + a.dim, 0.f);
          for (int64_t sp = 0; sp < splits; ++sp) {
            const float* part = base + sp * stride + r * (a.dim + 2);
            if (!(part[0] > -std::numeric_limits<float>::infinity())) continue;
            const float c = std::exp(part[0] - top);
            sum += c * part[1];
            for (int64_t d = 0; d < a.dim; ++d) o[d] += c * part[2 + d];
          }
          const float inv = 1.f / sum;
          for (int64_t d = 0; d < a.dim; ++d) o[d] *= inv;
        }
      }
    }
    return;
  }
  if (p.all_heads) {
    auto body = [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        attend_tile(a, loops, {b, 0, a.kv_heads, 0, a.seq, 0, a.keys_for(a.seq - 1)}, nullptr);
      }
    };
    if (p.threaded && a.batch > 1) {
      executorch::extension::parallel_for(0, a.batch, 1, body);
    } else {
      body(0, a.batch);
    }
    return;
  }
  // Tiles of (batch entry, kv head, row block). Row blocks go in the order first, last,
  // second, second to last, ..., so that with causal attention (later rows see more
  // keys) each thread's contiguous share of tiles mixes short and long ones.
  const int64_t rb = p.row_block, row_blocks = (a.seq + rb - 1) / rb;
  auto body = [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t z = task % row_blocks, kh = (task / row_blocks) % a.kv_heads;
      const int64_t b = task / (row_blocks * a.kv_heads);
      const int64_t block = z % 2 == 0 ? z / 2 : row_blocks - 1 - z / 2;
      const int64_t i0 = block * rb, i1 = std::min(a.seq, i0 + rb);
      attend_tile(a, loops, {b, kh, kh + 1, i0, i1, 0, a.keys_for(i1 - 1)}, nullptr);
    }
  };
  const int64_t tasks = a.batch * a.kv_heads * row_blocks;
  if (p.threaded && tasks > 1) {
    executorch::extension::parallel_for(0, tasks, 1, body);
  } else {
    body(0, tasks);
  }
}

// ---------------------------------------------------------------------------------------
// Half and BFloat16 attention (accumulation in float): one task per (batch, head, query
// row), scores for the visible rows, a max-subtracted exp with its sum, the weighted sum.

template <typename T>
void qk_scores(const T* q, const T* k, int64_t k_stride, int64_t keys, int64_t dim,
               float scale, float* out) {
  for (int64_t j = 0; j < keys; ++j) {
    float acc = 0.f;
    for (int64_t d = 0; d < dim; ++d) acc += to_float(q[d]) * to_float(k[j * k_stride + d]);
    out[j] = acc * scale;
  }
}

template <typename T>
void weighted_sum(const float* p, const T* v, int64_t v_stride, int64_t keys, int64_t dim,
                  float* acc) {
  for (int64_t d = 0; d < dim; ++d) acc[d] = 0.f;
  for (int64_t j = 0; j < keys; ++j) {
    for (int64_t d = 0; d < dim; ++d) acc[d] += p[j] * to_float(v[j * v_stride + d]);
  }
}

// One query row of one head: out = softmax(q·K^T * scale + mask) V over `keys` rows.
template <typename T, typename M>
void attend_row(const SdpaArgs& a, int64_t b, int64_t h, int64_t i, int64_t keys,
                std::vector<float>& scores, std::vector<float>& acc) {
  const int64_t dim = a.qv.size[3];
  const int64_t group = a.qv.size[2] / a.kv.size[2];
  const int64_t kh = h / group;
  const T* q = a.q->template const_data_ptr<T>() + b * a.qv.stride[0] + i * a.qv.stride[1] +
               h * a.qv.stride[2];
  const T* k = a.k->template const_data_ptr<T>() + b * a.kv.stride[0] + kh * a.kv.stride[2];
  const T* v = a.v->template const_data_ptr<T>() + b * a.vv.stride[0] + kh * a.vv.stride[2];

  if (static_cast<int64_t>(scores.size()) < keys) scores.resize(keys);
  if (static_cast<int64_t>(acc.size()) < dim) acc.resize(dim);
  float* s = scores.data();
  qk_scores(q, k, a.kv.stride[1], keys, dim, a.scale, s);
  if (a.mask != nullptr) {
    const M* mask_row = a.mask->template const_data_ptr<M>() + i * a.mask->strides()[0];
    const int64_t mask_stride = a.mask->strides()[1];
    for (int64_t j = 0; j < keys; ++j) s[j] += to_float(mask_row[j * mask_stride]);
  }
  float max_score = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < keys; ++j) max_score = std::max(max_score, s[j]);
  T* o = a.out->template mutable_data_ptr<T>() + b * a.ov.stride[0] + i * a.ov.stride[1] +
         h * a.ov.stride[2];
  // A row whose every score is -inf (or NaN) has no defined softmax; like torch, NaN.
  if (!(max_score > -std::numeric_limits<float>::infinity())) {
    for (int64_t d = 0; d < dim; ++d) {
      o[d] = static_cast<T>(std::numeric_limits<float>::quiet_NaN());
    }
    return;
  }
  const float inv = 1.f / exp_and_sum(s, keys, max_score);
  weighted_sum(s, v, a.vv.stride[1], keys, dim, acc.data());
  for (int64_t d = 0; d < dim; ++d) o[d] = static_cast<T>(acc[d] * inv);
}

template <typename T, typename M>
void run_sdpa(const SdpaArgs& a) {
  const int64_t batch = a.qv.size[0], seq = a.qv.size[1], heads = a.qv.size[2];
  const int64_t dim = a.qv.size[3];
  const int64_t cache_rows = a.kv.size[1];
  // Keys each query row sees (the last query row sees the most).
  auto keys_for = [&](int64_t i) -> int64_t {
    if (a.mask != nullptr) return cache_rows;
    return a.is_causal ? a.start_pos + i + 1 : a.start_pos + seq;
  };
  const int64_t tasks = batch * heads * seq;
  const int64_t work = tasks * keys_for(seq - 1) * dim * 2;
  auto body = [&](int64_t begin, int64_t end) {
    thread_local std::vector<float> scores, acc;
    for (int64_t t = begin; t < end; ++t) {
      const int64_t i = t % seq, h = (t / seq) % heads, b = t / (seq * heads);
      attend_row<T, M>(a, b, h, i, keys_for(i), scores, acc);
    }
  };
  if (work < kMinParallelWork || tasks == 1) {
    body(0, tasks);
  } else {
    const int64_t per_task = std::max<int64_t>(1, work / tasks);
    const int64_t grain = std::max<int64_t>(1, kMinParallelWork / per_task);
    executorch::extension::parallel_for(0, tasks, grain, body);
  }
}

// The float kernel's view of validated arguments.
F32Attention f32_attention(const SdpaArgs& a) {
  F32Attention f{};
  f.q = a.q->const_data_ptr<float>();
  f.k = a.k->const_data_ptr<float>();
  f.v = a.v->const_data_ptr<float>();
  f.out = a.out->mutable_data_ptr<float>();
  if (a.mask != nullptr) {
    f.mask = a.mask->const_data_ptr<float>();
    f.mask_stride[0] = a.mask->strides()[0];
    f.mask_stride[1] = a.mask->strides()[1];
  }
  for (int d = 0; d < 3; ++d) {
    f.q_stride[d] = a.qv.stride[d];
    f.k_stride[d] = a.kv.stride[d];
    f.v_stride[d] = a.vv.stride[d];
    f.o_stride[d] = a.ov.stride[d];
  }
  f.batch = a.qv.size[0];
  f.seq = a.qv.size[1];
  f.heads = a.qv.size[2];
  f.kv_heads = a.kv.size[2];
  f.dim = a.qv.size[3];
  f.cache_rows = a.kv.size[1];
  f.start_pos = a.start_pos;
  f.is_causal = a.is_causal;
  f.scale = a.scale;
  return f;
}

// The quantization parameters of custom_quantized_sdpa's int8 query, key and value.
struct Q8Params {
  const Tensor* q_zero_points;
  const Tensor* q_scales;
  const Tensor* k_zero_points;
  const Tensor* k_scales;
  const Tensor* v_zero_points;
  const Tensor* v_scales;
};

// Checks `zero_points` and `scales` against the int8 tensor `t` (viewed as `tv`) and fills
// `rows`; logs and returns false if they do not fit.
bool q8_rows(const char* op, const char* what, const Tensor& t, const View4& tv,
             const Tensor* zero_points, const Tensor* scales, bool seq_at_dim_2,
             Q8Rows& rows) {
  if (zero_points == nullptr || scales == nullptr) {
    ET_LOG(Error, "%s: an int8 %s needs its zero points and scales", op, what);
    return false;
  }
  View4 zv, sv;
  if (zero_points->dim() != 4 || scales->dim() != 4 ||
      zero_points->scalar_type() != ScalarType::Char ||
      scales->scalar_type() != ScalarType::Float) {
    ET_LOG(Error, "%s: %s zero points must be 4-D Char and scales 4-D Float (got %s, %s)", op,
           what, dtype_name(zero_points->scalar_type()), dtype_name(scales->scalar_type()));
    return false;
  }
  // The last dimension holds one value per row; only its first element is read, so its
  // stride does not matter.
  for (int i = 0; i < 4; ++i) {
    const int from = seq_at_dim_2 && (i == 1 || i == 2) ? 3 - i : i;
    zv.size[i] = zero_points->size(from);
    zv.stride[i] = zero_points->strides()[from];
    sv.size[i] = scales->size(from);
    sv.stride[i] = scales->strides()[from];
  }
  for (int d = 0; d < 3; ++d) {
    if (zv.size[d] != tv.size[d] || sv.size[d] != tv.size[d]) {
      ET_LOG(Error, "%s: %s zero points or scales differ from the %s in dimension %d", op,
             what, what, d);
      return false;
    }
  }
  if (zv.size[3] < 1 || sv.size[3] < 1) {
    ET_LOG(Error, "%s: %s zero points and scales must have a last dimension of 1", op, what);
    return false;
  }
  rows.data = t.const_data_ptr<int8_t>();
  rows.scales = scales->const_data_ptr<float>();
  rows.zero_points = zero_points->const_data_ptr<int8_t>();
  for (int d = 0; d < 3; ++d) {
    rows.stride[d] = tv.stride[d];
    rows.scale_stride[d] = sv.stride[d];
    rows.zero_point_stride[d] = zv.stride[d];
  }
  return true;
}

// custom_quantized_sdpa on int8 query, key and value: the query is dequantized into a
// dense [B, S, H, D] float array, and float attention reads the int8 keys and values
// block by block (see attend_tile).
bool run_q8(const char* op, const SdpaArgs& a, const Q8Params& qp, bool seq_at_dim_2) {
  Q8Rows q8, k8, v8;
  if (!q8_rows(op, "query", *a.q, a.qv, qp.q_zero_points, qp.q_scales, seq_at_dim_2, q8) ||
      !q8_rows(op, "key", *a.k, a.kv, qp.k_zero_points, qp.k_scales, seq_at_dim_2, k8) ||
      !q8_rows(op, "value", *a.v, a.vv, qp.v_zero_points, qp.v_scales, seq_at_dim_2, v8)) {
    return false;
  }
  const int64_t batch = a.qv.size[0], seq = a.qv.size[1], heads = a.qv.size[2];
  const int64_t dim = a.qv.size[3];
  thread_local std::vector<float> q_float;
  q_float.resize(static_cast<size_t>(batch * seq * heads * dim));
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t h = 0; h < heads; ++h) {
      // Rows of one head are S apart in the dense array: dequantize each on its own.
      for (int64_t i = 0; i < seq; ++i) {
        dequantize_rows(q8, b, i, h, 1, dim, q_float.data() + ((b * seq + i) * heads + h) * dim);
      }
    }
  }
  F32Attention f{};
  f.q = q_float.data();
  f.k8 = &k8;
  f.v8 = &v8;
  f.out = a.out->mutable_data_ptr<float>();
  if (a.mask != nullptr) {
    f.mask = a.mask->const_data_ptr<float>();
    f.mask_stride[0] = a.mask->strides()[0];
    f.mask_stride[1] = a.mask->strides()[1];
  }
  const int64_t q_stride[3] = {seq * heads * dim, heads * dim, dim};
  for (int d = 0; d < 3; ++d) {
    f.q_stride[d] = q_stride[d];
    f.o_stride[d] = a.ov.stride[d];
  }
  f.batch = batch;
  f.seq = seq;
  f.heads = heads;
  f.kv_heads = a.kv.size[2];
  f.dim = dim;
  f.cache_rows = a.kv.size[1];
  f.start_pos = a.start_pos;
  f.is_causal = a.is_causal;
  f.scale = a.scale;
  run_f32(f, plan_f32(f));
  return true;
}

// Validates shapes and runs attention; logs and returns false on bad arguments. With
// `q8` (custom_quantized_sdpa) an int8 query selects the int8 path; with `seq_at_dim_2`
// query, key, value and out are [B, H, S, D].
bool sdpa(const char* op, SdpaArgs& a, double dropout_p, std::optional<double> scale,
          const Q8Params* q8 = nullptr, bool seq_at_dim_2 = false) {
  if (!view4(*a.q, a.qv, seq_at_dim_2) || !view4(*a.k, a.kv, seq_at_dim_2) ||
      !view4(*a.v, a.vv, seq_at_dim_2)) {
    ET_LOG(Error,
           "%s: query, key and value must be 4-D [batch, seq, heads, head_dim] with a dense "
           "last dimension",
           op);
    return false;
  }
  const ScalarType dt = a.q->scalar_type();
  const bool int8 = q8 != nullptr && dt == ScalarType::Char;
  if (int8) {
    if (a.k->scalar_type() != dt || a.v->scalar_type() != dt ||
        a.out->scalar_type() != ScalarType::Float) {
      ET_LOG(Error, "%s: with an int8 (Char) query, key and value must be Char and out Float "
                    "(got %s, %s, %s)",
             op, dtype_name(a.k->scalar_type()), dtype_name(a.v->scalar_type()),
             dtype_name(a.out->scalar_type()));
      return false;
    }
  } else if (!is_float_type(dt) || a.k->scalar_type() != dt || a.v->scalar_type() != dt ||
             a.out->scalar_type() != dt) {
    ET_LOG(Error, "%s: query, key, value and out must share one of Float, Half, BFloat16%s "
                  "(query is %s)",
           op, q8 != nullptr ? ", or query, key and value be Char with a Float out" : "",
           dtype_name(dt));
    return false;
  }
  for (int d : {0, 1, 2, 3}) {
    if (a.kv.size[d] != a.vv.size[d]) {
      ET_LOG(Error, "%s: key and value differ in dimension %d", op, d);
      return false;
    }
  }
  if (a.qv.size[0] != a.kv.size[0] || a.qv.size[3] != a.kv.size[3]) {
    ET_LOG(Error, "%s: query and key differ in batch or head_dim", op);
    return false;
  }
  if (a.kv.size[2] == 0 || a.qv.size[2] % a.kv.size[2] != 0) {
    ET_LOG(Error, "%s: %lld query heads are not a multiple of %lld kv heads", op,
           (long long)a.qv.size[2], (long long)a.kv.size[2]);
    return false;
  }
  if (dropout_p != 0.0) {
    ET_LOG(Error, "%s: dropout_p must be 0 at inference (got %f)", op, dropout_p);
    return false;
  }
  if (a.mask != nullptr) {
    if (a.is_causal) {
      ET_LOG(Error, "%s: attn_mask and is_causal cannot be set at the same time", op);
      return false;
    }
    const ScalarType mt = a.mask->scalar_type();
    if (a.mask->dim() != 2 || a.mask->size(0) != a.qv.size[1] ||
        a.mask->size(1) != a.kv.size[1] ||
        (mt != ScalarType::Float && (int8 || mt != dt))) {
      ET_LOG(Error,
             "%s: attn_mask must be Float (or the query's dtype) [seq, cache rows] = "
             "[%lld, %lld]",
             op, (long long)a.qv.size[1], (long long)a.kv.size[1]);
      return false;
    }
  } else if (a.start_pos < 0 || a.start_pos + a.qv.size[1] > a.kv.size[1]) {
    ET_LOG(Error, "%s: start_pos %lld + %lld query rows exceeds the cache's %lld rows", op,
           (long long)a.start_pos, (long long)a.qv.size[1], (long long)a.kv.size[1]);
    return false;
  }
  const Error resized = executorch::runtime::resize_tensor(*a.out, a.q->sizes());
  if (resized != Error::Ok || !view4(*a.out, a.ov, seq_at_dim_2)) {
    ET_LOG(Error, "%s: cannot resize out to the query's shape", op);
    return false;
  }
  a.scale = static_cast<float>(scale.has_value() ? *scale
                                                 : 1.0 / std::sqrt(double(a.qv.size[3])));
  if (int8) return run_q8(op, a, *q8, seq_at_dim_2);
  const bool float_mask = a.mask != nullptr && a.mask->scalar_type() == ScalarType::Float;
  switch (dt) {
    case ScalarType::Float: {
      const F32Attention f = f32_attention(a);
      run_f32(f, plan_f32(f));
      break;
    }
    case ScalarType::Half:
      float_mask ? run_sdpa<Half, float>(a) : run_sdpa<Half, Half>(a);
      break;
    case ScalarType::BFloat16:
      float_mask ? run_sdpa<BFloat16, float>(a) : run_sdpa<BFloat16, BFloat16>(a);
      break;
    default:
      return false;
  }
  return true;
}

// Runs attention for an op with `n` schema arguments whose tensors are in `a`: fails the
// kernel on bad arguments, else returns `out`.
void sdpa_op(KernelRuntimeContext& ctx, Span<EValue*> stack, size_t n, const char* op,
             SdpaArgs& a, double dropout_p, std::optional<double> scale,
             const Q8Params* q8 = nullptr, bool seq_at_dim_2 = false) {
  if (!sdpa(op, a, dropout_p, scale, q8, seq_at_dim_2)) {
    ctx.fail(Error::InvalidArgument);
    return;
  }
  set_return(stack, n, *a.out);
}

void custom_sdpa_out(KernelRuntimeContext& ctx, Span<EValue*> stack) {
  const char* op = "llama::custom_sdpa.out";
  ETLLM_OP_CHECK(ctx, op, has_arity(stack, 9), "expected 9 arguments, got %zu", stack.size());
  Tensor *q, *k, *v, *mask, *out;
  SdpaArgs a{};
  double dropout_p;
  std::optional<double> scale;
  ETLLM_OP_CHECK(ctx, op,
                 arg_tensor(stack, 0, q) && arg_tensor(stack, 1, k) &&
                     arg_tensor(stack, 2, v) && arg_int(stack, 3, a.start_pos) &&
                     arg_opt_tensor(stack, 4, mask) && arg_double(stack, 5, dropout_p) &&
                     arg_bool(stack, 6, a.is_causal) && arg_opt_double(stack, 7, scale) &&
                     arg_tensor(stack, 8, out),
                 "arguments do not match the schema");
  a.q = q;
  a.k = k;
  a.v = v;
  a.mask = mask;
  a.out = out;
  sdpa_op(ctx, stack, 9, op, a, dropout_p, scale);
}

void custom_quantized_sdpa_out(KernelRuntimeContext& ctx, Span<EValue*> stack) {
  const char* op = "llama::custom_quantized_sdpa.out";
  ETLLM_OP_CHECK(ctx, op, has_arity(stack, 16), "expected 16 arguments, got %zu",
                 stack.size());
  Tensor *q, *k, *v, *mask, *out;
  Tensor *q_zp, *q_s, *k_zp, *k_s, *v_zp, *v_s;
  SdpaArgs a{};
  double dropout_p;
  std::optional<double> scale;
  bool seq_at_dim_2;
  ETLLM_OP_CHECK(ctx, op,
                 arg_tensor(stack, 0, q) && arg_tensor(stack, 1, k) &&
                     arg_tensor(stack, 2, v) && arg_int(stack, 3, a.start_pos) &&
                     arg_opt_tensor(stack, 4, mask) && arg_double(stack, 5, dropout_p) &&
                     arg_bool(stack, 6, a.is_causal) && arg_opt_double(stack, 7, scale) &&
                     arg_opt_tensor(stack, 8, q_zp) && arg_opt_tensor(stack, 9, q_s) &&
                     arg_opt_tensor(stack, 10, k_zp) && arg_opt_tensor(stack, 11, k_s) &&
                     arg_opt_tensor(stack, 12, v_zp) && arg_opt_tensor(stack, 13, v_s) &&
                     arg_bool(stack, 14, seq_at_dim_2) && arg_tensor(stack, 15, out),
                 "arguments do not match the schema");
  a.q = q;
  a.k = k;
  a.v = v;
  a.mask = mask;
  a.out = out;
  const Q8Params q8{q_zp, q_s, k_zp, k_s, v_zp, v_s};
  sdpa_op(ctx, stack, 16, op, a, dropout_p, scale, &q8, seq_at_dim_2);
}

void sdpa_with_kv_cache_out(KernelRuntimeContext& ctx, Span<EValue*> stack) {
  const char* op = "llama::sdpa_with_kv_cache.out";
  ETLLM_OP_CHECK(ctx, op, has_arity(stack, 12), "expected 12 arguments, got %zu", stack.size());
  Tensor *q, *k, *v, *k_cache, *v_cache, *mask, *out;
  SdpaArgs a{};
  int64_t seq_len;
  double dropout_p;
  std::optional<double> scale;
  ETLLM_OP_CHECK(ctx, op,
                 arg_tensor(stack, 0, q) && arg_tensor(stack, 1, k) &&
                     arg_tensor(stack, 2, v) && arg_tensor(stack, 3, k_cache) &&
                     arg_tensor(stack, 4, v_cache) && arg_int(stack, 5, a.start_pos) &&
                     arg_int(stack, 6, seq_len) && arg_opt_tensor(stack, 7, mask) &&
                     arg_double(stack, 8, dropout_p) && arg_bool(stack, 9, a.is_causal) &&
                     arg_opt_double(stack, 10, scale) && arg_tensor(stack, 11, out),
                 "arguments do not match the schema");
  ETLLM_OP_CHECK(ctx, op, q->dim() == 4 && seq_len == q->size(1),
                 "seq_len %lld does not match the query's %lld rows", (long long)seq_len,
                 q->dim() == 4 ? (long long)q->size(1) : -1LL);
  if (!update_cache_at(op, *k, *k_cache, a.start_pos) ||
      !update_cache_at(op, *v, *v_cache, a.start_pos)) {
    ctx.fail(Error::InvalidArgument);
    return;
  }
  a.q = q;
  a.k = k_cache;
  a.v = v_cache;
  a.mask = mask;
  a.out = out;
  sdpa_op(ctx, stack, 12, op, a, dropout_p, scale);
}

const Kernel kKernels[] = {
    Kernel("llama::custom_sdpa.out", custom_sdpa_out),
    Kernel("llama::update_cache.out", update_cache_out),
    Kernel("llama::sdpa_with_kv_cache.out", sdpa_with_kv_cache_out),
    Kernel("llama::update_cache_with_indices.out", update_cache_with_indices_out),
    Kernel("llama::custom_quantized_sdpa.out", custom_quantized_sdpa_out),
};
constexpr uint32_t kNumKernels = sizeof(kKernels) / sizeof(kKernels[0]);

}  // namespace

extern "C" {

// Number of kernels this file provides.
uint32_t etllm_llama_ops_count() noexcept { return kNumKernels; }

// Name of kernel `i`, or NULL past the end.
const char* etllm_llama_ops_name(uint32_t i) noexcept {
  return i < kNumKernels ? kKernels[i].name_ : nullptr;
}

// Registers each kernel whose op the registry does not have yet (another library may have
// registered it first: that one is kept). Writes one status per kernel into `status`
// (`count` entries at most): 0 registered now, 1 already registered, 2 refused.
void etllm_llama_ops_register(uint8_t* status, uint32_t count) noexcept {
  for (uint32_t i = 0; i < kNumKernels; ++i) {
    uint8_t result = 1;
    if (!executorch::runtime::registry_has_op_function(kKernels[i].name_)) {
      result = executorch::runtime::register_kernels({&kKernels[i], 1}) == Error::Ok ? 0 : 2;
    }
    if (i < count) status[i] = result;
  }
}

}  // extern "C"

namespace {

// For the test entry points: dense arrays (q and out [batch, seq, heads, dim], k and v
// [batch, cache_rows, kv_heads, dim], mask [seq, cache_rows] or NULL) as an F32Attention
// with the plan of `layout` (see etllm_llama_ops_test_f32_attention) run on it. Returns
// false when the shapes do not fit together.
bool run_dense_for_test(F32Attention& a, const float* mask, int64_t batch, int64_t seq,
                        int64_t heads, int64_t kv_heads, int64_t dim, int64_t cache_rows,
                        int64_t start_pos, bool is_causal, float scale, int32_t layout,
                        int64_t key_splits, int64_t row_block, bool portable, bool threaded) {
  if (batch < 0 || seq < 0 || heads <= 0 || kv_heads <= 0 || heads % kv_heads != 0 ||
      dim < 0 || cache_rows < 0 ||
      (mask == nullptr && (start_pos < 0 || start_pos + seq > cache_rows)) ||
      (mask != nullptr && is_causal) || key_splits < 1 || row_block < 1) {
    return false;
  }
  a.mask = mask;
  a.mask_stride[0] = cache_rows;
  a.mask_stride[1] = 1;
  const int64_t q_stride[3] = {seq * heads * dim, heads * dim, dim};
  const int64_t kv_stride[3] = {cache_rows * kv_heads * dim, kv_heads * dim, dim};
  for (int d = 0; d < 3; ++d) {
    a.q_stride[d] = a.o_stride[d] = q_stride[d];
    a.k_stride[d] = a.v_stride[d] = kv_stride[d];
  }
  a.batch = batch;
  a.seq = seq;
  a.heads = heads;
  a.kv_heads = kv_heads;
  a.dim = dim;
  a.cache_rows = cache_rows;
  a.start_pos = start_pos;
  a.is_causal = is_causal;
  a.scale = scale;
  F32Plan p = plan_f32(a);
  if (layout != 0) {
    p.all_heads = layout == 1;
    p.key_splits = key_splits;
    p.row_block = row_block;
    p.threaded = threaded;
  }
  p.portable = portable;
  run_f32(a, p);
  return true;
}

// Dense int8 rows [batch, rows, heads, dim] with one scale and zero point per
// (batch, row, head).
Q8Rows dense_q8(const int8_t* data, const float* scales, const int8_t* zero_points,
                int64_t rows, int64_t heads, int64_t dim) {
  Q8Rows r{};
  r.data = data;
  r.scales = scales;
  r.zero_points = zero_points;
  const int64_t stride[3] = {rows * heads * dim, heads * dim, dim};
  const int64_t param_stride[3] = {rows * heads, heads, 1};
  for (int d = 0; d < 3; ++d) {
    r.stride[d] = stride[d];
    r.scale_stride[d] = r.zero_point_stride[d] = param_stride[d];
  }
  return r;
}

}  // namespace

extern "C" {

// For tests: float attention on dense arrays (q and out [batch, seq, heads, dim], k and v
// [batch, cache_rows, kv_heads, dim], mask [seq, cache_rows] or NULL), with the kernel's
// plan forced. `layout` 0: the plan a call would get (the other plan arguments are then
// ignored); 1: one tile per batch entry and key range over every head, `key_splits` key
// ranges merged afterwards; 2: one tile per kv head and `row_block` query rows. `portable`
// skips the hand-written AVX2 loops; `threaded` hands the tiles to ExecuTorch's thread
// pool. Returns false when the shapes do not fit together.
bool etllm_llama_ops_test_f32_attention(const float* q, const float* k, const float* v,
                                        const float* mask, float* out, int64_t batch,
                                        int64_t seq, int64_t heads, int64_t kv_heads,
                                        int64_t dim, int64_t cache_rows, int64_t start_pos,
                                        bool is_causal, float scale, int32_t layout,
                                        int64_t key_splits, int64_t row_block, bool portable,
                                        bool threaded) noexcept {
  F32Attention a{};
  a.q = q;
  a.k = k;
  a.v = v;
  a.out = out;
  return run_dense_for_test(a, mask, batch, seq, heads, kv_heads, dim, cache_rows, start_pos,
                            is_causal, scale, layout, key_splits, row_block, portable,
                            threaded);
}

// For tests: the int8 path of custom_quantized_sdpa with the plan forced (as
// etllm_llama_ops_test_f32_attention): the query is given already dequantized (float
// [batch, seq, heads, dim]); keys and values are int8 [batch, cache_rows, kv_heads, dim]
// with scales (float) and zero points (int8) [batch, cache_rows, kv_heads].
bool etllm_llama_ops_test_q8_attention(const float* q, const int8_t* k, const float* k_scales,
                                       const int8_t* k_zero_points, const int8_t* v,
                                       const float* v_scales, const int8_t* v_zero_points,
                                       const float* mask, float* out, int64_t batch,
                                       int64_t seq, int64_t heads, int64_t kv_heads,
                                       int64_t dim, int64_t cache_rows, int64_t start_pos,
                                       bool is_causal, float scale, int32_t layout,
                                       int64_t key_splits, int64_t row_block, bool portable,
                                       bool threaded) noexcept {
  const Q8Rows k8 = dense_q8(k, k_scales, k_zero_points, cache_rows, kv_heads, dim);
  const Q8Rows v8 = dense_q8(v, v_scales, v_zero_points, cache_rows, kv_heads, dim);
  F32Attention a{};
  a.q = q;
  a.k8 = &k8;
  a.v8 = &v8;
  a.out = out;
  return run_dense_for_test(a, mask, batch, seq, heads, kv_heads, dim, cache_rows, start_pos,
                            is_causal, scale, layout, key_splits, row_block, portable,
                            threaded);
}
}
