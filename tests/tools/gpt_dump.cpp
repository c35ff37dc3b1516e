// Runs one GPT-2 forward and backward on the CPU backend and writes weights, batch, logits, loss
// and every parameter gradient to a safetensors file, for tests/torch_reference.py to check.
// usage: gpt_dump n_layer n_head n_embd vocab n_ctx batch seq f32|bf16 seed out.safetensors
#include <cstdio>
#include <cstdlib>

#include "backend/device.h"
#include "core/fs.h"
#include "core/rng.h"
#include "graph/program.h"
#include "io/safetensors.h"
#include "models/decoder.h"

using namespace mxn;

int main(int argc, char** argv) {
  if (argc != 11) {
    std::fprintf(stderr,
                 "usage: gpt_dump n_layer n_head n_embd vocab n_ctx batch seq dtype seed out\n");
    return 2;
  }
  DecoderConfig cfg;  // GPT-2
  cfg.layers = std::atoll(argv[1]);
  cfg.heads = std::atoll(argv[2]);
  cfg.hidden = std::atoll(argv[3]);
  cfg.vocab_size = std::atoll(argv[4]);
  cfg.max_pos = std::atoll(argv[5]);
  const int64_t B = std::atoll(argv[6]), T = std::atoll(argv[7]);
  const uint64_t seed = std::strtoull(argv[9], nullptr, 10);
  cfg.validate();
  auto dev = open_device("cpu");
  Graph g;
  g.matmul_compute = std::string(argv[8]) == "bf16" ? DType::bf16 : DType::f32;
  DecoderOptions o;
  o.with_loss = true;
  DecoderGraph m = build_decoder(g, cfg, B, T, o);
  append_backward(g, m.loss);
  Program prog(std::move(g), *dev);
  TensorMap out;
  for (int p : prog.graph().params()) {
    const Value& v = prog.graph().v(p);
    // Larger than GPT-2's 0.02 so every path (LayerNorm affine, biases) carries signal.
    auto w = decoder_init_param(v.name, numel(v.shape), cfg, seed);
    Rng r(seed + uint64_t(p));
    for (auto& x : w) x += float(r.normal() * 0.05);
    dev->upload(prog.tensor(p), w.data());
    HostTensor h(v.shape, DType::f32);
    std::copy(w.begin(), w.end(), h.f32());
    out.emplace(v.name, std::move(h));
  }
  Rng r(seed * 7 + 1);
  HostTensor tok({B * T}, DType::i32), tgt({B * T}, DType::i32), pos({B * T}, DType::i32);
  for (int64_t i = 0; i < B * T; ++i) {
    tok.i32()[i] = int32_t(r.next() % uint64_t(cfg.vocab_size));
    tgt.i32()[i] = int32_t(r.next() % uint64_t(cfg.vocab_size));
    pos.i32()[i] = int32_t(i % T);
  }
  dev->upload(prog.tensor(m.tokens), tok.bytes.data());
  dev->upload(prog.tensor(m.targets), tgt.bytes.data());
  dev->upload(prog.tensor(m.positions), pos.bytes.data());
  Tensor grads = prog.grads_all();
  std::vector<float> zero(size_t(grads.numel()), 0.f);
  dev->upload(grads, zero.data());
  prog.run(0, prog.graph().nodes.size());
  HostTensor logits({B * T, cfg.vocab_size}, DType::f32), loss({1}, DType::f32);
  dev->download(logits.bytes.data(), prog.tensor(m.logits));
  dev->download(loss.bytes.data(), prog.tensor(m.loss));
  for (int p : prog.graph().params()) {
    const Value& v = prog.graph().v(p);
    HostTensor h(v.shape, DType::f32);
    dev->download(h.bytes.data(), prog.tensor(v.grad));
    out.emplace("grad." + v.name, std::move(h));
  }
  out.emplace("tokens", std::move(tok));
  out.emplace("targets", std::move(tgt));
  out.emplace("logits", std::move(logits));
  out.emplace("loss", std::move(loss));
  write_file_atomic(argv[10], safetensors_serialize(out));
  return 0;
}
