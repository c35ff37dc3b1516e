#include "io/gguf.h"

#include <cmath>
#include <cstring>
#include <fstream>

#include "core/dtype.h"
#include "core/error.h"
#include "core/fs.h"

namespace mxn {
namespace {

constexpr uint32_t kMagic = 0x46554747;  // "GGUF" read as a little-endian u32
constexpr uint32_t kVersion = 3;
constexpr int kBlock = 32;                   // values a Q8_0 or Q4_0 block holds
constexpr int kQ8Bytes = 34, kQ4Bytes = 18;  // an f16 scale and 32 int8, or 32 4-bit two a byte

size_t scalar_size(GgufType t) {
  switch (t) {
    case GgufType::u8:
    case GgufType::i8:
    case GgufType::boolean:
      return 1;
    case GgufType::u16:
    case GgufType::i16:
      return 2;
    case GgufType::u32:
    case GgufType::i32:
    case GgufType::f32:
      return 4;
    case GgufType::u64:
    case GgufType::i64:
    case GgufType::f64:
      return 8;
    default:
      return 0;
  }
}

class Writer {
 public:
  std::string out;
  template <typename T>
  void pod(T v) {
    out.append(reinterpret_cast<const char*>(&v), sizeof v);
  }
  void str(const std::string& s) {
    pod<uint64_t>(s.size());
    out += s;
  }
  void scalar(GgufType t, const nlohmann::json& v) {
    switch (t) {
      case GgufType::u8:
        pod<uint8_t>(v.get<uint8_t>());
        break;
      case GgufType::i8:
        pod<int8_t>(v.get<int8_t>());
        break;
      case GgufType::u16:
        pod<uint16_t>(v.get<uint16_t>());
        break;
      case GgufType::i16:
        pod<int16_t>(v.get<int16_t>());
        break;
      case GgufType::u32:
        pod<uint32_t>(v.get<uint32_t>());
        break;
      case GgufType::i32:
        pod<int32_t>(v.get<int32_t>());
        break;
      case GgufType::f32:
        pod<float>(v.get<float>());
        break;
      case GgufType::boolean:
        pod<uint8_t>(v.get<bool>() ? 1 : 0);
        break;
      case GgufType::string:
        str(v.get<std::string>());
        break;
      case GgufType::u64:
        pod<uint64_t>(v.get<uint64_t>());
        break;
      case GgufType::i64:
        pod<int64_t>(v.get<int64_t>());
        break;
      case GgufType::f64:
        pod<double>(v.get<double>());
        break;
      case GgufType::array:
        throw Error("GGUF: nested arrays are not written");
    }
  }
};

class Reader {
 public:
  Reader(const char* d, size_t n, const std::string& path) : d_(d), n_(n), path_(path) {}
  size_t pos = 0;
  [[noreturn]] void fail(const std::string& what) const {
    throw Error(path_ + ": not a valid GGUF file: " + what + " (at byte " + std::to_string(pos) +
                ")");
  }
  void need(size_t k, const char* what) const {
    if (k > n_ - pos) fail(std::string("truncated ") + what);
  }
  template <typename T>
  T pod(const char* what) {
    need(sizeof(T), what);
    T v;
    std::memcpy(&v, d_ + pos, sizeof v);
    pos += sizeof v;
    return v;
  }
  std::string str(const char* what) {
    const uint64_t len = pod<uint64_t>(what);
    need(len, what);
    std::string s(d_ + pos, len);
    pos += len;
    return s;
  }
  nlohmann::json scalar(GgufType t) {
    switch (t) {
      case GgufType::u8:
        return pod<uint8_t>("u8");
      case GgufType::i8:
        return pod<int8_t>("i8");
      case GgufType::u16:
        return pod<uint16_t>("u16");
      case GgufType::i16:
        return pod<int16_t>("i16");
      case GgufType::u32:
        return pod<uint32_t>("u32");
      case GgufType::i32:
        return pod<int32_t>("i32");
      case GgufType::f32:
        return pod<float>("f32");
      case GgufType::boolean:
        return pod<uint8_t>("bool") != 0;
      case GgufType::u64:
        return pod<uint64_t>("u64");
      case GgufType::i64:
        return pod<int64_t>("i64");
      case GgufType::f64:
        return pod<double>("f64");
      case GgufType::string: {
        // Metadata strings are text; invalid UTF-8 is kept byte for byte as an escaped string.
        std::string s = str("string");
        return nlohmann::json(s);
      }
      default:
        fail("unknown value type " + std::to_string(uint32_t(t)));
    }
  }
  size_t size() const { return n_; }

