#include "io/hf_folder.h"

#include <filesystem>
#include <map>
#include <set>

#include "core/error.h"
#include "core/fs.h"

namespace mxn {
namespace fs = std::filesystem;

DecoderConfig load_hf_config(const std::string& dir) {
  if (!fs::is_directory(dir)) throw Error("model folder '" + dir + "' does not exist");
  const std::string path = (fs::path(dir) / "config.json").string();
  if (!fs::exists(path))
    throw Error("model folder '" + dir +
                "' has no config.json (expected a Hugging Face model folder)");
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(read_file(path, "model config"));
  } catch (const nlohmann::json::exception& e) {
    throw Error(path + ": not valid JSON (" + e.what() + ")");
  }
  return decoder_config_from_hf(j, path);
}

namespace {
// The folder's safetensors files (one, or the shards its index names).
std::vector<std::string> hf_weight_files(const std::string& dir) {
  const fs::path d(dir);
  std::vector<std::string> files;
  const fs::path index = d / "model.safetensors.index.json";
  if (fs::exists(index)) {
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(read_file(index.string(), "weight index"));
    } catch (const nlohmann::json::exception& e) {
      throw Error(index.string() + ": not valid JSON (" + e.what() + ")");
    }
    if (!j.contains("weight_map") || !j["weight_map"].is_object())
      throw Error(index.string() + ": no 'weight_map' object");
    std::set<std::string> shards;
    for (auto& [name, file] : j["weight_map"].items()) {
      if (!file.is_string() || file.get<std::string>().find('/') != std::string::npos)
        throw Error(index.string() + ": tensor '" + name + "' maps to " + file.dump() +
                    ", expected a file name in the folder");
      shards.insert(file.get<std::string>());
    }
    for (const std::string& s : shards) {
      if (!fs::exists(d / s))
        throw Error(index.string() + " names shard '" + s + "', which is not in the folder");
      files.push_back((d / s).string());
    }
  } else if (fs::exists(d / "model.safetensors")) {
    files.push_back((d / "model.safetensors").string());
  } else {
    throw Error("model folder '" + dir +
                "' has no model.safetensors or model.safetensors.index.json (only safetensors "
                "weights are read; convert pytorch_model.bin with transformers first)");
  }
  return files;
}
}  // namespace

TensorMap load_hf_weights(const std::string& dir) {
  TensorMap out;
  for (const std::string& f : hf_weight_files(dir))
    for (auto& [name, t] : safetensors_load(f)) out[name] = widen_to_f32(std::move(t));
  return out;
}

bool stacked_experts(const std::string& name, const Shape& shape) {
  return shape.size() == 3 && name.find(".experts.") != std::string::npos;
}

std::string expert_name(const std::string& stacked, int64_t e) {
  const size_t at = stacked.rfind("experts.") + 8;
  return stacked.substr(0, at) + std::to_string(e) + "." + stacked.substr(at);
}

bool expert_of(const std::string& name, std::string& stacked, int64_t& e) {
  const size_t at = name.rfind(".experts.");
  if (at == std::string::npos) return false;
  size_t i = at + 9, end = i;
  while (end < name.size() && end - i < 9 && name[end] >= '0' && name[end] <= '9') ++end;
  if (end == i || end >= name.size() || name[end] != '.') return false;
  e = std::stoll(name.substr(i, end - i));
  stacked = name.substr(0, i) + name.substr(end + 1);
  return true;
}

