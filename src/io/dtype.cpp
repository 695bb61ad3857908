// safetensors dtype table (owned by io; see include/lycoris/io/dtype.hpp)
