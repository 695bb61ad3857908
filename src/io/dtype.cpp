// safetensors dtype table (owned by io; see include/lycoris/io/dtype.hpp). No torch here.
#include "lycoris/io/dtype.hpp"

#include <cmath>
#include <limits>
#include <string>

namespace lycoris::io {
namespace {

struct DTypeEntry {
  DType dtype;
  const char* name;
  size_t size;
  bool floating;
  bool torch;  // has a torch dtype (float8 is decoded to F32 instead)
  const char* spellings;  // what users may type for it (--dtype), space-separated
};
// The one table: every other mapping (torch types, names, sizes) derives from it.
constexpr DTypeEntry kTable[] = {
    {DType::F64, "F64", 8, true, true, "fp64 float64 double"},
    {DType::F32, "F32", 4, true, true, "fp32 float32 float"},
    {DType::F16, "F16", 2, true, true, "fp16 float16 half"},
    {DType::BF16, "BF16", 2, true, true, "bf16 bfloat16 bfloat"},
    {DType::I64, "I64", 8, false, true, "i64 int64"},
    {DType::I32, "I32", 4, false, true, "i32 int32"},
    {DType::I16, "I16", 2, false, true, "i16 int16"},
    {DType::I8, "I8", 1, false, true, "i8 int8"},
    {DType::U8, "U8", 1, false, true, "u8 uint8"},
    {DType::BOOL, "BOOL", 1, false, true, "bool"},
    {DType::F8_E4M3, "F8_E4M3", 1, true, false, "f8_e4m3"},
    {DType::F8_E5M2, "F8_E5M2", 1, true, false, "f8_e5m2"},
};

const DTypeEntry& entry(DType d) {
  for (const auto& e : kTable)
    if (e.dtype == d) return e;
  return kTable[0];  // unreachable: every enumerator is in the table
}

// value = (-1)^s · 2^(e - bias) · (1 + m / 2^mbits) for normal numbers, 2^(1 - bias) · m / 2^mbits
// for subnormals (e == 0).
float decode(uint8_t byte, int mbits, int bias) {
  const int ebits = 7 - mbits;
  const int s = byte >> 7, e = (byte >> mbits) & ((1 << ebits) - 1), m = byte & ((1 << mbits) - 1);
  float mag = e == 0 ? std::ldexp(static_cast<float>(m), 1 - bias - mbits)
                     : std::ldexp(static_cast<float>((1 << mbits) + m), e - bias - mbits);
  return s ? -mag : mag;
}

}  // namespace

const char* dtype_name(DType d) { return entry(d).name; }
size_t item_size(DType d) { return entry(d).size; }
bool is_floating(DType d) { return entry(d).floating; }
bool has_torch_dtype(DType d) { return entry(d).torch; }

bool parse_dtype(const std::string& name, DType& out) {
  for (const auto& e : kTable)
    if (name == e.name) {
      out = e.dtype;
      return true;
    }
  return false;
}

bool parse_user_dtype(const std::string& spelling, DType& out) {
  if (parse_dtype(spelling, out)) return true;
  for (const auto& e : kTable) {
    const std::string words = std::string(" ") + e.spellings + " ";
    if (!spelling.empty() && spelling.find(' ') == std::string::npos && words.find(" " + spelling + " ") != std::string::npos) {
      out = e.dtype;
      return true;
    }
  }
  return false;
}

std::string dtype_spelling(DType d) {
  const std::string words = entry(d).spellings;
  return words.substr(0, words.find(' '));
}

float f8_e4m3_to_f32(uint8_t byte) {
  // e4m3fn: exponent 1111 is a normal binade except mantissa 111, which is NaN; no infinities.
  if ((byte & 0x7F) == 0x7F) return std::numeric_limits<float>::quiet_NaN();
  return decode(byte, 3, 7);
}

float f8_e5m2_to_f32(uint8_t byte) {
  // e5m2: IEEE layout; exponent 11111 is ±inf (mantissa 0) or NaN.
  if ((byte & 0x7C) == 0x7C) {
    if (byte & 0x03) return std::numeric_limits<float>::quiet_NaN();
    return (byte & 0x80) ? -std::numeric_limits<float>::infinity() : std::numeric_limits<float>::infinity();
  }
  return decode(byte, 2, 15);
}

}  // namespace lycoris::io
