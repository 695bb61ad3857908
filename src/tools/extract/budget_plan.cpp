// Extract's budget candidates per layer and the fit of the chosen one (see budget_plan.hpp).
#include "tools/extract/budget_plan.hpp"

#include <c10/util/accumulate.h>
#include <torch/torch.h>

#include <algorithm>

#include "lycoris/file_layouts.hpp"
#include "lycoris/functional/common.hpp"
#include "lycoris/functional/svd.hpp"
#include "lycoris/io/safetensors.hpp"
#include "tools/extract/fitters.hpp"

namespace lycoris::tools {

namespace F = functional;

namespace {

// LoHa and LoKr are fitted at these ranks only (each fit is an alternating solve); LoCon's errors at every rank
// come from one spectrum.
constexpr int64_t kLoHaMaxRank = 32;

torch::Tensor meta_tensor(std::vector<int64_t> shape, const ExtractOptions& o) {
  return torch::empty(shape, torch::TensorOptions().dtype(o.dtype).device(torch::kMeta));
}

std::vector<int64_t> shape_cat(std::vector<int64_t> head, const std::vector<int64_t>& tail) {
  head.insert(head.end(), tail.begin(), tail.end());
  return head;
}

}  // namespace

NamedTensors candidate_layout(const LayerCandidate& c, const std::vector<int64_t>& shape,
                              const std::vector<int64_t>& bias_shape, const ExtractOptions& o) {
  const int64_t O = shape[0], I = shape[1], r = c.rank;
  const std::vector<int64_t> kernel(shape.begin() + 2, shape.end());
  const int64_t k = c10::multiply_integers(kernel);
  if (c.diff) {  // the tool's full difference (extract_layer in full mode)
    NamedTensors t{{"diff", meta_tensor(shape, o)}};
    if (!bias_shape.empty()) t.emplace_back("diff_b", meta_tensor(bias_shape, o));
    return t;
  }
  switch (c.algo) {
    case ExtractAlgo::LoHa: {
      F::loha::Weights w{meta_tensor({O, r}, o), meta_tensor({r, I * k}, o), meta_tensor({O, r}, o),
                         meta_tensor({r, I * k}, o), {}, {}};
      return loha_file_tensors(w, meta_tensor({}, o));
    }
    case ExtractAlgo::LoKr: {
      const auto s = kron_split(meta_tensor(shape, o), o.lokr_factor);
      F::lokr::Weights w;
      w.w1 = meta_tensor({s.a, s.c}, o);
      if (lokr_stores_full_w2(s, r)) {
        w.w2 = meta_tensor(shape_cat({s.p, s.q}, kernel), o);
      } else {
        w.w2a = meta_tensor({s.p, r}, o);
        w.w2b = meta_tensor({r, s.q * k}, o);
      }
      return lokr_file_tensors(w, meta_tensor({}, o));
    }
    default: {
      std::vector<int64_t> up{O, r};
      up.resize(shape.size(), 1);
      F::lora::Weights w{meta_tensor(shape_cat({r, I}, kernel), o), meta_tensor(up, o), {}};
      return lora_file_tensors(w, meta_tensor({1}, o));
    }
  }
}

std::vector<LayerCandidate> layer_candidates(const torch::Tensor& D, const std::vector<int64_t>& bias_shape,
                                             const std::string& module, const ExtractOptions& o, uint64_t max_offset,
                                             const std::function<double(const LayerFit&)>& residual2) {
  const auto shape = D.sizes().vec();
  const int64_t O = shape[0], I = shape[1];
  auto costed = [&](LayerCandidate c) {
    for (const auto& [suffix, t] : candidate_layout(c, shape, bias_shape, o)) {
      const auto n = static_cast<uint64_t>(t.numel());
      c.params += n;
      c.bytes += n * static_cast<uint64_t>(t.element_size());
      c.header += io::header_entry_bound(
          module, {module + "." + suffix, io::from_torch(t.scalar_type()), t.sizes().vec()}, max_offset);
    }
    return c;
  };
  std::vector<LayerCandidate> out;
  LayerCandidate diff;
  diff.diff = true;
  out.push_back(costed(diff));
  // LoCon, rank r: error Σ_{i>r} σ_i² (Eckart–Young); the cost is linear in r (the layouts at ranks 1 and R give
  // it), its header bound taken at rank R (the widest shapes)
  const int64_t R = std::min(O, I);
  auto S2 = F::singular_values_gram(F::flat(D)).to(torch::kFloat64).square().cpu();
  std::vector<double> tail(static_cast<size_t>(S2.size(0)) + 1, 0.0);
  auto s2 = S2.accessor<double, 1>();
  for (int64_t i = S2.size(0) - 1; i >= 0; --i) tail[static_cast<size_t>(i)] = tail[static_cast<size_t>(i) + 1] + s2[i];
  const auto one = costed({ExtractAlgo::LoCon, false, 1}), last = costed({ExtractAlgo::LoCon, false, R});
  const uint64_t dbytes = R > 1 ? (last.bytes - one.bytes) / static_cast<uint64_t>(R - 1) : 0;
  const uint64_t dparams = R > 1 ? (last.params - one.params) / static_cast<uint64_t>(R - 1) : 0;
  for (int64_t r = 1; r <= R; ++r) {
    const auto steps = static_cast<uint64_t>(r - 1);
    out.push_back({ExtractAlgo::LoCon, false, r, one.bytes + steps * dbytes, last.header, one.params + steps * dparams,
                   tail[std::min<size_t>(static_cast<size_t>(r), tail.size() - 1)]});
  }
  if (o.algo != ExtractAlgo::Auto) return out;
  for (int64_t r = 1; r <= std::min(R, kLoHaMaxRank); r *= 2) {
    auto c = costed({ExtractAlgo::LoHa, false, r});
    c.error2 = residual2(fit_loha(D, r, o));
    out.push_back(c);
  }
  const auto s = kron_split(D, o.lokr_factor);
  const int64_t limit = std::min(s.p, s.q);
  std::vector<int64_t> ranks;
  for (int64_t r = 1; r <= limit && !lokr_stores_full_w2(s, r); r *= 2) ranks.push_back(r);
  for (int64_t r = 1; r <= limit; ++r)  // the smallest rank that stores W2 whole: the unconstrained W2
    if (lokr_stores_full_w2(s, r)) {
      ranks.push_back(r);
      break;
    }
  for (int64_t r : ranks) {
    auto c = costed({ExtractAlgo::LoKr, false, r});
    c.error2 = residual2(fit_lokr(D, r, o));
    out.push_back(c);
  }
  return out;
}

LayerFit fit_candidate(const torch::Tensor& D, const torch::Tensor& bias_delta, const LayerCandidate& c,
                       const ExtractOptions& o) {
  if (c.diff) {
    auto full = o;
    full.mode = RankMode::Full;
    return extract_layer(D, bias_delta, full);
  }
  switch (c.algo) {
    case ExtractAlgo::LoHa: return fit_loha(D, c.rank, o);
    case ExtractAlgo::LoKr: return fit_lokr(D, c.rank, o);
    default: return fit_locon(D, c.rank, o);
  }
}

}  // namespace lycoris::tools
