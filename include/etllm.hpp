// EtLlm C++ API: a header-only C++17 wrapper over the C API in etllm.h.
//
// - Handles are RAII and move-only: an etllm::Runner frees its runner when destroyed.
// - Errors are exceptions: every failing call throws etllm::Error, which carries the C
//   status code and the library's message.
// - Callbacks are any callables (lambdas included). An exception thrown inside a callback
//   stops generation and is rethrown from the generate call that invoked it; the runner
//   stays usable.
// - etllm::Runner mirrors upstream ExecuTorch's IRunner (load, is_loaded,
//   generate(prompt, config, token_callback, stats_callback), prefill, stop, reset), so
//   code written against TextLLMRunner changes little. See README.md, "Moving from
//   upstream's TextLLMRunner".
//
// - KV-cache managers can be written in C++: derive from etllm::IoManager and pass a
//   std::unique_ptr to the Runner constructor. An exception thrown by a manager method
//   becomes ETLLM_ERR_IO_MANAGER with its what() as the message (it never reaches the
//   library), and the runner deletes the manager exactly once.
//
// - etllm::Session (Runner::session()) is a conversation of its own over a runner's loaded
//   model: several share the weights, and their state can be saved and restored.
//
// - Multimodal prompts: a list of etllm::Input (text, token ids, images, features) given to
//   Runner::generate_inputs or Session::generate_inputs. etllm::AsrRunner transcribes speech
//   with an encoder-decoder export (Whisper).
//
// Thread rules are the C API's: one call at a time on a runner (or a session), except
// stop(), which any thread may call while generate runs. Sessions of one model take turns.
#ifndef ETLLM_HPP
#define ETLLM_HPP

#include <cstddef>
#include <cstdint>
#include <exception>
#include <functional>
#include <initializer_list>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include "etllm.h"

namespace etllm {

/// A failed EtLlm call: the C status code and the library's message.
class Error : public std::runtime_error {
 public:
  Error(etllm_status status, const std::string& message)
      : std::runtime_error(std::string(etllm_status_name(static_cast<int32_t>(status))) + ": " + message),
        status_(status),
        message_(message) {}

  /// The C status code.
  etllm_status status() const noexcept { return status_; }
  /// The library's message, without the status name.
  const std::string& message() const noexcept { return message_; }

 private:
  etllm_status status_;
  std::string message_;
};

namespace detail {
inline void check(etllm_status status) {
  if (status != ETLLM_OK) {
    throw Error(status, etllm_last_error_message());
  }
}

// Runs a plug-in method for a C trampoline: an exception must not cross into the library,
// so it becomes `on_error` with the exception's message (etllm_set_error_message).
template <class F>
etllm_status guarded(etllm_status on_error, F&& f) noexcept {
  try {
    f();
    return ETLLM_OK;
  } catch (const std::exception& e) {
    etllm_set_error_message(e.what());
  } catch (...) {
    etllm_set_error_message("a C++ exception that is not a std::exception");
  }
  return on_error;
}
}  // namespace detail

/// The library's version, e.g. "0.1.0".
inline std::string version() { return etllm_version(); }

/// Settings of one generation: upstream's GenerationConfig fields and defaults, plus
/// EtLlm's sampling filters, ignore_eos, seed, stop_token_ids and stop_strings.
/// `grammar` and `grammar_type` are upstream's constrained-decoding fields, which EtLlm
/// applies (see `etllm_generation_config.grammar`).
/// `max_new_tokens = N` yields exactly N tokens (upstream yields N - 1).
struct GenerationConfig {
  bool echo = true;              ///< pass the prompt to the token callback first
  int32_t max_new_tokens = -1;   ///< -1: as many as the context allows
  bool warming = false;          ///< warm-up run: no callbacks, runner reset afterwards
  int32_t seq_len = -1;          ///< most tokens in the sequence, prompt included; -1: the context
  float temperature = 0.8f;      ///< >= 0; 0 is greedy
  int32_t num_bos = 0;           ///< BOS tokens before the prompt
  int32_t num_eos = 0;           ///< EOS tokens after the prompt
  bool ignore_eos = false;       ///< keep generating past EOS
  std::optional<uint64_t> seed;  ///< same seed, same tokens; empty: seeded from the clock
  std::vector<uint32_t> stop_token_ids;  ///< extra ids that end generation like EOS
  int32_t top_k = 0;                 ///< sample from the k most likely tokens; 0: off
  float top_p = 1.0f;                ///< sample from the nucleus of mass top_p; 1: off
  float min_p = 0.0f;                ///< drop tokens below min_p times the best; 0: off
  float repetition_penalty = 1.0f;   ///< penalize tokens already seen; 1: off
  std::vector<std::string> stop_strings;  ///< text that ends generation (never streamed)
  std::string grammar;                    ///< the output must match it; empty: unconstrained
  std::string grammar_type = "json_schema";  ///< json_schema, regex, lark (lark_grammar) or gbnf
  bool grammar_fast_forward = true;  ///< feed text the grammar forces in one model step
  /// The prompt is the whole conversation (as chat UIs resend it): only the part that
  /// differs from the conversation's tokens is fed; Stats::reused_prompt_tokens counts the
  /// tokens kept. False: the prompt continues the conversation.
  bool reuse_prefix = false;

  /// The C struct for this config; valid while this object lives unchanged.
  etllm_generation_config to_c() const {
    stop_string_ptrs_.clear();
    for (const std::string& s : stop_strings) stop_string_ptrs_.push_back(s.c_str());
    etllm_generation_config c = etllm_generation_config_default();
    c.echo = echo;
    c.max_new_tokens = max_new_tokens;
    c.warming = warming;
    c.seq_len = seq_len;
    c.temperature = temperature;
    c.num_bos = num_bos;
    c.num_eos = num_eos;
    c.ignore_eos = ignore_eos;
    c.has_seed = seed.has_value();
    c.seed = seed.value_or(0);
    c.stop_token_ids = stop_token_ids.empty() ? nullptr : stop_token_ids.data();
    c.num_stop_token_ids = stop_token_ids.size();
    c.top_k = top_k;
    c.top_p = top_p;
    c.min_p = min_p;
    c.repetition_penalty = repetition_penalty;
    c.stop_strings = stop_string_ptrs_.empty() ? nullptr : stop_string_ptrs_.data();
    c.num_stop_strings = stop_string_ptrs_.size();
    c.grammar = grammar.empty() ? nullptr : grammar.c_str();
    c.grammar_type = grammar_type.c_str();
    c.grammar_no_fast_forward = !grammar_fast_forward;
    c.reuse_prefix = reuse_prefix;
    return c;
  }

 private:
  mutable std::vector<const char*> stop_string_ptrs_;  // what to_c() points at
};

/// Timings (microseconds) and counts of one generation: the C struct plus helpers (its
/// fields are etllm_stats's, reused_prompt_tokens included).
struct Stats : etllm_stats {
  Stats() : etllm_stats(etllm_stats_default()) {}
  explicit Stats(const etllm_stats& s) : etllm_stats(etllm_stats_default()) {
    static_cast<etllm_stats&>(*this) = s;
    struct_size = sizeof(etllm_stats);
  }

  /// Generated tokens per second after the prompt was evaluated.
  double decode_tokens_per_second() const {
    const uint64_t us = inference_end_us - prompt_eval_end_us;
    return us == 0 ? 0.0 : static_cast<double>(num_generated_tokens) * 1e6 / static_cast<double>(us);
  }

  /// The JSON form, with upstream's field names.
  std::string to_json() const {
    char* json = nullptr;
    detail::check(etllm_stats_to_json(this, &json));
    std::string out(json);
    etllm_string_free(json);
    return out;
  }
};

// ---- KV-cache managers written in C++ ---------------------------------------------------

/// A contiguous run of `T` that someone else owns (C++17 has no std::span).
template <class T>
class Span {
 public:
  constexpr Span() noexcept = default;
  constexpr Span(T* data, size_t size) noexcept : data_(data), size_(size) {}
  /// A view of a vector's elements (of the same type: a Span<const T> of a vector<T> too).
  template <class U, class = std::enable_if_t<std::is_same_v<std::remove_const_t<T>, U>>>
  Span(std::vector<U>& v) noexcept : data_(v.data()), size_(v.size()) {}  // NOLINT: implicit
  template <class U, class = std::enable_if_t<std::is_same_v<T, const U>>>
  Span(const std::vector<U>& v) noexcept : data_(v.data()), size_(v.size()) {}  // NOLINT: implicit

  constexpr T* data() const noexcept { return data_; }
  constexpr size_t size() const noexcept { return size_; }
  constexpr bool empty() const noexcept { return size_ == 0; }
  constexpr T& operator[](size_t i) const noexcept { return data_[i]; }
  /// Element `i`, or std::out_of_range.
  T& at(size_t i) const {
    if (i >= size_) throw std::out_of_range("etllm::Span index " + std::to_string(i) + " of " + std::to_string(size_));
    return data_[i];
  }
  constexpr T* begin() const noexcept { return data_; }
  constexpr T* end() const noexcept { return data_ + size_; }

 private:
  T* data_ = nullptr;
  size_t size_ = 0;
};

namespace detail {
template <class T>
constexpr etllm_dtype dtype_of() {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, int64_t> || std::is_same_v<T, int32_t>,
                "a tensor holds float, int64_t or int32_t");
  if constexpr (std::is_same_v<T, float>) return ETLLM_DTYPE_F32;
  else if constexpr (std::is_same_v<T, int64_t>) return ETLLM_DTYPE_I64;
  else return ETLLM_DTYPE_I32;
}

inline const char* dtype_name(etllm_dtype d) {
  switch (d) {
    case ETLLM_DTYPE_F32: return "f32";
    case ETLLM_DTYPE_I64: return "i64";
    case ETLLM_DTYPE_I32: return "i32";
    default: return "other";
  }
}
}  // namespace detail

