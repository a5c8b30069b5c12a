// Tests of the C++ wrapper's Tokenizer and TextStream against the reference output
// recorded by tools/fixtures/make_tokenizers.py.
#include <etllm.hpp>

#include <cstdio>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

const std::string kDir = std::string(ETLLM_FIXTURES_DIR) + "/tokenizers/";

int failures = 0;

#define CHECK(cond)                                                             \
  do {                                                                          \
    if (!(cond)) throw std::runtime_error(std::string("CHECK failed: ") + #cond); \
  } while (0)

// The integer array after "key": [ in the case of `format` whose text is `text`.
std::vector<uint32_t> ref_ids(const std::string& format, const std::string& text, const std::string& key) {
  std::ifstream f(kDir + "reference.json");
  std::stringstream ss;
  ss << f.rdbuf();
  const std::string json = ss.str();
  size_t at = json.find("\"" + format + "\": {");
  at = json.find("\"text\": \"" + text + "\"", at);
  at = json.find("\"" + key + "\": [", at);
  if (at == std::string::npos) throw std::runtime_error("no reference for " + format);
  const size_t open = json.find('[', at), close = json.find(']', open);
  std::vector<uint32_t> ids;
  std::stringstream items(json.substr(open + 1, close - open - 1));
  for (std::string item; std::getline(items, item, ',');) ids.push_back(static_cast<uint32_t>(std::stoul(item)));
  return ids;
}

void encode_and_decode_match_reference() {
  etllm::Tokenizer t(kDir + "sp_unigram.model");
  CHECK(t.encode("Hello, world!", 1, 1) == ref_ids("sentencepiece_unigram", "Hello, world!", "ids_bos_eos"));
  CHECK(t.vocab_size() == 200);
  // The unigram model lacks some of these characters (its reference decode has U+2047 for
  // them); the BPE model falls back to bytes, and sentencepiece decodes the text back.
  etllm::Tokenizer bpe(kDir + "sp_bpe.model");
  CHECK(bpe.encode("Hello, world!") == ref_ids("sentencepiece_bpe", "Hello, world!", "ids"));
  CHECK(bpe.decode(ref_ids("sentencepiece_bpe", "Hello, world!", "ids")) == "Hello, world!");
}

void stream_adds_up_to_the_decode() {
  etllm::Tokenizer t(kDir + "llama2c.bin", ETLLM_PRESET_LLAMA);
  const std::string text = "Caf\xC3\xA9 \xE6\x9D\xB1\xE4\xBA\xAC";
  const auto ids = t.encode(text);
  etllm::TextStream s(t);
  std::string out;
  for (uint32_t id : ids) out += s.push(id);
  out += s.flush();
  CHECK(out == t.decode(ids));
  CHECK(t.token_to_piece(t.bos_id()) == "<s>");
}

void bad_file_throws_invalid_tokenizer() {
  try {
    etllm::Tokenizer t(kDir + "README.md");
  } catch (const etllm::Error& e) {
    CHECK(e.status() == ETLLM_ERR_INVALID_TOKENIZER);
    return;
  }
  throw std::runtime_error("no exception");
}

void run(const char* name, void (*f)()) {
  try {
    f();
    std::fprintf(stderr, "ok   %s\n", name);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "FAIL %s: %s\n", name, e.what());
    failures++;
  }
}

}  // namespace

int main() {
  run("encode_and_decode_match_reference", encode_and_decode_match_reference);
  run("stream_adds_up_to_the_decode", stream_adds_up_to_the_decode);
  run("bad_file_throws_invalid_tokenizer", bad_file_throws_invalid_tokenizer);
  return failures == 0 ? 0 : 1;
}
