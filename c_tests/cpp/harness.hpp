// The C++ tests' small harness: CHECK, run one named case, and the summary that main
// returns.
#pragma once

#include <cstdio>
#include <stdexcept>

inline int failures = 0, passes = 0;

#define CHECK(cond)                                                                  \
  do {                                                                               \
    if (!(cond)) {                                                                   \
      std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
      throw std::runtime_error("check failed");                                      \
    }                                                                                \
  } while (0)

// Runs one case; an exception fails it and the next case still runs.
template <class F>
void run(const char* name, F test) {
  try {
    test();
    ++passes;
    std::fprintf(stderr, "ok   %s\n", name);
  } catch (const std::exception& e) {
    ++failures;
    std::fprintf(stderr, "FAIL %s: %s\n", name, e.what());
  }
}

// Prints the summary; main's status.
inline int finish() {
  std::fprintf(stderr, "%d passed, %d failed\n", passes, failures);
  return failures == 0 ? 0 : 1;
}
