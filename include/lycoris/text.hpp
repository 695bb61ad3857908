// Small text helpers shared by the library and the CLI.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace lycoris {

// `text` made safe to print on a terminal or in a one-line message: valid UTF-8 is kept, but control
// characters (C0, DEL, C1) become escapes ("\n", "\t", "\r", "\x1B", "\u0085"), as do the Unicode
// bidirectional overrides that can reorder what a line shows, and every byte of invalid UTF-8 ("\xFF").
// Names and keys come from files: printed raw, a name holding "\n" or an ANSI escape could forge lines.
std::string escape_control(std::string_view text);

// A tensor shape as "[2, 3]" (the one shape format of every message).
std::string shape_text(const std::vector<int64_t>& shape);

// The items separated by `sep`; past `max_items`, "<sep>… and N more".
std::string join(const std::vector<std::string>& items, const std::string& sep, size_t max_items = SIZE_MAX);

inline bool starts_with(std::string_view s, std::string_view prefix) { return s.substr(0, prefix.size()) == prefix; }
inline bool ends_with(std::string_view s, std::string_view suffix) {
  return s.size() >= suffix.size() && s.substr(s.size() - suffix.size()) == suffix;
}

// One table per enum, read both ways: {value, name} pairs, the canonical name of a value first and its
// aliases after it (e.g. {Peft, "peft"}, {Peft, "diffusers"}).
template <class Enum>
struct EnumName {
  Enum value;
  const char* name;
};

// The canonical name of `value` ("?" if the table lacks it).
template <class Enum, size_t N>
const char* enum_name(const EnumName<Enum> (&table)[N], Enum value) {
  for (const auto& e : table)
    if (e.value == value) return e.name;
  return "?";
}

// The value named `text`; false when no name matches. `known` (if given) receives the canonical names,
// comma-separated, for the caller's error message.
template <class Enum, size_t N>
bool parse_enum(const EnumName<Enum> (&table)[N], std::string_view text, Enum& out, std::string* known = nullptr) {
  for (const auto& e : table)
    if (text == e.name) {
      out = e.value;
      return true;
    }
  if (known) {
    known->clear();
    for (size_t i = 0; i < N; ++i)
      if (i == 0 || !(table[i].value == table[i - 1].value)) *known += std::string(known->empty() ? "" : ", ") + table[i].name;
  }
  return false;
}

}  // namespace lycoris
