// Internal to the tools (extract, resize): one-line errors for bad values and for failures inside the work
// on one module or layer.
#pragma once
#include <torch/types.h>

#include <string>
#include <vector>

namespace lycoris::tools {

// Number of NaN/Inf values of a floating-point tensor (0 for other dtypes).
int64_t count_nonfinite(const torch::Tensor& t);

// FormatError "<where>: tensor '<key>' has <n> NaN/Inf value(s)" unless every value of t is finite.
void require_finite(const torch::Tensor& t, const std::string& where, const std::string& key);

// t converted to `dtype` (what the output file holds), or Error "<where>: <key>: …" when the result has
// NaN/Inf values: finite values beyond the range of `dtype` (the message gives the largest one, then
// `hint`), or values the computation itself made non-finite.
torch::Tensor round_finite(const torch::Tensor& t, torch::ScalarType dtype, const std::string& where,
                           const std::string& key, const std::string& hint = "");

// Call inside a catch block. Re-throws the exception being handled so that its message names the file
// and `subject` (a module or layer) on one line:
//   c10::Error (torch)  → Error "<files[0]>: <subject>: <first line of torch's message>" (no backtrace);
//   lycoris::Error      → the same type; "<files[0]>: " and "<subject>: " put in front unless the message
//                         already begins with one of `files` / with `subject`;
//   anything else       → re-thrown unchanged.
[[noreturn]] void rethrow_with_context(const std::vector<std::string>& files, const std::string& subject);

}  // namespace lycoris::tools