/// A tensor passed across the boundary without a copy (an etllm_tensor_view with helpers):
/// element type, sizes, and a pointer to contiguous row-major data it does not own.
/// Layout-compatible with etllm_tensor_view, so an array of TensorView is an array of
/// etllm_tensor_view.
class TensorView {
 public:
  /// An empty view (no data).
  TensorView() noexcept : v_{} {}
  /// Wraps a C view.
  TensorView(const etllm_tensor_view& v) noexcept : v_(v) {}  // NOLINT: implicit on purpose

  /// A view of `data` (float, int64_t or int32_t) with `sizes`, outermost first; `data`
  /// must hold the product of the sizes elements and outlive every use of the view.
  template <class T>
  static TensorView of(T* data, std::initializer_list<int64_t> sizes) {
    return of(data, sizes.begin(), sizes.size());
  }
  template <class T>
  static TensorView of(T* data, const int64_t* sizes, size_t ndim) {
    if (ndim > ETLLM_MAX_DIMS) throw std::invalid_argument("etllm::TensorView: more than 8 dimensions");
    TensorView t;
    t.v_.dtype = detail::dtype_of<std::remove_const_t<T>>();
    t.v_.ndim = static_cast<uint32_t>(ndim);
    for (size_t d = 0; d < ndim; ++d) t.v_.sizes[d] = sizes[d];
    t.v_.data = const_cast<void*>(static_cast<const void*>(data));
    t.v_.nbytes = static_cast<size_t>(t.numel()) * sizeof(T);
    return t;
  }

  etllm_dtype dtype() const noexcept { return v_.dtype; }
  size_t ndim() const noexcept { return v_.ndim; }
  /// Size of dimension `d` (negative counts from the end, -1 is the innermost).
  int64_t size(int d) const {
    const int n = static_cast<int>(v_.ndim);
    const int i = d < 0 ? n + d : d;
    if (i < 0 || i >= n) throw std::out_of_range("etllm::TensorView: no dimension " + std::to_string(d));
    return v_.sizes[i];
  }
  std::vector<int64_t> sizes() const { return std::vector<int64_t>(v_.sizes, v_.sizes + v_.ndim); }
  /// Number of elements: the product of the sizes.
  int64_t numel() const noexcept {
    int64_t n = 1;
    for (uint32_t d = 0; d < v_.ndim; ++d) n *= v_.sizes[d];
    return n;
  }
  size_t nbytes() const noexcept { return v_.nbytes; }
  void* raw_data() const noexcept { return v_.data; }

  /// The elements as `T`; throws std::invalid_argument if the view holds another type.
  template <class T>
  T* data() const {
    if (v_.dtype != detail::dtype_of<std::remove_const_t<T>>()) {
      throw std::invalid_argument(std::string("etllm::TensorView holds ") + detail::dtype_name(v_.dtype) +
                                  ", not " + detail::dtype_name(detail::dtype_of<std::remove_const_t<T>>()));
    }
    return static_cast<T*>(v_.data);
  }

  /// Changes the sizes (same number of dimensions or not) and nbytes to match, keeping the
  /// data pointer: for inputs whose length changes from step to step.
  void resize(std::initializer_list<int64_t> sizes) {
    if (sizes.size() > ETLLM_MAX_DIMS) throw std::invalid_argument("etllm::TensorView: more than 8 dimensions");
    v_.ndim = static_cast<uint32_t>(sizes.size());
    size_t d = 0;
    for (int64_t s : sizes) v_.sizes[d++] = s;
    const size_t elem = v_.dtype == ETLLM_DTYPE_I64 ? 8 : 4;
    v_.nbytes = static_cast<size_t>(numel()) * elem;
  }

  /// "f32[1, 2, 64, 16]"
  std::string describe() const {
    std::string s = std::string(detail::dtype_name(v_.dtype)) + "[";
    for (uint32_t d = 0; d < v_.ndim; ++d) s += (d ? ", " : "") + std::to_string(v_.sizes[d]);
    return s + "]";
  }

  const etllm_tensor_view& c_view() const noexcept { return v_; }

 private:
  etllm_tensor_view v_;
};
static_assert(std::is_standard_layout_v<TensorView> && sizeof(TensorView) == sizeof(etllm_tensor_view),
              "etllm::TensorView must be layout-compatible with etllm_tensor_view");

/// One model step, as a manager's prepare method returns it: the method to run and every
/// one of its inputs, in order. The name and the inputs (and the data they point to)
/// belong to the manager and must stay valid until its matching update method returns.
struct Step {
  const char* method = nullptr;  ///< NUL-terminated, e.g. "forward"
  Span<const TensorView> inputs;
};

/// The logits that predict the next token, as an update method returns them: `size` floats
/// that stay valid until the next step (usually a row of the step's output 0).
struct Logits {
  const float* data = nullptr;
  size_t size = 0;

  /// Row `row` of a logits tensor shaped [vocab], [1, vocab] or [1, rows, vocab].
  static Logits row_of(const TensorView& t, int64_t row) {
    const float* p = t.data<const float>();
    const int64_t vocab = t.ndim() > 0 ? t.size(-1) : 0;
    if (vocab < 1 || row < 0 || (row + 1) * vocab > t.numel()) {
      throw std::out_of_range("the logits output " + t.describe() + " has no row " + std::to_string(row));
    }
    return {p + row * vocab, static_cast<size_t>(vocab)};
  }
  /// The last row of a logits tensor.
  static Logits last_row_of(const TensorView& t) {
    const int64_t vocab = t.ndim() > 0 ? t.size(-1) : 0;
    return row_of(t, vocab > 0 ? t.numel() / vocab - 1 : 0);
  }
};

/// What a manager's load returns.
struct LoadResult {
  int64_t max_prefill_chunk = 1;  ///< most tokens per prefill step, >= 1
  int64_t max_context = 0;        ///< most positions the manager can hold, >= 1
};

/// What a KV-cache manager sees of the model in IoManager::load (a thin wrapper over
/// etllm_model_info, valid only during that call). Failing lookups throw etllm::Error.
class ModelInfo {
 public:
  explicit ModelInfo(const etllm_model_info* info) noexcept : info_(info) {}

  /// The (non-constant) method names, in name order.
  std::vector<std::string> methods() const {
    size_t n = 0;
    detail::check(etllm_model_info_num_methods(info_, &n));
    std::vector<std::string> names;
    for (size_t i = 0; i < n; ++i) {
      const char* name = nullptr;
      detail::check(etllm_model_info_method_name(info_, i, &name));
      names.emplace_back(name);
    }
    return names;
  }
  bool has_method(const std::string& method) const {
    size_t in = 0, out = 0;
    return etllm_model_info_method(info_, method.c_str(), &in, &out) == ETLLM_OK;
  }
  size_t num_inputs(const std::string& method) const { return counts(method).first; }
  size_t num_outputs(const std::string& method) const { return counts(method).second; }
  /// Input `index` of `method`: dtype and sizes (upper bounds for a dynamic shape), no data.
  TensorView input(const std::string& method, size_t index) const {
    etllm_tensor_view v{};
    detail::check(etllm_model_info_input(info_, method.c_str(), index, &v));
    return v;
  }
  TensorView output(const std::string& method, size_t index) const {
    etllm_tensor_view v{};
    detail::check(etllm_model_info_output(info_, method.c_str(), index, &v));
    return v;
  }
  /// The integers of constant method `name` (an int, bool, int list or integer tensor,
  /// flattened); std::nullopt when there is no such constant or it is not integers.
  std::optional<std::vector<int64_t>> constant_ints(const std::string& name) const {
    size_t n = 0;
    if (etllm_model_info_constant_ints(info_, name.c_str(), nullptr, 0, &n) != ETLLM_OK) return std::nullopt;
    std::vector<int64_t> v(n);
    detail::check(etllm_model_info_constant_ints(info_, name.c_str(), v.data(), v.size(), &n));
    return v;
  }
  /// The floats of constant method `name` (a float tensor, flattened), or std::nullopt.
  std::optional<std::vector<float>> constant_floats(const std::string& name) const {
    size_t n = 0;
    if (etllm_model_info_constant_floats(info_, name.c_str(), nullptr, 0, &n) != ETLLM_OK) return std::nullopt;
    std::vector<float> v(n);
    detail::check(etllm_model_info_constant_floats(info_, name.c_str(), v.data(), v.size(), &n));
    return v;
  }
  /// Constant method `name` as one integer; throws etllm::Error if it is not exactly one.
  int64_t constant_int(const std::string& name) const {
    const auto v = constant_ints(name);
    if (!v) throw Error(ETLLM_ERR_NOT_FOUND, "the model has no integer constant method `" + name + "`");
    if (v->size() != 1) {
      throw Error(ETLLM_ERR_UNSUPPORTED_MODEL,
                  "constant method `" + name + "` holds " + std::to_string(v->size()) + " integers, not one");
    }
    return v->front();
  }
  /// The model's metadata (-1 where the model does not say).
  etllm_model_metadata metadata() const {
    etllm_model_metadata m{};
    m.struct_size = sizeof m;
    detail::check(etllm_model_info_metadata(info_, &m));
    return m;
  }
  const etllm_model_info* handle() const noexcept { return info_; }

 private:
  std::pair<size_t, size_t> counts(const std::string& method) const {
    size_t in = 0, out = 0;
    detail::check(etllm_model_info_method(info_, method.c_str(), &in, &out));
    return {in, out};
  }
  const etllm_model_info* info_;
};

/// Where a manager's save_state writes its state: EtLlm's etllm_state_buffer, valid only
/// during that call (do not keep it).
class StateWriter {
 public:
  explicit StateWriter(etllm_state_buffer* buffer) noexcept : buffer_(buffer) {}

