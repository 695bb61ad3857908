// How a rank is chosen from singular values: the rules `lycoris extract` and `lycoris resize` share
// (docs/tools.md#extract-rank-modes, docs/tools.md#resize).
//   fixed r = p;  threshold #{σ_i > p};  ratio #{σ_i > p·σ_1} (0 ≤ p ≤ 1);
//   quantile #{i : σ_1 + … + σ_i < p·Σσ} (strict, 0 ≤ p ≤ 1);  full: no rank (extract stores the whole
//   difference).
#pragma once
#include <torch/types.h>

#include <cstdint>
#include <string>

namespace lycoris::tools {

enum class RankMode { Fixed, Threshold, Ratio, Quantile, Full };

// "fixed", "threshold", "ratio", "quantile", "full" (OptionError "--mode: …" otherwise).
RankMode parse_rank_mode(const std::string& name);
const char* to_string(RankMode mode);

struct RankRule {
  RankMode mode = RankMode::Fixed;
  double param = 1;  // the rank (fixed), threshold, ratio or quantile
};
// OptionError "<what>: …" for a parameter the mode does not accept (fixed < 1 or not an integer,
// threshold < 0, ratio/quantile outside [0, 1], NaN).
void validate(const RankRule& rule, const std::string& what);
// The mode's raw count on descending singular values S (the reference's rule, before clamping;
// fixed: the parameter itself, S may be undefined).
int64_t select_rank(const torch::Tensor& S, const RankRule& rule);
// The reference clamp: max(1, r), then min(out, in, r).
int64_t clamp_rank(int64_t r, int64_t out, int64_t in);

}  // namespace lycoris::tools
