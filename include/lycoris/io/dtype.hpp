// The dtype table: safetensors dtype name ⇄ enum ⇄ item size (torch mapping in io/safetensors.hpp).
//
// F8_E4M3 (float8 e4m3fn: bias 7, no infinities, S.1111.111 = NaN) and F8_E5M2 (bias 15, IEEE-like
// infinities/NaN) have no torch dtype in the libtorch we target: they are decoded exactly (subnormals,
// NaN, ±0 included) to F32 on read (SafetensorsFile::tensor returns an F32 copy) and cannot be written
// from a torch tensor (raw copies with SafetensorsWriter::write_bytes still work).
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>

namespace lycoris::io {

enum class DType { F64, F32, F16, BF16, I64, I32, I16, I8, U8, BOOL, F8_E4M3, F8_E5M2 };

const char* dtype_name(DType d);  // "F16"
size_t item_size(DType d);
bool is_floating(DType d);      // F64, F32, F16, BF16 and both float8 formats
bool has_torch_dtype(DType d);  // every dtype but float8
// Parses a safetensors dtype name; returns false if unknown.
bool parse_dtype(const std::string& name, DType& out);
// Parses what a user may type for a dtype: the safetensors name or a usual spelling (fp16, float16, half,
// bf16, bfloat16, fp32, float, fp64, …); false if unknown.
bool parse_user_dtype(const std::string& spelling, DType& out);
// The short spelling users type for it ("fp16").
std::string dtype_spelling(DType d);

// Exact decoding of one float8 byte to float (every value of both formats is representable in F32).
float f8_e4m3_to_f32(uint8_t byte);
float f8_e5m2_to_f32(uint8_t byte);

}  // namespace lycoris::io