  /// Appends `size` bytes at `data` (copied); throws etllm::Error if the buffer cannot grow.
  void append(const void* data, size_t size) { detail::check(etllm_state_buffer_append(buffer_, data, size)); }
  /// Appends the bytes of `value`, a trivially copyable value, in this machine's layout.
  template <class T>
  void append_value(const T& value) {
    static_assert(std::is_trivially_copyable_v<T>, "append_value copies bytes");
    append(&value, sizeof value);
  }
  etllm_state_buffer* handle() const noexcept { return buffer_; }

 private:
  etllm_state_buffer* buffer_;
};

/// A KV-cache manager written in C++: prepares every input of each model step and takes
/// every output (the C vtable etllm_io_manager, as a class). The runner calls load once,
/// then for each step prepare_* followed by update_*, with reset and rewind between steps,
/// all on the thread that called into the runner, one at a time.
///
/// Errors: throw. The exception stops at the C boundary: the runner's call fails with
/// ETLLM_ERR_IO_MANAGER and the exception's what() in its message (etllm::Runner throws
/// that as etllm::Error), rolls the conversation back and stays usable.
///
/// Ownership: give the manager to etllm::Runner's constructor (or to_c()); the runner
/// deletes it exactly once, when it is destroyed or when its creation fails.
///
/// Saved states: a manager that keeps a conversation's data (its own caches, its
/// position) overrides save_state and restore_state, so that several conversations can
/// share one model and a conversation can be stored and resumed (etllm_io_manager's
/// save_state and restore_state); the defaults throw: such a manager serves one
/// conversation.
class IoManager {
 public:
  virtual ~IoManager() = default;

  /// Checks the model fits, allocates buffers, and says how many tokens a prefill step
  /// takes and how many positions the manager can hold.
  virtual LoadResult load(const ModelInfo& model) = 0;
  /// Forgets everything: the next step starts at position 0.
  virtual void reset() = 0;
  /// Keeps only the first `pos` positions.
  virtual void rewind(int64_t pos) = 0;
  /// The step for a prefill of `tokens` (at most max_prefill_chunk) starting at `start_pos`.
  virtual Step prepare_prefill(Span<const uint64_t> tokens, int64_t start_pos) = 0;
  /// Takes the outputs of the prefill step prepared last; returns the next-token logits.
  virtual Logits update_prefill(Span<const TensorView> outputs) = 0;
  /// The step for decoding `token` at position `pos`.
  virtual Step prepare_decode(uint64_t token, int64_t pos) = 0;
  /// As update_prefill, for the decode step prepared last.
  virtual Logits update_decode(Span<const TensorView> outputs) = 0;

  /// Appends the manager's conversation state (what it keeps between steps) to `out`, in
  /// a format of its own: a tag and a version first, and the layout the data depends on,
  /// so that restore_state can refuse a foreign state. Called between steps. The
  /// default throws: this manager cannot save.
  virtual void save_state(StateWriter& out) {
    (void)out;
    throw std::runtime_error("this KV-cache manager cannot save its state (it does not override save_state)");
  }
  /// Replaces the conversation state with `state` (valid during the call), bytes that
  /// save_state wrote. Check everything before changing anything: if it throws, the
  /// manager must keep the state it had. The default throws.
  virtual void restore_state(Span<const uint8_t> state) {
    (void)state;
    throw std::runtime_error("this KV-cache manager cannot restore a state (it does not override restore_state)");
  }

  /// The C vtable for `manager`, which it now owns: pass it in
  /// etllm_runner_options.io_manager (the runner calls destroy, which deletes the manager,
  /// exactly once). A null manager gives a zeroed vtable.
  static etllm_io_manager to_c(std::unique_ptr<IoManager> manager) noexcept {
    etllm_io_manager vt{};
    if (!manager) return vt;
    vt.struct_size = sizeof vt;
    vt.user_data = manager.release();
    vt.load = &load_trampoline;
    vt.reset = &reset_trampoline;
    vt.rewind = &rewind_trampoline;
    vt.prepare_prefill = &prepare_prefill_trampoline;
    vt.update_prefill = &update_prefill_trampoline;
    vt.prepare_decode = &prepare_decode_trampoline;
    vt.update_decode = &update_decode_trampoline;
    vt.destroy = &destroy_trampoline;
    vt.save_state = &save_state_trampoline;
    vt.restore_state = &restore_state_trampoline;
    return vt;
  }

 private:
  static IoManager& self(void* user_data) noexcept { return *static_cast<IoManager*>(user_data); }

  template <class F>
  static etllm_status guarded(F&& f) noexcept {
    return detail::guarded(ETLLM_ERR_IO_MANAGER, std::forward<F>(f));
  }

  static void out_step(const Step& step, etllm_step* out) {
    if (step.method == nullptr) throw std::invalid_argument("the step has no method name");
    out->method = step.method;
    // TensorView is layout-compatible with etllm_tensor_view (checked above).
    out->inputs = reinterpret_cast<const etllm_tensor_view*>(step.inputs.data());
    out->num_inputs = step.inputs.size();
  }

  static void out_logits(const Logits& logits, const float** out, size_t* out_vocab) {
    if (logits.data == nullptr || logits.size == 0) throw std::invalid_argument("the update returned no logits");
    *out = logits.data;
    *out_vocab = logits.size;
  }

  static Span<const TensorView> outputs_of(const etllm_tensor_view* outputs, size_t n) noexcept {
    return {reinterpret_cast<const TensorView*>(outputs), n};
  }

  static etllm_status load_trampoline(void* ud, const etllm_model_info* model, int64_t* chunk,
                                      int64_t* context) {
    return guarded([&] {
      const LoadResult r = self(ud).load(ModelInfo(model));
      *chunk = r.max_prefill_chunk;
      *context = r.max_context;
    });
  }
  static etllm_status reset_trampoline(void* ud) {
    return guarded([&] { self(ud).reset(); });
  }
  static etllm_status rewind_trampoline(void* ud, int64_t pos) {
    return guarded([&] { self(ud).rewind(pos); });
  }
  static etllm_status prepare_prefill_trampoline(void* ud, const uint64_t* tokens, size_t n, int64_t start_pos,
                                                 etllm_step* out) {
    return guarded([&] { out_step(self(ud).prepare_prefill(Span<const uint64_t>(tokens, n), start_pos), out); });
  }
  static etllm_status update_prefill_trampoline(void* ud, const etllm_tensor_view* outputs, size_t n,
                                                const float** logits, size_t* vocab) {
    return guarded([&] { out_logits(self(ud).update_prefill(outputs_of(outputs, n)), logits, vocab); });
  }
  static etllm_status prepare_decode_trampoline(void* ud, uint64_t token, int64_t pos, etllm_step* out) {
    return guarded([&] { out_step(self(ud).prepare_decode(token, pos), out); });
  }
  static etllm_status update_decode_trampoline(void* ud, const etllm_tensor_view* outputs, size_t n,
                                               const float** logits, size_t* vocab) {
    return guarded([&] { out_logits(self(ud).update_decode(outputs_of(outputs, n)), logits, vocab); });
  }
  static etllm_status save_state_trampoline(void* ud, etllm_state_buffer* buffer) {
    return guarded([&] {
      StateWriter out(buffer);
      self(ud).save_state(out);
    });
  }
  static etllm_status restore_state_trampoline(void* ud, const uint8_t* data, size_t len) {
    return guarded([&] { self(ud).restore_state(Span<const uint8_t>(data, len)); });
  }
  static void destroy_trampoline(void* ud) { delete static_cast<IoManager*>(ud); }
};

// ---- Sampler plugins written in C++ ------------------------------------------------------

/// A sampling step run before the built-in sampler for every generated token (constrained
/// decoding and the like): apply() sees the logits (and may edit them) and the tokens of
/// this generate call so far, and returns a token to choose it, or std::nullopt to let the
/// built-in sampler choose from the edited logits. An exception thrown by a method ends
/// generate with ETLLM_ERR_SAMPLER and its message. Give it to Runner::set_sampler, which
/// owns it from then on.
class SamplerPlugin {
 public:
  virtual ~SamplerPlugin() = default;
  /// Called when a generate call starts.
  virtual void reset() {}
  /// Sees (and may edit) the next-token logits; returns the chosen token or std::nullopt.
  virtual std::optional<uint32_t> apply(Span<float> logits, Span<const uint32_t> history) = 0;

  /// The C vtable for `plugin`, which it now owns (destroy deletes it).
  static etllm_sampler to_c(std::unique_ptr<SamplerPlugin> plugin) noexcept {
    etllm_sampler vt{};
    if (!plugin) return vt;
    vt.struct_size = sizeof vt;
    vt.user_data = plugin.release();
    vt.apply = &apply_trampoline;
    vt.reset = &reset_trampoline;
    vt.destroy = &destroy_trampoline;
    return vt;
  }

 private:
  template <class F>
  static etllm_status guarded(F&& f) noexcept {
    return detail::guarded(ETLLM_ERR_SAMPLER, std::forward<F>(f));
  }
  static etllm_status apply_trampoline(void* ud, float* logits, size_t n, const uint32_t* history,
                                       size_t num_history, int64_t* out_token) {
    return guarded([&] {
      const std::optional<uint32_t> t = static_cast<SamplerPlugin*>(ud)->apply(
          Span<float>(logits, n), Span<const uint32_t>(history, num_history));
      *out_token = t ? static_cast<int64_t>(*t) : -1;
    });
  }
  static etllm_status reset_trampoline(void* ud) {
    return guarded([&] { static_cast<SamplerPlugin*>(ud)->reset(); });
  }
  static void destroy_trampoline(void* ud) { delete static_cast<SamplerPlugin*>(ud); }
};

