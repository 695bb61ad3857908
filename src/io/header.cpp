// safetensors header parser and validator (no torch: the fuzzer links only this and nlohmann-json).
#include "lycoris/io/header.hpp"

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <exception>
#include <limits>
#include <nlohmann/json.hpp>
#include <string_view>
#include <unordered_set>

#include "lycoris/error.hpp"
#include "lycoris/text.hpp"

namespace lycoris::io {

using nlohmann::json;

uint64_t TensorInfo::numel() const {
  uint64_t n = 1;
  for (int64_t d : shape) n *= static_cast<uint64_t>(d);
  return n;
}

std::string printable(const std::string& text, size_t max) {
  std::string out;
  for (unsigned char c : text) {
    if (out.size() >= max) {
      out += "...";
      break;
    }
    if (c >= 0x20 && c < 0x7F) {
      out += static_cast<char>(c);
    } else {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\x%02X", c);
      out += buf;
    }
  }
  return out;
}

namespace {

constexpr uint64_t kInt64Max = static_cast<uint64_t>(std::numeric_limits<int64_t>::max());
const char* const kMetadata = "__metadata__";

struct Ctx {
  const std::string& file;
  [[noreturn]] void header(const std::string& reason) const {
    throw FormatError(file + ": header: " + reason);
  }
  [[noreturn]] void tensor(const std::string& name, const std::string& reason) const {
    throw FormatError(file + ": tensor '" + printable(name) + "': " + reason);
  }
};

std::string json_number_text(const json& v) { return printable(v.dump(), 40); }

// A JSON value that must be a non-negative integer ≤ limit; `what` names it in the message.
uint64_t non_negative(const Ctx& ctx, const std::string& name, const json& v, const std::string& what,
                      uint64_t limit) {
  if (v.is_number_unsigned()) {
    uint64_t x = v.get<uint64_t>();
    if (x > limit) ctx.tensor(name, what + " " + std::to_string(x) + " is too large");
    return x;
  }
  if (v.is_number_integer()) ctx.tensor(name, "negative " + what + " " + json_number_text(v));
  if (v.is_number_float())
    ctx.tensor(name, what + " " + json_number_text(v) + " is not an integer in the 64-bit range");
  ctx.tensor(name, what + " is not an integer (got " + std::string(v.type_name()) + ")");
}


TensorInfo parse_entry(const Ctx& ctx, const std::string& name, const json& e, uint64_t data_size) {
  if (!e.is_object()) ctx.tensor(name, "entry is not a JSON object (got " + std::string(e.type_name()) + ")");
  for (const auto& kv : e.items())
    if (kv.key() != "dtype" && kv.key() != "shape" && kv.key() != "data_offsets")
      ctx.tensor(name, "unexpected field '" + printable(kv.key()) + "' (allowed: dtype, shape, data_offsets)");
  for (const char* field : {"dtype", "shape", "data_offsets"})
    if (!e.contains(field)) ctx.tensor(name, std::string("missing field '") + field + "'");

  TensorInfo t;
  t.name = name;
  const json& dtype = e["dtype"];
  if (!dtype.is_string()) ctx.tensor(name, "dtype is not a string (got " + std::string(dtype.type_name()) + ")");
  if (!parse_dtype(dtype.get_ref<const std::string&>(), t.dtype))
    ctx.tensor(name, "unknown dtype '" + printable(dtype.get_ref<const std::string&>()) + "'");

  const json& shape = e["shape"];
  if (!shape.is_array()) ctx.tensor(name, "shape is not an array (got " + std::string(shape.type_name()) + ")");
  // Product of the dims (zeros counted as 1, so strides never overflow either) must fit in int64.
  uint64_t product = 1;
  bool overflow = false;
  for (const json& d : shape) {
    uint64_t dim = non_negative(ctx, name, d, "shape dimension", kInt64Max);
    t.shape.push_back(static_cast<int64_t>(dim));
    uint64_t p;
    if (__builtin_mul_overflow(product, std::max<uint64_t>(dim, 1), &p) || p > kInt64Max) overflow = true;
    product = p;
  }
  if (overflow) ctx.tensor(name, "shape " + shape_text(t.shape) + ": element count overflows 64 bits");
  const uint64_t numel = t.numel();
  uint64_t nbytes;
  if (__builtin_mul_overflow(numel, item_size(t.dtype), &nbytes) || nbytes > kInt64Max)
    ctx.tensor(name, "shape " + shape_text(t.shape) + ": byte size overflows 64 bits");

  const json& off = e["data_offsets"];
  if (!off.is_array() || off.size() != 2)
    ctx.tensor(name, "data_offsets is not an array [begin, end] (got " +
                         (off.is_array() ? std::to_string(off.size()) + " elements" : std::string(off.type_name())) +
                         ")");
  t.begin = non_negative(ctx, name, off[0], "data_offsets begin", std::numeric_limits<uint64_t>::max());
  t.end = non_negative(ctx, name, off[1], "data_offsets end", std::numeric_limits<uint64_t>::max());
  if (t.begin > t.end)
    ctx.tensor(name, "data_offsets begin " + std::to_string(t.begin) + " > end " + std::to_string(t.end));
  if (t.end - t.begin != nbytes)
    ctx.tensor(name, "wrong byte length: data_offsets [" + std::to_string(t.begin) + ", " + std::to_string(t.end) +
                         "] span " + std::to_string(t.end - t.begin) + " bytes but shape " + shape_text(t.shape) +
                         " of " + dtype_name(t.dtype) + " needs " + std::to_string(nbytes));
  if (t.end > data_size)
    ctx.tensor(name, "data_offsets end " + std::to_string(t.end) + " is past the end of the data buffer (" +
                         std::to_string(data_size) + " bytes)");
  return t;
}

void parse_metadata(const Ctx& ctx, const json& m, std::map<std::string, std::string>& out) {
  if (m.is_null()) return;  // written by some tools for "no metadata" (the Rust reader accepts it)
  if (!m.is_object()) ctx.header("__metadata__ is not an object (got " + std::string(m.type_name()) + ")");
  for (const auto& mk : m.items()) {
    if (!mk.value().is_string())
      ctx.header("__metadata__ key '" + printable(mk.key()) + "': value is not a string (got " +
                 mk.value().type_name() + ")");
    out.emplace(mk.key(), mk.value().get<std::string>());
  }
}

// nlohmann SAX handler building the Header as the JSON is read, in linear time (nlohmann's callback
// parser rescans the parent object whenever a child closes: quadratic in the tensor count). Each root
// entry becomes a small DOM, validated when it closes, then dropped. Duplicate keys (at every level) and
// nesting deeper than a header needs (root object → entry → shape array) throw at once. An invalid entry
// throws only once the whole JSON is read (a later syntax error wins), and the first in key order does:
// the message does not depend on the order of the entries.
class HeaderBuilder {
 public:
  // A valid entry takes at least 48 bytes of the JSON: room for that many names spares the set's rehashes
  // (about 30% of the parse of a large header).
  HeaderBuilder(const Ctx& ctx, Header& h, uint64_t data_size, uint64_t json_size)
      : ctx_(ctx), h_(h), data_size_(data_size) {
    names_.reserve(json_size / 48);
  }