namespace {
const std::string kKvB = "kv_b_proj.weight", kKB = "k_b_proj.weight", kVB = "v_b_proj.weight";
std::string with_leaf(const std::string& name, const std::string& from, const std::string& to) {
  return name.substr(0, name.size() - from.size()) + to;
}
// MLA's kv_b_proj (H (dn + dv), R) as mxn keeps it: k_b (H, dn, R) and v_b (H, dv, R), head by
// head; `from_kv` false: back.
void split_kv_b(const float* kv, float* k, float* v, int64_t H, int64_t dn, int64_t dv, int64_t R,
                bool from_kv = true) {
  for (int64_t h = 0; h < H; ++h) {
    float* rows = const_cast<float*>(kv) + h * (dn + dv) * R;
    if (from_kv) {
      std::copy_n(rows, dn * R, k + h * dn * R);
      std::copy_n(rows + dn * R, dv * R, v + h * dv * R);
    } else {
      std::copy_n(k + h * dn * R, dn * R, rows);
      std::copy_n(v + h * dv * R, dv * R, rows + dn * R);
    }
  }
}
int find_weight(const Graph& g, const std::string& name) {
  for (int p : g.weights())
    if (g.v(p).name == name) return p;
  throw Error("internal: no weight " + name);
}

void upload_kv_b(Program& prog, int k_b, const std::string& name, DType dt, const Shape& shape,
                 const char* bytes, const std::string& source) {
  const Value& k = prog.graph().v(k_b);
  const int v_b = find_weight(prog.graph(), with_leaf(k.name, kKB, kVB));
  const Shape& vs = prog.graph().v(v_b).shape;
  const int64_t H = k.shape[0], dn = k.shape[1], R = k.shape[2], dv = vs[1];
  if (shape != Shape{H * (dn + dv), R} ||
      (dt != DType::f32 && dt != DType::bf16 && dt != DType::f16))
    throw Error(source + ": tensor '" + name + "' has shape " + shape_str(shape) + " " +
                dtype_name(dt) + ", expected " + shape_str({H * (dn + dv), R}) + " f32");
  std::vector<float> kv(size_t(H * (dn + dv) * R)), kk(size_t(H * dn * R)), vv(size_t(H * dv * R));
  const auto* u16 = reinterpret_cast<const uint16_t*>(bytes);
  for (size_t i = 0; i < kv.size(); ++i)
    kv[i] = dt == DType::f32    ? reinterpret_cast<const float*>(bytes)[i]
            : dt == DType::bf16 ? bf16_to_f32(u16[i])
                                : f16_to_f32(u16[i]);
  split_kv_b(kv.data(), kk.data(), vv.data(), H, dn, dv, R);
  prog.device().upload(prog.tensor(k_b), kk.data());
  prog.device().upload(prog.tensor(v_b), vv.data());
}
}  // namespace

void upload_hf_weights(Program& prog, const std::string& dir, WeightSet which,
                       int64_t expert_first) {
  const std::string source = "model folder '" + dir + "'";
  struct Want {
    int value;
    int64_t expert;  // a stacked weight's slice, or -1
  };
  std::map<std::string, Want> want;  // checkpoint name -> where it goes, for this call's weights
  for (int p : prog.graph().weights()) {
    const Value& v = prog.graph().v(p);
    if ((which == WeightSet::frozen && v.kind != ValueKind::frozen) ||
        (which == WeightSet::trained && v.kind != ValueKind::param))
      continue;
    if (v.name.ends_with(kVB)) continue;  // with k_b, from kv_b_proj
    if (v.name.ends_with(kKB)) {
      want.emplace(with_leaf(v.name, kKB, kKvB), Want{p, -2});
      continue;
    }
    if (!stacked_experts(v.name, v.shape)) {
      want.emplace(v.name, Want{p, -1});
      continue;
    }
    for (int64_t e = 0; e < v.shape[0]; ++e)
      want.emplace(expert_name(v.name, expert_first + e), Want{p, e});
  }
  std::vector<uint16_t> half;
  std::vector<float> wide;
  for (const std::string& f : hf_weight_files(dir))
    safetensors_visit(
        f, [&](const std::string& name, DType dt, const Shape& shape, const char* bytes) {
          auto it = want.find(name);
          if (it == want.end()) return;  // not this graph's (or not this call's)
          const Value& v = prog.graph().v(it->second.value);
          if (it->second.expert == -2) {  // MLA's kv_b_proj, split into k_b and v_b
            upload_kv_b(prog, it->second.value, name, dt, shape, bytes, source);
            want.erase(it);
            return;
          }
          Tensor dst = prog.tensor(it->second.value);
          if (it->second.expert >= 0) {  // one expert's slice of a stacked weight
            dst.shape.erase(dst.shape.begin());
            dst = Tensor(dst.shape, dst.dtype, dst.buffer,
                         dst.offset + uint64_t(it->second.expert) * dst.nbytes());
          }
          if (shape != dst.shape || (dt != DType::f32 && dt != DType::bf16 && dt != DType::f16))
            throw Error(source + ": tensor '" + name + "' has shape " + shape_str(shape) + " " +
                        dtype_name(dt) + ", expected " + shape_str(dst.shape) + " f32");
          const int64_t n = numel(shape);
          const auto* u16 = reinterpret_cast<const uint16_t*>(bytes);
          if (v.dtype == dt) {  // as stored: straight from the file's pages
            prog.device().upload(dst, bytes);
          } else if (v.dtype == DType::f32) {
            wide.resize(size_t(n));
            for (int64_t i = 0; i < n; ++i)
              wide[size_t(i)] = dt == DType::bf16 ? bf16_to_f32(u16[i]) : f16_to_f32(u16[i]);
            prog.device().upload(dst, wide.data());
          } else {  // bf16 storage from f32 or f16
            half.resize(size_t(n));
            for (int64_t i = 0; i < n; ++i)
              half[size_t(i)] = f32_to_bf16(
                  dt == DType::f32 ? reinterpret_cast<const float*>(bytes)[i] : f16_to_f32(u16[i]));
            prog.device().upload(dst, half.data());
          }
          want.erase(it);
        });
  for (auto it = want.begin(); it != want.end();) {  // a router bias the checkpoint lacks: zero
    const Value& v = prog.graph().v(it->second.value);
    if (!v.name.ends_with(kRouterBias)) {
      ++it;
      continue;
    }
    wide.assign(size_t(numel(v.shape)), 0.f);
    half.assign(wide.size(), 0);
    prog.device().upload(prog.tensor(it->second.value), v.dtype == DType::f32
                                                            ? static_cast<const void*>(wide.data())
                                                            : half.data());
    it = want.erase(it);
  }
  if (!want.empty()) {
    const auto& [name, w] = *want.begin();
    Shape shape = prog.graph().v(w.value).shape;
    if (w.expert >= 0) shape.erase(shape.begin());
    throw Error(source + " is missing tensor '" + name + "' (expected shape " + shape_str(shape) +
                ")");
  }
}

