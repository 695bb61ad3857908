// safetensors header parser (no torch)