  bool null() { return value(nullptr); }
  bool boolean(bool v) { return value(v); }
  bool number_integer(json::number_integer_t v) { return value(v); }
  bool number_unsigned(json::number_unsigned_t v) { return value(v); }
  bool number_float(json::number_float_t v, const json::string_t& /*text*/) { return value(v); }
  bool string(json::string_t& v) { return value(std::move(v)); }
  bool binary(json::binary_t& v) { return value(json::binary(std::move(v))); }
  bool start_object(std::size_t /*size*/) { return open(json::value_t::object); }
  bool start_array(std::size_t /*size*/) { return open(json::value_t::array); }
  bool end_object() { return close(); }
  bool end_array() { return close(); }

  bool key(json::string_t& key) {
    Frame& f = stack_.back();
    if (!f.value) {  // the root object
      if (!names_.insert(key).second) {
        if (key == kMetadata) ctx_.header("duplicate key '__metadata__'");
        ctx_.tensor(key, "duplicate tensor name");
      }
    } else if (f.value->contains(key)) {
      reject(f.name, (f.name == kMetadata ? "duplicate key '" : "duplicate field '") + printable(key) + "'");
    }
    f.key = std::move(key);
    return true;
  }

  template <class Exception>
  bool parse_error(std::size_t /*position*/, const std::string& /*token*/, const Exception& e) {
    syntax_error_ = e.what();
    return false;
  }

