// mxn convert: a model from a Hugging Face folder, a GGUF file or an mxn checkpoint, out as a
// Hugging Face folder (f32, f16, bf16) or a GGUF file (f32, f16, bf16, Q8_0, Q4_0); mxn merge: the
// same with a LoRA adapter folded into the weights.
#include <cstdio>
#include <filesystem>

#include "cli/commands.h"
#include "core/error.h"
#include "core/fs.h"
#include "infer/model.h"
#include "io/gguf_model.h"
#include "io/hf_folder.h"

namespace mxn::cli {

namespace {

struct Args {
  std::string from, to, type = "f32", tokenizer, adapter;
};

void add_output_options(CLI::App* sub, Args& a) {
  sub->add_option("to", a.to, "a folder (Hugging Face layout) or a file ending in .gguf")
      ->required();
  sub->add_option(
         "--type", a.type,
         "weight type: f32, f16, bf16, or q8_0 or q4_0 (GGUF only; q4_0 in every matrix, as "
         "llama-quantize --pure)")
      ->capture_default_str();
  sub->add_option("--tokenizer", a.tokenizer,
                  "a folder whose tokenizer files go along (default: the source's own)");
}

int convert(const Args& a) {
  const bool gguf = a.to.ends_with(".gguf");
  const GgmlType type = ggml_type_from_name(a.type);
  if (!gguf && ggml_blocked(type))
    throw Error(a.type + " is a GGUF type; a Hugging Face folder takes f32, f16 or bf16");
  if (!gguf && std::filesystem::is_regular_file(a.to))
    throw Error("'" + a.to + "' is a file; give a folder, or a name ending in .gguf");
  ModelSource m = load_model(a.from, a.adapter);
  if (m.cfg.prefix_len > 0)
    throw Error(
        "a P-Tuning v2 prefix is not a weight update and cannot be folded into the weights; "
        "use it with generate --adapter");
  const std::string tok = a.tokenizer.empty() ? m.tokenizer_dir : a.tokenizer;
  if (!a.tokenizer.empty() && !std::filesystem::is_directory(a.tokenizer))
    throw Error("tokenizer folder '" + a.tokenizer + "' does not exist");
  for (auto& [n, t] : m.weights) t = widen_to_f32(std::move(t));  // the writers take f32
  if (gguf) {
    const std::string name = std::filesystem::path(a.to).stem().string();
    write_file_atomic(a.to, gguf_serialize(decoder_to_gguf(m.cfg, m.weights, type, tok, name)));
  } else {
    const DType dt = type == GgmlType::f32   ? DType::f32
                     : type == GgmlType::f16 ? DType::f16
                                             : DType::bf16;
    save_hf_folder(a.to, m.cfg, m.weights, dt, tok);
  }
  std::printf("wrote %s (%s, %s, %.1fM parameters) from %s\n", a.to.c_str(), arch_name(m.cfg.arch),
              a.type.c_str(), double(m.cfg.param_count()) / 1e6, m.what.c_str());
  return 0;
}

}  // namespace

std::function<int()> add_convert(CLI::App& app) {
  auto* sub = app.add_subcommand(
      "convert", "write a model as a Hugging Face folder or a GGUF file (llama.cpp)");
  auto a = std::make_shared<Args>();
  sub->add_option("from", a->from,
                  "a Hugging Face model folder, a .gguf file, or an mxn run or "
                  "checkpoint folder")
      ->required();
  add_output_options(sub, *a);
  sub->add_option("--adapter", a->adapter, "a LoRA adapter to merge into the weights on the way");
  return [a] { return convert(*a); };
}

std::function<int()> add_merge(CLI::App& app) {
  auto* sub = app.add_subcommand(
      "merge", "fold a LoRA adapter into a model's weights: a Hugging Face folder or GGUF out");
  auto a = std::make_shared<Args>();
  sub->add_option("--model", a->from, "the base: a Hugging Face model folder or a .gguf file")
      ->required();
  sub->add_option("--adapter", a->adapter, "a PEFT LoRA folder, or an mxn LoRA run or checkpoint")
      ->required();
  add_output_options(sub, *a);
  return [a] { return convert(*a); };
}

}  // namespace mxn::cli