 private:
  const char* d_;
  size_t n_;
  const std::string& path_;
};

}  // namespace

GgmlType ggml_type_from_name(const std::string& n) {
  if (n == "f32") return GgmlType::f32;
  if (n == "f16") return GgmlType::f16;
  if (n == "bf16") return GgmlType::bf16;
  if (n == "q8_0" || n == "Q8_0") return GgmlType::q8_0;
  if (n == "q4_0" || n == "Q4_0") return GgmlType::q4_0;
  throw Error("unknown weight type '" + n + "' (expected f32, f16, bf16, q8_0 or q4_0)");
}

bool ggml_blocked(GgmlType t) { return t == GgmlType::q8_0 || t == GgmlType::q4_0; }

size_t ggml_row_bytes(GgmlType t, int64_t n) {
  if (t == GgmlType::q8_0) return size_t(n / kBlock) * kQ8Bytes;
  if (t == GgmlType::q4_0) return size_t(n / kBlock) * kQ4Bytes;
  return size_t(n) * (t == GgmlType::f32 ? 4 : 2);
}

int64_t GgufTensor::numel() const {
  int64_t n = 1;
  for (int64_t d : ne) n *= d;
  return n;
}

const GgufKV* GgufFile::find(const std::string& key) const {
  for (const GgufKV& e : kv)
    if (e.key == key) return &e;
  return nullptr;
}

const GgufTensor* GgufFile::tensor(const std::string& name) const {
  for (const GgufTensor& t : tensors)
    if (t.name == name) return &t;
  return nullptr;
}

void GgufFile::set(const std::string& key, GgufType type, nlohmann::json value, GgufType elem) {
  for (GgufKV& e : kv)
    if (e.key == key) {
      e = {key, type, elem, std::move(value)};
      return;
    }
  kv.push_back({key, type, elem, std::move(value)});
}

std::string gguf_serialize(const GgufFile& f) {
  size_t align = 32;
  if (const GgufKV* a = f.find("general.alignment")) align = a->value.get<uint32_t>();
  Writer w;
  w.pod<uint32_t>(kMagic);
  w.pod<uint32_t>(kVersion);
  w.pod<uint64_t>(f.tensors.size());
  w.pod<uint64_t>(f.kv.size());
  for (const GgufKV& e : f.kv) {
    w.str(e.key);
    w.pod<uint32_t>(uint32_t(e.type));
    if (e.type != GgufType::array) {
      w.scalar(e.type, e.value);
      continue;
    }
    w.pod<uint32_t>(uint32_t(e.elem));
    w.pod<uint64_t>(e.value.size());
    for (const auto& v : e.value) w.scalar(e.elem, v);
  }
  uint64_t offset = 0;
  for (const GgufTensor& t : f.tensors) {
    w.str(t.name);
    w.pod<uint32_t>(uint32_t(t.ne.size()));
    for (int64_t d : t.ne) w.pod<uint64_t>(uint64_t(d));
    w.pod<uint32_t>(uint32_t(t.type));
    w.pod<uint64_t>(offset);
    offset += (t.view().size() + align - 1) / align * align;
  }
  w.out.resize((w.out.size() + align - 1) / align * align, '\0');
  for (const GgufTensor& t : f.tensors) {
    w.out += t.view();
    w.out.resize((w.out.size() + align - 1) / align * align, '\0');
  }
  return std::move(w.out);
}

GgufFile gguf_parse(const char* data, size_t size, const std::string& path) {
  Reader r(data, size, path);
  if (r.pod<uint32_t>("magic") != kMagic) r.fail("the file does not start with 'GGUF'");
  const uint32_t version = r.pod<uint32_t>("version");
  if (version != 2 && version != 3)
    r.fail("version " + std::to_string(version) + ", expected 2 or 3");
  const uint64_t n_tensors = r.pod<uint64_t>("tensor count");
  const uint64_t n_kv = r.pod<uint64_t>("metadata count");
  // Each entry takes at least 8 bytes, which bounds the counts by the file size.
  if (n_tensors > size / 8 || n_kv > size / 8)
    r.fail("tensor or metadata count larger than the file");
  GgufFile f;
  for (uint64_t i = 0; i < n_kv; ++i) {
    GgufKV e;
    e.key = r.str("metadata key");
    e.type = GgufType(r.pod<uint32_t>("value type"));
    if (e.type != GgufType::array) {
      e.value = r.scalar(e.type);
    } else {
      e.elem = GgufType(r.pod<uint32_t>("array type"));
      const uint64_t n = r.pod<uint64_t>("array length");
      if (e.elem == GgufType::array) r.fail("'" + e.key + "' is an array of arrays");
      const size_t min = e.elem == GgufType::string ? 8 : scalar_size(e.elem);
      if (min == 0)
        r.fail("'" + e.key + "' has unknown element type " + std::to_string(uint32_t(e.elem)));
      if (n > (r.size() - r.pos) / min) r.fail("'" + e.key + "' is longer than the file");
      e.value = nlohmann::json::array();
      for (uint64_t k = 0; k < n; ++k) e.value.push_back(r.scalar(e.elem));
    }
    f.kv.push_back(std::move(e));
  }
  uint64_t align = 32;
  if (const GgufKV* a = f.find("general.alignment")) {
    if (!a->value.is_number_unsigned() || a->value.get<uint64_t>() == 0 ||
        (a->value.get<uint64_t>() & (a->value.get<uint64_t>() - 1)) != 0 ||
        a->value.get<uint64_t>() > (1u << 20))
      r.fail("general.alignment must be a power of two");
    align = a->value.get<uint64_t>();
  }
  std::vector<uint64_t> offsets;
  for (uint64_t i = 0; i < n_tensors; ++i) {
    GgufTensor t;
    t.name = r.str("tensor name");
    const uint32_t nd = r.pod<uint32_t>("tensor dims");
    if (nd < 1 || nd > 4)
      r.fail("tensor '" + t.name + "' has " + std::to_string(nd) + " dims, expected 1 to 4");
    uint64_t numel = 1;
    for (uint32_t k = 0; k < nd; ++k) {
      const uint64_t d = r.pod<uint64_t>("tensor shape");
      if (d == 0 || d > (uint64_t(1) << 40) || numel > (uint64_t(1) << 40) / d)
        r.fail("tensor '" + t.name + "' has an impossible shape");
      numel *= d;
      t.ne.push_back(int64_t(d));
    }
    const uint32_t type = r.pod<uint32_t>("tensor type");
    if (type != 0 && type != 1 && type != 2 && type != 8 && type != 30) {
      // ggml's type numbers (ggml.h) of the quantized formats llama.cpp's files hold.
      static const std::pair<uint32_t, const char*> names[] = {
          {3, "Q4_1"},     {6, "Q5_0"},    {7, "Q5_1"},     {9, "Q8_1"},   {10, "Q2_K"},
          {11, "Q3_K"},    {12, "Q4_K"},   {13, "Q5_K"},    {14, "Q6_K"},  {15, "Q8_K"},
          {16, "IQ2_XXS"}, {17, "IQ2_XS"}, {18, "IQ3_XXS"}, {19, "IQ1_S"}, {20, "IQ4_NL"},
          {21, "IQ3_S"},   {22, "IQ2_S"},  {23, "IQ4_XS"},  {29, "IQ1_M"}, {34, "TQ1_0"},
          {35, "TQ2_0"}};
      std::string name;
      for (const auto& [n, s] : names)
        if (n == type) name = std::string(" (") + s + ")";
      r.fail("tensor '" + t.name + "' has ggml type " + std::to_string(type) + name +
             ", which mxn does not compute (it reads f32, f16, bf16, Q8_0 and Q4_0)");
    }
    t.type = GgmlType(type);
    if (ggml_blocked(t.type) && t.ne[0] % kBlock != 0)
      r.fail(std::string(t.type == GgmlType::q8_0 ? "Q8_0" : "Q4_0") + " tensor '" + t.name +
             "' has rows of " + std::to_string(t.ne[0]) + ", not a multiple of 32");
    offsets.push_back(r.pod<uint64_t>("tensor offset"));
    if (offsets.back() % align != 0) r.fail("tensor '" + t.name + "' is not aligned");
    f.tensors.push_back(std::move(t));
  }
  const uint64_t base = (r.pos + align - 1) / align * align;
  for (size_t i = 0; i < f.tensors.size(); ++i) {
    GgufTensor& t = f.tensors[i];
    const size_t bytes = ggml_row_bytes(t.type, t.ne[0]) * size_t(t.numel() / t.ne[0]);
    if (base > size || offsets[i] > size - base || bytes > size - base - offsets[i])
      throw Error(path + ": not a valid GGUF file: tensor '" + t.name +
                  "' lies past the end of the file");
    t.bytes = std::string_view(data + base + offsets[i], bytes);
  }
  return f;
}

GgufFile gguf_load(const std::string& path) {
  auto m = std::make_shared<MappedFile>(path, "GGUF file");
  GgufFile f = gguf_parse(m->data(), m->size(), path);
  f.mapping = m;
  return f;
}

bool is_gguf_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  char magic[4] = {};
  return in.read(magic, 4) && std::memcmp(magic, "GGUF", 4) == 0;
}

