// A KV-cache manager written in C++ (etllm::IoManager) for exports whose KV cache lives
// inside the model, forward(tokens i64[1, seq], input_pos i64[1]) -> logits, such as
// tests/fixtures/dyn_xnnpack/model.pte. It does what EtLlm's built-in KvCacheInModel
// manager does for that signature: each step fills the tokens and the start position, and
// the logits are the last row of output 0. The cache itself is state inside the program,
// so reset and rewind have nothing to move (the model masks the positions past the current
// one, and later steps overwrite them), and a saved state (save_state) is only a tag and a
// version, which restore_state checks.
#ifndef EXAMPLE_KV_IN_MODEL_MANAGER_HPP
#define EXAMPLE_KV_IN_MODEL_MANAGER_HPP

#include <etllm.hpp>

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

class KvInModelManager : public etllm::IoManager {
 public:
  etllm::LoadResult load(const etllm::ModelInfo& model) override {
    if (!model.has_method("forward")) throw std::runtime_error("the model has no `forward` method");
    const size_t n_inputs = model.num_inputs("forward");
    if (n_inputs != 2) {
      throw std::runtime_error("`forward` takes " + std::to_string(n_inputs) +
                               " inputs; this manager drives forward(tokens, input_pos)");
    }
    const etllm::TensorView tokens = model.input("forward", 0);
    const etllm::TensorView pos = model.input("forward", 1);
    if (tokens.dtype() != ETLLM_DTYPE_I64 || tokens.ndim() != 2 || tokens.size(0) != 1) {
      throw std::runtime_error("the tokens input of `forward` is " + tokens.describe() + "; expected i64[1, seq]");
    }
    if (pos.dtype() != ETLLM_DTYPE_I64 || pos.ndim() != 1 || pos.size(0) != 1) {
      throw std::runtime_error("the position input of `forward` is " + pos.describe() + "; expected i64[1]");
    }
    const etllm_model_metadata meta = model.metadata();
    if (tokens.size(1) > 1 && !meta.enable_dynamic_shape) {
      throw std::runtime_error("`forward` takes a fixed " + std::to_string(tokens.size(1)) +
                               " tokens per call; this manager needs dynamic shape or one token");
    }
    max_chunk_ = tokens.size(1);  // the upper bound of the dynamic dimension
    max_context_ = meta.max_context_len;
    tokens_.assign(static_cast<size_t>(max_chunk_), 0);
    inputs_ = {etllm::TensorView::of(tokens_.data(), {1, 1}), etllm::TensorView::of(&start_pos_, {1})};
    return {max_chunk_, max_context_};
  }

  void reset() override {}

  void rewind(int64_t pos) override {
    if (pos < 0 || pos > max_context_) throw std::out_of_range("cannot rewind to " + std::to_string(pos));
  }

  etllm::Step prepare_prefill(etllm::Span<const uint64_t> tokens, int64_t start_pos) override {
    return prepare(tokens, start_pos);
  }

  etllm::Logits update_prefill(etllm::Span<const etllm::TensorView> outputs) override {
    return etllm::Logits::last_row_of(outputs.at(0));
  }

  etllm::Step prepare_decode(uint64_t token, int64_t pos) override {
    return prepare(etllm::Span<const uint64_t>(&token, 1), pos);
  }

  etllm::Logits update_decode(etllm::Span<const etllm::TensorView> outputs) override {
    return etllm::Logits::last_row_of(outputs.at(0));
  }

  // This manager keeps nothing of a conversation between steps (the cache is the model's,
  // which EtLlm saves): its state is a tag and a format version.
  void save_state(etllm::StateWriter& out) override { out.append(kState, sizeof kState); }

  void restore_state(etllm::Span<const uint8_t> state) override {
    if (state.size() != sizeof kState || std::memcmp(state.data(), kState, sizeof kState) != 0) {
      throw std::invalid_argument("not a saved state of the C++ KvInModelManager (" + std::to_string(state.size()) +
                                  " bytes; expected \"cpKV\" version 1)");
    }
  }

  static constexpr uint8_t kState[8] = {'c', 'p', 'K', 'V', 1, 0, 0, 0};

 private:
  etllm::Step prepare(etllm::Span<const uint64_t> tokens, int64_t start_pos) {
    const int64_t n = static_cast<int64_t>(tokens.size());
    if (n < 1 || n > max_chunk_) {
      throw std::invalid_argument("a step takes 1 to " + std::to_string(max_chunk_) + " tokens, got " +
                                  std::to_string(n));
    }
    if (start_pos < 0 || start_pos + n > max_context_) {
      throw std::out_of_range("positions " + std::to_string(start_pos) + ".." + std::to_string(start_pos + n) +
                              " exceed the context of " + std::to_string(max_context_));
    }
    for (int64_t i = 0; i < n; ++i) tokens_[static_cast<size_t>(i)] = static_cast<int64_t>(tokens[static_cast<size_t>(i)]);
    inputs_[0].resize({1, n});
    start_pos_ = start_pos;
    // The name and the views (and what they point to) live in this object, so they stay
    // valid until the matching update.
    return {"forward", inputs_};
  }

  int64_t max_chunk_ = 1;
  int64_t max_context_ = 0;
  std::vector<int64_t> tokens_;
  int64_t start_pos_ = 0;
  std::vector<etllm::TensorView> inputs_;
};

#endif  // EXAMPLE_KV_IN_MODEL_MANAGER_HPP
