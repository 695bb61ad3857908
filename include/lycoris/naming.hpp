// Module naming (FORMAT.md §2): one home for every naming rule.
//
// An adapter module name is "<prefix>_<path with . → _>". The mapping path → name is not invertible
// (`a.b_c` and `a_b.c` collide), so names are resolved the way every reference loader does it: enumerate
// the base checkpoint's layers, build each layer's names with every naming rule ("dialect"), and look the
// adapter's module names up in that table. New dialects (kohya on ldm layouts, PEFT, …) are entries of
// dialects() that emit more (name, layer) pairs; nothing else changes.
#pragma once
#include <functional>
#include <string>
#include <unordered_map>
#include <vector>

namespace lycoris::naming {

// "<prefix>_<path with . → _>"; the root module (empty path) gives "<prefix>_".
std::string module_name(const std::string& prefix, const std::string& path);
// Prefixes the reference and kohya write: lycoris, lora_unet, lora_te, lora_te1, lora_te2, lora_te3.
const std::vector<std::string>& known_prefixes();

// A layer of a base checkpoint: a key "<path>.weight" (the root layer's key is plain "weight").
struct BaseLayer {
  std::string path;        // dotted module path ("" for the root)
  std::string weight_key;  // "<path>.weight"
  std::string bias_key;    // "<path>.bias" when the checkpoint has it, else ""
};

// The layers of a checkpoint, in key order: one per key ending in ".weight" (or equal to "weight").
std::vector<BaseLayer> base_layers(const std::vector<std::string>& keys);

// One adapter module name given to a base layer by a naming rule.
struct Resolution {
  std::string module;  // the adapter module name
  BaseLayer layer;
  std::string dialect;  // the rule that produced the name, e.g. "standalone"
  std::string prefix;   // the prefix used ("lycoris", "lora_unet", …)
};

// A naming dialect: emits every adapter module name it gives to the layers of a checkpoint.
struct Dialect {
  std::string name;
  std::function<void(const std::vector<BaseLayer>&, const std::function<void(Resolution)>& emit)> names;
};

// The dialects tried, in order. Today only "standalone": each known prefix + "_" + path with . → _.
const std::vector<Dialect>& dialects();

// Adapter module name → base layer, built from a checkpoint's key list.
class Resolver {
 public:
  explicit Resolver(const std::vector<std::string>& base_keys, const std::vector<Dialect>& rules = dialects());

  // Every base layer this module name denotes: empty when none, more than one when ambiguous (colliding
  // paths such as `a.b_c` / `a_b.c`; the caller decides, the loader reports it as an error).
  std::vector<const Resolution*> find(const std::string& module) const;
  // Up to n known names closest to `module` (edit distance), for "matches nothing" messages.
  std::vector<std::string> closest(const std::string& module, size_t n = 3) const;
  size_t size() const { return by_name_.size(); }
  const std::vector<BaseLayer>& layers() const { return layers_; }

 private:
  std::vector<BaseLayer> layers_;
  std::unordered_map<std::string, std::vector<Resolution>> by_name_;
};

}  // namespace lycoris::naming
