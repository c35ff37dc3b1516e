#pragma once
// GGUF v3, llama.cpp's model file: a header of typed key/value metadata and tensor descriptors,
// then the tensors' data, each aligned (general.alignment, default 32). Tensor shapes are ggml's
// `ne`, fastest-varying dimension first: a PyTorch (out, in) weight is ne = {in, out}.
// Read and written here for the types mxn converts: f32, f16, bf16, Q8_0 and Q4_0.
#include <cstdint>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>
#include <vector>

namespace mxn {

enum class GgmlType : uint32_t { f32 = 0, f16 = 1, q4_0 = 2, q8_0 = 8, bf16 = 30 };
GgmlType ggml_type_from_name(const std::string& name);  // f32|f16|bf16|q8_0|q4_0, else Error
bool ggml_blocked(GgmlType t);                          // Q8_0, Q4_0: rows in blocks of 32
// Bytes of a row of `n` elements (Q8_0, Q4_0: n a multiple of 32).
size_t ggml_row_bytes(GgmlType t, int64_t n);

// GGUF value types, as the format numbers them.
enum class GgufType : uint32_t {
  u8 = 0,
  i8 = 1,
  u16 = 2,
  i16 = 3,
  u32 = 4,
  i32 = 5,
  f32 = 6,
  boolean = 7,
  string = 8,
  array = 9,
  u64 = 10,
  i64 = 11,
  f64 = 12
};

struct GgufKV {
  std::string key;
  GgufType type = GgufType::string;
  GgufType elem = GgufType::u8;  // for arrays
  nlohmann::json value;          // number, bool, string, or an array of them
};

struct GgufTensor {
  std::string name;
  std::vector<int64_t> ne;
  GgmlType type = GgmlType::f32;
  std::string data;        // ggml's bytes for the type, when written or copied
  std::string_view bytes;  // the bytes: `data`, or a view into the file gguf_load mapped
  int64_t numel() const;
  std::string_view view() const { return data.empty() ? bytes : std::string_view(data); }
};

struct GgufFile {
  std::shared_ptr<const void> mapping;  // keeps the tensors' views valid (gguf_load)
  std::vector<GgufKV> kv;
  std::vector<GgufTensor> tensors;
  const GgufKV* find(const std::string& key) const;
  const GgufTensor* tensor(const std::string& name) const;
  void set(const std::string& key, GgufType type, nlohmann::json value,
           GgufType elem = GgufType::u8);
};

std::string gguf_serialize(const GgufFile& f);
// Every bound is checked: a truncated or corrupt file is an Error naming `path` and what is wrong.
// Tensors view `data`, which must outlive the result; gguf_load maps the file and keeps it.
GgufFile gguf_parse(const char* data, size_t size, const std::string& path);
GgufFile gguf_load(const std::string& path);
bool is_gguf_file(const std::string& path);  // starts with the magic "GGUF"

// f32 values into ggml bytes of `t`, rounded as ggml's reference quantizer rounds them (Q8_0:
// d = amax / 127 as f16, q = round-half-away(x / d); Q4_0: d = the value of largest magnitude
// / -8 as f16, q = min(15, trunc(x / d + 8.5)) with the product taken exactly, as an FMA and the
// gguf package take it), and back (Q4_0: (q - 8) d).
std::string ggml_encode(GgmlType t, const float* x, int64_t n);
void ggml_decode(GgmlType t, std::string_view bytes, int64_t n, float* out);

}  // namespace mxn
