#include "io/safetensors.h"

#include <cstring>
#include <nlohmann/json.hpp>
#include <string_view>

#include "core/error.h"
#include "core/fs.h"

namespace mxn {
namespace {

const char* st_dtype(DType t) {
  switch (t) {
    case DType::f32:
      return "F32";
    case DType::bf16:
      return "BF16";
    case DType::f16:
      return "F16";
    case DType::i32:
      return "I32";
  }
  return "?";
}

}  // namespace

namespace {
// The 8-byte length and the JSON header; the tensors' bytes follow in map order.
std::string safetensors_header(const TensorMap& tensors,
                               const std::map<std::string, std::string>& metadata) {
  nlohmann::ordered_json h = nlohmann::ordered_json::object();
  if (!metadata.empty()) h["__metadata__"] = metadata;
  uint64_t off = 0;
  for (const auto& [name, t] : tensors) {
    h[name] = {{"dtype", st_dtype(t.dtype)},
               {"shape", t.shape},
               {"data_offsets", {off, off + t.bytes.size()}}};
    off += t.bytes.size();
  }
  std::string header = h.dump();
  header.append((8 - header.size() % 8) % 8, ' ');
  std::string out(8, '\0');
  const uint64_t n = header.size();
  std::memcpy(out.data(), &n, 8);
  return out + header;
}
}  // namespace

std::string safetensors_serialize(const TensorMap& tensors,
                                  const std::map<std::string, std::string>& metadata) {
  std::string out = safetensors_header(tensors, metadata);
  for (const auto& [name, t] : tensors)
    out.append(reinterpret_cast<const char*>(t.bytes.data()), t.bytes.size());
  return out;
}

uint64_t safetensors_save(const std::string& path, const TensorMap& tensors,
                          const std::map<std::string, std::string>& metadata) {
  const std::string header = safetensors_header(tensors, metadata);
  std::vector<std::string_view> parts{header};
  for (const auto& [name, t] : tensors)
    parts.emplace_back(reinterpret_cast<const char*>(t.bytes.data()), t.bytes.size());
  write_file_atomic(path, parts);  // no second copy of the tensors in memory
  return checksum_of(parts);
}

namespace {

struct Entry {
  std::string name;
  DType dtype;
  Shape shape;
  uint64_t begin, size;  // bytes from the file's start
};

// The tensors of a safetensors file in memory, validated (their bytes inside the file).
std::vector<Entry> safetensors_index(std::string_view bytes, const std::string& path) {
  auto corrupt = [&](const std::string& why) -> Error {
    return Error("checkpoint file '" + path + "' is corrupt or truncated: " + why);
  };
  if (bytes.size() < 8) throw corrupt("shorter than the 8-byte header length");
  uint64_t n;
  std::memcpy(&n, bytes.data(), 8);
  if (n > bytes.size() - 8)
    throw corrupt("header length " + std::to_string(n) + " exceeds the file");
  nlohmann::json h;
  try {
    h = nlohmann::json::parse(bytes.begin() + 8, bytes.begin() + 8 + int64_t(n));
  } catch (const std::exception& e) {
    throw corrupt(std::string("header is not valid JSON (") + e.what() + ")");
  }
  if (!h.is_object()) throw corrupt("header is not a JSON object");
  const uint64_t data_start = 8 + n, data_size = bytes.size() - data_start;
  std::vector<Entry> out;
  for (auto& [name, e] : h.items()) {
    if (name == "__metadata__") continue;
    try {
      const std::string dt = e.at("dtype").get<std::string>();
      DType t;
      if (dt == "F32")
        t = DType::f32;
      else if (dt == "BF16")
        t = DType::bf16;
      else if (dt == "F16")
        t = DType::f16;
      else if (dt == "I32")
        t = DType::i32;
      else
        throw corrupt("tensor '" + name + "' has unsupported dtype " + dt);
      // Integers only (a float or a negative number is corrupt, not converted), and a size that
      // fits in the file before anything is allocated.
      auto integers = [&corrupt](const nlohmann::json& entry, const std::string& name,
                                 const char* key) {
        const nlohmann::json& a = entry.at(key);
        if (!a.is_array()) throw corrupt("tensor '" + name + "': '" + key + "' is not a list");
        std::vector<uint64_t> v;
        for (const auto& x : a) {
          if (!x.is_number_unsigned())
            throw corrupt("tensor '" + name + "': '" + key + "' holds " + x.dump() +
                          ", expected non-negative integers");
          v.push_back(x.get<uint64_t>());
        }
        return v;
      };
      Shape shape;
      uint64_t bytes_needed = dtype_size(t);
      for (uint64_t d : integers(e, name, "shape")) {
        if (d > data_size || (d > 0 && bytes_needed > data_size / d))
          throw corrupt("tensor '" + name +
                        "' has data offsets outside the file (its shape needs more bytes than the "
                        "file's " +
                        std::to_string(data_size) + ")");
        bytes_needed *= d;
        shape.push_back(int64_t(d));
      }
      const std::vector<uint64_t> off = integers(e, name, "data_offsets");
      if (off.size() != 2 || off[0] > off[1] || off[1] > data_size ||
          off[1] - off[0] != bytes_needed)
        throw corrupt("tensor '" + name +
                      "' has data offsets outside the file or of the wrong size");
      out.push_back({name, t, shape, data_start + off[0], bytes_needed});
    } catch (const nlohmann::json::exception& ex) {
      throw corrupt("tensor '" + name + "': " + ex.what());
    }
  }
  return out;
}

}  // namespace

TensorMap safetensors_parse(const std::string& bytes, const std::string& path) {
  TensorMap out;
  for (const Entry& e : safetensors_index(bytes, path)) {
    HostTensor ht(e.shape, e.dtype);
    std::memcpy(ht.bytes.data(), bytes.data() + e.begin, e.size);
    out.emplace(e.name, std::move(ht));
  }
  return out;
}

TensorMap safetensors_load(const std::string& path) {
  return safetensors_parse(read_file(path, "checkpoint file"), path);
}

void safetensors_visit(const std::string& path,
                       const std::function<void(const std::string& name, DType dtype,
                                                const Shape& shape, const char* bytes)>& fn) {
  const MappedFile m(path, "weights file");
  const std::string_view all(m.data() ? m.data() : "", m.size());
  for (const Entry& e : safetensors_index(all, path)) {
    fn(e.name, e.dtype, e.shape, m.data() + e.begin);
    m.release(e.begin, e.size);  // read once: the pages leave this process's memory
  }
}

}  // namespace mxn
