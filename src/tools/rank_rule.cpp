// The rank rules of extract and resize (see include/lycoris/tools/rank_rule.hpp).
#include "lycoris/tools/rank_rule.hpp"

#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <sstream>

#include "lycoris/error.hpp"
#include "lycoris/text.hpp"

namespace lycoris::tools {

namespace {
constexpr EnumName<RankMode> kRankModes[] = {{RankMode::Fixed, "fixed"},
                                             {RankMode::Threshold, "threshold"},
                                             {RankMode::Ratio, "ratio"},
                                             {RankMode::Quantile, "quantile"},
                                             {RankMode::Full, "full"}};
}  // namespace

RankMode parse_rank_mode(const std::string& name) {
  RankMode m;
  std::string known;
  if (!parse_enum(kRankModes, name, m, &known))
    throw OptionError("--mode: '" + escape_control(name) + "' is not one of " + known);
  return m;
}

const char* to_string(RankMode mode) { return enum_name(kRankModes, mode); }

void validate(const RankRule& rule, const std::string& what) {
  const double p = rule.param;
  auto fail = [&](const std::string& why) {
    std::ostringstream value;  // "-3", "0.5", "1e+11" rather than to_string's "-3.000000"
    value << p;
    throw OptionError(what + ": " + value.str() + " is not valid for mode " + to_string(rule.mode) + " (" + why +
                      ")");
  };
  if (std::isnan(p)) fail("NaN");
  switch (rule.mode) {
    case RankMode::Fixed:
      if (p < 1 || p != std::floor(p) || p > 1e9) fail("the rank must be a positive integer");
      break;
    case RankMode::Threshold:
      if (p < 0 || std::isinf(p)) fail("the threshold must be finite and ≥ 0");
      break;
    case RankMode::Ratio:
    case RankMode::Quantile:
      if (p < 0 || p > 1) fail("it must lie in [0, 1]");
      break;
    case RankMode::Full: break;
  }
}

int64_t select_rank(const torch::Tensor& S, const RankRule& rule) {
  if (rule.mode == RankMode::Fixed || rule.mode == RankMode::Full) return static_cast<int64_t>(rule.param);
  auto s = S.to(torch::kFloat64);
  switch (rule.mode) {
    case RankMode::Threshold: return (s > rule.param).sum().item<int64_t>();
    case RankMode::Ratio: return (s > s.max() * rule.param).sum().item<int64_t>();
    case RankMode::Quantile: return (s.cumsum(0) < s.sum() * rule.param).sum().item<int64_t>();
    default: return 0;
  }
}

int64_t clamp_rank(int64_t r, int64_t out, int64_t in) { return std::min({out, in, std::max<int64_t>(1, r)}); }

}  // namespace lycoris::tools
