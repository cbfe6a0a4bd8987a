// Reads one JSON string per stdin line and writes one JSON line per input: {"ids": [...]} or
// {"error": "..."}. The C++ side of clip_tokenizer_differential.py (built with ASan/UBSan).
// Usage: clip_tokenizer_encode [vocab_dir]
#include <iostream>
#include <string>

#include "nlohmann/json.hpp"
#include "worker/clip_tokenizer.h"

int main(int argc, char** argv) {
  const std::string dir = argc > 1 ? argv[1] : DMDSERVE_VOCAB_DIR;
  dmdserve::ClipTokenizer::Options options;
  options.vocab_path = dir + "/vocab.json";
  options.merges_path = dir + "/merges.txt";
  auto tokenizer = dmdserve::ClipTokenizer::Create(options);
  if (!tokenizer.ok()) {
    std::cerr << tokenizer.status() << "\n";
    return 1;
  }
  std::string line;
  while (std::getline(std::cin, line)) {
    if (line.empty()) continue;
    const auto ids = (*tokenizer)->Encode(nlohmann::json::parse(line).get<std::string>());
    nlohmann::json out;
    if (ids.ok()) {
      out["ids"] = *ids;
    } else {
      out["error"] = std::string(ids.status().message());
    }
    std::cout << out.dump() << "\n";
  }
  return 0;
}
