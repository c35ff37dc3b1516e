// Runs one forward and backward of a Hugging Face model folder through mxn's decoder and writes
// logits, loss and every parameter gradient to a safetensors file, for tests/hf_models_test.py.
// The batch is `tokens` (B, T) i32 from IN; targets are the tokens shifted left (the last of each
// row ignored), as transformers computes a causal LM's loss from labels. With ADAPTER (a PEFT LoRA
// or prefix-tuning folder) the base is frozen and the gradients are the adapter's. A mixture of
// experts' model also writes each MoE layer's experts per token (router.<i>, (B*T, K) i32).
// usage: decoder_dump MODEL_DIR IN.safetensors OUT.safetensors [device] [ADAPTER]
#include <cstdio>

#include "backend/device.h"
#include "core/error.h"
#include "core/fs.h"
#include "graph/program.h"
#include "infer/adapter.h"
#include "io/hf_folder.h"

using namespace mxn;

int main(int argc, char** argv) try {
  if (argc < 4) {
    std::fprintf(stderr, "usage: decoder_dump MODEL_DIR IN.safetensors OUT.safetensors [device]\n");
    return 2;
  }
  DecoderConfig cfg = load_hf_config(argv[1]);
  const TensorMap weights = decoder_weights(cfg, load_hf_weights(argv[1]), argv[1]);
  TensorMap in = safetensors_load(argv[2]);
  const HostTensor& tok = in.at("tokens");
  const int64_t B = tok.shape[0], T = tok.shape[1];
  auto dev = open_device(argc > 4 ? argv[4] : "cpu");
  Graph g;
  DecoderOptions o;
  o.with_loss = true;
  Adapter adapter;
  if (argc > 5) {
    adapter = load_adapter(argv[5]);
    o.freeze = true;
    if (adapter.prefix)
      cfg.prefix_len = adapter.prefix_len;
    else
      o.lora = adapter.spec;
  }
  DecoderGraph m = build_decoder(g, cfg, B, T, o);
  for (int ids : m.router_ids) g.mark_output(ids);
  append_backward(g, m.loss);
  Program prog(std::move(g), *dev);
  upload_weights(prog, weights, argv[1], o.freeze ? WeightSet::frozen : WeightSet::all);
  if (o.freeze) upload_weights(prog, adapter.tensors, argv[5], WeightSet::trained);
  HostTensor tgt({B * T}, DType::i32), pos({B * T}, DType::i32);
  const int32_t* t = reinterpret_cast<const int32_t*>(tok.bytes.data());
  for (int64_t i = 0; i < B * T; ++i) {
    tgt.i32()[i] = i % T == T - 1 ? -1 : t[i + 1];
    pos.i32()[i] = int32_t(i % T);
  }
  dev->upload(prog.tensor(m.tokens), tok.bytes.data());
  dev->upload(prog.tensor(m.targets), tgt.bytes.data());
  dev->upload(prog.tensor(m.positions), pos.bytes.data());
  Tensor grads = prog.grads_all();
  std::vector<float> zero(size_t(grads.numel()), 0.f);
  dev->upload(grads, zero.data());
  prog.run(0, prog.graph().nodes.size());
  TensorMap out;
  HostTensor logits({B * T, cfg.vocab_size}, DType::f32), loss({1}, DType::f32);
  dev->download(logits.bytes.data(), prog.tensor(m.logits));
  dev->download(loss.bytes.data(), prog.tensor(m.loss));
  for (int p : prog.graph().params()) {
    const Value& v = prog.graph().v(p);
    HostTensor h(v.shape, DType::f32);
    dev->download(h.bytes.data(), prog.tensor(v.grad));
    out.emplace("grad." + v.name, std::move(h));
  }
  for (size_t l = 0; l < m.router_ids.size(); ++l) {  // each MoE layer's experts per token
    HostTensor h(prog.graph().v(m.router_ids[l]).shape, DType::i32);
    dev->download(h.bytes.data(), prog.tensor(m.router_ids[l]));
    out.emplace("router." + std::to_string(l), std::move(h));
  }
  out.emplace("logits", std::move(logits));
  out.emplace("loss", std::move(loss));
  write_file_atomic(argv[3], safetensors_serialize(out));
  return 0;
} catch (const Error& e) {
  std::fprintf(stderr, "decoder_dump: %s\n", e.what());
  return 1;
}
