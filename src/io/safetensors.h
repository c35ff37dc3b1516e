#pragma once
// safetensors (Hugging Face's weight format): an 8-byte little-endian header length, a JSON
// header naming each tensor's dtype, shape and byte range, then the raw data.
#include <functional>
#include <map>
#include <string>

#include "core/tensor.h"

namespace mxn {

using TensorMap = std::map<std::string, HostTensor>;

std::string safetensors_serialize(const TensorMap& tensors,
                                  const std::map<std::string, std::string>& metadata = {});
// Written atomically, straight from the tensors (no serialised copy in memory). Returns the
// XXH3-64 checksum of the file's bytes.
uint64_t safetensors_save(const std::string& path, const TensorMap& tensors,
                          const std::map<std::string, std::string>& metadata = {});
// Throws an Error naming the file and what is wrong with it (truncated, bad header, ...).
TensorMap safetensors_load(const std::string& path);
TensorMap safetensors_parse(const std::string& bytes, const std::string& path);
// Each tensor of a file in turn, read from a memory map (its bytes valid during the call, then
// dropped from memory): a model's weights go to a device without a host copy of the file.
void safetensors_visit(const std::string& path,
                       const std::function<void(const std::string& name, DType dtype,
                                                const Shape& shape, const char* bytes)>& fn);

}  // namespace mxn
