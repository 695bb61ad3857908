// The dtype table: safetensors dtype name ⇄ enum ⇄ item size (torch mapping in io/safetensors.hpp).
#pragma once
#include <cstddef>
#include <string>

namespace lycoris::io {

enum class DType { F64, F32, F16, BF16, I64, I32, I16, I8, U8, BOOL, F8_E4M3, F8_E5M2 };

const char* dtype_name(DType d);  // "F16"
size_t item_size(DType d);
// Parses a safetensors dtype name; returns false if unknown.
bool parse_dtype(const std::string& name, DType& out);

}  // namespace lycoris::io
