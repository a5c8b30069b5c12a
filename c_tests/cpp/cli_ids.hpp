// Runs an `etllm generate ... --json` command line and returns the generated token ids it
// printed (empty when the command fails). Shared by the C++ tests that compare the wrapper
// with the command-line tool.
#pragma once

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

inline std::vector<uint32_t> cli_generated_ids(const std::string& cmd) {
  FILE* p = popen(cmd.c_str(), "r");
  std::vector<uint32_t> ids;
  if (p == nullptr) return ids;
  char line[8192];
  while (std::fgets(line, sizeof line, p) != nullptr) {
    const char* id = std::strstr(line, "\"id\":");
    if (id == nullptr || std::strncmp(id + 5, "null", 4) == 0) continue;
    ids.push_back(static_cast<uint32_t>(std::strtoul(id + 5, nullptr, 10)));
  }
  if (pclose(p) != 0) ids.clear();
  return ids;
}
