// The application's existing code: counts words in streamed text.
#pragma once

#include <cstddef>
#include <string>

class TextStats {
 public:
  // Adds a piece of text (any split: a word may continue in the next piece).
  void add(const std::string& piece);
  std::size_t words() const { return words_; }
  std::size_t bytes() const { return bytes_; }

 private:
  std::size_t words_ = 0;
  std::size_t bytes_ = 0;
  bool in_word_ = false;
};
