// The same seed gives the same tokens through the C++ wrapper as through the `etllm`
// command-line tool (the Rust API), with every sampling filter on.
#include <etllm.hpp>

#include "cli_ids.hpp"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace {

const std::string kFixtures = ETLLM_FIXTURES_DIR "/";
const std::string kModel = kFixtures + "dyn_xnnpack/model.pte";
const std::string kTokenizer = kFixtures + "tokenizer.json";
const char* kPrompt = "Once upon a time";

std::vector<uint32_t> cli_ids(uint64_t seed) {
  const std::string cmd = std::string("'") + ETLLM_CLI + "' generate --model '" + kModel + "' --tokenizer '" +
                          kTokenizer + "' --prompt '" + kPrompt + "' --seed " + std::to_string(seed) +
                          " --temperature 0.8 --top-k 40 --top-p 0.9 --min-p 0.02 --repetition-penalty 1.1"
                          " --max-new-tokens 24 --ignore-eos --bos 1 --json";
  return cli_generated_ids(cmd);
}

}  // namespace

int main() {
  etllm::Runner runner(kModel, kTokenizer);
  int failures = 0;
  for (uint64_t seed = 1; seed <= 3; ++seed) {
    etllm::GenerationConfig c;
    c.echo = false;
    c.temperature = 0.8f;
    c.top_k = 40;
    c.top_p = 0.9f;
    c.min_p = 0.02f;
    c.repetition_penalty = 1.1f;
    c.max_new_tokens = 24;
    c.ignore_eos = true;
    c.num_bos = 1;
    c.seed = seed;
    std::vector<uint32_t> got;
    runner.reset();
    runner.generate_stream(kPrompt, c, [&](std::string_view, int64_t id) {
      if (id >= 0) got.push_back(static_cast<uint32_t>(id));
      return true;
    });
    const std::vector<uint32_t> want = cli_ids(seed);
    if (want.size() != 24 || got != want) {
      std::fprintf(stderr, "seed %llu: the C++ wrapper and the CLI differ (%zu vs %zu tokens)\n",
                   static_cast<unsigned long long>(seed), got.size(), want.size());
      ++failures;
    }
  }
  std::fprintf(stderr, "%d failed\n", failures);
  return failures == 0 ? 0 : 1;
}