/// Called with each piece and its token id (-1 for echoed or trailing text); return false
/// to stop generating.
using StreamCallback = std::function<bool(std::string_view piece, int64_t token_id)>;
/// Called once with the stats when generation ends.
using StatsCallback = std::function<void(const Stats&)>;

namespace detail {
// State shared with the C trampolines for one streaming call: an exception thrown by a
// callback stops generation and is rethrown once the C call returns.
struct StreamContext {
  const StreamCallback* on_piece;
  const StatsCallback* on_stats;
  std::exception_ptr error;

  static int32_t token_trampoline(void* user_data, const char* piece, size_t len, int64_t token_id) {
    auto* ctx = static_cast<StreamContext*>(user_data);
    if (ctx->error || !*ctx->on_piece) return ctx->error ? 1 : 0;
    try {
      return (*ctx->on_piece)(std::string_view(piece, len), token_id) ? 0 : 1;
    } catch (...) {
      ctx->error = std::current_exception();
      return 1;
    }
  }

  static void stats_trampoline(void* user_data, const etllm_stats* stats) {
    auto* ctx = static_cast<StreamContext*>(user_data);
    if (ctx->error || !*ctx->on_stats) return;
    try {
      (*ctx->on_stats)(Stats(*stats));
    } catch (...) {
      ctx->error = std::current_exception();
    }
  }
};

// Runs `call(token_cb, stats_cb, user_data, out_stats)`, a streaming C call, with the
// callables behind the trampolines; rethrows a callback's exception, then checks the status.
template <class F>
Stats stream(const StreamCallback& on_piece, const StatsCallback& on_stats, F&& call) {
  StreamContext ctx{&on_piece, &on_stats, nullptr};
  Stats stats;
  const etllm_status s = call(&StreamContext::token_trampoline, &StreamContext::stats_trampoline, &ctx, &stats);
  if (ctx.error) std::rethrow_exception(ctx.error);
  check(s);
  return stats;
}

// An upstream-style callback (text only) as a StreamCallback; empty stays empty.
inline StreamCallback text_only(const std::function<void(const std::string&)>& token_callback) {
  if (!token_callback) return {};
  return [token_callback](std::string_view piece, int64_t) {
    token_callback(std::string(piece));
    return true;
  };
}

// Takes a byte buffer the library allocated (etllm_buffer_free).
inline std::vector<uint8_t> take_bytes(uint8_t* data, size_t len) {
  const std::unique_ptr<uint8_t, void (*)(void*)> owned(data, &etllm_buffer_free);
  return data == nullptr ? std::vector<uint8_t>() : std::vector<uint8_t>(data, data + len);
}

inline std::vector<uint8_t> bytes_of(std::string_view text) {
  return std::vector<uint8_t>(text.begin(), text.end());
}
}  // namespace detail

/// One part of a multimodal prompt (etllm_input), made by its static makers; it owns
/// its text, ids, bytes or values. A list of them goes to Runner::generate_inputs and
/// Session::generate_inputs, one audio or features input to AsrRunner::transcribe.
class Input {
 public:
  /// Text, tokenized with the model's tokenizer.
  static Input text(std::string text) {
    Input in(ETLLM_INPUT_TEXT);
    in.text_ = std::move(text);
    return in;
  }
  /// Token ids, fed as they are.
  static Input tokens(std::vector<uint32_t> ids) {
    Input in(ETLLM_INPUT_TOKENS);
    in.tokens_ = std::move(ids);
    return in;
  }
  /// An image file (PNG, JPEG, GIF, BMP or WebP).
  static Input image_file(std::string path) {
    Input in(ETLLM_INPUT_IMAGE_FILE);
    in.text_ = std::move(path);
    return in;
  }
  /// The bytes of such an image file.
  static Input image_bytes(std::vector<uint8_t> encoded) {
    Input in(ETLLM_INPUT_IMAGE_ENCODED);
    in.bytes_ = std::move(encoded);
    return in;
  }
  /// Decoded 8-bit pixels, rows top to bottom, channels interleaved; `channels` is 1
  /// (gray), 2 (gray + alpha), 3 (RGB) or 4 (RGBA), and `pixels` holds
  /// width * height * channels bytes.
  static Input image_pixels(std::vector<uint8_t> pixels, uint32_t width, uint32_t height, uint32_t channels = 3) {
    Input in(ETLLM_INPUT_IMAGE_PIXELS);
    in.bytes_ = std::move(pixels);
    in.width_ = width;
    in.height_ = height;
    in.channels_ = channels;
    return in;
  }
  /// A WAV file (PCM 8/16/24/32-bit or float 32-bit, mono or stereo).
  static Input audio_file(std::string path) {
    Input in(ETLLM_INPUT_AUDIO_FILE);
    in.text_ = std::move(path);
    return in;
  }
  /// Samples in [-1, 1] at `sample_rate`, `channels` 1, or 2 interleaved (averaged).
  static Input audio_samples(std::vector<float> samples, uint32_t sample_rate, uint32_t channels = 1) {
    Input in(ETLLM_INPUT_AUDIO_SAMPLES);
    in.floats_ = std::move(samples);
    in.sample_rate_ = sample_rate;
    in.channels_ = channels;
    return in;
  }
  /// Values computed elsewhere for the model's encoder, with their sizes (outermost
  /// first): a vision encoder's pixel values ([3, H, W] or [1, 3, H, W]), or for
  /// AsrRunner log-mel features ([n_mels, frames]).
  static Input features(std::vector<float> data, std::vector<size_t> sizes) {
    Input in(ETLLM_INPUT_FEATURES);
    in.floats_ = std::move(data);
    in.sizes_ = std::move(sizes);
    return in;
  }

  /// Which kind of input this is.
  etllm_input_kind kind() const noexcept { return kind_; }

  /// The C struct, pointing into this object; valid while it lives unchanged.
  etllm_input to_c() const noexcept {
    etllm_input c = etllm_input_default();
    c.kind = static_cast<int32_t>(kind_);
    switch (kind_) {
      case ETLLM_INPUT_TEXT: c.text = text_.c_str(); break;
      case ETLLM_INPUT_IMAGE_FILE:
      case ETLLM_INPUT_AUDIO_FILE: c.path = text_.c_str(); break;
      default: break;
    }
    c.tokens = tokens_.data();
    c.num_tokens = tokens_.size();
    c.bytes = bytes_.data();
    c.num_bytes = bytes_.size();
    c.width = width_;
    c.height = height_;
    c.channels = channels_;
    c.sample_rate = sample_rate_;
    c.floats = floats_.data();
    c.num_floats = floats_.size();
    c.sizes = sizes_.data();
    c.num_sizes = sizes_.size();
    return c;
  }

 private:
  explicit Input(etllm_input_kind kind) noexcept : kind_(kind) {}

  etllm_input_kind kind_;
  std::string text_;  // the text, or the path
  std::vector<uint32_t> tokens_;
  std::vector<uint8_t> bytes_;
  std::vector<float> floats_;
  std::vector<size_t> sizes_;
  uint32_t width_ = 0, height_ = 0, channels_ = 0, sample_rate_ = 0;
};

namespace detail {
// The C structs of `inputs`, pointing into them.
inline std::vector<etllm_input> c_inputs(const std::vector<Input>& inputs) {
  std::vector<etllm_input> c;
  c.reserve(inputs.size());
  for (const Input& in : inputs) c.push_back(in.to_c());
  return c;
}
}  // namespace detail

/// One message of a conversation.
struct ChatMessage {
  std::string role;     ///< "system", "user", "assistant", ...
  std::string content;  ///< what they say
};

class ChatTemplate;
class Session;

/// Options fixed when a runner is created.
struct RunnerOptions {
  uint32_t num_threads = 0;  ///< ExecuTorch thread-pool size (process-wide); 0 keeps it
  /// External data files (.ptd) with weights kept out of the .pte; empty: `<stem>.ptd`
  /// beside the model if it exists (etllm_runner_options.data_paths).
  std::vector<std::string> data_paths;
  /// The method that runs model steps when not "forward" (e.g. "lora_forward"); empty
  /// means "forward" (etllm_runner_options.method_name).
  std::string method_name;
  /// The image processor's settings (a Hugging Face preprocessor_config.json) of a
  /// multimodal export; empty: preprocessor_config.json beside the model, else beside the
  /// tokenizer, if there is one (etllm_runner_options.preprocessor_config).
  std::string preprocessor_config;
};

/// Runs one model with one tokenizer and one conversation. Move-only.
class Runner {
 public:
  /// Called with each piece of text (complete UTF-8), as upstream's token callback.
  using TokenCallback = std::function<void(const std::string&)>;
  /// Called with each piece and its token id (-1 for echoed or trailing text); return
  /// false to stop generating.
  using StreamCallback = etllm::StreamCallback;
  /// Called once with the stats when generation ends.
  using StatsCallback = etllm::StatsCallback;

  /// A runner for the model and tokenizer; nothing is read until load() or the first
  /// generate (as upstream's TextLLMRunner).
  Runner(const std::string& model_path, const std::string& tokenizer_path, RunnerOptions options = {})
      : Runner(model_path, tokenizer_path, options, nullptr) {}

  /// A runner that drives the model through `io_manager`, a KV-cache manager written in
  /// C++ (nullptr: the built-in manager chosen from the model's signature), e.g.
  /// `etllm::Runner runner(model, tokenizer, {}, std::make_unique<MyManager>());`. The runner
  /// owns the manager from here on, also when this constructor throws: it is deleted
  /// exactly once.
  Runner(const std::string& model_path, const std::string& tokenizer_path, RunnerOptions options,
         std::unique_ptr<IoManager> io_manager) {
    etllm_runner_options o = etllm_runner_options_default();
    o.num_threads = options.num_threads;
    std::vector<const char*> data_paths;
    for (const std::string& path : options.data_paths) data_paths.push_back(path.c_str());
    o.data_paths = data_paths.data();
    o.num_data_paths = data_paths.size();
    o.method_name = options.method_name.empty() ? nullptr : options.method_name.c_str();
    o.preprocessor_config = options.preprocessor_config.empty() ? nullptr : options.preprocessor_config.c_str();
    etllm_io_manager vt{};
    if (io_manager) {
      vt = IoManager::to_c(std::move(io_manager));
      o.io_manager = &vt;
    }
    detail::check(etllm_runner_new(model_path.c_str(), tokenizer_path.c_str(), &o, &handle_));
  }

