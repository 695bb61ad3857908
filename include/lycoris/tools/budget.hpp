// Budget-optimal rank allocation: the part `lycoris extract --budget` and `lycoris resize --budget` share
// (docs/tools.md#budget).
//
// Every layer offers choices (a form and rank, or dropped), each with a cost (file bytes or parameters)
// and the error it leaves, E = w·‖D − ΔW‖²_F. One choice per layer; minimise Σ E under Σ cost ≤ budget (a
// multiple-choice knapsack). The allocation is a greedy walk on each layer's lower convex hull of its
// (cost, error) points, the steps taken across all layers in order of error removed per unit of cost, then
// a fill of the leftover budget. Guarantee (the Lagrangian argument, docs/tools.md#budget-optimality): with
// λ the ratio of the first hull step that did not fit, every layer's hull point minimises E + λ·cost over
// all its choices, so the walk's allocation (cost C*, error E*) has the least error of all allocations
// costing ≤ C*, and the optimum at the budget B is ≥ E* − λ·(B − C*). When every step costs the same (LoCon,
// equal shapes and dtypes, no fixed costs) the walk is exactly optimal at every budget.
#pragma once
#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace lycoris::tools {

// A file size: digits with an optional fraction, then an optional unit. K/M/G/T and KB/MB/GB/TB are powers of
// 1000 (as disks and most tools count), KiB/MiB/GiB/TiB powers of 1024, B or nothing bytes; units are
// case-insensitive. OptionError "<what>: …" for an empty, negative, zero, non-numeric or overflowing size and
// an unknown unit. The result is rounded down to whole bytes.
uint64_t parse_byte_size(const std::string& text, const std::string& what);

// One way to store a layer.
struct BudgetChoice {
  uint64_t cost = 0;  // bytes (data + header entries) or parameters
  double error = 0;   // weighted squared error it leaves
};

struct BudgetAllocation {
  std::vector<size_t> choice;   // per layer, the index of its choice
  uint64_t cost = 0;            // Σ cost of the chosen
  double error = 0;             // Σ error of the chosen
  uint64_t certified_cost = 0;  // the hull walk's cost C*: no allocation costing ≤ C* has less error than…
  double certified_error = 0;   // …E*, the walk's error
  double lower_bound = 0;       // no allocation within the budget has less error than this
};

// The allocation of `budget` across `layers` (each a non-empty list of choices in any order). OptionError
// "<what>: …" when the cheapest choices together already exceed the budget.
BudgetAllocation allocate_budget(const std::vector<std::vector<BudgetChoice>>& layers, uint64_t budget,
                                 const std::string& what);

// When the costs count the header with a bound (bytes mode): the allocation of `budget` (whose exact size
// `exact_size` must be ≤ `limit`, the bound guarantees it), or of `budget` + extra, the extra searched by
// bisection for the lowest error whose exact size still fits `limit`: what the bound over-counted goes back to
// the layers. Error (an internal fault) if the first allocation does not fit.
BudgetAllocation allocate_exact(const std::vector<std::vector<BudgetChoice>>& layers, uint64_t budget, uint64_t limit,
                                const std::function<uint64_t(const BudgetAllocation&)>& exact_size,
                                const std::string& what);

}  // namespace lycoris::tools
