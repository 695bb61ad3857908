// What every subcommand shares: option parsing with one-line errors, and printing names from files safely.
#pragma once
#include <torch/types.h>

#include <initializer_list>
#include <optional>
#include <string>

namespace lycoris::cli {

// A multiplier given on the command line ("-w 0.8"): a whole finite number; beyond ±kMaxWeight only with
// --force (such a weight is almost always a typo and overflows fp16 outputs). OptionError otherwise.
constexpr double kMaxWeight = 1e6;
double parse_weight(const std::string& text, bool force);

// --device: a device this build of libtorch can use ("cpu", "cuda", "cuda:1", "mps"); OptionError naming
// what is missing otherwise ("this build of libtorch has no CUDA").
torch::Device parse_device(const std::string& text);

// --dtype: one of the `allowed` dtypes in any spelling of the dtype table (fp16, float16, half, F16, …), or
// "keep" (nullopt) when `keep` is allowed. OptionError "--dtype: unknown dtype 'x' (keep, fp32, …)" otherwise.
std::optional<torch::ScalarType> parse_dtype(const std::string& text, std::initializer_list<torch::ScalarType> allowed,
                                             bool keep);

// --threads: 0 = every hardware thread; more than the machine has is clamped to that, with a warning.
int thread_count(int requested);

// One line on stderr: "lycoris: warning: <text>", control characters escaped.
void warn(const std::string& text);
// The same for errors: "lycoris: error: <text>".
void print_error(const std::string& text);

}  // namespace lycoris::cli
