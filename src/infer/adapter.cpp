#include "infer/adapter.h"

#include <cmath>
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/fs.h"
#include "core/json_num.h"
#include "io/checkpoint.h"
#include "io/hf_folder.h"

namespace fs = std::filesystem;

namespace mxn {
namespace {

const std::string kPeftPrefix = "base_model.model.", kPrompt = "prompt_embeddings";
const std::string kA = ".lora_A.weight", kB = ".lora_B.weight";

bool ends_with(const std::string& s, const std::string& t) {
  return s.size() >= t.size() && s.compare(s.size() - t.size(), t.size(), t) == 0;
}

// The folder that holds adapter_config.json: `path` itself, or an mxn run's latest checkpoint.
fs::path adapter_dir(const std::string& path) {
  const fs::path p(path);
  if (!fs::exists(p)) throw Error("adapter '" + path + "' does not exist");
  if (fs::is_regular_file(p / "adapter_config.json")) return p;
  if (fs::is_directory(p)) {
    std::string ck;
    try {
      ck = resolve_checkpoint(path);
    } catch (const Error&) {
    }
    if (!ck.empty() && fs::is_regular_file(fs::path(ck) / "adapter_config.json")) return ck;
  }
  throw Error("'" + path +
              "' is not an adapter (expected a PEFT folder with adapter_config.json and "
              "adapter_model.safetensors, or an mxn LoRA run folder)");
}

// The routed experts' pairs (PEFT keeps one per expert: "...experts.<e>.<leaf>.lora_A.weight")
// as the stacks the model trains, (experts, rows, cols); every expert from 0 on, shapes alike.
void restack_experts(TensorMap& tensors, const std::string& wf) {
  std::map<std::string, std::map<int64_t, std::string>> stacks;  // stack -> expert -> name
  for (const auto& [n, t] : tensors) {
    std::string stacked;
    int64_t e = 0;
    if (expert_of(n, stacked, e)) stacks[stacked][e] = n;
  }
  for (const auto& [stacked, parts] : stacks) {
    const int64_t E = int64_t(parts.size());
    const Shape one = tensors.at(parts.begin()->second).shape;
    HostTensor h({E, one[0], one[1]}, DType::f32);
    int64_t want = 0;
    for (const auto& [e, n] : parts) {
      if (e != want++)
        throw Error("adapter '" + wf + "' has " + std::to_string(E) + " experts' " + stacked +
                    " but not expert " + std::to_string(want - 1) + "'s");
      const HostTensor& t = tensors.at(n);
      if (t.shape != one)
        throw Error("adapter '" + wf + "': " + n + " is " + shape_str(t.shape) + ", expected " +
                    shape_str(one) + " as expert 0's");
      std::copy_n(t.f32(), numel(one), h.f32() + e * numel(one));
    }
    for (const auto& [e, n] : parts) tensors.erase(n);
    tensors.emplace(stacked, std::move(h));
  }
}

}  // namespace

std::string adapter_config_json(const Adapter& a, const DecoderConfig& c) {
  if (a.prefix) {  // PEFT's PrefixTuningConfig without the projection
    const nlohmann::json j = {{"peft_type", "PREFIX_TUNING"},
                              {"task_type", "CAUSAL_LM"},
                              {"num_virtual_tokens", a.prefix_len},
                              {"num_layers", c.layers},
                              {"token_dim", c.n_kv_heads() * c.hd()},
                              {"num_attention_heads", c.n_kv_heads()},
                              {"num_transformer_submodules", 1},
                              {"prefix_projection", false},
                              {"encoder_hidden_size", c.hidden},
                              {"base_model_name_or_path", a.base},
                              {"inference_mode", true},
                              {"revision", nullptr}};
    return j.dump(2) + "\n";
  }
  const bool fan_in_fan_out = c.gpt2();
  // The fields PEFT 0.13 writes, so its LoraConfig reads the file as one of its own.
  nlohmann::json j = {{"peft_type", "LORA"},
                      {"task_type", "CAUSAL_LM"},
                      {"r", a.spec.r},
                      {"lora_alpha", a.spec.alpha},
                      {"lora_dropout", a.dropout},
                      {"target_modules", a.spec.targets},
                      {"bias", "none"},
                      {"fan_in_fan_out", fan_in_fan_out},
                      {"base_model_name_or_path", a.base},
                      {"inference_mode", true},
                      {"init_lora_weights", true},
                      {"modules_to_save", nullptr},
                      {"layers_to_transform", nullptr},
                      {"layers_pattern", nullptr},
                      {"rank_pattern", nlohmann::json::object()},
                      {"alpha_pattern", nlohmann::json::object()},
                      {"use_rslora", false},
                      {"use_dora", false},
                      {"revision", nullptr}};
  return j.dump(2) + "\n";
}

TensorMap adapter_peft_tensors(const Adapter& a) {
  TensorMap out;
  if (!a.prefix) {
    for (const auto& [name, t] : a.tensors) {
      if (!stacked_experts(name, t.shape)) {
        out.emplace(kPeftPrefix + name, t);
        continue;
      }
      const Shape one(t.shape.begin() + 1, t.shape.end());  // PEFT's pair for each expert
      for (int64_t e = 0; e < t.shape[0]; ++e) {
        HostTensor h(one, DType::f32);
        std::copy_n(t.f32() + e * numel(one), numel(one), h.f32());
        out.emplace(kPeftPrefix + expert_name(name, e), std::move(h));
      }
    }
    return out;
  }
  const int64_t P = a.prefix_len, W = a.kv_dim, L = a.layers;
  HostTensor e({P, L * 2 * W}, DType::f32);
  for (int64_t l = 0; l < L; ++l)
    for (int kv = 0; kv < 2; ++kv) {
      const HostTensor& t = a.tensors.at(kv ? prefix_value_name(l) : prefix_key_name(l));
      for (int64_t p = 0; p < P; ++p)
        std::copy_n(t.f32() + p * W, W, e.f32() + p * L * 2 * W + (l * 2 + kv) * W);
    }
  out.emplace(kPrompt, std::move(e));
  return out;
}

TensorMap project_prefix(const TensorMap& enc, int64_t layers) {
  const std::string e = kPrefixEncoder;
  const HostTensor &E = enc.at(e + "embedding"), &W1 = enc.at(e + "dense.weight"),
                   &b1 = enc.at(e + "dense.bias");
  const int64_t P = E.shape[0], C = E.shape[1], Hp = W1.shape[0];
  std::vector<double> h(size_t(P * Hp));
  for (int64_t p = 0; p < P; ++p)
    for (int64_t j = 0; j < Hp; ++j) {
      double s = b1.f32()[j];
      for (int64_t c = 0; c < C; ++c) s += double(E.f32()[p * C + c]) * W1.f32()[j * C + c];
      h[size_t(p * Hp + j)] = double(std::tanh(float(s)));  // as the graph: tanh of an f32
    }
  TensorMap out;
  for (int64_t l = 0; l < layers; ++l)
    for (int i = 0; i < 2; ++i) {
      const std::string n = e + std::to_string(l) + (i ? ".value." : ".key.");
      const HostTensor &W = enc.at(n + "weight"), &b = enc.at(n + "bias");
      const int64_t Wd = W.shape[0];
      HostTensor t({P, Wd}, DType::f32);
      for (int64_t p = 0; p < P; ++p)
        for (int64_t o = 0; o < Wd; ++o) {
          double s = b.f32()[o];
          for (int64_t j = 0; j < Hp; ++j) s += h[size_t(p * Hp + j)] * W.f32()[o * Hp + j];
          t.f32()[p * Wd + o] = float(s);
        }
      out.emplace(i ? prefix_value_name(l) : prefix_key_name(l), std::move(t));
    }
  return out;
}

namespace {

Adapter load_prefix(const nlohmann::json& j, const fs::path& dir, const std::string& cf) {
  Adapter a;
  a.prefix = true;
  a.prefix_len = json_value<int64_t>(j, "num_virtual_tokens", 0, cf);
  a.layers = json_value<int64_t>(j, "num_layers", 0, cf);
  a.kv_dim = json_value<int64_t>(j, "token_dim", 0, cf);
  if (a.prefix_len <= 0 || a.layers <= 0 || a.kv_dim <= 0)
    throw Error("adapter config '" + cf +
                "' needs num_virtual_tokens, num_layers and token_dim >= 1 for PREFIX_TUNING");
  if (j.value("prefix_projection", false))
    throw Error("adapter config '" + cf +
                "': prefix_projection is true; save the projected prefix (the trained MLP's "
                "output) instead, as mxn does");
  if (j.contains("base_model_name_or_path") && j["base_model_name_or_path"].is_string())
    a.base = j["base_model_name_or_path"].get<std::string>();
  const std::string wf = (dir / "adapter_model.safetensors").string();
  TensorMap m = safetensors_load(wf);
  auto it = m.find(kPrompt);
  if (it == m.end()) throw Error("adapter '" + wf + "' has no '" + kPrompt + "' tensor");
  const HostTensor e = widen_to_f32(std::move(it->second));
  const Shape want{a.prefix_len, a.layers * 2 * a.kv_dim};
  if (e.shape != want || e.dtype != DType::f32)
    throw Error("adapter tensor '" + kPrompt + "' in '" + wf + "' is " + shape_str(e.shape) +
                ", expected " + shape_str(want) + " (num_virtual_tokens x num_layers*2*token_dim)");
  const int64_t P = a.prefix_len, W = a.kv_dim, L = a.layers;
  for (int64_t l = 0; l < L; ++l)
    for (int kv = 0; kv < 2; ++kv) {
      HostTensor t({P, W}, DType::f32);
      for (int64_t p = 0; p < P; ++p)
        std::copy_n(e.f32() + p * L * 2 * W + (l * 2 + kv) * W, W, t.f32() + p * W);
      a.tensors.emplace(kv ? prefix_value_name(l) : prefix_key_name(l), std::move(t));
    }
  return a;
}

}  // namespace

Adapter load_adapter(const std::string& path) {
  const fs::path dir = adapter_dir(path);
  const std::string cf = (dir / "adapter_config.json").string();
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(read_file(cf, "adapter config"));
  } catch (const nlohmann::json::exception& e) {
    throw Error("adapter config '" + cf + "' is not valid JSON: " + e.what());
  }
  if (!j.is_object()) throw Error("adapter config '" + cf + "' is not a JSON object");
  const std::string type = j.contains("peft_type") && j["peft_type"].is_string()
                               ? j["peft_type"].get<std::string>()
                               : "";
  if (type == "PREFIX_TUNING") return load_prefix(j, dir, cf);
  if (type != "LORA")
    throw Error("adapter '" + cf + "' has peft_type '" + type +
                "'; mxn reads LORA and PREFIX_TUNING (P-Tuning v2) adapters");
  Adapter a;
  a.spec.r = json_value<int64_t>(j, "r", 8, cf);
  a.spec.alpha = json_value<float>(j, "lora_alpha", 8.f, cf);
  a.dropout = json_value<double>(j, "lora_dropout", 0.0, cf);
  if (a.spec.r <= 0)
    throw Error("adapter config '" + cf + "': r = " + std::to_string(a.spec.r) +
                ", expected a rank >= 1");
  if (j.value("use_dora", false) || j.value("use_rslora", false))
    throw Error("adapter config '" + cf + "': DoRA and rsLoRA adapters are not read yet");
  if (j.contains("base_model_name_or_path") && j["base_model_name_or_path"].is_string())
    a.base = j["base_model_name_or_path"].get<std::string>();
  if (j.contains("target_modules") && j["target_modules"].is_array())
    for (const auto& t : j["target_modules"])
      if (t.is_string()) a.spec.targets.push_back(t.get<std::string>());
  const std::string wf = (dir / "adapter_model.safetensors").string();
  for (auto& [name, t] : safetensors_load(wf)) {
    std::string n = name;
    if (n.rfind(kPeftPrefix, 0) == 0) n = n.substr(kPeftPrefix.size());
    if (!ends_with(n, kA) && !ends_with(n, kB))
      throw Error("adapter '" + wf + "' holds tensor '" + name +
                  "', which is not a LoRA A or B matrix (modules_to_save is not read yet)");
    HostTensor h = widen_to_f32(std::move(t));
    if (h.dtype != DType::f32 || h.shape.size() != 2)
      throw Error("adapter tensor '" + name + "' in '" + wf + "' is " + shape_str(h.shape) + " " +
                  dtype_name(h.dtype) + ", expected a 2-D float matrix");
    a.tensors.emplace(n, std::move(h));
  }
  restack_experts(a.tensors, wf);
  for (const auto& [n, t] : a.tensors) {
    if (!ends_with(n, kA)) continue;
    const std::string module = n.substr(0, n.size() - kA.size());
    if (!a.tensors.count(lora_b_name(module)))
      throw Error("adapter '" + wf + "' has " + n + " without its " + lora_b_name(module));
  }
  if (a.tensors.empty()) throw Error("adapter '" + wf + "' holds no LoRA tensors");
  return a;
}

