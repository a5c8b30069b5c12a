// Tests of the header-only C++ wrapper (include/etllm.hpp): RAII, lambdas, exceptions,
// upstream-style generate, and stop() from a std::thread.
#include <etllm.hpp>

#include "harness.hpp"

#include "reference.hpp"

#include <atomic>
#include <condition_variable>
#include <cstdio>
#include <fstream>
#include <mutex>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

namespace {

const std::string kFixtures = [] {
  const std::string file = __FILE__;  // <repo>/c_tests/cpp/test_cpp_wrapper.cpp
  const std::string repo = file.substr(0, file.rfind("c_tests/"));
  return (repo.empty() ? std::string("./") : repo) + "tests/fixtures/";
}();
const std::string kModel = kFixtures + "dyn_xnnpack/model.pte";
const std::string kTokenizer = kFixtures + "tokenizer.json";

Case reference_case(int nth) { return reference_case_of(kFixtures + "dyn_xnnpack/reference.json", nth); }

etllm::GenerationConfig greedy(int32_t n) { return greedy_config<etllm::GenerationConfig>(n); }

// A stream callback that appends each generated token id to `ids`.
etllm::Runner::StreamCallback collect_into(std::vector<uint32_t>& ids) {
  return [&ids](std::string_view, int64_t id) {
    if (id >= 0) ids.push_back(static_cast<uint32_t>(id));
    return true;
  };
}

void generate_tokens_matches_eager_reference() {
  etllm::Runner runner(kModel, kTokenizer);
  runner.load();
  for (int i = 0; i < 3; ++i) {
    const Case c = reference_case(i);
    runner.reset();
    std::vector<uint32_t> got;
    runner.generate_tokens(c.prompt_ids, greedy(static_cast<int32_t>(c.greedy_ids.size())),
                           collect_into(got));
    CHECK(got == c.greedy_ids);
  }
}

void upstream_style_generate_streams_strings_and_stats() {
  etllm::Runner runner(kModel, kTokenizer);
  CHECK(!runner.is_loaded());
  std::string text;
  int stats_calls = 0;
  etllm::GenerationConfig config = greedy(6);
  config.num_bos = 1;
  config.echo = true;
  const etllm::Stats stats = runner.generate(
      "The", config, [&](const std::string& piece) { text += piece; },
      [&](const etllm::Stats& s) {
        ++stats_calls;
        CHECK(s.num_generated_tokens == 6);
      });
  CHECK(runner.is_loaded());  // generate loads on first use, as upstream
  CHECK(stats_calls == 1);
  CHECK(stats.num_generated_tokens == 6);
  CHECK(stats.num_prompt_tokens == 2);
  CHECK(text.rfind("The", 0) == 0);  // echoed prompt first
  CHECK(stats.to_json().find("\"generated_tokens\":6") != std::string::npos);
}

void errors_are_exceptions_with_status_and_message() {
  etllm::Runner runner("/nonexistent/model.pte", kTokenizer);
  try {
    runner.load();
    CHECK(false);
  } catch (const etllm::Error& e) {
    CHECK(e.status() == ETLLM_ERR_FILE_ACCESS);
    CHECK(e.message().find("/nonexistent/model.pte") != std::string::npos);
  }
  etllm::Runner good(kModel, kTokenizer);
  try {
    good.generate("", greedy(3));
    CHECK(false);
  } catch (const etllm::Error& e) {
    CHECK(e.status() == ETLLM_ERR_INVALID_ARGUMENT);
  }
}

void exception_in_callback_propagates_and_runner_stays_usable() {
  etllm::Runner runner(kModel, kTokenizer);
  const Case c = reference_case(0);
  int calls = 0;
  try {
    runner.generate_tokens(c.prompt_ids, greedy(10), [&](std::string_view, int64_t) -> bool {
      if (++calls == 3) throw std::logic_error("from the callback");
      return true;
    });
    CHECK(false);
  } catch (const std::logic_error& e) {
    CHECK(std::string(e.what()) == "from the callback");
  }
  CHECK(calls == 3);  // generation stopped at the throw
  runner.reset();
  std::vector<uint32_t> got;
  runner.generate_tokens(c.prompt_ids, greedy(static_cast<int32_t>(c.greedy_ids.size())),
                         collect_into(got));
  CHECK(got == c.greedy_ids);
}

void stop_from_std_thread_ends_generation() {
  etllm::Runner runner(kModel, kTokenizer);
  const Case c = reference_case(1);
  std::mutex m;
  std::condition_variable cv;
  bool asked = false, stopped = false;
  std::thread stopper([&] {
    std::unique_lock<std::mutex> lock(m);
    cv.wait(lock, [&] { return asked; });
    runner.stop();
    stopped = true;
    cv.notify_all();
  });
  int tokens = 0;
  const etllm::Stats stats = runner.generate_tokens(c.prompt_ids, greedy(-1), [&](std::string_view, int64_t id) {
    if (id >= 0 && ++tokens == 5) {
      std::unique_lock<std::mutex> lock(m);
      asked = true;
      cv.notify_all();
      cv.wait(lock, [&] { return stopped; });
    }
    return true;
  });
  stopper.join();
  CHECK(stats.stop_reason == ETLLM_STOP_REQUESTED);
  CHECK(tokens == 5);
}

void runner_is_move_only_and_moves_keep_the_handle() {
  static_assert(!std::is_copy_constructible_v<etllm::Runner>);
  static_assert(std::is_nothrow_move_constructible_v<etllm::Runner>);
  etllm::Runner a(kModel, kTokenizer);
  a.load();
  etllm::Runner b(std::move(a));
  CHECK(b.is_loaded());
  CHECK(b.max_context_len() == 128);
  CHECK(b.vocab_size() == 512);
  CHECK(b.bos_id() == 1u);
  CHECK(b.eos_ids() == std::vector<uint32_t>{2});
  try {
    (void)a.is_loaded();  // NOLINT: use after move is what is tested
    CHECK(false);
  } catch (const etllm::Error& e) {
    CHECK(e.status() == ETLLM_ERR_NULL_ARGUMENT);
  }
}

void prefill_then_continue_matches_reference() {
  etllm::Runner runner(kModel, kTokenizer);
  const Case c = reference_case(1);
  runner.prefill_tokens(c.prompt_ids);
  CHECK(runner.position() == static_cast<int64_t>(c.prompt_ids.size()));
  std::vector<uint32_t> got;
  runner.generate_stream("", greedy(static_cast<int32_t>(c.greedy_ids.size())), collect_into(got));
  CHECK(got == c.greedy_ids);
}

void sampling_filters_and_stop_strings_reach_the_library() {
  etllm::Runner runner(kModel, kTokenizer);
  const Case c = reference_case(1);
  // top_k 1 is greedy whatever the temperature.
  etllm::GenerationConfig config = greedy(static_cast<int32_t>(c.greedy_ids.size()));
  config.temperature = 1.5f;
  config.top_k = 1;
  config.seed = 3;
  std::vector<uint32_t> got;
  runner.generate_tokens(c.prompt_ids, config, collect_into(got));
  CHECK(got == c.greedy_ids);
  // A stop string taken from the greedy text ends generation before it.
  runner.reset();
  std::string text;
  etllm::GenerationConfig plain = greedy(static_cast<int32_t>(c.greedy_ids.size()));
  runner.generate_tokens(c.prompt_ids, plain, [&](std::string_view piece, int64_t) {
    text.append(piece);
    return true;
  });
  // One whole character from the middle (never half of a multi-byte one).
  auto continuation = [&](size_t i) { return (static_cast<unsigned char>(text[i]) & 0xC0) == 0x80; };
  size_t start = text.size() / 2, end = start + 1;
  while (start < text.size() && continuation(start)) ++start;
  end = start + 1;
  while (end < text.size() && continuation(end)) ++end;
  CHECK(start < text.size());
  const std::string stop = text.substr(start, end - start);
  runner.reset();
  plain.stop_strings = {stop};
  std::string cut;
  const etllm::Stats stats = runner.generate_tokens(c.prompt_ids, plain, [&](std::string_view piece, int64_t) {
    cut.append(piece);
    return true;
  });
  CHECK(stats.stop_reason == ETLLM_STOP_STRING);
  CHECK(cut == text.substr(0, text.find(stop)));
}

void rewind_and_warmup() {
  etllm::Runner runner(kModel, kTokenizer);
  runner.warmup();
  CHECK(runner.is_loaded());
  CHECK(runner.position() == 0);
  const Case c = reference_case(0);
  std::vector<uint32_t> got;
  runner.generate_tokens(c.prompt_ids, greedy(3), collect_into(got));
  CHECK(got.size() == 3);
  runner.rewind(1);
  CHECK(runner.position() == 1);
}

// Forbids one token; throws on request.
struct Ban : etllm::SamplerPlugin {
  uint32_t banned;
  bool throw_now = false;
  int* destroyed;
  Ban(uint32_t b, int* d) : banned(b), destroyed(d) {}
  ~Ban() override { ++*destroyed; }
  std::optional<uint32_t> apply(etllm::Span<float> logits, etllm::Span<const uint32_t>) override {
    if (throw_now) throw std::runtime_error("no such token allowed");
    logits[banned] = -1e30f;
    return std::nullopt;
  }
};

void sampler_plugin_in_cpp() {
  etllm::Runner runner(kModel, kTokenizer);
  const Case c = reference_case(0);
  int destroyed = 0;
  auto plugin = std::make_unique<Ban>(c.greedy_ids[0], &destroyed);
  Ban* raw = plugin.get();
  runner.set_sampler(std::move(plugin));
  std::vector<uint32_t> got;
  runner.generate_tokens(c.prompt_ids, greedy(1), collect_into(got));
  CHECK(got.size() == 1 && got[0] != c.greedy_ids[0]);
  raw->throw_now = true;
  try {
    runner.generate_tokens(c.prompt_ids, greedy(1), collect_into(got));
    CHECK(false);
  } catch (const etllm::Error& e) {
    CHECK(e.status() == ETLLM_ERR_SAMPLER);
    CHECK(e.message().find("no such token allowed") != std::string::npos);
  }
  runner.set_sampler(nullptr);
  CHECK(destroyed == 1);
}

}  // namespace

int main() {
  run("generate_tokens_matches_eager_reference", generate_tokens_matches_eager_reference);
  run("upstream_style_generate_streams_strings_and_stats", upstream_style_generate_streams_strings_and_stats);
  run("errors_are_exceptions_with_status_and_message", errors_are_exceptions_with_status_and_message);
  run("exception_in_callback_propagates_and_runner_stays_usable", exception_in_callback_propagates_and_runner_stays_usable);
  run("stop_from_std_thread_ends_generation", stop_from_std_thread_ends_generation);
  run("runner_is_move_only_and_moves_keep_the_handle", runner_is_move_only_and_moves_keep_the_handle);
  run("prefill_then_continue_matches_reference", prefill_then_continue_matches_reference);
  run("sampling_filters_and_stop_strings_reach_the_library", sampling_filters_and_stop_strings_reach_the_library);
  run("rewind_and_warmup", rewind_and_warmup);
  run("sampler_plugin_in_cpp", sampler_plugin_in_cpp);
  return finish();
}
