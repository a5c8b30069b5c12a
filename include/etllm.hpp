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
// Thread rules are the C API's: one call at a time on a runner, except stop(), which any
// thread may call while generate runs.
#ifndef ETLLM_HPP
#define ETLLM_HPP

#include <cstdint>
#include <exception>
#include <functional>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
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
}  // namespace detail

/// The library's version, e.g. "0.1.0".
inline std::string version() { return etllm_version(); }

/// Settings of one generation: upstream's GenerationConfig fields and defaults, plus
/// EtLlm's ignore_eos, seed and stop_token_ids. `max_new_tokens = N` yields exactly N
/// tokens (upstream yields N - 1).
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

  /// The C struct for this config; valid while this object lives unchanged.
  etllm_generation_config to_c() const {
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
    return c;
  }
};

/// Timings (microseconds) and counts of one generation: the C struct plus helpers.
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

/// Options fixed when a runner is created.
struct RunnerOptions {
  uint32_t num_threads = 0;  ///< ExecuTorch thread-pool size (process-wide); 0 keeps it
};

/// Runs one model with one tokenizer and one conversation. Move-only.
class Runner {
 public:
  /// Called with each piece of text (complete UTF-8), as upstream's token callback.
  using TokenCallback = std::function<void(const std::string&)>;
  /// Called with each piece and its token id (-1 for echoed or trailing text); return
  /// false to stop generating.
  using StreamCallback = std::function<bool(std::string_view piece, int64_t token_id)>;
  /// Called once with the stats when generation ends.
  using StatsCallback = std::function<void(const Stats&)>;

  /// A runner for the model and tokenizer; nothing is read until load() or the first
  /// generate (as upstream's TextLLMRunner).
  Runner(const std::string& model_path, const std::string& tokenizer_path, RunnerOptions options = {}) {
    etllm_runner_options o = etllm_runner_options_default();
    o.num_threads = options.num_threads;
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
    StreamCallback stream;
    if (token_callback) {
      stream = [&token_callback](std::string_view piece, int64_t) {
        token_callback(std::string(piece));
        return true;
      };
    }
    return run(Input{&prompt, nullptr}, config, stream, stats_callback);
  }

  /// Generates from `prompt`, streaming each piece with its token id to `on_piece`, which
  /// returns false to stop.
  Stats generate_stream(const std::string& prompt, const GenerationConfig& config,
                        const StreamCallback& on_piece, const StatsCallback& on_stats = {}) {
    return run(Input{&prompt, nullptr}, config, on_piece, on_stats);
  }

  /// Generates from token ids (num_bos and num_eos still apply).
  Stats generate_tokens(const std::vector<uint32_t>& ids, const GenerationConfig& config,
                        const StreamCallback& on_piece, const StatsCallback& on_stats = {}) {
    return run(Input{nullptr, &ids}, config, on_piece, on_stats);
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

  /// Asks a running generate to stop; callable from any thread.
  void stop() const { detail::check(etllm_runner_stop(handle())); }

  /// Forgets the conversation.
  void reset() { detail::check(etllm_runner_reset(handle())); }

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
  struct Input {
    const std::string* text;
    const std::vector<uint32_t>* ids;
  };

  // State shared with the C trampolines for one generate call.
  struct Context {
    const StreamCallback* on_piece;
    const StatsCallback* on_stats;
    std::exception_ptr error;
  };

  static int32_t token_trampoline(void* user_data, const char* piece, size_t len, int64_t token_id) {
    auto* ctx = static_cast<Context*>(user_data);
    if (ctx->error || !*ctx->on_piece) return ctx->error ? 1 : 0;
    try {
      return (*ctx->on_piece)(std::string_view(piece, len), token_id) ? 0 : 1;
    } catch (...) {
      ctx->error = std::current_exception();
      return 1;
    }
  }

  static void stats_trampoline(void* user_data, const etllm_stats* stats) {
    auto* ctx = static_cast<Context*>(user_data);
    if (ctx->error || !*ctx->on_stats) return;
    try {
      (*ctx->on_stats)(Stats(*stats));
    } catch (...) {
      ctx->error = std::current_exception();
    }
  }

  Stats run(Input input, const GenerationConfig& config, const StreamCallback& on_piece,
            const StatsCallback& on_stats) {
    const etllm_generation_config c = config.to_c();
    Context ctx{&on_piece, &on_stats, nullptr};
    Stats stats;
    const etllm_status s =
        input.text != nullptr
            ? etllm_runner_generate(handle(), input.text->c_str(), &c, &token_trampoline, &stats_trampoline,
                                    &ctx, &stats)
            : etllm_runner_generate_tokens(handle(), input.ids->data(), input.ids->size(), &c,
                                           &token_trampoline, &stats_trampoline, &ctx, &stats);
    if (ctx.error) std::rethrow_exception(ctx.error);
    detail::check(s);
    return stats;
  }

  int64_t get(etllm_status (*fn)(const etllm_runner*, int64_t*)) const {
    int64_t value = 0;
    detail::check(fn(handle(), &value));
    return value;
  }

  etllm_runner* handle_ = nullptr;
};

}  // namespace etllm

#endif  // ETLLM_HPP
