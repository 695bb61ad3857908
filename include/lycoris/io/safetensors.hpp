// safetensors reading (mmap, zero-copy, validated) and writing (streaming, atomic).
// Format: 8-byte little-endian header length N, N bytes of JSON header, then the data buffer.
#pragma once
#include <torch/types.h>

#include <cstdint>
#include <initializer_list>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "lycoris/io/header.hpp"

namespace lycoris::io {

// torch dtype of a safetensors dtype (F8 types: FormatError unless converted on read).
torch::ScalarType to_torch(DType dtype);
// safetensors dtype of a torch dtype; FormatError for types safetensors cannot store.
DType from_torch(torch::ScalarType type);

// A validated, memory-mapped safetensors file. Cheap to copy (shared mapping).
// Tensors returned by tensor() are zero-copy views of the mapping (read-only memory: do not write
// into them) and keep the mapping alive after the SafetensorsFile is gone.
class SafetensorsFile {
 public:
  // mmap + full header validation (FormatError "<path>: <reason>"); IOError if it cannot be opened or is
  // not a regular file (a FIFO, device or directory is refused at once, never waited on).
  static SafetensorsFile open(const std::string& path);

  const std::string& path() const;
  const Header& header() const;  // tensors in file order, metadata
  const std::vector<TensorInfo>& tensors() const { return header().tensors; }
  const std::map<std::string, std::string>& metadata() const { return header().metadata; }
  bool contains(const std::string& name) const;
  const TensorInfo& info(const std::string& name) const;  // KeyError naming the file if absent
  std::vector<std::string> names() const;                 // in file (offset) order

  // Zero-copy CPU tensor backed by the mapping. Exceptions (always an owning CPU copy instead): data not
  // aligned to the item size (data_offsets need not be aligned), F8 dtypes (decoded to F32), empty
  // tensors. BOOL bytes other than 0/1 are a FormatError.
  torch::Tensor tensor(const std::string& name) const;
  // Converted to dtype/device: a copy, except a view of the mapping when dtype and device already match
  // and copy is false (copy = true always gives a writable tensor of its own).
  torch::Tensor tensor(const std::string& name, torch::ScalarType dtype, torch::Device device = torch::kCPU,
                       bool copy = false) const;
  // Every tensor (zero-copy), by name.
  std::map<std::string, torch::Tensor> all() const;
  // Raw bytes of a tensor inside the mapping.
  const uint8_t* data(const TensorInfo& info) const;
  uint64_t file_size() const;

 private:
  struct Mapping;
  std::shared_ptr<Mapping> map_;
};

struct TensorDecl {
  std::string name;
  DType dtype;
  std::vector<int64_t> shape;
};

// Streaming, atomic writer: declare every tensor up front (the header needs all shapes), then write
// each tensor's data in declaration order, then commit(). Data goes to an unnamed temporary file in the
// destination directory (O_TMPFILE; "<path>.tmp-<pid>-<n>" where the filesystem lacks it); commit() fsyncs,
// names and renames it over `path`. If commit() is never reached (error, exception, kill) the destination
// is untouched and no temporary is left (a named one: removed by the destructor, or by the handler of
// remove_temporaries_on_signals()).
// Header: keys sorted like the reference writer (by dtype alignment then name is NOT required; we write
// in declaration order), padded with spaces to a multiple of 8 bytes.
class SafetensorsWriter {
 public:
  SafetensorsWriter(std::string path, std::vector<TensorDecl> tensors,
                    std::map<std::string, std::string> metadata = {});
  ~SafetensorsWriter();
  SafetensorsWriter(const SafetensorsWriter&) = delete;
  SafetensorsWriter& operator=(const SafetensorsWriter&) = delete;

  // Write the next declared tensor (name must match the next declaration; dtype/shape must match;
  // the tensor may live on any device and need not be contiguous).
  void write(const std::string& name, const torch::Tensor& tensor);
  // Raw bytes of the next declared tensor (exact byte length).
  void write_bytes(const std::string& name, const void* data, uint64_t size);
  void commit();

 private:
  struct State;
  std::unique_ptr<State> state_;
};

// Installs handlers for `signals` that remove the named temporary files of every writer in progress (see
// SafetensorsWriter) and then end the process by the same signal. For programs, such as the CLI: a library
// does not take over its host's signals by itself. (SIGKILL cannot be caught: there the temporary is
// unnamed wherever the filesystem supports O_TMPFILE, so nothing is left either.)
void remove_temporaries_on_signals(std::initializer_list<int> signals);

// The exact size of the file SafetensorsWriter writes for `tensors` and `metadata`: 8-byte length, header padded
// to 8 bytes, data. Errors as the writer's (FormatError/ShapeError naming `path`).
uint64_t safetensors_size(const std::string& path, const std::vector<TensorDecl>& tensors,
                          const std::map<std::string, std::string>& metadata = {});
// An upper bound on the header bytes one tensor's entry adds (its comma included) when no data offset in the file
// exceeds `max_offset`; exact but for the digits of the offsets.
uint64_t header_entry_bound(const std::string& path, const TensorDecl& tensor, uint64_t max_offset);

// Convenience: write all tensors (in the given order) atomically.
void save_file(const std::string& path, const std::vector<std::pair<std::string, torch::Tensor>>& tensors,
               const std::map<std::string, std::string>& metadata = {});

}  // namespace lycoris::io