  const std::string& syntax_error() const { return syntax_error_; }
  // The root value; a root object is kept empty (its entries went to the Header).
  const json& root() const { return root_; }
  // After a successful parse of a root object: the error of the first invalid entry in key order.
  void rethrow_entry_error() const {
    if (entry_error_) std::rethrow_exception(entry_error_);
  }

 private:
  struct Frame {
    json* value;       // the container being filled; nullptr for a root object (its entries are not kept)
    std::string name;  // the root key this frame lies under ("" for the root and inside a root array)
    std::string key;   // objects: the key of the next value
  };

  // A problem inside the value stored under root key `name` (a tensor entry, __metadata__, or "" inside
  // a root array).
  [[noreturn]] void reject(const std::string& name, const std::string& reason) const {
    if (name == kMetadata) ctx_.header("__metadata__: " + reason);
    ctx_.tensor(name, reason);
  }

  // Stores `v` where the parser is and returns its address.
  json* place(json v) {
    if (stack_.empty()) return &(root_ = std::move(v));
    Frame& top = stack_.back();
    if (!top.value) return &(entry_ = std::move(v));
    if (top.value->is_object()) return &((*top.value)[top.key] = std::move(v));
    top.value->push_back(std::move(v));
    return &top.value->back();
  }
  bool in_root_object() const { return stack_.size() == 1 && !stack_[0].value; }

  bool value(json v) {
    place(std::move(v));
    if (in_root_object()) finish_entry();
    return true;
  }
  bool open(json::value_t type) {
    Frame f;
    if (stack_.size() == 1) f.name = stack_[0].key;
    if (stack_.size() >= 2) f.name = stack_[1].name;
    if (stack_.size() >= 3) {
      if (stack_[0].value) ctx_.header("JSON nested deeper than a safetensors header allows");  // a root array
      reject(f.name, "JSON nested deeper than a safetensors header allows");
    }
    if (stack_.empty() && type == json::value_t::object) {
      root_ = json(type);
      f.value = nullptr;
    } else {
      f.value = place(json(type));
    }
    stack_.push_back(std::move(f));
    return true;
  }
  bool close() {
    stack_.pop_back();
    if (in_root_object()) finish_entry();
    return true;
  }

  // The entry under the root object's last key is complete: validate it into the Header.
  void finish_entry() {
    const std::string& name = stack_[0].key;
    if (entry_error_ && name > entry_error_name_) return;  // an earlier key already failed
    try {
      if (name == kMetadata)
        parse_metadata(ctx_, entry_, h_.metadata);
      else
        h_.tensors.push_back(parse_entry(ctx_, name, entry_, data_size_));
    } catch (const FormatError&) {
      entry_error_ = std::current_exception();
      entry_error_name_ = name;
    }
  }

