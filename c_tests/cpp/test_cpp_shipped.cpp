// The C++ wrapper's RunnerOptions reach the library: data files (`data_paths`, the LoRA
// export's foundation and adapter files) and the step method (`method_name`, the multi-method
// LoRA export's `lora_forward`) give the same greedy tokens as the `etllm` command-line tool
// (the Rust API, checked against eager PyTorch in tests/shipped_exports.rs) with `--data`
// and `--method`; the adapter method gives other tokens than `forward`.
#include <etllm.hpp>

#include "cli_ids.hpp"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace {

const std::string kShipped = ETLLM_FIXTURES_DIR "/shipped/";
const std::string kTokenizer = ETLLM_FIXTURES_DIR "/tokenizer.json";
const char* kPrompt = "Once upon a time";

std::vector<uint32_t> cli_ids(const std::string& args) {
  const std::string cmd = std::string("'") + ETLLM_CLI + "' generate " + args + " --tokenizer '" + kTokenizer +
                          "' --prompt '" + kPrompt + "' --temperature 0 --max-new-tokens 16 --ignore-eos --bos 1 --json";
  return cli_generated_ids(cmd);
}

std::vector<uint32_t> wrapper_ids(const std::string& model, const etllm::RunnerOptions& options) {
  etllm::Runner runner(model, kTokenizer, options);
  etllm::GenerationConfig c;
  c.echo = false;
  c.temperature = 0.0f;
  c.max_new_tokens = 16;
  c.ignore_eos = true;
  c.num_bos = 1;
  std::vector<uint32_t> ids;
  runner.generate_stream(kPrompt, c, [&](std::string_view, int64_t id) {
    if (id >= 0) ids.push_back(static_cast<uint32_t>(id));
    return true;
  });
  return ids;
}

int check(const char* what, const std::vector<uint32_t>& got, const std::vector<uint32_t>& want) {
  if (want.size() != 16 || got != want) {
    std::fprintf(stderr, "%s: the wrapper gave %zu tokens, the CLI %zu, and they differ\n", what, got.size(),
                 want.size());
    return 1;
  }
  return 0;
}

}  // namespace

int main() {
  int failures = 0;

  const std::string lora = kShipped + "lora/";
  etllm::RunnerOptions with_data;
  with_data.num_threads = 1;
  with_data.data_paths = {lora + "foundation.ptd", lora + "lora.ptd"};
  failures += check("data_paths",
                    wrapper_ids(lora + "model.pte", with_data),
                    cli_ids("--model '" + lora + "model.pte' --data '" + lora + "foundation.ptd' --data '" + lora +
                            "lora.ptd'"));

  const std::string multi = kShipped + "lora_multimethod/model.pte";
  etllm::RunnerOptions adapter;
  adapter.num_threads = 1;
  adapter.method_name = "lora_forward";
  const std::vector<uint32_t> adapted = wrapper_ids(multi, adapter);
  failures += check("method_name", adapted, cli_ids("--model '" + multi + "' --method lora_forward"));
  etllm::RunnerOptions base;
  base.num_threads = 1;
  if (wrapper_ids(multi, base) == adapted) {
    std::fprintf(stderr, "method_name: lora_forward gave the same tokens as forward\n");
    failures++;
  }

  try {
    etllm::RunnerOptions missing;
    missing.data_paths = {lora + "no-such-file.ptd"};
    etllm::Runner runner(lora + "model.pte", kTokenizer, missing);
    runner.load();
    std::fprintf(stderr, "a missing data file did not fail\n");
    failures++;
  } catch (const etllm::Error& e) {
    if (std::strstr(e.what(), "no-such-file.ptd") == nullptr) {
      std::fprintf(stderr, "the error does not name the missing file: %s\n", e.what());
      failures++;
    }
  }
  return failures == 0 ? 0 : 1;
}