void apply_adapter(DecoderConfig& c, TensorMap& weights, const Adapter& a,
                   const std::string& source) {
  if (a.prefix) {
    const int64_t W = c.n_kv_heads() * c.hd();
    if (a.layers != c.layers || a.kv_dim != W)
      throw Error("adapter for another base: its prefix has " + std::to_string(a.layers) +
                  " layers of " + std::to_string(a.kv_dim) + " key/value columns (tensor '" +
                  kPrompt + "'), but " + source + " has " + std::to_string(c.layers) +
                  " layers of " + std::to_string(W));
    c.prefix_len = a.prefix_len;
    for (const auto& [n, t] : a.tensors) weights[n] = t;
    return;
  }
  const float scale = a.spec.alpha / float(a.spec.r);
  for (const auto& [n, bt] : a.tensors) {
    if (!ends_with(n, kB)) continue;
    const std::string module = n.substr(0, n.size() - kB.size());
    auto ia = a.tensors.find(lora_a_name(module));
    if (ia == a.tensors.end())
      throw Error("adapter tensor " + n + " has no " + lora_a_name(module));
    const HostTensor& at = ia->second;
    // The routed experts' stacks: each expert's pair onto its own weight, which the model holds
    // as one tensor an expert (a Hugging Face folder) or as the stack (an mxn checkpoint).
    const bool stack = at.shape.size() == 3;
    const int64_t E = stack ? at.shape[0] : 1;
    const Shape a1(at.shape.end() - 2, at.shape.end()), b1(bt.shape.end() - 2, bt.shape.end());
    if (bt.shape.size() != at.shape.size() || (stack && bt.shape[0] != E))
      throw Error("adapter tensors " + lora_a_name(module) + " " + shape_str(at.shape) + " and " +
                  n + " " + shape_str(bt.shape) + " do not pair");
    for (int64_t e = 0; e < E; ++e) {
      const std::string mod = stack ? expert_name(module, e) : module;
      auto iw = weights.find(mod + ".weight");
      HostTensor* w = iw == weights.end() ? nullptr : &iw->second;
      int64_t slice = 0;
      if (!w && stack && weights.count(module + ".weight"))
        w = &weights.at(module + ".weight"), slice = e;
      if (!w)
        throw Error("adapter tensor " + n + " adapts " + mod + ".weight, which " + source +
                    " does not have (an adapter for another model?)");
      const int64_t r = a1[0], in = a1[1], out = b1[0];
      const Shape want = c.gpt2() ? Shape{in, out} : Shape{out, in};
      const Shape has =
          w->shape.size() == 3 && stack ? Shape(w->shape.begin() + 1, w->shape.end()) : w->shape;
      if (b1[1] != r || has != want || w->dtype != DType::f32 ||
          (w->shape.size() == 3 && w->shape[0] != E))
        throw Error("adapter for another base: " + lora_a_name(mod) + " is " + shape_str(a1) +
                    " and " + lora_b_name(mod) + " is " + shape_str(b1) + ", but " + mod +
                    ".weight in " + source + " is " + shape_str(w->shape) +
                    " (expected lora_A (r, in) and lora_B (out, r) for a weight of " +
                    (c.gpt2() ? "(in, out))" : "(out, in))"));
      const float* A = at.f32() + e * numel(a1);
      const float* B = bt.f32() + e * numel(b1);
      float* W = w->f32() + slice * numel(want);
      for (int64_t o = 0; o < out; ++o)
        for (int64_t i = 0; i < in; ++i) {
          double s = 0;
          for (int64_t k = 0; k < r; ++k) s += double(B[o * r + k]) * double(A[k * in + i]);
          W[c.gpt2() ? i * out + o : o * in + i] += float(s) * scale;
        }
    }
  }
}

}  // namespace mxn
