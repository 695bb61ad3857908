// The model of bench/train_bench.cpp and bench/jit_bench.cpp: `blocks_conv` blocks of Conv2d 3×3 at 320
// channels, then `blocks_linear` blocks of q/k/v/out/ff Linear at 320 (batch 4, 8×8 spatial = 64 tokens).
#pragma once
#include <torch/torch.h>

#include <array>
#include <cmath>
#include <string>
#include <vector>

namespace lycoris::bench {

constexpr int64_t kC = 320, kBatch = 4, kHW = 8, kBlocks = 4;

template <typename Linear, typename Conv2d>
struct BenchModelImpl : torch::nn::Module {
  std::vector<Conv2d> convs;
  std::vector<std::array<Linear, 5>> blocks;
  explicit BenchModelImpl(int64_t blocks_conv = kBlocks, int64_t blocks_linear = kBlocks) {
    auto conv_list = register_module("convs", std::make_shared<torch::nn::Module>());
    for (int64_t i = 0; i < blocks_conv; ++i)
      convs.push_back(conv_list->register_module(std::to_string(i),
                                                 Conv2d(torch::nn::Conv2dOptions(kC, kC, 3).padding(1))));
    auto list = register_module("blocks", std::make_shared<torch::nn::Module>());
    for (int64_t i = 0; i < blocks_linear; ++i) {
      auto b = list->register_module(std::to_string(i), std::make_shared<torch::nn::Module>());
      std::array<Linear, 5> l = {Linear(nullptr), Linear(nullptr), Linear(nullptr), Linear(nullptr), Linear(nullptr)};
      const char* names[] = {"to_q", "to_k", "to_v", "to_out", "ff"};
      for (int j = 0; j < 5; ++j) l[j] = b->register_module(names[j], Linear(kC, kC));
      blocks.push_back(l);
    }
  }
  torch::Tensor forward(torch::Tensor x) {
    for (auto& c : convs) x = x + c(torch::silu(x));
    auto t = x.flatten(2).transpose(1, 2);  // [B, 64, C]
    for (auto& b : blocks) {
      auto q = b[0](t), k = b[1](t), v = b[2](t);
      auto a = torch::softmax(q.matmul(k.transpose(1, 2)) / std::sqrt(double(kC)), -1);
      t = t + b[3](a.matmul(v));
      t = t + b[4](torch::gelu(t));
    }
    return t;
  }
};

}  // namespace lycoris::bench
