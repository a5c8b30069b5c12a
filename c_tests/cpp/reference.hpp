// The greedy references of a fixture model (tests/fixtures/<model>/reference.json) for the
// C++ tests, read without a JSON library: each case's prompt ids and greedy ids, in order.
#pragma once

#include <cstdint>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

// Reads the integer array that follows the n-th occurrence of "key": in reference.json.
inline std::vector<uint32_t> json_ids(const std::string& json, const std::string& key, int nth) {
  size_t at = 0;
  for (int i = 0; i <= nth; ++i) {
    at = json.find("\"" + key + "\":", at);
    if (at == std::string::npos) throw std::runtime_error("no " + key + " in reference.json");
    at += key.size() + 3;
  }
  const size_t open = json.find('[', at), close = json.find(']', open);
  std::vector<uint32_t> ids;
  std::stringstream items(json.substr(open + 1, close - open - 1));
  for (std::string item; std::getline(items, item, ',');) ids.push_back(static_cast<uint32_t>(std::stoul(item)));
  return ids;
}

struct Case {
  std::vector<uint32_t> prompt_ids, greedy_ids;
};

// Case `nth` of `reference_json` (a reference.json path).
inline Case reference_case_of(const std::string& reference_json, int nth) {
  std::ifstream in(reference_json);
  if (!in) throw std::runtime_error("cannot read " + reference_json);
  std::stringstream text;
  text << in.rdbuf();
  return {json_ids(text.str(), "prompt_ids", nth), json_ids(text.str(), "greedy_ids", nth)};
}

// Greedy, no echo, EOS ignored, exactly `n` new tokens: the settings the references were
// made with.
template <class Config>
Config greedy_config(int32_t n) {
  Config c;
  c.echo = false;
  c.temperature = 0.0f;
  c.max_new_tokens = n;
  c.ignore_eos = true;
  return c;
}
