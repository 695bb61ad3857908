// safetensors header parser and validator (no torch: the fuzzer links only this and nlohmann-json).
#include "lycoris/io/header.hpp"

#include <algorithm>
#include <cstdio>
#include <limits>
#include <nlohmann/json.hpp>
#include <set>

#include "lycoris/error.hpp"

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

// Thrown from inside the JSON parser callback (duplicate key, nesting); turned into FormatError.
struct Reject {
  std::string where, reason;  // where: "" (header) or the tensor name
  bool tensor;
};

struct Ctx {
  const std::string& file;
  [[noreturn]] void header(const std::string& reason) const {
    throw FormatError(file + ": header: " + reason);
  }
  [[noreturn]] void tensor(const std::string& name, const std::string& reason) const {
    throw FormatError(file + ": tensor '" + printable(name) + "': " + reason);
  }
};

// Duplicate keys at any level (nlohmann silently keeps the last one) and nesting deeper than a valid
// header ever needs (root object → entry object → shape array) are rejected while parsing.
class Guard {
 public:
  bool operator()(int /*depth*/, json::parse_event_t event, json& parsed) {
    switch (event) {
      case json::parse_event_t::object_start:
      case json::parse_event_t::array_start: {
        Frame f;
        f.object = event == json::parse_event_t::object_start;
        if (!stack_.empty()) f.name = stack_.size() == 1 ? stack_.back().last_key : stack_[1].name;
        if (stack_.size() >= 3) reject(f.name, "JSON nested deeper than a safetensors header allows", stack_[0].object);
        stack_.push_back(std::move(f));
        break;
      }
      case json::parse_event_t::object_end:
      case json::parse_event_t::array_end:
        if (!stack_.empty()) stack_.pop_back();
        break;
      case json::parse_event_t::key: {
        if (stack_.empty()) break;
        Frame& f = stack_.back();
        const std::string& key = parsed.get_ref<const std::string&>();
        if (!f.keys.insert(key).second) {
          if (stack_.size() == 1) {
            if (key == kMetadata) reject("", "duplicate key '__metadata__'", false);
            reject(key, "duplicate tensor name", true);
          }
          reject(f.name, (f.name == kMetadata ? "duplicate key '" : "duplicate field '") + printable(key) + "'",
                 true);
        }
        f.last_key = key;
        break;
      }
      case json::parse_event_t::value:
        break;
    }
    return true;
  }

 private:
  struct Frame {
    bool object = true;
    std::string name;  // tensor name (or __metadata__) this frame belongs to; "" for the root
    std::string last_key;
    std::set<std::string> keys;
  };
  // in_entry: the problem is inside the value stored under `name` (a tensor entry or __metadata__).
  [[noreturn]] static void reject(const std::string& name, const std::string& reason, bool in_entry) {
    if (in_entry && name == kMetadata) throw Reject{"", "__metadata__: " + reason, false};
    throw Reject{name, reason, in_entry};
  }
  std::vector<Frame> stack_;
};

std::string number_text(const json& v) { return printable(v.dump(), 40); }

// A JSON value that must be a non-negative integer ≤ limit; `what` names it in the message.
uint64_t non_negative(const Ctx& ctx, const std::string& name, const json& v, const std::string& what,
                      uint64_t limit) {
  if (v.is_number_unsigned()) {
    uint64_t x = v.get<uint64_t>();
    if (x > limit) ctx.tensor(name, what + " " + std::to_string(x) + " is too large");
    return x;
  }
  if (v.is_number_integer()) ctx.tensor(name, "negative " + what + " " + number_text(v));
  if (v.is_number_float())
    ctx.tensor(name, what + " " + number_text(v) + " is not an integer in the 64-bit range");
  ctx.tensor(name, what + " is not an integer (got " + std::string(v.type_name()) + ")");
}

std::string shape_text(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
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

}  // namespace

Header parse_header(const uint8_t* bytes, size_t size, const std::string& file) {
  const Ctx ctx{file};
  if (size == 0) ctx.header("empty file");
  if (size < 8) ctx.header("file is " + std::to_string(size) + " bytes, too short for the 8-byte header length");
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | bytes[i];  // little-endian
  if (n > kMaxHeaderSize)
    ctx.header("header length " + std::to_string(n) + " exceeds the " + std::to_string(kMaxHeaderSize) +
               "-byte limit");
  if (n > size - 8)
    ctx.header("header length " + std::to_string(n) + " runs past the end of the file (" + std::to_string(size) +
               " bytes)");

  json root;
  try {
    Guard guard;
    root = json::parse(bytes + 8, bytes + 8 + n, std::ref(guard), /*allow_exceptions=*/true,
                       /*ignore_comments=*/false);
  } catch (const Reject& r) {
    if (r.tensor) ctx.tensor(r.where, r.reason);
    ctx.header(r.reason);
  } catch (const json::exception& e) {
    ctx.header("not valid JSON: " + printable(e.what(), 300));
  }
  if (!root.is_object()) ctx.header("not a JSON object (got " + std::string(root.type_name()) + ")");

  Header h;
  h.header_size = n;
  h.data_start = 8 + n;
  const uint64_t data_size = size - h.data_start;
  for (const auto& kv : root.items()) {
    if (kv.key() == kMetadata) {
      const json& m = kv.value();
      if (m.is_null()) continue;  // written by some tools for "no metadata" (the Rust reader accepts it)
      if (!m.is_object()) ctx.header("__metadata__ is not an object (got " + std::string(m.type_name()) + ")");
      for (const auto& mk : m.items()) {
        if (!mk.value().is_string())
          ctx.header("__metadata__ key '" + printable(mk.key()) + "': value is not a string (got " +
                     mk.value().type_name() + ")");
        h.metadata.emplace(mk.key(), mk.value().get<std::string>());
      }
      continue;
    }
    h.tensors.push_back(parse_entry(ctx, kv.key(), kv.value(), data_size));
  }

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