  const Ctx& ctx_;
  Header& h_;
  uint64_t data_size_;
  json root_;   // the root value (a root object stays empty)
  json entry_;  // the root object's entry being read
  std::vector<Frame> stack_;
  std::unordered_set<std::string> names_;  // the root object's keys
  std::string syntax_error_;
  std::exception_ptr entry_error_;
  std::string entry_error_name_;
};

// Another common file format, by its first bytes: what to tell someone who gave it as a safetensors file
// (nullptr when unknown). Only asked once the bytes have failed as safetensors, as a header length
// (every valid one is < 2^27, so its bytes 4-7 are zero) or as the start of the JSON object.
const char* other_format(const uint8_t* bytes, size_t size) {
  auto starts = [&](std::string_view magic) {
    return size >= magic.size() && std::memcmp(bytes, magic.data(), magic.size()) == 0;
  };
  if (starts("PK\x03\x04"))
    return "this is a ZIP archive (a PyTorch .pt/.pth/.ckpt checkpoint or TorchScript module; convert it to "
           "safetensors first)";
  if (size >= 2 && bytes[0] == 0x80 && bytes[1] >= 2 && bytes[1] <= 5)  // pickle PROTO opcode, protocol 2-5
    return "this is a Python pickle (a PyTorch checkpoint in the legacy format, or another pickled object; "
           "convert it to safetensors first)";
  if (starts("GGUF")) return "this is a GGUF file (a llama.cpp / GGML model)";
  if (starts("\x89HDF\r\n\x1a\n")) return "this is an HDF5 file (a Keras .h5 model?)";
  if (starts("\x93NUMPY")) return "this is a NumPy .npy array";
  if (starts("\x1f\x8b")) return "this is a gzip-compressed file (decompress it first)";
  if (starts("version https://git-lfs"))
    return "this is a Git LFS pointer, not the file's content (fetch it with `git lfs pull`)";
  if (starts("<!DOCTYPE") || starts("<!doctype") || starts("<html") || starts("<HTML"))
    return "this is an HTML page (a failed download?)";
  return nullptr;
}

}  // namespace

Header parse_header(const uint8_t* bytes, size_t size, const std::string& file) {
  const Ctx ctx{file};
  if (size == 0) ctx.header("empty file");
  if (size < 8) ctx.header("file is " + std::to_string(size) + " bytes, too short for the 8-byte header length");
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | bytes[i];  // little-endian
  // Bytes that fail as safetensors are named when another format's: not an absurd header length.
  auto reject_other_format = [&] {
    if (const char* what = other_format(bytes, size)) ctx.header(std::string("not a safetensors file: ") + what);
  };
  if (n > kMaxHeaderSize) {
    reject_other_format();
    ctx.header("header length " + std::to_string(n) + " exceeds the " + std::to_string(kMaxHeaderSize) +
               "-byte limit");
  }
  if (n > size - 8) {
    reject_other_format();
    ctx.header("header length " + std::to_string(n) + " runs past the end of the file (" + std::to_string(size) +
               " bytes)");
  }

  Header h;
  h.header_size = n;
  h.data_start = 8 + n;
  const uint64_t data_size = size - h.data_start;
  HeaderBuilder builder(ctx, h, data_size, n);
  if (!json::sax_parse(bytes + 8, bytes + 8 + n, &builder, json::input_format_t::json, /*strict=*/true,
                       /*ignore_comments=*/false)) {
    // a header that begins like a JSON object is a damaged safetensors file, whatever its first bytes
    const uint8_t* p = bytes + 8;
    while (p < bytes + 8 + n && (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r')) ++p;
    if (p == bytes + 8 + n || *p != '{') reject_other_format();
    ctx.header("not valid JSON: " + printable(builder.syntax_error(), 300));
  }
  if (!builder.root().is_object()) ctx.header("not a JSON object (got " + std::string(builder.root().type_name()) + ")");
  builder.rethrow_entry_error();

  // Writers order header keys arbitrarily: sort by offset, then the tensors must tile the buffer.
  std::sort(h.tensors.begin(), h.tensors.end(), [](const TensorInfo& a, const TensorInfo& b) {
    if (a.begin != b.begin) return a.begin < b.begin;
    if (a.end != b.end) return a.end < b.end;
    return a.name < b.name;
  });
  uint64_t pos = 0;
  const TensorInfo* prev = nullptr;
  for (const TensorInfo& t : h.tensors) {
    if (t.begin > pos)
      ctx.tensor(t.name, "gap of " + std::to_string(t.begin - pos) + " unused bytes before it (data_offsets begin " +
                             std::to_string(t.begin) + ", previous tensor ends at " + std::to_string(pos) + ")");
    if (t.begin < pos)
      ctx.tensor(t.name, "data_offsets [" + std::to_string(t.begin) + ", " + std::to_string(t.end) +
                             "] overlap tensor '" + printable(prev->name) + "' (ends at " + std::to_string(pos) +
                             ")");
    pos = t.end;
    prev = &t;
  }
  if (pos != data_size)
    ctx.header(std::to_string(data_size - pos) + " trailing bytes after the last tensor (data buffer is " +
               std::to_string(data_size) + " bytes, tensors cover " + std::to_string(pos) + ")");
  return h;
}

}  // namespace lycoris::io
