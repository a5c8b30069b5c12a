// Streams a generation from C++ with EtLlm's header-only wrapper, inside an application
// that has code of its own (TextStats). docs/tutorials/cpp-cmake-streaming.md walks
// through it.
//
//   story MODEL.pte TOKENIZER.json "PROMPT" [MAX_NEW_TOKENS]
//
// Text streams to stdout as it is generated; a summary goes to stderr. Exits 1 on an
// error, or when the stats disagree with what was streamed.
#include <etllm.hpp>

#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <string>

#include "text_stats.h"

int main(int argc, char** argv) {
  if (argc < 4 || argc > 5) {
    std::cerr << "usage: " << argv[0] << " MODEL.pte TOKENIZER.json PROMPT [MAX_NEW_TOKENS]\n";
    return 2;
  }
  try {
    // Opens lazily: the model and tokenizer load on the first generate (or on load()).
    etllm::Runner runner(argv[1], argv[2]);

    etllm::GenerationConfig config;  // upstream's field names and defaults
    config.max_new_tokens = argc == 5 ? std::atoi(argv[4]) : 64;
    config.temperature = 0.0f;  // greedy; set seed for reproducible sampling instead
    config.num_bos = 1;
    config.echo = false;        // stream only the generated text

    TextStats text;
    std::size_t pieces = 0;
    // The token callback gets complete UTF-8 pieces on this thread, as they are generated.
    // An exception thrown here stops generation and comes out of generate().
    const etllm::Stats stats = runner.generate(argv[3], config, [&](const std::string& piece) {
      std::fwrite(piece.data(), 1, piece.size(), stdout);
      std::fflush(stdout);
      text.add(piece);
      ++pieces;
    });
    std::cout << "\n";

    std::cerr << stats.num_generated_tokens << " tokens in " << pieces << " pieces, "
              << text.words() << " words, " << stats.decode_tokens_per_second() << " tokens/s\n"
              << stats.to_json() << "\n";  // upstream's JSON stats, with stop_reason
    // What CI checks: the stream and the stats agree, and max_new_tokens is exact unless
    // the model ended the text first.
    const bool eos = stats.stop_reason == ETLLM_STOP_EOS;
    if (pieces == 0 || pieces > stats.num_generated_tokens + 1 ||
        (!eos && stats.num_generated_tokens != static_cast<uint64_t>(config.max_new_tokens))) {
      std::cerr << "error: unexpected stats\n";
      return 1;
    }
    return 0;
  } catch (const etllm::Error& e) {  // every failure: status and message
    std::cerr << "error: " << e.what() << " (" << etllm_status_name(e.status()) << ")\n";
    return 1;
  }
}