HostTensor widen_to_f32(HostTensor t) {
  if (t.dtype != DType::bf16 && t.dtype != DType::f16) return t;
  HostTensor h(t.shape, DType::f32);
  const auto* src = reinterpret_cast<const uint16_t*>(t.bytes.data());
  for (int64_t i = 0; i < t.numel(); ++i)
    h.f32()[i] = t.dtype == DType::bf16 ? bf16_to_f32(src[i]) : f16_to_f32(src[i]);
  return h;
}

namespace {
// `t`'s values in f32: `t` itself, or (bf16) widened into `scratch`; no copy of an f32 tensor.
const HostTensor& as_f32(const HostTensor& t, HostTensor& scratch) {
  if (t.dtype == DType::f32) return t;
  return scratch = widen_to_f32(t);
}

// The tensor for parameter `v` (f32, or bf16 as a GGUF stores it), or an Error naming it with
// its expected and found shape.
const HostTensor& expect_tensor(const TensorMap& weights, const Value& v,
                                const std::string& source) {
  auto it = weights.find(v.name);
  if (it == weights.end())
    throw Error(source + " is missing tensor '" + v.name + "' (expected shape " +
                shape_str(v.shape) + ")");
  const DType dt = it->second.dtype;
  if (it->second.shape != v.shape || (dt != DType::f32 && dt != DType::bf16))
    throw Error(source + ": tensor '" + v.name + "' has shape " + shape_str(it->second.shape) +
                " " + dtype_name(dt) + ", expected " + shape_str(v.shape) + " f32 or bf16");
  return it->second;
}
}  // namespace

void upload_weights(Program& prog, const TensorMap& weights, const std::string& source,
                    WeightSet which) {
  std::vector<uint16_t> half;
  std::vector<float> wide;
  for (int p : prog.graph().weights()) {
    const Value& v = prog.graph().v(p);
    if ((which == WeightSet::frozen && v.kind != ValueKind::frozen) ||
        (which == WeightSet::trained && v.kind != ValueKind::param))
      continue;
    const HostTensor& t = expect_tensor(weights, v, source);
    const size_t n = size_t(t.numel());
    if (v.dtype == t.dtype) {  // as held: f32, or bf16 as a GGUF stores it
      prog.device().upload(prog.tensor(p), t.bytes.data());
    } else if (v.dtype == DType::f32) {  // bf16 held, f32 on the device
      wide.resize(n);
      const auto* h = reinterpret_cast<const uint16_t*>(t.bytes.data());
      for (size_t i = 0; i < n; ++i) wide[i] = bf16_to_f32(h[i]);
      prog.device().upload(prog.tensor(p), wide.data());
    } else {  // bf16 storage for inference
      half.resize(n);
      const float* f = t.f32();
      for (size_t i = 0; i < n; ++i) half[i] = f32_to_bf16(f[i]);
      prog.device().upload(prog.tensor(p), half.data());
    }
  }
}

const char* const kTokenizerFiles[8] = {
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
    "merges.txt",     "tokenizer.model",       "added_tokens.json",       "generation_config.json"};