  Runner(const Runner&) = delete;
  Runner& operator=(const Runner&) = delete;
  Runner(Runner&& other) noexcept : handle_(std::exchange(other.handle_, nullptr)) {}
  Runner& operator=(Runner&& other) noexcept {
    if (this != &other) {
      etllm_runner_free(handle_);
      handle_ = std::exchange(other.handle_, nullptr);
    }
    return *this;
  }
  ~Runner() { etllm_runner_free(handle_); }

  /// Loads the tokenizer and model; does nothing when already loaded.
  void load() { detail::check(etllm_runner_load(handle())); }

  /// Whether load() has succeeded.
  bool is_loaded() const {
    bool loaded = false;
    detail::check(etllm_runner_is_loaded(handle(), &loaded));
    return loaded;
  }

  /// Generates from `prompt`, streaming text to `token_callback` (upstream's signature).
  Stats generate(const std::string& prompt, const GenerationConfig& config = {},
                 TokenCallback token_callback = {}, StatsCallback stats_callback = {}) {
    return run(Prompt{&prompt, nullptr}, config, detail::text_only(token_callback), stats_callback);
  }

  /// Generates from `prompt`, streaming each piece with its token id to `on_piece`, which
  /// returns false to stop.
  Stats generate_stream(const std::string& prompt, const GenerationConfig& config,
                        const StreamCallback& on_piece, const StatsCallback& on_stats = {}) {
    return run(Prompt{&prompt, nullptr}, config, on_piece, on_stats);
  }

  /// Generates from token ids (num_bos and num_eos still apply).
  Stats generate_tokens(const std::vector<uint32_t>& ids, const GenerationConfig& config,
                        const StreamCallback& on_piece, const StatsCallback& on_stats = {}) {
    return run(Prompt{nullptr, &ids}, config, on_piece, on_stats);
  }

  /// Feeds `prompt` into the conversation without generating; a later generate continues
  /// after it (and may use an empty prompt to continue this text).
  Stats prefill(const std::string& prompt, const GenerationConfig& config = {}) {
    const etllm_generation_config c = config.to_c();
    Stats stats;
    detail::check(etllm_runner_prefill(handle(), prompt.c_str(), &c, &stats));
    return stats;
  }

  /// Like prefill(), from token ids.
  Stats prefill_tokens(const std::vector<uint32_t>& ids, const GenerationConfig& config = {}) {
    const etllm_generation_config c = config.to_c();
    Stats stats;
    detail::check(etllm_runner_prefill_tokens(handle(), ids.data(), ids.size(), &c, &stats));
    return stats;
  }

  /// Generates from a multimodal prompt: `inputs` (text, token ids, images, features) fed
  /// in order after the conversation so far, as upstream's MultimodalRunner does; streams
  /// each piece with its token id to `on_piece` (return false to stop). Images need a
  /// multimodal export (vision_encoder, token_embedding, text_decoder): an image for a
  /// text-only model throws ETLLM_ERR_UNSUPPORTED_MODEL, an unreadable one
  /// ETLLM_ERR_INVALID_MEDIA. config.num_bos / num_eos apply to the first input when it is
  /// text or tokens and the conversation is empty. A bad input, or inputs that do not fit
  /// the context, change nothing.
  Stats generate_inputs(const std::vector<Input>& inputs, const GenerationConfig& config,
                        const StreamCallback& on_piece, const StatsCallback& on_stats = {}) {
    const std::vector<etllm_input> in = detail::c_inputs(inputs);
    const etllm_generation_config c = config.to_c();
    return detail::stream(on_piece, on_stats,
                          [&](etllm_token_callback t, etllm_stats_callback st, void* ctx, etllm_stats* out) {
                            return etllm_runner_generate_inputs(handle(), in.data(), in.size(), &c, t, st, ctx, out);
                          });
  }

  /// Feeds `inputs` (see generate_inputs()) without generating; a later generate
  /// continues after them.
  Stats prefill_inputs(const std::vector<Input>& inputs, const GenerationConfig& config = {}) {
    const std::vector<etllm_input> in = detail::c_inputs(inputs);
    const etllm_generation_config c = config.to_c();
    Stats stats;
    detail::check(etllm_runner_prefill_inputs(handle(), in.data(), in.size(), &c, &stats));
    return stats;
  }

  /// Asks a running generate to stop; callable from any thread.
  void stop() const { detail::check(etllm_runner_stop(handle())); }

  /// Forgets the conversation.
  void reset() { detail::check(etllm_runner_reset(handle())); }

  /// Sets the sampler plugin (the runner owns it from now on), or removes it with nullptr.
  void set_sampler(std::unique_ptr<SamplerPlugin> plugin) {
    if (!plugin) {
      detail::check(etllm_runner_set_sampler(handle(), nullptr));
      return;
    }
    const etllm_sampler vt = SamplerPlugin::to_c(std::move(plugin));
    detail::check(etllm_runner_set_sampler(handle(), &vt));
  }

  /// Sets the chat template (copied), or with nullptr goes back to the model's own
  /// (template files beside the tokenizer, else the built-in Llama 3 template).
  void set_chat_template(const ChatTemplate* chat_template);

  /// Renders `messages` with the runner's chat template (generate with num_bos = 0).
  std::string apply_chat_template(const std::vector<ChatMessage>& messages, bool add_generation_prompt);

  /// Rolls the conversation back to its first `pos` tokens (see position()).
  void rewind(int64_t pos) { detail::check(etllm_runner_rewind(handle(), pos)); }

  /// A new, empty conversation over this runner's model (loaded first if needed): see
  /// etllm::Session. The runner's own conversation is not affected.
  Session session();

  /// Loads if needed and runs a short generation without callbacks; the conversation is
  /// empty afterwards.
  void warmup() { detail::check(etllm_runner_warmup(handle())); }

  /// Most positions a conversation holds (needs a loaded runner).
  int64_t max_context_len() const { return get(etllm_runner_max_context_len); }
  /// Most tokens per model call (needs a loaded runner).
  int64_t max_seq_len() const { return get(etllm_runner_max_seq_len); }
  /// The model's vocabulary size (needs a loaded runner).
  int64_t vocab_size() const { return get(etllm_runner_vocab_size); }
  /// Tokens in the conversation so far (needs a loaded runner).
  int64_t position() const { return get(etllm_runner_position); }

  /// The BOS id in use, if any (needs a loaded runner).
  std::optional<uint32_t> bos_id() const {
    uint32_t id = 0;
    const etllm_status s = etllm_runner_bos_id(handle(), &id);
    if (s == ETLLM_ERR_NOT_FOUND) return std::nullopt;
    detail::check(s);
    return id;
  }

  /// The EOS ids in use (needs a loaded runner).
  std::vector<uint32_t> eos_ids() const {
    size_t count = 0;
    detail::check(etllm_runner_eos_ids(handle(), nullptr, 0, &count));
    std::vector<uint32_t> ids(count);
    detail::check(etllm_runner_eos_ids(handle(), ids.data(), ids.size(), &count));
    return ids;
  }

  /// The underlying C handle, still owned by this object.
  etllm_runner* handle() const {
    if (handle_ == nullptr) throw Error(ETLLM_ERR_NULL_ARGUMENT, "use of a moved-from etllm::Runner");
    return handle_;
  }

 private:
  struct Prompt {
    const std::string* text;
    const std::vector<uint32_t>* ids;
  };

  Stats run(Prompt input, const GenerationConfig& config, const StreamCallback& on_piece,
            const StatsCallback& on_stats) {
    const etllm_generation_config c = config.to_c();
    return detail::stream(on_piece, on_stats,
                          [&](etllm_token_callback t, etllm_stats_callback st, void* ctx, etllm_stats* out) {
                            return input.text != nullptr
                                       ? etllm_runner_generate(handle(), input.text->c_str(), &c, t, st, ctx, out)
                                       : etllm_runner_generate_tokens(handle(), input.ids->data(),
                                                                      input.ids->size(), &c, t, st, ctx, out);
                          });
  }

  int64_t get(etllm_status (*fn)(const etllm_runner*, int64_t*)) const {
    int64_t value = 0;
    detail::check(fn(handle(), &value));
    return value;
  }

  etllm_runner* handle_ = nullptr;
};

/// A conversation of its own (KV cache, position, tokens) over a runner's loaded model,
/// made by Runner::session(). Sessions of one model share its weights; the model's KV cache
/// holds the session that ran last, and switching sessions copies their caches aside and
/// back (about the part in use). A session's state can be saved as bytes or to a file and
/// restored into a session of the same model, in this process or another, which then
/// continues token for token. Move-only.
///
/// Threads: one call at a time on a session (another call meanwhile throws etllm::Error
/// ETLLM_ERR_BUSY), except stop(). Sessions of one model may run on different threads:
/// their calls take turns. A call on any session of the model (or on the runner) made from
/// inside a callback of a running call throws ETLLM_ERR_BUSY. A session keeps the model
/// loaded: it stays usable after its runner is destroyed.
class Session {
 public:
  using TokenCallback = Runner::TokenCallback;
  using StreamCallback = etllm::StreamCallback;
  using StatsCallback = etllm::StatsCallback;

