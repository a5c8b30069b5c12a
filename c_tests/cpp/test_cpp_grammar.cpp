// Constrained decoding through the C++ wrapper: the same seed gives the same constrained
// tokens as the `etllm` command-line tool (the Rust API), the grammar stop reason reaches
// Stats, and a grammar that does not compile throws etllm::Error with ETLLM_ERR_GRAMMAR
// while the runner stays usable.
#include <etllm.hpp>

#include "cli_ids.hpp"

#include <cstdio>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

namespace {

const std::string kFixtures = ETLLM_FIXTURES_DIR "/";
const std::string kModel = kFixtures + "dyn_xnnpack/model.pte";
const std::string kTokenizer = kFixtures + "tokenizer.json";
const std::string kSchema = kFixtures + "grammar/person.schema.json";
const char* kPrompt = "Once upon a time";

std::string read_text(const std::string& path) {
  std::ifstream in(path);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

std::vector<uint32_t> cli_ids(uint64_t seed) {
  const std::string cmd = std::string("'") + ETLLM_CLI + "' generate --model '" + kModel +
                          "' --tokenizer '" + kTokenizer + "' --prompt '" + kPrompt +
                          "' --seed " + std::to_string(seed) +
                          " --temperature 1 --max-new-tokens 100 --bos 1 --json-schema '" +
                          kSchema + "' --json";
  return cli_generated_ids(cmd);
}

int failures = 0;

void expect(bool ok, const char* what) {
  if (!ok) {
    std::fprintf(stderr, "FAILED: %s\n", what);
    ++failures;
  }
}

}  // namespace

int main() {
  etllm::Runner runner(kModel, kTokenizer);
  const std::string schema = read_text(kSchema);
  expect(!schema.empty(), "the schema fixture is readable");
  for (uint64_t seed = 1; seed <= 3; ++seed) {
    etllm::GenerationConfig c;
    c.echo = false;
    c.temperature = 1.0f;
    c.max_new_tokens = 100;
    c.num_bos = 1;
    c.seed = seed;
    c.grammar = schema;
    c.grammar_type = "json_schema";
    std::vector<uint32_t> got;
    runner.reset();
    etllm::Stats stats = runner.generate_stream(kPrompt, c, [&](std::string_view, int64_t id) {
      if (id >= 0) got.push_back(static_cast<uint32_t>(id));
      return true;
    });
    const std::vector<uint32_t> want = cli_ids(seed);
    expect(!want.empty() && got == want, "the C++ wrapper and the CLI draw the same tokens");
    expect(stats.stop_reason == ETLLM_STOP_GRAMMAR_COMPLETE, "the stop reason is grammar_complete");
  }

  etllm::GenerationConfig bad;
  bad.grammar = "start: missing_rule";
  bad.grammar_type = "lark";
  bad.max_new_tokens = 4;
  bool threw = false;
  try {
    runner.reset();
    runner.generate_stream(kPrompt, bad, [](std::string_view, int64_t) { return true; });
  } catch (const etllm::Error& e) {
    threw = e.status() == ETLLM_ERR_GRAMMAR;
  }
  expect(threw, "a grammar that does not compile throws ETLLM_ERR_GRAMMAR");
  etllm::GenerationConfig plain;
  plain.echo = false;
  plain.temperature = 0.0f;
  plain.max_new_tokens = 4;
  plain.ignore_eos = true;
  size_t n = 0;
  runner.generate_stream(kPrompt, plain, [&](std::string_view, int64_t id) {
    if (id >= 0) ++n;
    return true;
  });
  expect(n == 4, "the runner generates after the grammar error");

  std::fprintf(stderr, "%d failed\n", failures);
  return failures == 0 ? 0 : 1;
}
