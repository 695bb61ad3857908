// Checking an output path before the work that produces it (extract, resize, merge, convert can take
// minutes; an unwritable -o should fail at once, not after the work).
#pragma once
#include <string>

namespace lycoris::io {

// Succeeds when an atomic write to `path` (a temporary beside it, renamed over it) can start: its parent
// directory exists and a file can be created there, and `path` is not a directory or another non-regular
// file. Otherwise IOError "<path>: cannot write here: <reason>". Leaves nothing behind.
void check_output_path(const std::string& path);

}  // namespace lycoris::io
