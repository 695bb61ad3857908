// Typed errors. Every message names the file / module / key it is about and the reason.
#pragma once
#include <stdexcept>
#include <string>

namespace lycoris {

// Base of every error the library throws on bad input.
struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};
// A malformed file: "<file>: tensor '<name>': <reason>".
struct FormatError : Error {
  using Error::Error;
};
// A tensor whose shape does not fit the layer or the other tensors of its module.
struct ShapeError : Error {
  using Error::Error;
};
// An invalid option or option combination.
struct OptionError : Error {
  using Error::Error;
};
// A key set that does not form a known adapter module, or a name that matches nothing.
struct KeyError : Error {
  using Error::Error;
};
// Operating-system level failure (open, mmap, write, rename).
struct IOError : Error {
  using Error::Error;
};

}  // namespace lycoris
