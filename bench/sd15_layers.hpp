// The SD1.5-shaped layer list the extract and budget benchmarks share (bench/data/sd15_unet_layers.json).
#pragma once
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <stdexcept>
#include <string>
#include <vector>

namespace lycoris::bench {

struct Sd15Layer {
  std::string module, kind;           // diffusers module path; linear, conv2d, groupnorm, layernorm
  std::vector<int64_t> weight, bias;  // bias empty when the layer has none
};

inline std::vector<Sd15Layer> sd15_layers() {
  const auto path = std::filesystem::path(__FILE__).parent_path() / "data" / "sd15_unet_layers.json";
  std::ifstream in(path);
  if (!in) throw std::runtime_error(path.string() + ": cannot open");
  auto j = nlohmann::json::parse(in);
  std::vector<Sd15Layer> out;
  for (const auto& l : j.at("layers")) {
    Sd15Layer x{l.at("module"), l.at("kind"), l.at("weight").get<std::vector<int64_t>>(), {}};
    if (!l.at("bias").is_null()) x.bias = l.at("bias").get<std::vector<int64_t>>();
    out.push_back(x);
  }
  return out;
}

}  // namespace lycoris::bench
