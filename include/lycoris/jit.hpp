// Adapters on TorchScript modules (docs/training.md#torchscript): a model exported from PyTorch with
// torch.jit.script or torch.jit.trace and loaded with torch::jit::load is a host model like a torch::nn one.
//
//   auto model = lycoris::torchscript::load("model.pt");
//   auto net = lycoris::create_lycoris_from_weights(model, "style.safetensors", 0.8);
//   net->apply_to();                                   // the scripted forward now reads W0 + 0.8·ΔW
//   auto y = model.forward({x}).toTensor();
//   net->restore();                                    // the module holds its own tensors again
//
// host_module(torch::jit::Module) is the second implementation of the host view (lycoris/host_layer.hpp):
// the network code is the same for both. Its layers are submodules of the torch.nn classes Linear
// (NonDynamicallyQuantizableLinear too), Conv1d/2d/3d, LayerNorm and GroupNorm, known by their qualified
// class name; their settings come from the class constants of a scripted layer, or from the op the traced
// forward calls with the layer's weight. Rebuild mode sets the module's `weight` / `bias` slots, which the
// TorchScript code reads on every call (prim::GetAttr): parameters() of the module give W' while bound,
// restore() puts the very tensors W0/b0 back. Bypass mode is not available (the code cannot ask adapters).
//
// Errors (lycoris::Error) rather than silent no-ops: a frozen module (torch.jit.freeze inlined its weights
// as constants), a file whose modules match no layer, a layer its code never reads (one probe of the
// model's methods: a layer left out of the trace, or unused by forward).
#pragma once
#include <torch/csrc/jit/api/module.h>

#include <string>
#include <vector>

#include "lycoris/host_layer.hpp"
#include "lycoris/network.hpp"
#include "lycoris/tools/merge.hpp"

namespace lycoris {

// A TorchScript module (or any of its submodules) as a host tree; Error when it is frozen.
HostModulePtr host_module(const torch::jit::Module& module);

// docs/training.md#create-lycoris on a TorchScript module: discovery, presets and file names are those of
// the same model in torch::nn. Layers the host view cannot adapt are skipped with a warning (warnings()).
LycorisNetwork create_lycoris(const torch::jit::Module& model, NetworkOptions opts);
LycorisNetwork create_lycoris(const torch::jit::Module& model, double multiplier = 1.0, int64_t linear_dim = 4,
                              double linear_alpha = 1.0, NetworkOptions opts = {});

// docs/training.md#loading on a TorchScript module. Besides the errors of the torch::nn overload: Error
// when the file has no module for any layer of the model, and when one of its modules names a layer that
// cannot be adapted (saying why: never read by the module's code, unsupported settings).
LycorisNetwork create_lycoris_from_weights(const torch::jit::Module& model, const std::string& file,
                                           double multiplier = 1.0, const Preset& preset = Preset());

namespace torchscript {

// Hold one while training a TorchScript model (docs/training.md#torchscript-speed). By default the graph
// executor profiles the code and runs it through autodiff subgraphs, which makes a training step 30–40 %
// slower than on the same torch::nn model; in this scope (on this thread: the setting is thread-local) the
// code runs op by op under ordinary autograd, so a step costs what it costs in torch::nn and computes the
// same numbers. Inference (NoGradGuard, apply/switch/merge) does not need it.
//
//   lycoris::torchscript::TrainingScope training;
//   for (...) { loss(model.forward({x}).toTensor()).backward(); net->step(opt); }
class TrainingScope {
 public:
  TrainingScope();
  ~TrainingScope();
  TrainingScope(const TrainingScope&) = delete;
  TrainingScope& operator=(const TrainingScope&) = delete;

 private:
  bool previous_;  // the thread's setting before, restored on destruction
};

// True when `path` starts like a ZIP archive (PyTorch's .pt format); false for anything else, also when
// the file cannot be read.
bool is_archive(const std::string& path);

// torch::jit::load with errors that name the file: IOError when it cannot be opened, FormatError when it
// is no TorchScript archive or a truncated one.
torch::jit::Module load(const std::string& path);

// module.save to a temporary file next to `path`, renamed into place when complete: `path` is never
// half-written. IOError naming `path` on failure.
void save(const torch::jit::Module& module, const std::string& path);

// What merge_archive did.
struct ArchiveMergeReport {
  std::vector<size_t> modules_applied;  // per adapter
  size_t layers = 0;                    // layers whose weight (or bias) changed
  std::vector<std::string> warnings;    // file modules that match no layer (with allow_unmatched)
  double seconds = 0;
};

// `lycoris merge model.pt ADAPTER... -o out.pt`: loads the archive, merges each adapter at its weight in
// order (create_lycoris_from_weights + merge_to, so W ← apply_weight_B(apply_weight_A(W0)) as
// docs/training.md#merge-to), and saves the module (code and every other attribute unchanged) as
// `output`. Adapter modules matching no layer are an error unless `allow_unmatched`.
ArchiveMergeReport merge_archive(const std::string& base, const std::string& output,
                                 const std::vector<tools::MergeInput>& adapters, bool allow_unmatched = false);

}  // namespace torchscript
}  // namespace lycoris
