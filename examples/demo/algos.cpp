// The rows of the comparison: every algorithm with the reference's recommended settings
// (LyCORIS docs/Algo-List.md and docs/Guidelines.md; quoted in docs/demo.md). Learning rates are Adam
// rates chosen once for this short run (same steps for every row): 1e-2 for the adapters ((IA)^3 at the
// top of its recommended 5e-3…1e-2), 2e-3 for full fine-tuning.
#include <algorithm>
#include <set>
#include <sstream>

#include "demo.hpp"
#include "lycoris/error.hpp"

namespace lycoris::demo {

std::vector<AlgoSpec> algo_specs() {
  std::vector<AlgoSpec> specs;
  auto add = [&](std::string label, std::string algo, int64_t dim, double alpha, double lr, std::string settings,
                 AdapterOptions module = {}, bool train_norm = false) {
    AlgoSpec s;
    s.label = std::move(label);
    s.algo = std::move(algo);
    s.dim = dim;
    s.alpha = alpha;
    s.lr = lr;
    s.settings = std::move(settings);
    s.module = module.algo(s.algo);  // rank and alpha: the network's dims (spec.dim, spec.alpha)
    s.train_norm = train_norm;
    specs.push_back(std::move(s));
  };
  // LoRA/LoCon: "dim <= 64, alpha from 1 to half dimension".
  add("lora", "lora", 8, 4, 1e-2, "dim 8, alpha 4");
  // LoHa: "dim <= 32, alpha from 1 to half dimension".
  add("loha", "loha", 8, 4, 1e-2, "dim 8, alpha 4");
  // Small LoKr: "factor = -1"; the second factor is left low-rank where dim allows.
  add("lokr-small", "lokr", 4, 4, 1e-2, "factor -1, dim 4, alpha 4", AdapterOptions().factor(-1));
  // Large LoKr: "factor ~8, full dimension (LoRA like)"; alpha is ignored when both factors are full.
  add("lokr-large", "lokr", 100000, 1, 1e-2, "factor 8, full dimension", AdapterOptions().factor(8).full_matrix(true));
  // Native fine-tuning (every weight, plus the norms): lower rate.
  add("full", "full", 1, 1, 2e-3, "all layers + norms", AdapterOptions(), true);
  // (IA)^3: "needs much higher lr (about 5e-3 ~ 1e-2)".
  add("ia3", "ia3", 1, 1, 1e-2, "recommended lr 5e-3…1e-2");
  // DyLoRA: "large dim with alpha = dim/4 ~ dim, e.g. dim 128, alpha 64"; larger block_size for few steps.
  add("dylora", "dylora", 128, 64, 1e-2, "dim 128, alpha 64, block 16", AdapterOptions().block_size(16));
  // GLoRA: no recommendation upstream; LoRA-like size.
  add("glora", "glora", 8, 4, 1e-2, "dim 8, alpha 4");
  // GLoKr (ours): LoKr's small setting plus the A term.
  add("glokr", "glokr", 4, 4, 1e-2, "factor -1, dim 4, alpha 4", AdapterOptions().factor(-1));
  // Diag-OFT: "dim corresponds to block size".
  add("diag-oft", "diag-oft", 8, 1, 1e-2, "block size 8");
  // BOFT: dim 16 is the smallest that factorises every layer here (the 10-wide head needs ≥ 10).
  add("boft", "boft", 16, 1, 1e-2, "dim 16 (butterfly)");
  return specs;
}

std::vector<AlgoSpec> select_algos(const std::string& list) {
  const auto all = algo_specs();
  if (list.empty() || list == "all") return all;
  std::set<std::string> wanted;
  std::stringstream ss(list);
  for (std::string item; std::getline(ss, item, ',');) {
    item.erase(std::remove_if(item.begin(), item.end(), [](unsigned char c) { return std::isspace(c); }), item.end());
    std::transform(item.begin(), item.end(), item.begin(), [](unsigned char c) { return std::tolower(c); });
    if (item == "locon") item = "lora";
    if (item == "oft") item = "diag-oft";
    if (item.empty()) continue;
    const bool known = std::any_of(all.begin(), all.end(), [&](const AlgoSpec& s) { return s.label == item || s.algo == item; });
    if (!known) {
      std::string names;
      for (const auto& s : all) names += (names.empty() ? "" : ", ") + s.label;
      throw OptionError("--algo: unknown algorithm '" + item + "' (known: " + names + ")");
    }
    wanted.insert(item);
  }
  std::vector<AlgoSpec> out;
  for (const auto& s : all)
    if (wanted.count(s.label) || wanted.count(s.algo)) out.push_back(s);
  return out;
}

}  // namespace lycoris::demo