std::string ggml_encode(GgmlType t, const float* x, int64_t n) {
  std::string out(ggml_row_bytes(t, n), '\0');
  char* o = out.data();
  switch (t) {
    case GgmlType::f32:
      std::memcpy(o, x, size_t(n) * 4);
      break;
    case GgmlType::f16:
    case GgmlType::bf16:
      for (int64_t i = 0; i < n; ++i) {
        const uint16_t h = t == GgmlType::f16 ? f32_to_f16(x[i]) : f32_to_bf16(x[i]);
        std::memcpy(o + 2 * i, &h, 2);
      }
      break;
    case GgmlType::q8_0:
      for (int64_t b = 0; b < n / kBlock; ++b) {
        const float* v = x + b * kBlock;
        float amax = 0.f;
        for (int i = 0; i < kBlock; ++i) amax = std::max(amax, std::fabs(v[i]));
        const float d = amax / 127.f, id = d != 0.f ? 1.f / d : 0.f;
        const uint16_t dh = f32_to_f16(d);
        char* blk = o + b * kQ8Bytes;
        std::memcpy(blk, &dh, 2);
        for (int i = 0; i < kBlock; ++i) blk[2 + i] = char(int8_t(std::round(v[i] * id)));
      }
      break;
    case GgmlType::q4_0:
      for (int64_t b = 0; b < n / kBlock; ++b) {
        const float* v = x + b * kBlock;
        float amax = 0.f, max = 0.f;  // the first value of the largest magnitude, its sign kept
        for (int i = 0; i < kBlock; ++i)
          if (amax < std::fabs(v[i])) amax = std::fabs(v[i]), max = v[i];
        const float d = max / -8.f, id = d != 0.f ? 1.f / d : 0.f;
        // x id + 8.5 rounded once (the exact product in double, the sum rounded to float), as
        // ggml's reference compiled with FMA and the gguf package compute it.
        auto q = [id](float v) {
          const float t = float(double(v) * double(id) + 8.5);
          return uint8_t(std::min(15.f, std::trunc(t)));
        };
        const uint16_t dh = f32_to_f16(d);
        char* blk = o + b * kQ4Bytes;
        std::memcpy(blk, &dh, 2);
        for (int j = 0; j < kBlock / 2; ++j)
          blk[2 + j] = char(q(v[j]) | uint8_t(q(v[kBlock / 2 + j]) << 4));
      }
      break;
  }
  return out;
}

