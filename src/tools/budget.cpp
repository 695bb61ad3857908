// Budget sizes and the allocation across layers (see include/lycoris/tools/budget.hpp, docs/tools.md#budget).
#include "lycoris/tools/budget.hpp"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdlib>
#include <cstdint>
#include <utility>
#include <queue>

#include "lycoris/error.hpp"
#include "lycoris/text.hpp"

namespace lycoris::tools {

uint64_t parse_byte_size(const std::string& text, const std::string& what) {
  const std::string shown = what + " '" + escape_control(text) + "'";
  if (!text.empty() && text[0] == '-') throw OptionError(shown + ": the budget must be positive");
  size_t i = 0;
  while (i < text.size() && (std::isdigit(static_cast<unsigned char>(text[i])) || text[i] == '.')) ++i;
  const std::string number = text.substr(0, i);
  std::string unit;
  for (char c : text.substr(i)) unit += static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  if (number.empty() || number == "." || std::count(number.begin(), number.end(), '.') > 1)
    throw OptionError(shown + ": not a size (a number with an optional unit: 32M, 32MB, 32MiB, 500000)");
  struct Unit {
    const char* name;
    double factor;
  };
  static const Unit kUnits[] = {{"", 1},     {"b", 1},       {"k", 1e3},     {"kb", 1e3},     {"kib", 1024.0},
                                {"m", 1e6},  {"mb", 1e6},    {"mib", 1 << 20}, {"g", 1e9},    {"gb", 1e9},
                                {"gib", 1073741824.0}, {"t", 1e12}, {"tb", 1e12}, {"tib", 1099511627776.0}};
  const Unit* found = nullptr;
  for (const auto& u : kUnits)
    if (unit == u.name) found = &u;
  if (!found)
    throw OptionError(shown + ": unknown unit '" + escape_control(text.substr(i)) +
                      "' (K, M, G, T = powers of 1000; KiB, MiB, GiB, TiB = powers of 1024; B)");
  const double bytes = std::floor(std::strtod(number.c_str(), nullptr) * found->factor);
  if (!(bytes >= 1)) throw OptionError(shown + ": the budget must be at least 1 byte");
  if (bytes >= 9.2e18) throw OptionError(shown + ": too large");
  return static_cast<uint64_t>(bytes);
}

namespace {

// A layer's lower convex hull of (cost, error), from its cheapest choice (the least error among equally
// cheap ones): indices into its choices, cost increasing, error decreasing, and the error removed per unit of
// cost decreasing from one step to the next (convexity).
std::vector<size_t> lower_hull(const std::vector<BudgetChoice>& c) {
  std::vector<size_t> order(c.size());
  for (size_t i = 0; i < c.size(); ++i) order[i] = i;
  std::sort(order.begin(), order.end(), [&](size_t a, size_t b) {
    return c[a].cost != c[b].cost ? c[a].cost < c[b].cost : c[a].error < c[b].error;
  });
  std::vector<size_t> hull;
  for (size_t i : order) {
    if (!hull.empty() && c[i].error >= c[hull.back()].error) continue;  // costs more, removes nothing
    // pop while the last point lies on or above the segment from its predecessor to i (not convex)
    while (hull.size() >= 2) {
      const auto& p = c[hull[hull.size() - 2]];
      const auto& q = c[hull.back()];
      const double pq = (p.error - q.error) / static_cast<double>(q.cost - p.cost);
      const double pi = (p.error - c[i].error) / static_cast<double>(c[i].cost - p.cost);
      if (pq > pi) break;
      hull.pop_back();
    }
    hull.push_back(i);
  }
  return hull;
}

struct HullStep {
  double ratio;  // error removed per unit of cost
  size_t layer;
  bool operator<(const HullStep& o) const { return ratio < o.ratio || (ratio == o.ratio && layer > o.layer); }
};

// Each layer's choices by cost with the least error up to each cost: the best change of a layer that fits in a
// given number of bytes, by one binary search.
struct CheapestBest {
  std::vector<uint64_t> cost;       // ascending
  std::vector<double> error;        // the least error among the choices up to this one
  std::vector<size_t> index;        // …and which choice it is
  explicit CheapestBest(const std::vector<BudgetChoice>& c) {
    std::vector<size_t> order(c.size());
    for (size_t i = 0; i < c.size(); ++i) order[i] = i;
    std::sort(order.begin(), order.end(), [&](size_t a, size_t b) { return c[a].cost < c[b].cost; });
    for (size_t i : order) {
      const bool better = error.empty() || c[i].error < error.back();
      cost.push_back(c[i].cost);
      error.push_back(better ? c[i].error : error.back());
      index.push_back(better ? i : index.back());
    }
  }
  // the least-error choice costing at most `limit` (npos if none)
  size_t best_within(uint64_t limit) const {
    const auto it = std::upper_bound(cost.begin(), cost.end(), limit);
    return it == cost.begin() ? SIZE_MAX : index[static_cast<size_t>(it - cost.begin()) - 1];
  }
};

// Exchange: one layer steps down to its previous hull point, and what that frees plus the leftover buys the
// single best change of another layer; taken while it lowers the total error (the knapsack gaps the greedy
// leaves, e.g. a higher rank in one layer that blocks the first rank of another).
void exchange(const std::vector<std::vector<BudgetChoice>>& layers, const std::vector<std::vector<size_t>>& hulls,
              uint64_t budget, BudgetAllocation& a) {
  const size_t n = layers.size();
  std::vector<CheapestBest> best;
  for (const auto& l : layers) best.emplace_back(l);
  for (size_t pass = 0; pass < 4 * n + 16; ++pass) {
    const uint64_t leftover = budget - a.cost;
    double best_delta = 0;
    size_t down_layer = n, down_choice = 0, up_layer = n, up_choice = 0;
    for (size_t l = 0; l < n; ++l) {
      const auto& now = layers[l][a.choice[l]];
      size_t prev = SIZE_MAX;  // the hull point below the current choice
      for (size_t h : hulls[l])
        if (layers[l][h].cost < now.cost) prev = h;
      if (prev == SIZE_MAX) continue;
      const double loss = layers[l][prev].error - now.error;
      const uint64_t freed = leftover + (now.cost - layers[l][prev].cost);
      for (size_t m = 0; m < n; ++m) {
        if (m == l) continue;
        const auto& other = layers[m][a.choice[m]];
        const size_t k = best[m].best_within(other.cost + freed);
        if (k == SIZE_MAX) continue;
        const double delta = (other.error - layers[m][k].error) - loss;
        if (delta > best_delta + 1e-12 * (a.error + 1e-300)) {
          best_delta = delta;
          down_layer = l, down_choice = prev, up_layer = m, up_choice = k;
        }
      }
    }
    if (down_layer == n) break;
    for (auto [l, k] : {std::pair{down_layer, down_choice}, std::pair{up_layer, up_choice}}) {
      a.cost = a.cost - layers[l][a.choice[l]].cost + layers[l][k].cost;
      a.error += layers[l][k].error - layers[l][a.choice[l]].error;
      a.choice[l] = k;
    }
  }
}

}  // namespace

BudgetAllocation allocate_budget(const std::vector<std::vector<BudgetChoice>>& layers, uint64_t budget,
                                 const std::string& what) {
  const size_t n = layers.size();
  std::vector<std::vector<size_t>> hulls(n);
  std::vector<size_t> at(n, 0);  // position on the hull
  BudgetAllocation a;
  a.choice.resize(n);
  uint64_t cheapest = 0;
  for (size_t l = 0; l < n; ++l) {
    if (layers[l].empty()) throw Error(what + ": layer " + std::to_string(l) + " has no choice");
    hulls[l] = lower_hull(layers[l]);
    const auto& c0 = layers[l][hulls[l][0]];
    cheapest += c0.cost;
    a.error += c0.error;
  }
  if (cheapest > budget)
    throw OptionError(what + ": " + std::to_string(budget) + " is less than the " + std::to_string(cheapest) +
                      " the smallest possible output takes");
  a.cost = cheapest;
  auto step_of = [&](size_t l) -> HullStep {
    const auto& p = layers[l][hulls[l][at[l]]];
    const auto& q = layers[l][hulls[l][at[l] + 1]];
    return {(p.error - q.error) / static_cast<double>(q.cost - p.cost), l};
  };
  auto take = [&](size_t l) {
    const auto& p = layers[l][hulls[l][at[l]]];
    const auto& q = layers[l][hulls[l][at[l] + 1]];
    a.cost += q.cost - p.cost;
    a.error -= p.error - q.error;
    ++at[l];
  };
  auto has_step = [&](size_t l) { return at[l] + 1 < hulls[l].size(); };
  std::priority_queue<HullStep> steps;
  for (size_t l = 0; l < n; ++l)
    if (has_step(l)) steps.push(step_of(l));
  // The hull walk: steps in order of ratio (non-increasing, each hull being convex) while they fit.
  double lambda = 0;  // the ratio of the first step that did not fit (0: every step fitted)
  while (!steps.empty()) {
    const HullStep s = steps.top();
    const auto& p = layers[s.layer][hulls[s.layer][at[s.layer]]];
    const auto& q = layers[s.layer][hulls[s.layer][at[s.layer] + 1]];
    if (a.cost + (q.cost - p.cost) > budget) {
      lambda = s.ratio;
      break;
    }
    steps.pop();
    take(s.layer);
    if (has_step(s.layer)) steps.push(step_of(s.layer));
  }
  a.certified_cost = a.cost;
  a.certified_error = a.error;
  a.lower_bound = std::max(0.0, a.error - lambda * static_cast<double>(budget - a.cost));
  for (size_t l = 0; l < n; ++l) a.choice[l] = hulls[l][at[l]];
  // The fill: the leftover budget goes, repeatedly, to the change of one layer's choice (any choice, on its
  // hull or not) that removes the most error and still fits (each pass costs Σ choices: a bounded number of them).
  for (size_t pass = 0; pass < 4 * n + 16; ++pass) {
    size_t best_layer = n, best_choice = 0;
    double best_gain = 0;
    for (size_t l = 0; l < n; ++l) {
      const auto& now = layers[l][a.choice[l]];
      for (size_t k = 0; k < layers[l].size(); ++k) {
        const auto& c = layers[l][k];
        const double gain = now.error - c.error;
        if (gain > best_gain && c.cost <= budget - a.cost + now.cost) best_gain = gain, best_layer = l, best_choice = k;
      }
    }
    if (best_layer == n) break;
    a.cost = a.cost - layers[best_layer][a.choice[best_layer]].cost + layers[best_layer][best_choice].cost;
    a.error -= best_gain;
    a.choice[best_layer] = best_choice;
  }
  exchange(layers, hulls, budget, a);
  return a;
}

BudgetAllocation allocate_exact(const std::vector<std::vector<BudgetChoice>>& layers, uint64_t budget, uint64_t limit,
                                const std::function<uint64_t(const BudgetAllocation&)>& exact_size,
                                const std::string& what) {
  auto best = allocate_budget(layers, budget, what);
  const uint64_t size = exact_size(best);
  if (size > limit)
    throw Error(what + ": the planned file takes " + std::to_string(size) + " bytes, beyond " + std::to_string(limit) +
                " (please report this)");
  // the exact size is not monotone in the extra, but mostly grows with it: bisection, keeping the best that fits
  uint64_t lo = 0, hi = limit;
  for (int i = 0; i < 20 && hi - lo > 1; ++i) {
    const uint64_t mid = lo + (hi - lo) / 2;
    auto a = allocate_budget(layers, budget + mid, what);
    if (exact_size(a) <= limit) {
      if (a.error < best.error) best = std::move(a);
      lo = mid;
    } else {
      hi = mid;
    }
  }
  return best;
}

}  // namespace lycoris::tools