  Session(const Session&) = delete;
  Session& operator=(const Session&) = delete;
  Session(Session&& other) noexcept : handle_(std::exchange(other.handle_, nullptr)) {}
  Session& operator=(Session&& other) noexcept {
    if (this != &other) {
      etllm_session_free(handle_);
      handle_ = std::exchange(other.handle_, nullptr);
    }
    return *this;
  }
  ~Session() { etllm_session_free(handle_); }

  /// Generates from `prompt`, streaming text to `token_callback` (Runner::generate).
  Stats generate(const std::string& prompt, const GenerationConfig& config = {},
                 TokenCallback token_callback = {}, StatsCallback stats_callback = {}) {
    return run(&prompt, nullptr, config, detail::text_only(token_callback), stats_callback);
  }

  /// Generates from `prompt`, streaming each piece with its token id to `on_piece`, which
  /// returns false to stop (Runner::generate_stream).
  Stats generate_stream(const std::string& prompt, const GenerationConfig& config,
                        const StreamCallback& on_piece, const StatsCallback& on_stats = {}) {
    return run(&prompt, nullptr, config, on_piece, on_stats);
  }

  /// Generates from token ids (num_bos and num_eos still apply); empty ids continue the
  /// conversation from its last token.
  Stats generate_tokens(const std::vector<uint32_t>& ids, const GenerationConfig& config,
                        const StreamCallback& on_piece, const StatsCallback& on_stats = {}) {
    return run(nullptr, &ids, config, on_piece, on_stats);
  }

  /// Feeds `prompt` into the conversation without generating (Runner::prefill).
  Stats prefill(const std::string& prompt, const GenerationConfig& config = {}) {
    const etllm_generation_config c = config.to_c();
    Stats stats;
    detail::check(etllm_session_prefill(handle(), prompt.c_str(), &c, &stats));
    return stats;
  }

  /// Like prefill(), from token ids.
  Stats prefill_tokens(const std::vector<uint32_t>& ids, const GenerationConfig& config = {}) {
    const etllm_generation_config c = config.to_c();
    Stats stats;
    detail::check(etllm_session_prefill_tokens(handle(), ids.data(), ids.size(), &c, &stats));
    return stats;
  }

  /// Generates from a multimodal prompt on this session's conversation
  /// (Runner::generate_inputs).
  Stats generate_inputs(const std::vector<Input>& inputs, const GenerationConfig& config,
                        const StreamCallback& on_piece, const StatsCallback& on_stats = {}) {
    const std::vector<etllm_input> in = detail::c_inputs(inputs);
    const etllm_generation_config c = config.to_c();
    return detail::stream(on_piece, on_stats,
                          [&](etllm_token_callback t, etllm_stats_callback st, void* ctx, etllm_stats* out) {
                            return etllm_session_generate_inputs(handle(), in.data(), in.size(), &c, t, st, ctx, out);
                          });
  }

  /// Feeds `inputs` without generating (Runner::prefill_inputs).
  Stats prefill_inputs(const std::vector<Input>& inputs, const GenerationConfig& config = {}) {
    const std::vector<etllm_input> in = detail::c_inputs(inputs);
    const etllm_generation_config c = config.to_c();
    Stats stats;
    detail::check(etllm_session_prefill_inputs(handle(), in.data(), in.size(), &c, &stats));
    return stats;
  }

  /// Asks this session's running generate to stop; callable from any thread.
  void stop() const { detail::check(etllm_session_stop(handle())); }

  /// Forgets the conversation (and the state kept aside for it).
  void reset() { detail::check(etllm_session_reset(handle())); }

  /// Rolls the conversation back to its first `pos` tokens (see position()).
  void rewind(int64_t pos) { detail::check(etllm_session_rewind(handle(), pos)); }

  /// Tokens in the conversation so far.
  int64_t position() const {
    int64_t value = 0;
    detail::check(etllm_session_position(handle(), &value));
    return value;
  }

  /// The conversation's tokens (position() of them): those in the KV cache, then the last
  /// generated one.
  std::vector<uint32_t> tokens() const {
    size_t count = 0;
    detail::check(etllm_session_tokens(handle(), nullptr, 0, &count));
    std::vector<uint32_t> ids(count);
    detail::check(etllm_session_tokens(handle(), ids.data(), ids.size(), &count));
    ids.resize(count < ids.size() ? count : ids.size());
    return ids;
  }

  /// The session's state as bytes, with `user_data` (any bytes, e.g. a chat's messages)
  /// kept as they are. Restore it with load_state() on a session of the same model.
  std::vector<uint8_t> save_state(const std::vector<uint8_t>& user_data = {}) const {
    uint8_t* state = nullptr;
    size_t len = 0;
    detail::check(etllm_session_save_state(handle(), user_data.data(), user_data.size(), &state, &len));
    return detail::take_bytes(state, len);
  }
  std::vector<uint8_t> save_state(std::string_view user_data) const { return save_state(detail::bytes_of(user_data)); }

  /// Replaces the conversation with a state save_state() made on a session of the same
  /// model and returns its user data. A state that is not one, is truncated or corrupt, or
  /// comes from another model throws etllm::Error ETLLM_ERR_INVALID_STATE, and the session
  /// keeps its own state.
  std::vector<uint8_t> load_state(const std::vector<uint8_t>& state) {
    uint8_t* data = nullptr;
    size_t len = 0;
    detail::check(etllm_session_load_state(handle(), state.data(), state.size(), &data, &len));
    return detail::take_bytes(data, len);
  }

  /// save_state() into the file at `path` (written beside it and renamed into place).
  void save_state_file(const std::string& path, const std::vector<uint8_t>& user_data = {}) const {
    detail::check(etllm_session_save_state_file(handle(), path.c_str(), user_data.data(), user_data.size()));
  }
  void save_state_file(const std::string& path, std::string_view user_data) const {
    save_state_file(path, detail::bytes_of(user_data));
  }

  /// load_state() from a file save_state_file() wrote; returns its user data. An
  /// unreadable file throws ETLLM_ERR_FILE_ACCESS.
  std::vector<uint8_t> load_state_file(const std::string& path) {
    uint8_t* data = nullptr;
    size_t len = 0;
    detail::check(etllm_session_load_state_file(handle(), path.c_str(), &data, &len));
    return detail::take_bytes(data, len);
  }

  /// The underlying C handle, still owned by this object.
  etllm_session* handle() const {
    if (handle_ == nullptr) throw Error(ETLLM_ERR_NULL_ARGUMENT, "use of a moved-from etllm::Session");
    return handle_;
  }

 private:
  friend class Runner;
  explicit Session(etllm_session* h) noexcept : handle_(h) {}

  Stats run(const std::string* text, const std::vector<uint32_t>* ids, const GenerationConfig& config,
            const StreamCallback& on_piece, const StatsCallback& on_stats) {
    const etllm_generation_config c = config.to_c();
    return detail::stream(on_piece, on_stats,
                          [&](etllm_token_callback t, etllm_stats_callback st, void* ctx, etllm_stats* out) {
                            return text != nullptr
                                       ? etllm_session_generate(handle(), text->c_str(), &c, t, st, ctx, out)
                                       : etllm_session_generate_tokens(handle(), ids->data(), ids->size(), &c, t,
                                                                       st, ctx, out);
                          });
  }

  etllm_session* handle_ = nullptr;
};

inline Session Runner::session() {
  etllm_session* h = nullptr;
  detail::check(etllm_session_new(handle(), &h));
  return Session(h);
}

namespace detail {
inline std::vector<etllm_chat_message> c_messages(const std::vector<ChatMessage>& messages) {
  std::vector<etllm_chat_message> c;
  c.reserve(messages.size());
  for (const ChatMessage& m : messages) c.push_back({m.role.c_str(), m.content.c_str()});
  return c;
}
// Takes a string the library allocated.
inline std::string take_string(char* s) {
  std::string out(s);
  etllm_string_free(s);
  return out;
}
}  // namespace detail

/// A compiled chat template (Jinja, rendered as HF transformers renders chat templates).
/// Move-only.
class ChatTemplate {
 public:
  /// Compiles `source`; throws etllm::Error (ETLLM_ERR_CHAT_TEMPLATE) on a syntax error.
  explicit ChatTemplate(const std::string& source) {
    detail::check(etllm_chat_template_new(source.c_str(), &handle_));
  }
  /// The built-in Llama 3 Instruct template.
  static ChatTemplate llama3() { return make(etllm_chat_template_llama3); }
  /// The built-in Llama 2 Chat template.
  static ChatTemplate llama2() { return make(etllm_chat_template_llama2); }
  /// A model folder's template (chat_template.jinja or tokenizer_config.json), or nullopt
  /// when it has none.
  static std::optional<ChatTemplate> from_model_dir(const std::string& path) {
    etllm_chat_template* h = nullptr;
    const etllm_status s = etllm_chat_template_from_model_dir(path.c_str(), &h);
    if (s == ETLLM_ERR_NOT_FOUND) return std::nullopt;
    detail::check(s);
    return ChatTemplate(h);
  }

  ChatTemplate(const ChatTemplate&) = delete;
  ChatTemplate& operator=(const ChatTemplate&) = delete;
  ChatTemplate(ChatTemplate&& other) noexcept : handle_(std::exchange(other.handle_, nullptr)) {}
  ChatTemplate& operator=(ChatTemplate&& other) noexcept {
    if (this != &other) {
      etllm_chat_template_free(handle_);
      handle_ = std::exchange(other.handle_, nullptr);
    }
    return *this;
  }
  ~ChatTemplate() { etllm_chat_template_free(handle_); }

  /// Sets a special-token variable, such as ("bos_token", "<s>").
  ChatTemplate& set_token(const std::string& name, const std::string& value) {
    detail::check(etllm_chat_template_set_token(handle(), name.c_str(), value.c_str()));
    return *this;
  }