void ggml_decode(GgmlType t, std::string_view bytes, int64_t n, float* x) {
  const char* p = bytes.data();
  switch (t) {
    case GgmlType::f32:
      std::memcpy(x, p, size_t(n) * 4);
      return;
    case GgmlType::f16:
    case GgmlType::bf16:
      for (int64_t i = 0; i < n; ++i) {
        uint16_t h;
        std::memcpy(&h, p + 2 * i, 2);
        x[i] = t == GgmlType::f16 ? f16_to_f32(h) : bf16_to_f32(h);
      }
      return;
    case GgmlType::q8_0:
      for (int64_t b = 0; b < n / kBlock; ++b) {
        uint16_t dh;
        std::memcpy(&dh, p + b * kQ8Bytes, 2);
        const float d = f16_to_f32(dh);
        for (int i = 0; i < kBlock; ++i)
          x[b * kBlock + i] = d * float(int8_t(p[b * kQ8Bytes + 2 + i]));
      }
      return;
    case GgmlType::q4_0:
      for (int64_t b = 0; b < n / kBlock; ++b) {
        const char* blk = p + b * kQ4Bytes;
        uint16_t dh;
        std::memcpy(&dh, blk, 2);
        const float d = f16_to_f32(dh);
        float* y = x + b * kBlock;
        for (int j = 0; j < kBlock / 2; ++j) {
          const auto byte = uint8_t(blk[2 + j]);
          y[j] = d * float(int(byte & 15) - 8);
          y[kBlock / 2 + j] = d * float(int(byte >> 4) - 8);
        }
      }
      return;
  }
}

}  // namespace mxn
