// Small text helpers shared by the library and the CLI.
#pragma once
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

// The items separated by `sep`; past `max_items`, "<sep>… and N more".
std::string join(const std::vector<std::string>& items, const std::string& sep, size_t max_items = SIZE_MAX);

inline bool starts_with(std::string_view s, std::string_view prefix) { return s.substr(0, prefix.size()) == prefix; }
inline bool ends_with(std::string_view s, std::string_view suffix) {
  return s.size() >= suffix.size() && s.substr(s.size() - suffix.size()) == suffix;
}

}  // namespace lycoris
