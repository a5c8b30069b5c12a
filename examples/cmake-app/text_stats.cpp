#include "text_stats.h"

#include <cctype>

void TextStats::add(const std::string& piece) {
  bytes_ += piece.size();
  for (unsigned char c : piece) {
    const bool space = std::isspace(c) != 0;
    if (!space && !in_word_) ++words_;
    in_word_ = !space;
  }
}
