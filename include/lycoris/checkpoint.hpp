// Training checkpoints (docs/training.md#checkpoint-and-resume): everything the next training step reads,
// so that a job killed mid-way and resumed from its last checkpoint ends with the same adapter as an
// uninterrupted run (bit-identical on the same devices).
//
//   net->apply_to();
//   torch::optim::AdamW opt(net->parameters(), 1e-3);
//   int64_t step = 0;
//   if (resuming) step = lycoris::load_checkpoint("run.ckpt", *net, opt).step;
//   for (; step < steps; ) {
//     ...loss.backward(); net->step(opt); ++step;
//     if (step % 100 == 0) lycoris::save_checkpoint("run.ckpt", *net, opt, step);
//   }
//
// A checkpoint holds: every parameter and buffer of the network's adapters (dtype and bits exact), the
// optimizer's state and options per parameter group (lr, betas, momentum buffers, step counts), the step
// counter, the default random generators' states (CPU and the adapters' devices) now and before the last
// refresh of the bound weights (so that loading redraws the same dropouts), DyLoRA's current block count,
// the multiplier, the train/eval mode, and a JSON text of the caller's (data loader position, ...).
// Neither function does anything but read or write `path`: in a multi-process job, rank 0 saves (then a
// barrier) and every rank loads.
#pragma once
#include <cstdint>
#include <string>

namespace torch::optim {
class Optimizer;
}  // namespace torch::optim

namespace lycoris {

class LycorisNetworkImpl;

// What load_checkpoint returns besides the objects it restores.
struct Checkpoint {
  int64_t step = 0;         // the step counter given to save_checkpoint
  std::string extra = "{}";  // the JSON value given to save_checkpoint (compact form)
};

// Writes the checkpoint of `net` and `optimizer` at `step` to `path` atomically (a temporary file renamed
// over `path`: a kill leaves the previous checkpoint intact). `extra` must be JSON text (OptionError
// otherwise). Pass *net for a LycorisNetwork.
void save_checkpoint(const std::string& path, const LycorisNetworkImpl& net, const torch::optim::Optimizer& optimizer,
                     int64_t step, const std::string& extra = "{}");

// Restores `net` and `optimizer` from `path`, written by save_checkpoint for a network of the same
// structure (modules, algorithms, tensor names, shapes, dtypes: create it with the same model and options)
// and an optimizer of the same type over the same parameter groups (constructed with any options: the
// checkpoint's are restored). The network must be applied (apply_to) when it was at saving.
// Everything is checked before anything changes: IOError when the file cannot be read; FormatError naming the
// file when it is not a checkpoint or is truncated/damaged; KeyError naming the first difference of
// structure; OptionError for another optimizer type or other parameter groups.
Checkpoint load_checkpoint(const std::string& path, LycorisNetworkImpl& net, torch::optim::Optimizer& optimizer);

// The adapter structure of `net` as text: per module a line "<module> <algo>", then per tensor (parameters,
// then buffers) "<module>.<tensor> <dtype> <shape>". Equal texts: a checkpoint (or a peer process) fits.
std::string network_structure(const LycorisNetworkImpl& net);
// "" when the structures are equal, else their first difference, e.g.
// "line 3: <a_name> has 'm.lora_up F32 [8, 4]', <b_name> has 'm.lora_up F32 [8, 2]'".
std::string structure_difference(const std::string& a, const std::string& b, const std::string& a_name,
                                 const std::string& b_name);

}  // namespace lycoris