  /// Renders `messages` into prompt text (generate from it with num_bos = 0).
  std::string apply(const std::vector<ChatMessage>& messages, bool add_generation_prompt) const {
    const std::vector<etllm_chat_message> c = detail::c_messages(messages);
    char* text = nullptr;
    detail::check(etllm_chat_template_apply(handle(), c.data(), c.size(), add_generation_prompt, &text));
    return detail::take_string(text);
  }

  /// The underlying C handle, still owned by this object.
  etllm_chat_template* handle() const {
    if (handle_ == nullptr) throw Error(ETLLM_ERR_NULL_ARGUMENT, "use of a moved-from etllm::ChatTemplate");
    return handle_;
  }

 private:
  explicit ChatTemplate(etllm_chat_template* h) noexcept : handle_(h) {}
  static ChatTemplate make(etllm_status (*fn)(etllm_chat_template**)) {
    etllm_chat_template* h = nullptr;
    detail::check(fn(&h));
    return ChatTemplate(h);
  }
  etllm_chat_template* handle_ = nullptr;
};

inline void Runner::set_chat_template(const ChatTemplate* chat_template) {
  detail::check(etllm_runner_set_chat_template(handle(), chat_template ? chat_template->handle() : nullptr));
}

inline std::string Runner::apply_chat_template(const std::vector<ChatMessage>& messages,
                                               bool add_generation_prompt) {
  const std::vector<etllm_chat_message> c = detail::c_messages(messages);
  char* text = nullptr;
  detail::check(etllm_runner_apply_chat_template(handle(), c.data(), c.size(), add_generation_prompt, &text));
  return detail::take_string(text);
}

/// A multi-turn chat on a runner (its own conversation) or on a session, that keeps
/// earlier turns in the KV cache. It refers to the runner or session, which must outlive
/// it; do not generate on it between turns. Move-only.
class Conversation {
 public:
  /// A conversation on `runner` rendered with a copy of `chat_template` (nullptr: the
  /// runner's template; the runner is loaded if needed).
  explicit Conversation(Runner& runner, const ChatTemplate* chat_template = nullptr) : runner_(&runner) {
    detail::check(etllm_conversation_new(runner.handle(), chat_template ? chat_template->handle() : nullptr,
                                         &handle_));
  }
  /// A conversation on `session` rendered with a copy of `chat_template`.
  Conversation(Session& session, const ChatTemplate& chat_template) : session_(&session) {
    detail::check(etllm_conversation_new(nullptr, chat_template.handle(), &handle_));
  }
  /// A conversation on `session` from to_json()'s text (for example the user data of a
  /// state the session just loaded), rendered with a copy of `chat_template`.
  static Conversation from_json(Session& session, const ChatTemplate& chat_template, const std::string& json) {
    etllm_conversation* handle = nullptr;
    detail::check(etllm_conversation_from_json(nullptr, chat_template.handle(), json.c_str(), &handle));
    return Conversation(&session, handle);
  }
  Conversation(const Conversation&) = delete;
  Conversation& operator=(const Conversation&) = delete;
  Conversation(Conversation&& other) noexcept
      : runner_(other.runner_), session_(other.session_), handle_(std::exchange(other.handle_, nullptr)) {}
  Conversation& operator=(Conversation&& other) noexcept {
    if (this != &other) {
      etllm_conversation_free(handle_);
      runner_ = other.runner_;
      session_ = other.session_;
      handle_ = std::exchange(other.handle_, nullptr);
    }
    return *this;
  }

  /// The conversation as JSON (messages, the text fed, where each turn began): save it as
  /// the user data of Session::save_state to resume the chat with from_json.
  std::string to_json() const {
    char* json = nullptr;
    detail::check(etllm_conversation_to_json(handle(), &json));
    return detail::take_string(json);
  }
  ~Conversation() { etllm_conversation_free(handle_); }

  /// Adds a system message (only before the first turn).
  void set_system(const std::string& content) {
    detail::check(etllm_conversation_set_system(handle(), content.c_str()));
  }

  /// The reply to one user message.
  struct Reply {
    std::string text;
    Stats stats;
  };

  /// Sends `user` and generates the reply, streaming it to `on_piece` (return false to stop).
  Reply send(const std::string& user, const GenerationConfig& config = {}, const StreamCallback& on_piece = {}) {
    Reply reply;
    const StreamCallback collect = [&](std::string_view piece, int64_t id) {
      reply.text.append(piece);
      return on_piece ? on_piece(piece, id) : true;
    };
    const StatsCallback no_stats;
    const etllm_generation_config c = config.to_c();
    reply.stats = detail::stream(collect, no_stats,
                                 [&](etllm_token_callback t, etllm_stats_callback st, void* ctx, etllm_stats* out) {
                                   return session_ ? etllm_conversation_send_session(handle(), session_->handle(),
                                                                                     user.c_str(), &c, t, st, ctx, out)
                                                   : etllm_conversation_send(handle(), runner_->handle(),
                                                                             user.c_str(), &c, t, st, ctx, out);
                                 });
    return reply;
  }

  /// Drops the last turn and rewinds the runner or session; false when there was none.
  bool rewind() {
    bool dropped = false;
    detail::check(session_ ? etllm_conversation_rewind_session(handle(), session_->handle(), &dropped)
                           : etllm_conversation_rewind(handle(), runner_->handle(), &dropped));
    return dropped;
  }

  /// Forgets every turn (a system message stays) and resets the runner or session.
  void reset() {
    detail::check(session_ ? etllm_conversation_reset_session(handle(), session_->handle())
                           : etllm_conversation_reset(handle(), runner_->handle()));
  }

  /// The messages so far, replies included.
  std::vector<ChatMessage> messages() const {
    size_t n = 0;
    detail::check(etllm_conversation_num_messages(handle(), &n));
    std::vector<ChatMessage> out;
    for (size_t i = 0; i < n; ++i) {
      char* role = nullptr;
      char* content = nullptr;
      detail::check(etllm_conversation_message(handle(), i, &role, &content));
      std::string r = detail::take_string(role);
      out.push_back({std::move(r), detail::take_string(content)});
    }
    return out;
  }

  /// The underlying C handle, still owned by this object.
  etllm_conversation* handle() const {
    if (handle_ == nullptr) throw Error(ETLLM_ERR_NULL_ARGUMENT, "use of a moved-from etllm::Conversation");
    return handle_;
  }

 private:
  Conversation(Session* session, etllm_conversation* handle) : session_(session), handle_(handle) {}

  Runner* runner_ = nullptr;
  Session* session_ = nullptr;
  etllm_conversation* handle_ = nullptr;
};

/// A tokenizer of any supported format (HF tokenizer.json or its folder, tiktoken,
/// SentencePiece, llama2.c), found from the file's content. Immutable once loaded: any
/// number of threads may use it at once. Failing calls throw etllm::Error.
class Tokenizer {
 public:
  /// Loads `path`; `preset` is ETLLM_PRESET_NONE or ETLLM_PRESET_LLAMA.
  explicit Tokenizer(const std::string& path, etllm_preset preset = ETLLM_PRESET_NONE) {
    detail::check(etllm_tokenizer_load(path.c_str(), static_cast<int32_t>(preset), &handle_));
  }
  Tokenizer(const Tokenizer&) = delete;
  Tokenizer& operator=(const Tokenizer&) = delete;
  Tokenizer(Tokenizer&& other) noexcept : handle_(std::exchange(other.handle_, nullptr)) {}
  Tokenizer& operator=(Tokenizer&& other) noexcept {
    if (this != &other) {
      etllm_tokenizer_free(handle_);
      handle_ = std::exchange(other.handle_, nullptr);
    }
    return *this;
  }
  ~Tokenizer() { etllm_tokenizer_free(handle_); }

  /// The ids of `text`, with `num_bos` BOS tokens before and `num_eos` EOS tokens after.
  std::vector<uint32_t> encode(const std::string& text, uint32_t num_bos = 0, uint32_t num_eos = 0) const {
    uint32_t* ids = nullptr;
    size_t len = 0;
    detail::check(etllm_tokenizer_encode(handle_, text.c_str(), num_bos, num_eos, &ids, &len));
    std::vector<uint32_t> out(ids, ids + len);
    etllm_buffer_free(ids);
    return out;
  }

  /// The text of `ids`.
  std::string decode(const std::vector<uint32_t>& ids) const {
    char* text = nullptr;
    size_t len = 0;
    detail::check(etllm_tokenizer_decode(handle_, ids.data(), ids.size(), &text, &len));
    std::string out(text, len);
    etllm_buffer_free(text);
    return out;
  }

  /// The token's piece as the vocabulary stores it (raw bytes for tiktoken and llama2.c).
  std::string token_to_piece(uint32_t id) const {
    char* piece = nullptr;
    size_t len = 0;
    detail::check(etllm_tokenizer_token_to_piece(handle_, id, &piece, &len));
    std::string out(piece, len);
    etllm_buffer_free(piece);
    return out;
  }

  size_t vocab_size() const {
    size_t n = 0;
    detail::check(etllm_tokenizer_vocab_size(handle_, &n));
    return n;
  }

  /// The BOS id; throws etllm::Error (ETLLM_ERR_NOT_FOUND) when there is none.
  uint32_t bos_id() const {
    uint32_t id = 0;
    detail::check(etllm_tokenizer_bos_id(handle_, &id));
    return id;
  }

  std::vector<uint32_t> eos_ids() const {
    const uint32_t* ids = nullptr;
    size_t len = 0;
    detail::check(etllm_tokenizer_eos_ids(handle_, &ids, &len));
    return std::vector<uint32_t>(ids, ids + len);
  }

  const etllm_tokenizer* handle() const { return handle_; }

 private:
  etllm_tokenizer* handle_ = nullptr;
};

