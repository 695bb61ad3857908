// Key tables between checkpoint layouts (docs/tools.md#checkpoint-layouts), generated from the models' block structure:
// diffusers U-Net ↔ ldm/SGM U-Net, OpenCLIP ↔ HF CLIP; and the underscore → dot path guess.
#include <algorithm>
#include <cctype>
#include <unordered_set>

#include "lycoris/naming.hpp"

namespace lycoris::naming {

const UNetConfig& sd_unet_config() {
  static const UNetConfig c{"sd", 4, 2, {true, true, true, false}, false};
  return c;
}

const UNetConfig& sdxl_unet_config() {
  static const UNetConfig c{"sdxl", 3, 2, {false, true, true}, true};
  return c;
}

namespace {

std::string indexed(const std::string& a, int i) { return a + "." + std::to_string(i); }

// Resnet sub-layers: diffusers name → ldm name (ResBlock: in_layers = [norm, SiLU, conv], emb_layers =
// [SiLU, linear], out_layers = [norm, SiLU, dropout, conv]).
const std::vector<std::pair<const char*, const char*>>& resnet_parts() {
  static const std::vector<std::pair<const char*, const char*>> parts = {
      {"norm1", "in_layers.0"},  {"conv1", "in_layers.2"},  {"time_emb_proj", "emb_layers.1"},
      {"norm2", "out_layers.0"}, {"conv2", "out_layers.3"}, {"conv_shortcut", "skip_connection"},
  };
  return parts;
}

// Longest prefix of `path` (whole components) present in `map`, with the rest appended to its value.
std::optional<std::string> map_prefix(const std::unordered_map<std::string, std::string>& map,
                                      const std::string& path) {
  for (size_t end = path.size();;) {
    auto it = map.find(path.substr(0, end));
    if (it != map.end()) return it->second + path.substr(end);
    if (end == 0) return std::nullopt;
    end = path.rfind('.', end - 1);
    if (end == std::string::npos) return std::nullopt;
  }
}

}  // namespace

UNetTable::UNetTable(const UNetConfig& c) : config_(c) {
  const int L = c.levels, n = c.layers_per_block;
  auto add = [&](const std::string& d, const std::string& l) { entries_.emplace_back(d, l); };
  auto resnet = [&](const std::string& d, const std::string& l) {
    for (const auto& [dp, lp] : resnet_parts()) add(d + "." + dp, l + "." + lp);
  };
  add("conv_in", "input_blocks.0.0");
  add("time_embedding.linear_1", "time_embed.0");
  add("time_embedding.linear_2", "time_embed.2");
  if (c.add_embedding) {
    add("add_embedding.linear_1", "label_emb.0.0");
    add("add_embedding.linear_2", "label_emb.0.2");
  }
  for (int i = 0; i < L; ++i) {
    for (int j = 0; j < n; ++j) {
      const int k = (n + 1) * i + j + 1;
      resnet(indexed(indexed("down_blocks", i) + ".resnets", j), indexed(indexed("input_blocks", k), 0));
      if (c.attention[static_cast<size_t>(i)])
        add(indexed(indexed("down_blocks", i) + ".attentions", j), indexed(indexed("input_blocks", k), 1));
    }
    if (i < L - 1) add(indexed("down_blocks", i) + ".downsamplers.0.conv", indexed("input_blocks", (n + 1) * (i + 1)) + ".0.op");
  }
  resnet("mid_block.resnets.0", "middle_block.0");
  add("mid_block.attentions.0", "middle_block.1");
  resnet("mid_block.resnets.1", "middle_block.2");
  for (int i = 0; i < L; ++i) {
    const bool attn = c.attention[static_cast<size_t>(L - 1 - i)];  // up block i mirrors down level L-1-i
    for (int j = 0; j <= n; ++j) {
      const int k = (n + 1) * i + j;
      resnet(indexed(indexed("up_blocks", i) + ".resnets", j), indexed(indexed("output_blocks", k), 0));
      if (attn) add(indexed(indexed("up_blocks", i) + ".attentions", j), indexed(indexed("output_blocks", k), 1));
    }
    // the upsampler follows the last resnet (and its attention) of the level
    if (i < L - 1) add(indexed("up_blocks", i) + ".upsamplers.0.conv", indexed(indexed("output_blocks", (n + 1) * i + n), attn ? 2 : 1) + ".conv");
  }
  add("conv_norm_out", "out.0");
  add("conv_out", "out.2");
  for (const auto& [d, l] : entries_) {
    d2l_[d] = l;
    l2d_[l] = d;
  }
}

std::optional<std::string> UNetTable::to_ldm(const std::string& path) const { return map_prefix(d2l_, path); }
std::optional<std::string> UNetTable::to_diffusers(const std::string& path) const { return map_prefix(l2d_, path); }

const UNetTable& sd_unet_table() {
  static const UNetTable t(sd_unet_config());
  return t;
}

const UNetTable& sdxl_unet_table() {
  static const UNetTable t(sdxl_unet_config());
  return t;
}

const UNetTable* unet_table_for(const std::vector<std::string>& paths, bool ldm) {
  const UNetTable* best = nullptr;
  size_t best_count = 0;
  for (const UNetTable* t : {&sd_unet_table(), &sdxl_unet_table()}) {
    size_t count = 0;
    // a table "explains" a path when the path maps and maps back to itself
    for (const auto& p : paths) {
      auto other = ldm ? t->to_diffusers(p) : t->to_ldm(p);
      if (other && (ldm ? t->to_ldm(*other) : t->to_diffusers(*other)) == p) ++count;
    }
    if (count > best_count) {
      best = t;
      best_count = count;
    }
  }
  return best;
}

// ---- OpenCLIP ↔ HF CLIP (per resblock N; docs/tools.md#checkpoint-layouts)

namespace {
const std::vector<std::pair<const char*, const char*>>& clip_block_parts() {
  static const std::vector<std::pair<const char*, const char*>> parts = {
      {"attn.out_proj", "self_attn.out_proj"}, {"mlp.c_fc", "mlp.fc1"}, {"mlp.c_proj", "mlp.fc2"},
      {"ln_1", "layer_norm1"},                 {"ln_2", "layer_norm2"},
  };
  return parts;
}
const std::vector<std::pair<const char*, const char*>>& clip_top_parts() {
  static const std::vector<std::pair<const char*, const char*>> parts = {
      {"ln_final", "text_model.final_layer_norm"},
      {"token_embedding", "text_model.embeddings.token_embedding"},
  };
  return parts;
}
const char* const kQKV[3] = {"q_proj", "k_proj", "v_proj"};
}  // namespace

std::vector<std::string> openclip_to_hf(const std::string& p) {
  for (const auto& [oc, hf] : clip_top_parts())
    if (p == oc) return {hf};
  static const std::string blocks = "transformer.resblocks.";
  if (p.compare(0, blocks.size(), blocks) != 0) return {};
  const auto dot = p.find('.', blocks.size());
  if (dot == std::string::npos) return {};
  const auto n = p.substr(blocks.size(), dot - blocks.size());
  if (n.empty() || !std::all_of(n.begin(), n.end(), ::isdigit)) return {};
  const auto rest = p.substr(dot + 1);
  const std::string layer = "text_model.encoder.layers." + n + ".";
  if (rest == "attn.in_proj") return {layer + "self_attn.q_proj", layer + "self_attn.k_proj", layer + "self_attn.v_proj"};
  for (const auto& [oc, hf] : clip_block_parts())
    if (rest == oc) return {layer + hf};
  return {};
}

std::optional<std::pair<std::string, int>> hf_to_openclip(const std::string& p) {
  for (const auto& [oc, hf] : clip_top_parts())
    if (p == hf) return std::make_pair(std::string(oc), -1);
  static const std::string layers = "text_model.encoder.layers.";
  if (p.compare(0, layers.size(), layers) != 0) return std::nullopt;
  const auto dot = p.find('.', layers.size());
  if (dot == std::string::npos) return std::nullopt;
  const auto n = p.substr(layers.size(), dot - layers.size());
  const auto rest = p.substr(dot + 1);
  const std::string block = "transformer.resblocks." + n + ".";
  for (int i = 0; i < 3; ++i)
    if (rest == std::string("self_attn.") + kQKV[i]) return std::make_pair(block + "attn.in_proj", i);
  for (const auto& [oc, hf] : clip_block_parts())
    if (rest == hf) return std::make_pair(block + oc, -1);
  return std::nullopt;
}

// ---- underscore → dot

std::string guess_path(const std::string& underscored) {
  // Multi-word identifiers of the SD/SDXL U-Nets (both layouts), DiT/Flux/SD3 transformers and CLIP/T5.
  static const std::vector<std::string> words = {
      "down_blocks", "up_blocks", "mid_block", "transformer_blocks", "single_transformer_blocks", "proj_in",
      "proj_out", "to_q", "to_k", "to_v", "to_out", "to_add_out", "add_q_proj", "add_k_proj", "add_v_proj",
      "time_emb_proj", "conv_shortcut", "conv_in", "conv_out", "conv_norm_out", "time_embedding", "linear_1",
      "linear_2", "add_embedding", "text_model", "self_attn", "q_proj", "k_proj", "v_proj", "out_proj",
      "layer_norm1", "layer_norm2", "final_layer_norm", "token_embedding", "position_embedding", "input_blocks",
      "output_blocks", "middle_block", "in_layers", "out_layers", "emb_layers", "skip_connection", "time_embed",
      "label_emb", "norm_out", "proj_mlp", "context_embedder", "x_embedder", "ff_context", "norm1_context",
      "time_text_embed", "timestep_embedder", "text_embedder", "guidance_embedder", "norm_q", "norm_k",
      "norm_added_q", "norm_added_k", "in_proj", "c_fc", "c_proj", "ln_1", "ln_2", "ln_final", "lora_up",
      "lora_down", "text_projection", "embed_tokens", "layer_norm", "final_layer_norm", "shared", "o_proj",
      "gate_proj", "up_proj", "down_proj", "input_layernorm", "post_attention_layernorm", "attn_1", "conv_act",
  };
  static const std::unordered_set<std::string> set(words.begin(), words.end());
  std::vector<std::string> tokens;
  size_t start = 0;
  while (true) {
    auto u = underscored.find('_', start);
    tokens.push_back(underscored.substr(start, u == std::string::npos ? std::string::npos : u - start));
    if (u == std::string::npos) break;
    start = u + 1;
  }
  std::string out;
  for (size_t i = 0; i < tokens.size();) {
    size_t take = 1;
    for (size_t len = std::min<size_t>(4, tokens.size() - i); len >= 2; --len) {
      std::string w = tokens[i];
      for (size_t j = 1; j < len; ++j) w += "_" + tokens[i + j];
      if (set.count(w)) {
        take = len;
        break;
      }
    }
    std::string w = tokens[i];
    for (size_t j = 1; j < take; ++j) w += "_" + tokens[i + j];
    out += (out.empty() ? "" : ".") + w;
    i += take;
  }
  return out;
}

}  // namespace lycoris::naming