TensorMap decoder_weights(const DecoderConfig& c, TensorMap weights, const std::string& source) {
  Graph g;
  build_decoder(g, c, 1, 1);
  TensorMap out;
  for (int p : g.params()) {
    const Value& v = g.v(p);
    if (stacked_experts(v.name, v.shape) && !weights.count(v.name)) {  // each expert's, stacked
      HostTensor t(v.shape, DType::f32), scratch;
      const int64_t each = numel(v.shape) / v.shape[0];
      for (int64_t e = 0; e < v.shape[0]; ++e) {
        Value one = v;
        one.name = expert_name(v.name, e);
        one.shape.erase(one.shape.begin());
        const HostTensor& x = as_f32(expect_tensor(weights, one, source), scratch);
        std::copy_n(x.f32(), each, t.f32() + e * each);
      }
      out[v.name] = std::move(t);
      continue;
    }
    if (v.name.ends_with(kKB) && !weights.count(v.name)) {  // MLA: from kv_b_proj
      const std::string vname = with_leaf(v.name, kKB, kVB);
      const Value* vb = nullptr;
      for (int q : g.params())
        if (g.v(q).name == vname) vb = &g.v(q);
      const int64_t H = v.shape[0], dn = v.shape[1], R = v.shape[2], dv = vb->shape[1];
      Value kv = v;
      kv.name = with_leaf(v.name, kKB, kKvB);
      kv.shape = {H * (dn + dv), R};
      HostTensor scratch;
      const HostTensor& t = as_f32(expect_tensor(weights, kv, source), scratch);
      HostTensor k(v.shape, DType::f32), vt(vb->shape, DType::f32);
      split_kv_b(t.f32(), k.f32(), vt.f32(), H, dn, dv, R);
      out[v.name] = std::move(k);
      out[vname] = std::move(vt);
      continue;
    }
    if (v.name.ends_with(kVB) && !weights.count(v.name)) continue;  // with k_b
    if (v.name.ends_with(kRouterBias) && !weights.count(v.name)) {  // none yet: zero
      out[v.name] = HostTensor(v.shape, DType::f32);
      continue;
    }
    expect_tensor(weights, v, source);
    out.insert(weights.extract(v.name));  // moved, not copied
  }
  return out;
}

void save_hf_folder(const std::string& dir, const DecoderConfig& c, const TensorMap& weights,
                    DType dtype, const std::string& tokenizer_dir) {
  fs::create_directories(dir);
  nlohmann::json j = decoder_config_to_hf(c);
  j["torch_dtype"] = dtype == DType::f32 ? "float32" : dtype == DType::f16 ? "float16" : "bfloat16";
  TensorMap out;
  auto put = [&](const std::string& name, const Shape& shape, const float* x) {
    HostTensor h(shape, dtype);
    auto* o = reinterpret_cast<uint16_t*>(h.bytes.data());
    for (int64_t i = 0; i < h.numel(); ++i) {
      if (dtype == DType::f32)
        h.f32()[i] = x[i];
      else
        o[i] = dtype == DType::bf16 ? f32_to_bf16(x[i]) : f32_to_f16(x[i]);
    }
    out[name] = std::move(h);
  };
  for (const auto& [name, t] : weights) {
    if (name.ends_with(kVB)) continue;  // with k_b
    if (name.ends_with(kKB)) {          // MLA: back into kv_b_proj
      const HostTensor& v = weights.at(with_leaf(name, kKB, kVB));
      const int64_t H = t.shape[0], dn = t.shape[1], R = t.shape[2], dv = v.shape[1];
      std::vector<float> kv(size_t(H * (dn + dv) * R));
      split_kv_b(kv.data(), const_cast<float*>(t.f32()), const_cast<float*>(v.f32()), H, dn, dv, R,
                 false);
      put(with_leaf(name, kKB, kKvB), {H * (dn + dv), R}, kv.data());
      continue;
    }
    if (!stacked_experts(name, t.shape)) {
      put(name, t.shape, t.f32());
      continue;
    }
    const Shape one(t.shape.begin() + 1, t.shape.end());  // transformers' one tensor an expert
    for (int64_t e = 0; e < t.shape[0]; ++e)
      put(expert_name(name, e), one, t.f32() + e * numel(one));
  }
  safetensors_save((fs::path(dir) / "model.safetensors").string(), out, {{"format", "pt"}});
  if (!tokenizer_dir.empty() && fs::absolute(tokenizer_dir) != fs::absolute(dir))
    for (const char* name : kTokenizerFiles)
      if (fs::exists(fs::path(tokenizer_dir) / name))
        write_file_atomic((fs::path(dir) / name).string(),
                          read_file((fs::path(tokenizer_dir) / name).string(), "tokenizer file"));
  // GPT-2's vocab.json + merges.txt beside a config of another family (a LLaMA-shaped run on
  // GPT-2 tokens): without a tokenizer_config.json naming the class, transformers'
  // AutoTokenizer would look for that family's own tokenizer files.
  const fs::path d(dir);
  if (fs::exists(d / "vocab.json") && fs::exists(d / "merges.txt") &&
      !fs::exists(d / "tokenizer_config.json") && !fs::exists(d / "tokenizer.json")) {
    const nlohmann::json t = {
        {"tokenizer_class", "GPT2Tokenizer"}, {"bos_token", "<|endoftext|>"},
        {"eos_token", "<|endoftext|>"},       {"unk_token", "<|endoftext|>"},
        {"add_prefix_space", false},          {"model_max_length", c.max_pos}};
    write_file_atomic((d / "tokenizer_config.json").string(), t.dump(2) + "\n");
  }
  write_file_atomic((fs::path(dir) / "config.json").string(), j.dump(2) + "\n");
}

}  // namespace mxn