/// Token ids in, complete UTF-8 out. Keeps the tokenizer's data alive itself. One call
/// at a time.
class TextStream {
 public:
  explicit TextStream(const Tokenizer& tokenizer) {
    detail::check(etllm_text_stream_new(tokenizer.handle(), &handle_));
  }
  TextStream(const TextStream&) = delete;
  TextStream& operator=(const TextStream&) = delete;
  TextStream(TextStream&& other) noexcept : handle_(std::exchange(other.handle_, nullptr)) {}
  TextStream& operator=(TextStream&& other) noexcept {
    if (this != &other) {
      etllm_text_stream_free(handle_);
      handle_ = std::exchange(other.handle_, nullptr);
    }
    return *this;
  }
  ~TextStream() { etllm_text_stream_free(handle_); }

  /// The text token `id` completes (often empty while a character is incomplete).
  std::string push(uint32_t id) {
    const char* text = nullptr;
    size_t len = 0;
    detail::check(etllm_text_stream_push(handle_, id, &text, &len));
    return std::string(text, len);
  }

  /// Whatever is held back (incomplete bytes become U+FFFD); starts the stream over.
  std::string flush() {
    const char* text = nullptr;
    size_t len = 0;
    detail::check(etllm_text_stream_flush(handle_, &text, &len));
    return std::string(text, len);
  }

 private:
  etllm_text_stream* handle_ = nullptr;
};

/// Options of Server (etllm_server_options); defaults from etllm_server_options_default().
struct ServerOptions {
  std::string host = "127.0.0.1";  ///< the address to listen on (loopback by default)
  uint16_t port = 8080;            ///< 0 picks a free port (Server::port() tells which)
  uint32_t parallel = 1;           ///< slots: sessions whose KV caches are kept
  uint32_t queue_size = 64;        ///< requests that may wait; one more is a 503
  uint32_t context_length = 0;     ///< the most tokens a request may hold; 0: the model's
  uint32_t shutdown_timeout_ms = 10000;  ///< grace for requests after stop()
  uint64_t max_body_bytes = 8u << 20;    ///< larger bodies are a 413
  std::string api_key;             ///< when not empty, required as "Authorization: Bearer KEY"
  std::string model_name = "etllm";  ///< the id /v1/models lists
  bool log_requests = false;       ///< one line a request on stderr
};

/// The OpenAI-compatible HTTP server over a runner's model (etllm_server), serving on
/// threads of its own from construction until stop() or destruction. It keeps the model
/// loaded after the Runner is destroyed. Move-only.
class Server {
 public:
  Server(Runner& runner, const ServerOptions& options = {}) {
    etllm_server_options o = etllm_server_options_default();
    o.host = options.host.c_str();
    o.port = options.port;
    o.parallel = options.parallel;
    o.queue_size = options.queue_size;
    o.context_length = options.context_length;
    o.shutdown_timeout_ms = options.shutdown_timeout_ms;
    o.max_body_bytes = options.max_body_bytes;
    o.api_key = options.api_key.empty() ? nullptr : options.api_key.c_str();
    o.model_name = options.model_name.c_str();
    o.log_requests = options.log_requests;
    detail::check(etllm_server_start(runner.handle(), &o, &handle_));
  }
  Server(const Server&) = delete;
  Server& operator=(const Server&) = delete;
  Server(Server&& other) noexcept : handle_(std::exchange(other.handle_, nullptr)) {}
  Server& operator=(Server&& other) noexcept {
    if (this != &other) {
      etllm_server_free(handle_);
      handle_ = std::exchange(other.handle_, nullptr);
    }
    return *this;
  }
  /// Stops the server (as stop()) and frees it.
  ~Server() { etllm_server_free(handle_); }

  /// The port it listens on.
  uint16_t port() const { return etllm_server_port(handle()); }

  /// Stops accepting, lets requests finish for shutdown_timeout_ms, cancels the rest and
  /// returns when the server has ended; a second call does nothing.
  void stop() { detail::check(etllm_server_stop(handle())); }

  /// The underlying C handle, still owned by this object.
  etllm_server* handle() const {
    if (handle_ == nullptr) throw Error(ETLLM_ERR_NULL_ARGUMENT, "use of a moved-from etllm::Server");
    return handle_;
  }

 private:
  etllm_server* handle_ = nullptr;
};

/// Options of AsrRunner (etllm_asr_options).
struct AsrOptions {
  uint32_t num_threads = 0;  ///< ExecuTorch thread-pool size (process-wide); 0 keeps it
  /// The feature extractor's settings (a Whisper preprocessor_config.json); empty:
  /// preprocessor_config.json beside the model, else beside the tokenizer, else Whisper's
  /// (80 mel bands, 16 kHz, 30 s).
  std::string preprocessor_config;
  /// External data files (.ptd), as RunnerOptions::data_paths.
  std::vector<std::string> data_paths;
};

/// What AsrRunner::transcribe decodes (etllm_transcribe_options).
struct TranscribeOptions {
  /// The spoken language as Whisper's code ("en", "fr"...); empty: detected from the
  /// decoder's first step.
  std::string language;
  bool translate = false;  ///< translate into English (<|translate|>) instead of transcribing
  /// The whole decoder prompt (start token, language, task, <|notimestamps|>); empty: made
  /// from the fields above.
  std::vector<uint32_t> decoder_prompt;
};

/// What AsrRunner::transcribe returns.
struct Transcript {
  std::string text;              ///< the text, special tokens left out
  std::vector<uint32_t> tokens;  ///< the generated ids, the end-of-text token excluded
  Stats stats;                   ///< num_prompt_tokens is the encoder's output length
};

/// A speech-to-text model (upstream's ASR layout: `encoder` and `text_decoder` methods, as
/// optimum-executorch exports Whisper) with its tokenizer (etllm_asr). Move-only.
///
/// Threads: one call at a time (another meanwhile throws etllm::Error ETLLM_ERR_BUSY),
/// except stop(), which any thread may call while transcribe runs.
class AsrRunner {
 public:
  /// Loads the model and tokenizer; a decoder-only model throws
  /// ETLLM_ERR_UNSUPPORTED_MODEL.
  AsrRunner(const std::string& model_path, const std::string& tokenizer_path, const AsrOptions& options = {}) {
    etllm_asr_options o = etllm_asr_options_default();
    o.num_threads = options.num_threads;
    o.preprocessor_config = options.preprocessor_config.empty() ? nullptr : options.preprocessor_config.c_str();
    std::vector<const char*> data_paths;
    for (const std::string& path : options.data_paths) data_paths.push_back(path.c_str());
    o.data_paths = data_paths.data();
    o.num_data_paths = data_paths.size();
    detail::check(etllm_asr_open(model_path.c_str(), tokenizer_path.c_str(), &o, &handle_));
  }

  AsrRunner(const AsrRunner&) = delete;
  AsrRunner& operator=(const AsrRunner&) = delete;
  AsrRunner(AsrRunner&& other) noexcept : handle_(std::exchange(other.handle_, nullptr)) {}
  AsrRunner& operator=(AsrRunner&& other) noexcept {
    if (this != &other) {
      etllm_asr_free(handle_);
      handle_ = std::exchange(other.handle_, nullptr);
    }
    return *this;
  }
  ~AsrRunner() { etllm_asr_free(handle_); }

  /// Transcribes `audio`: Input::audio_file (WAV), Input::audio_samples (any rate) or
  /// Input::features (log-mel features as the encoder takes them). The encoder runs once,
  /// the decoder a token at a time until its end-of-text token, max_new_tokens or its
  /// context. `config` (std::nullopt: greedy, until the end of text) applies its sampling
  /// fields, max_new_tokens, ignore_eos and stop_token_ids. Text pieces stream to
  /// `on_piece` (special tokens left out; return false to stop). Unreadable audio throws
  /// ETLLM_ERR_INVALID_MEDIA, and the runner stays usable.
  Transcript transcribe(const Input& audio, const TranscribeOptions& options = {},
                        const std::optional<GenerationConfig>& config = std::nullopt,
                        const StreamCallback& on_piece = {}) {
    const etllm_input in = audio.to_c();
    etllm_transcribe_options o = etllm_transcribe_options_default();
    o.translate = options.translate;
    o.language = options.language.empty() ? nullptr : options.language.c_str();
    o.decoder_prompt = options.decoder_prompt.empty() ? nullptr : options.decoder_prompt.data();
    o.num_decoder_prompt = options.decoder_prompt.size();
    etllm_generation_config c{};
    if (config) c = config->to_c();
    const StatsCallback no_stats;
    detail::StreamContext ctx{&on_piece, &no_stats, nullptr};
    char* text = nullptr;
    uint32_t* ids = nullptr;
    size_t num_ids = 0;
    Transcript out;
    const etllm_status s = etllm_asr_transcribe(handle(), &in, &o, config ? &c : nullptr,
                                                &detail::StreamContext::token_trampoline, &ctx, &text, &ids,
                                                &num_ids, &out.stats);
    // Owned from here on, whatever is thrown.
    const std::unique_ptr<char, void (*)(char*)> owned_text(text, &etllm_string_free);
    const std::unique_ptr<uint32_t, void (*)(void*)> owned_ids(ids, &etllm_buffer_free);
    if (ctx.error) std::rethrow_exception(ctx.error);
    detail::check(s);
    if (text != nullptr) out.text = text;
    if (ids != nullptr) out.tokens.assign(ids, ids + num_ids);
    return out;
  }

  /// Asks a running transcribe to end before its next decoder step; callable from any
  /// thread.
  void stop() const { detail::check(etllm_asr_stop(handle())); }

  /// The underlying C handle, still owned by this object.
  etllm_asr* handle() const {
    if (handle_ == nullptr) throw Error(ETLLM_ERR_NULL_ARGUMENT, "use of a moved-from etllm::AsrRunner");
    return handle_;
  }

 private:
  etllm_asr* handle_ = nullptr;
};

}  // namespace etllm

#endif  // ETLLM_HPP
