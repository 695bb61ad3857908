// `lycoris extract`: the checkpoint-level tool — layers streamed from the two checkpoints, fitted by the
// per-layer rule (layer_fit.cpp, fitters.cpp) and written atomically (see include/lycoris/tools/extract.hpp).
#include "lycoris/tools/extract.hpp"

#include <c10/util/accumulate.h>
#include <torch/torch.h>

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <nlohmann/json.hpp>
#include <set>

#include "exec/stopwatch.hpp"
#include "exec/threads.hpp"
#include "exec/worker_pool.hpp"
#include "lycoris/error.hpp"
#include "lycoris/functional/common.hpp"
#include "lycoris/io/output_path.hpp"
#include "lycoris/io/safetensors.hpp"
#include "lycoris/naming.hpp"
#include "tools/tool_checks.hpp"
#include "lycoris/text.hpp"

namespace lycoris::tools {

namespace F = functional;

// ---------------------------------------------------------------- options and names

namespace {
constexpr EnumName<ExtractAlgo> kExtractAlgos[] = {{ExtractAlgo::LoCon, "locon"},
                                                   {ExtractAlgo::LoCon, "lora"},
                                                   {ExtractAlgo::LoHa, "loha"},
                                                   {ExtractAlgo::LoKr, "lokr"}};
}  // namespace

ExtractAlgo parse_extract_algo(const std::string& name) {
  ExtractAlgo a;
  std::string known;
  if (!parse_enum(kExtractAlgos, name, a, &known))
    throw OptionError("--algo: '" + escape_control(name) + "' is not one of " + known);
  return a;
}

const char* to_string(ExtractAlgo algo) { return enum_name(kExtractAlgos, algo); }

std::string extract_module_name(const std::string& prefix, const std::string& path) {
  if (prefix == "kohya")
    return naming::module_name(path.rfind("text_model.", 0) == 0 ? "lora_te" : "lora_unet", path);
  return naming::module_name(prefix, path);
}

// ---------------------------------------------------------------- the checkpoint-level tool

namespace {

void check_options(const ExtractOptions& o) {
  if (o.mode != RankMode::Full) {
    validate(RankRule{o.mode, o.linear_param}, "linear " + std::string(to_string(o.mode)));
    validate(RankRule{o.mode, o.conv_param}, "conv " + std::string(to_string(o.mode)));
  }
  if (o.sparse_bias && o.algo != ExtractAlgo::LoCon)
    throw OptionError("--use-sparse-bias: only LoCon files can carry a sparse bias (docs/format.md#sparse-bias)");
  if (std::isnan(o.sparsity) || o.sparsity < 0 || o.sparsity > 1)
    throw OptionError("--sparsity: " + std::to_string(o.sparsity) + " is outside [0, 1]");
  if (!torch::isFloatingType(o.dtype)) throw OptionError("extract: the output dtype must be a floating-point type");
  if (o.loha_iters < 0) throw OptionError("--loha-iters: must be ≥ 0");
  if (!(o.loha_tol >= 0)) throw OptionError("--loha-tol: must be ≥ 0");
  if (o.prefix.empty()) throw OptionError("--prefix: must not be empty");
  if (o.threads < 0) throw OptionError("--threads: must be ≥ 0");
}

// Every weight key (and the bias of each) must be in both checkpoints.
void check_same_keys(const io::SafetensorsFile& base, const io::SafetensorsFile& tuned) {
  std::vector<std::string> missing;
  auto scan = [&](const io::SafetensorsFile& a, const io::SafetensorsFile& b, const char* where) {
    for (const auto& layer : naming::base_layers(a.names())) {
      for (const auto* key : {&layer.weight_key, &layer.bias_key})
        if (!key->empty() && !b.contains(*key)) missing.push_back("'" + *key + "' only in " + where);
    }
  };
  scan(base, tuned, base.path().c_str());
  scan(tuned, base, tuned.path().c_str());
  if (missing.empty()) return;
  std::string msg = "extract: the checkpoints do not have the same layers: ";
  for (size_t i = 0; i < missing.size() && i < 5; ++i) msg += (i ? ", " : "") + missing[i];
  if (missing.size() > 5) msg += " and " + std::to_string(missing.size() - 5) + " more";
  throw KeyError(msg);
}

struct OutputEntry {
  std::string key;
  io::DType dtype;
  std::vector<int64_t> shape;
  torch::Tensor tensor;                    // CPU, output dtype; undefined when produced while writing
  std::function<torch::Tensor()> produce;  // full differences are recomputed instead of kept in memory
};

std::string options_record(const ExtractOptions& o) {
  nlohmann::json j;
  j["algo"] = to_string(o.algo);
  j["mode"] = to_string(o.mode);
  j["linear"] = o.linear_param;
  j["conv"] = o.conv_param;
  j["tucker"] = o.tucker;
  if (o.sparse_bias) j["sparsity"] = o.sparsity;
  return j.dump();
}

// Drops this process's pages of a tensor's bytes in a mapped input once the layer is done: the mapping is
// read-only MAP_PRIVATE, so the pages come back from the page cache if touched again, and the resident set
// stays at one layer instead of growing to both checkpoints (3.4 GB at SD1.5 scale).
void release_pages(const io::SafetensorsFile& f, const std::string& key) {
#ifdef MADV_DONTNEED
  const auto& info = f.info(key);
  if (info.nbytes() == 0) return;
  const auto page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  const auto at = reinterpret_cast<uintptr_t>(f.data(info));
  const auto begin = at / page * page;
  madvise(reinterpret_cast<void*>(begin), at + info.nbytes() - begin, MADV_DONTNEED);
#endif
}

// tuned − base of one key in fp32 (exact for fp16/bf16 inputs), into `out` when given (a reused buffer).
torch::Tensor difference(const io::SafetensorsFile& base, const io::SafetensorsFile& tuned, const std::string& key,
                         torch::Device device, torch::Tensor out = {}) {
  auto wt = tuned.tensor(key), wb = base.tensor(key);
  if (!out.defined()) out = torch::empty(wt.sizes(), torch::TensorOptions().dtype(torch::kFloat32).device(device));
  out.copy_(wt);
  out.sub_(wb.to(device));  // computed in fp32 (type promotion of the in-place op)
  return out;
}

// max|D|: NaN when D holds a NaN, Inf when it holds an Inf.
double max_abs(const torch::Tensor& D) {
  return torch::linalg_vector_norm(D, INFINITY, c10::nullopt, false, c10::nullopt).item<double>();
}

// For tuned − base of `key` with max|D| = dmax not finite: FormatError naming the input file whose tensor has
// NaN/Inf, else Error for the F32 subtraction itself overflowing.
void require_finite_difference(double dmax, const io::SafetensorsFile& base, const io::SafetensorsFile& tuned,
                               const std::string& key) {
  if (std::isfinite(dmax)) return;
  require_finite(base.tensor(key), base.path(), key);
  require_finite(tuned.tensor(key), tuned.path(), key);
  throw Error(tuned.path() + ": tensor '" + key + "': tuned − base overflows F32 (the difference is computed in F32)");
}

// The reference's test allclose(W_tuned, W_base, rtol 1e-5, atol 1e-8) (fp32), decided from D = W_tuned − W_base
// (dmax = max|D|) without full-size temporaries: max|D| = 0 → close; max|D| above atol + rtol·max|W_base| → the
// element holding max|D| fails its own bound; only in between (rare) is the element-wise test run.
bool unchanged(const torch::Tensor& D, double dmax, const io::SafetensorsFile& base, const io::SafetensorsFile& tuned,
               const std::string& key) {
  if (dmax == 0) return true;
  auto wb = base.tensor(key);
  const double bmax =
      torch::linalg_vector_norm(wb, INFINITY, c10::nullopt, false, torch::kFloat32).item<double>();
  if (dmax > (1e-8 + 1e-5 * bmax) * (1 + 1e-5)) return false;
  return torch::allclose(tuned.tensor(key, torch::kFloat32, D.device()), wb.to(D.device(), torch::kFloat32), 1e-5,
                         1e-8);
}

// One reused fp32 buffer for D: a single allocation of the largest layer instead of fresh pages per layer.
struct Workspace {
  torch::Tensor buffer;
  torch::Tensor take(const std::vector<int64_t>& shape, torch::Device device) {
    const int64_t n = c10::multiply_integers(shape);
    if (!buffer.defined() || buffer.numel() < n || buffer.device() != device)
      buffer = torch::empty({n}, torch::TensorOptions().dtype(torch::kFloat32).device(device));
    return buffer.narrow(0, 0, n).view(shape);
  }
};

// ‖D − ΔW(fit)‖_F with ΔW rebuilt from the stored tensors. A plain LoRA is checked in row blocks of ~4 MB
// (D_b − s·up_b·down, one addmm each, no full-size rebuild); other forms through fit_delta.
double residual_norm(const torch::Tensor& D, const LayerFit& fit) {
  if (fit.form == "diff" || fit.form == "norm") {
    const auto& t = fit.tensors.front().second;
    return (t.to(D.scalar_type()) - D).norm().item<double>();
  }
  TensorMap m(fit.tensors.begin(), fit.tensors.end());
  if (fit.form == "lora" && !m.count("bias_indices")) {
    auto M = F::flat(D);
    auto up = m.at("lora_up.weight").reshape({D.size(0), -1}).to(D.scalar_type());
    auto down = m.at("lora_down.weight").reshape({up.size(1), M.size(1)}).to(D.scalar_type());
    const double scale = F::scalar_value(m.at("alpha"), "extract", "alpha") / static_cast<double>(up.size(1));
    const int64_t rows = std::max<int64_t>(1, (int64_t{1} << 20) / std::max<int64_t>(M.size(1), 1));
    double e2 = 0;
    for (int64_t i = 0; i < M.size(0); i += rows) {
      const int64_t n = std::min(rows, M.size(0) - i);
      e2 += std::pow(torch::addmm(M.narrow(0, i, n), up.narrow(0, i, n), down, 1, -scale).norm().item<double>(), 2);
    }
    return std::sqrt(e2);
  }
  if (fit.form == "lokr" || fit.form == "lokr(full w2)") {
    // ‖D − s·W1⊗W2‖² = ‖D‖² − 2s·Σ_uv W1[u,v]·⟨D_uv, W2⟩ + s²‖W1‖²‖W2‖² over the (p, q·k) blocks D_uv, one row
    // block u at a time in fp64 (no rearranged copy of D, no rebuild; fp64 keeps the difference exact enough)
    const auto f64 = torch::kFloat64;
    auto w1 = m.at("lokr_w1").to(f64);
    torch::Tensor w2;
    double scale = 1;
    if (m.count("lokr_w2")) {
      w2 = m.at("lokr_w2").to(f64);
    } else {
      auto a = m.at("lokr_w2_a").to(f64);
      w2 = a.matmul(m.at("lokr_w2_b").to(f64).reshape({a.size(1), -1}));
      scale = F::scalar_value(m.at("alpha"), "extract", "alpha") / static_cast<double>(a.size(1));
    }
    const int64_t A = w1.size(0), C = w1.size(1), P = D.size(0) / A;
    w2 = w2.reshape({P, -1});
    auto blocks = D.reshape({A, P, C, w2.size(1)});
    double d2 = 0, cross = 0;
    for (int64_t u = 0; u < A; ++u) {
      auto Du = blocks.select(0, u).to(f64);  // (p, c, q·k)
      d2 += Du.square().sum().item<double>();
      cross += torch::einsum("pcn,pn->c", {Du, w2}).dot(w1.select(0, u)).item<double>();
    }
    const double e2 = d2 - 2 * scale * cross + scale * scale * w1.square().sum().item<double>() *
                                                   w2.square().sum().item<double>();
    return std::sqrt(std::max(e2, 0.0));
  }
  auto approx = fit_delta(fit, D.sizes()).to(D.scalar_type());
  if (approx.is_alias_of(D)) return (approx - D).norm().item<double>();
  return approx.sub_(D).norm().item<double>();
}

// The result of one layer, produced by a worker and consumed in base order.
struct LayerOutcome {
  enum Kind { Unchanged, Skipped, Extracted } kind = Unchanged;
  ExtractLayerReport report;
  std::vector<std::pair<std::string, torch::Tensor>> stored;  // suffix → CPU tensor (output dtype)
  std::vector<std::pair<std::string, std::string>> deferred;  // suffix → key whose tuned − base is written
  io::DType deferred_dtype{};
  std::vector<std::vector<int64_t>> deferred_shapes;
  double err = 0;
};

LayerOutcome process_layer(const naming::BaseLayer& layer, const io::SafetensorsFile& base,
                           const io::SafetensorsFile& tuned, const ExtractOptions& o, Workspace& ws) {
  LayerOutcome out;
  const exec::Stopwatch watch;
  const auto& bi = base.info(layer.weight_key);
  const auto& ti = tuned.info(layer.weight_key);
  auto done_with_inputs = [&] {
    for (const auto* key : {&layer.weight_key, &layer.bias_key})
      if (!key->empty()) release_pages(base, *key), release_pages(tuned, *key);
  };
  // byte-identical weights (most unchanged layers) need no arithmetic at all
  if (bi.dtype == ti.dtype && bi.nbytes() == ti.nbytes() &&
      std::memcmp(base.data(bi), tuned.data(ti), bi.nbytes()) == 0) {
    done_with_inputs();
    return out;
  }
  auto D = difference(base, tuned, layer.weight_key, o.device, ws.take(bi.shape, o.device));
  const double dmax = max_abs(D);
  require_finite_difference(dmax, base, tuned, layer.weight_key);
  if (unchanged(D, dmax, base, tuned, layer.weight_key)) {
    done_with_inputs();
    return out;
  }
  torch::Tensor bias_delta;
  if (!layer.bias_key.empty()) {
    bias_delta = difference(base, tuned, layer.bias_key, o.device);
    require_finite_difference(max_abs(bias_delta), base, tuned, layer.bias_key);
  }
  done_with_inputs();

  auto& lr = out.report;
  lr.module = extract_module_name(o.prefix, layer.path);
  lr.key = layer.weight_key;
  lr.shape = bi.shape;
  lr.delta_norm = D.norm().item<double>();
  if (D.dim() > 5 || (D.dim() == 1 && o.mode != RankMode::Full)) {
    out.kind = LayerOutcome::Skipped;
    lr.form = "skipped";
    lr.note = D.dim() == 1 ? "1-D (norm) layers are extracted only in full mode"
                           : "weights with more than 5 dims are not Linear/Conv layers";
    return out;
  }
  LayerFit fit;
  if (D.dim() == 1) {
    fit.form = "norm";
    fit.tensors = {{"w_norm", D}};
    if (bias_delta.defined()) fit.tensors.emplace_back("b_norm", bias_delta);
  } else {
    fit = extract_layer(D, bias_delta, o);
  }
  // what the file will hold: floats in the output dtype, all finite
  for (auto& [suffix, t] : fit.tensors)
    if (torch::isFloatingType(t.scalar_type()))
      t = round_finite(t, o.dtype, "layer " + layer.weight_key, lr.module + "." + suffix,
                       "choose a wider --dtype (bf16, fp32)");
  out.kind = LayerOutcome::Extracted;
  out.err = residual_norm(D, fit);
  lr.form = fit.form;
  lr.rank = fit.rank;
  lr.note = fit.note;
  lr.rel_error = lr.delta_norm > 0 ? out.err / lr.delta_norm : 0;
  const bool deferred = fit.form == "diff" || fit.form == "norm";
  for (auto& [suffix, t] : fit.tensors) {
    if (deferred) {
      // recomputed from the mapped files while writing: tuned − base of the weight or of the bias
      const bool is_bias = suffix == "diff_b" || suffix == "b_norm";
      out.deferred.emplace_back(suffix, is_bias ? layer.bias_key : layer.weight_key);
      out.deferred_dtype = io::from_torch(t.scalar_type());
      out.deferred_shapes.push_back(t.sizes().vec());
    } else {
      auto c = t.to(torch::kCPU).contiguous();
      out.stored.emplace_back(suffix, c.is_alias_of(D) ? c.clone() : c);  // D is the reused buffer
    }
  }
  lr.seconds = watch.seconds();
  return out;
}

// The floating-point layers of the pair, after the header-only checks (so that a bad pair fails before any
// arithmetic): ShapeError for a weight or bias whose shapes differ.
std::vector<naming::BaseLayer> layers_to_extract(const io::SafetensorsFile& base, const io::SafetensorsFile& tuned) {
  std::vector<naming::BaseLayer> layers;
  for (const auto& layer : naming::base_layers(base.names())) {
    const auto& bi = base.info(layer.weight_key);
    const auto& ti = tuned.info(layer.weight_key);
    if (bi.shape != ti.shape)
      throw ShapeError("extract: '" + layer.weight_key + "' has shape " + F::shape_str(bi.shape) + " in " +
                       base.path() + " but " + F::shape_str(ti.shape) + " in " + tuned.path());
    if (!torch::isFloatingType(io::to_torch(bi.dtype)) || !torch::isFloatingType(io::to_torch(ti.dtype))) continue;
    if (!layer.bias_key.empty() && base.info(layer.bias_key).shape != tuned.info(layer.bias_key).shape)
      throw ShapeError("extract: '" + layer.bias_key + "' has different shapes in the two checkpoints");
    layers.push_back(layer);
  }
  return layers;
}

// Writes the entries in order (atomically, with the options as metadata); returns the tensor bytes written.
uint64_t write_output(const std::string& output, const std::vector<OutputEntry>& entries, const ExtractOptions& o) {
  std::vector<io::TensorDecl> decls;
  for (const auto& e : entries) decls.push_back({e.key, e.dtype, e.shape});
  io::SafetensorsWriter writer(output, decls, {{"lycoris_extract", options_record(o)}});
  uint64_t bytes = 0;
  for (const auto& e : entries) {
    auto t = e.tensor.defined() ? e.tensor : e.produce();
    writer.write(e.key, t);
    bytes += static_cast<uint64_t>(t.numel()) * static_cast<uint64_t>(t.element_size());
  }
  writer.commit();
  return bytes;
}

}  // namespace

ExtractReport extract(const std::string& base_path, const std::string& tuned_path, const std::string& output,
                      const ExtractOptions& o, const std::function<void(const ExtractLayerReport&)>& on_layer) {
  const exec::Stopwatch watch;
  check_options(o);
  io::check_output_path(output);  // before minutes of work
  auto base = io::SafetensorsFile::open(base_path);
  auto tuned = io::SafetensorsFile::open(tuned_path);
  check_same_keys(base, tuned);

  const auto layers = layers_to_extract(base, tuned);  // header-only checks: before any arithmetic

  // Layer-parallel: `workers` layers in flight, each single-threaded (intra-op and BLAS), results consumed in
  // base order. Small per-layer operations (QR of thin sketches, small SVDs, ALS solves) do not scale
  // across threads; independent layers do.
  const int workers = static_cast<int>(
      std::clamp<int64_t>(o.threads > 0 ? o.threads : at::get_num_threads(), 1, std::max<size_t>(layers.size(), 1)));
  exec::IntraOpThreads one_thread(1);
  exec::SingleThreadedBlas blas;  // layer-parallel workers: each BLAS call in its caller's thread
  std::vector<Workspace> workspaces(static_cast<size_t>(workers));
  exec::OrderedMap<LayerOutcome> results(layers.size(), workers, [&](size_t i, int worker) -> LayerOutcome {
    try {
      return process_layer(layers[i], base, tuned, o, workspaces[static_cast<size_t>(worker)]);
    } catch (...) {
      rethrow_with_context({tuned.path(), base.path()}, "layer " + layers[i].weight_key);
    }
  });

  ExtractReport report;
  std::vector<OutputEntry> entries;
  std::set<std::string> names;
  double err2 = 0, norm2 = 0;
  for (size_t i = 0; i < layers.size(); ++i) {
    LayerOutcome r = results.take(i);
    if (r.kind == LayerOutcome::Unchanged) {
      ++report.unchanged;
      continue;
    }
    auto& lr = r.report;
    if (r.kind == LayerOutcome::Skipped) {
      ++report.skipped;
    } else {
      if (!names.insert(lr.module).second)
        throw KeyError("extract: two layers map to the module name '" + lr.module + "' (colliding paths)");
      err2 += r.err * r.err;
      norm2 += lr.delta_norm * lr.delta_norm;
      for (auto& [suffix, t] : r.stored)
        entries.push_back({lr.module + "." + suffix, io::from_torch(t.scalar_type()), t.sizes().vec(), t, {}});
      for (size_t k = 0; k < r.deferred.size(); ++k) {
        const std::string key = r.deferred[k].second;
        entries.push_back({lr.module + "." + r.deferred[k].first, r.deferred_dtype, r.deferred_shapes[k], {},
                           [&base, &tuned, key, dtype = o.dtype] {
                             auto t = difference(base, tuned, key, torch::kCPU).to(dtype);
                             release_pages(base, key), release_pages(tuned, key);
                             return t;
                           }});
      }
    }
    report.layers.push_back(lr);
    if (on_layer) on_layer(lr);
  }
  report.total_rel_error = norm2 > 0 ? std::sqrt(err2 / norm2) : 0;

  report.bytes_written = write_output(output, entries, o);
  report.tensors_written = entries.size();
  report.seconds = watch.seconds();
  return report;
}

}  // namespace lycoris::tools
