// Generation with a KV-cache manager written in C++ (kv_in_model_manager.hpp): an
// etllm::IoManager subclass handed to etllm::Runner, which owns it from then on.
//
//   custom_manager MODEL.pte TOKENIZER.json "PROMPT" [MAX_NEW_TOKENS]
//
// MODEL's forward must be (tokens i64[1, seq], input_pos i64[1]), as
// tests/fixtures/dyn_xnnpack/model.pte. The text streams to stdout; then the same prompt
// runs through EtLlm's built-in manager and the program checks (exit status 1 otherwise)
// that both managers generated the same tokens.
#include <etllm.hpp>

#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include "kv_in_model_manager.hpp"

namespace {

std::vector<uint32_t> generate(etllm::Runner& runner, const std::string& prompt, int32_t max_new_tokens,
                               bool print) {
  etllm::GenerationConfig config;
  config.max_new_tokens = max_new_tokens;
  config.num_bos = 1;
  config.temperature = 0.0f;  // greedy: the two managers must agree token for token
  config.echo = print;
  std::vector<uint32_t> ids;
  runner.generate_stream(prompt, config, [&](std::string_view piece, int64_t id) {
    if (id >= 0) ids.push_back(static_cast<uint32_t>(id));
    if (print) {
      std::fwrite(piece.data(), 1, piece.size(), stdout);
      std::fflush(stdout);
    }
    return true;
  });
  return ids;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 4 || argc > 5) {
    std::fprintf(stderr, "usage: %s MODEL.pte TOKENIZER.json PROMPT [MAX_NEW_TOKENS]\n", argv[0]);
    return 2;
  }
  const int32_t max_new_tokens = argc == 5 ? std::atoi(argv[4]) : 32;
  try {
    etllm::RunnerOptions options;
    options.num_threads = 1;
    // The runner owns the manager: it deletes it when destroyed (or if construction fails).
    etllm::Runner custom(argv[1], argv[2], options, std::make_unique<KvInModelManager>());
    const std::vector<uint32_t> ids = generate(custom, argv[3], max_new_tokens, true);
    std::printf("\n");

    etllm::Runner builtin(argv[1], argv[2], options);
    const std::vector<uint32_t> expected = generate(builtin, argv[3], max_new_tokens, false);
    if (ids != expected) {
      std::fprintf(stderr, "the C++ manager generated other tokens than the built-in manager\n");
      return 1;
    }
    std::fprintf(stderr, "%zu tokens, the same as the built-in manager's\n", ids.size());
  } catch (const etllm::Error& e) {
    // A manager's exception arrives here as ETLLM_ERR_IO_MANAGER, its what() in the message.
    std::fprintf(stderr, "%s\n", e.what());
    return 1;
  }
  return 0;
}
