// Streaming generation with the C++ wrapper.
//
//   generate_cpp MODEL.pte TOKENIZER.json "PROMPT" [MAX_NEW_TOKENS]
//
// Text streams to stdout as it is generated; stats go to stderr. Errors are etllm::Error
// exceptions carrying the C status and message.
#include <etllm.hpp>

#include <cstdio>
#include <cstdlib>
#include <iostream>

int main(int argc, char** argv) {
  if (argc < 4) {
    std::cerr << "usage: " << argv[0] << " MODEL.pte TOKENIZER.json PROMPT [MAX_NEW_TOKENS]\n";
    return 2;
  }
  try {
    etllm::Runner runner(argv[1], argv[2]);
    runner.load();  // optional: generate() loads on first use

    etllm::GenerationConfig config;  // upstream's fields and defaults
    config.max_new_tokens = argc > 4 ? std::atoi(argv[4]) : 64;
    config.num_bos = 1;
    config.temperature = 0.0f;  // greedy

    // Upstream-style callbacks: each piece is complete UTF-8.
    const etllm::Stats stats = runner.generate(
        argv[3], config,
        [](const std::string& piece) {
          std::fwrite(piece.data(), 1, piece.size(), stdout);
          std::fflush(stdout);
        },
        [](const etllm::Stats& s) { std::cerr << "\n" << s.to_json() << "\n"; });
    std::cerr << stats.num_generated_tokens << " tokens, " << stats.decode_tokens_per_second()
              << " tokens/s\n";
    // max_new_tokens is exact unless the model ends the text first (CI relies on this).
    if (stats.stop_reason != ETLLM_STOP_EOS &&
        stats.num_generated_tokens != static_cast<uint64_t>(config.max_new_tokens)) {
      std::cerr << "error: expected " << config.max_new_tokens << " tokens\n";
      return 1;
    }
    return 0;
  } catch (const etllm::Error& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  }
}
