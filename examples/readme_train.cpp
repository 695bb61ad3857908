#include <lycoris/lycoris.hpp>
#include <torch/torch.h>

#include <iostream>

int main() {
  torch::manual_seed(0);
  // Any torch::nn model: here a small MLP, and data to fit.
  auto model = torch::nn::Sequential(torch::nn::Linear(16, 32), torch::nn::GELU(), torch::nn::Linear(32, 4));
  auto x = torch::randn({64, 16}), y = torch::randn({64, 4});

  auto net = lycoris::create_lycoris(model, lycoris::NetworkOptions()
                                                .linear_dim(8)           // rank of Linear layers and 1x1 convs
                                                .linear_alpha(4)         // scale = alpha / rank
                                                .preset(lycoris::Preset::builtin("full"))  // or Preset::from_toml_file
                                                .module(lycoris::LoKrOptions().factor(8)));
  // (create_lycoris throws when the preset matches no layer of the model)
  net->freeze_model();                 // the model's own parameters never train
  net->apply_to();                     // W' = W0 + ΔW bound into the layers; W0 untouched
  std::cout << net->summary().text();  // trainable params: … || all params: … || trainable%: …

  torch::optim::AdamW opt(net->parameters(), 1e-2);
  for (int step = 0; step < 50; ++step) {
    auto loss = torch::mse_loss(model->forward(x), y);
    loss.backward();
    net->step(opt);                    // opt.step(), opt.zero_grad(), then the adapted weights are recomputed
  }
  net->save_weights("readme_lokr.safetensors", torch::kHalf);  // loads in ComfyUI / sd-webui / Python LyCORIS
  net->restore();                                              // the model is bit-identical to before apply_to

  auto loaded = lycoris::create_lycoris_from_weights(model, "readme_lokr.safetensors");
  loaded->merge_to(1.0);  // folded into the weights for good (or apply_to() / restore() to switch it)
}
