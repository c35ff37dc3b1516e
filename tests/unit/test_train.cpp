// Training end to end on the default corpus: the loss falls, and a resumed run is bit-identical.
#include <dlfcn.h>
#include <execinfo.h>
#include <gtest/gtest.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <new>
#include <thread>

#include "core/error.h"
#include "data/bpe.h"
#include "data/chat.h"
#include "data/tokenizer.h"
#include "io/hf_folder.h"
#include "train/trainer.h"

using namespace mxn;

// Counts C++ heap allocations while `g_counting` is set, to check that a step allocates nothing.
// oneDNN's dnnl_sgemm makes one small internal object per call; those are counted apart, by the
// library the caller of operator new lives in.
static std::atomic<bool> g_counting{false};
static std::atomic<long> g_allocs{0}, g_dnnl_allocs{0};
static thread_local bool t_inside = false;
void* operator new(size_t n) {
  if (g_counting && !t_inside) {
    t_inside = true;
    void* frames[2];
    Dl_info info{};
    const bool dnnl = backtrace(frames, 2) == 2 && dladdr(frames[1], &info) && info.dli_fname &&
                      std::strstr(info.dli_fname, "libdnnl");
    ++(dnnl ? g_dnnl_allocs : g_allocs);
    t_inside = false;
  }
  if (void* p = std::malloc(n ? n : 1)) return p;
  throw std::bad_alloc();
}
void operator delete(void* p) noexcept { std::free(p); }
void operator delete(void* p, size_t) noexcept { std::free(p); }

namespace {

TrainConfig tiny(const std::string& out) {
  TrainConfig c;
  c.dtype = "f32";  // the figures below are f32's, whatever this CPU's bf16 rate
  c.model.n_layer = 2;
  c.model.n_head = 4;
  c.model.n_embd = 64;
  c.model.vocab_size = 256;
  c.model.n_ctx = 64;
  c.data = std::string(MXN_SOURCE_DIR) + "/data/kjv.bin";
  c.out = (std::filesystem::temp_directory_path() / out).string();
  c.batch = 8;
  c.steps = 300;
  c.warmup = 20;
  c.lr = 3e-3;
  c.min_lr = 3e-4;
  c.seed = 5;
  return c;
}

// A LLaMA-shaped Hugging Face folder (2 layers, width 64, 4 heads, 2 KV heads, vocab 256) with
// random weights, for the adapter tests.
std::string lora_base(const std::string& name) {
  DecoderConfig d;
  d.arch = Arch::llama;
  d.vocab_size = 256;
  d.hidden = 64;
  d.layers = 2;
  d.heads = 4;
  d.kv_heads = 2;
  d.max_pos = 64;
  d.tie_embeddings = false;
  const std::string dir = (std::filesystem::temp_directory_path() / name).string();
  TensorMap base;
  Graph g;
  build_decoder(g, d, 1, 1);
  for (int p : g.params()) {
    HostTensor h(g.v(p).shape, DType::f32);
    const auto w = decoder_init_param(g.v(p).name, h.numel(), d, 3);
    std::copy(w.begin(), w.end(), h.f32());
    base.emplace(g.v(p).name, std::move(h));
  }
  save_hf_folder(dir, d, base);
  return dir;
}

}  // namespace

TEST(Train, LossFallsWellBelowItsStart) {
  TrainConfig c = tiny("mxn_test_loss");
  ASSERT_TRUE(std::filesystem::exists(c.data)) << "run scripts/setup first: it prepares " << c.data;
  Trainer tr(c);
  const float val0 = tr.eval_loss();
  EXPECT_NEAR(val0, std::log(256.0f), 0.1f);  // an untrained model is close to uniform
  double tail = 0;
  for (int s = 1; s <= c.steps; ++s) {
    const float l = tr.step();
    ASSERT_TRUE(std::isfinite(l));
    if (s > c.steps - 20) tail += l / 20.0;
  }
  const float val1 = tr.eval_loss();
  // From ln(256) = 5.55 this model reaches a train loss of about 2.3 and a validation loss of
  // 2.33 in 300 steps (seed 5, measured here); the bounds leave room for other CPUs' rounding.
  EXPECT_LT(tail, 2.5);
  EXPECT_LT(val1, 2.55f);
  EXPECT_LT(val1, val0 - 3.0f);
}

TEST(Train, ResumeIsBitExact) {
  TrainConfig c = tiny("mxn_test_resume");
  c.steps = 40;
  c.accum = 2;
  c.batch = 4;
  std::filesystem::remove_all(c.out);
  TensorMap straight;
  {
    Trainer tr(c);
    for (int s = 0; s < 40; ++s) tr.step();
    straight = tr.weights();
  }
  std::string ckpt;
  {
    Trainer tr(c);
    for (int s = 0; s < 20; ++s) tr.step();
    ckpt = tr.save();
  }
  Trainer tr(c, ckpt);
  ASSERT_EQ(tr.current_step(), 20);
  for (int s = 0; s < 20; ++s) tr.step();
  TensorMap resumed = tr.weights();
  ASSERT_EQ(resumed.size(), straight.size());
  for (const auto& [name, t] : straight) EXPECT_EQ(resumed.at(name).bytes, t.bytes) << name;
  std::filesystem::remove_all(c.out);
}

TEST(Train, Bf16TracksF32) {
  // bf16 matmuls change the trajectory only by rounding: after 30 steps the losses agree closely.
  TrainConfig c = tiny("mxn_test_bf16");
  c.steps = 30;
  Trainer a(c);
  c.dtype = "bf16";
  Trainer b(c);
  float la = 0, lb = 0;
  for (int s = 0; s < 30; ++s) {
    la = a.step();
    lb = b.step();
  }
  EXPECT_NEAR(la, lb, 0.02f * la);
}

TEST(Train, RecomputeIsBitIdenticalInLessMemory) {
  // --recompute 1 runs each layer norm and GELU again in the backward instead of keeping its
  // output: the same weights bit for bit, and the arena (planned at the forward/backward turn,
  // where every kept value is live) loses those outputs of every layer but the one whose
  // recomputed copy is live.
  TrainConfig c = tiny("mxn_test_recompute");
  c.steps = 8;
  for (const char* arch : {"gpt2", "llama"})  // layer norm and GELU; RMSNorm and SwiGLU
    for (const char* dt : {"f32", "bf16"}) {
      c.model.arch = arch;
      c.dtype = dt;
      c.recompute = 0;
      Trainer keep(c);
      c.recompute = 1;
      Trainer again(c);
      const std::string what = std::string(arch) + " " + dt;
      for (int s = 0; s < 8; ++s) EXPECT_EQ(keep.step(), again.step()) << what << " step " << s;
      const TensorMap a = keep.weights(), b = again.weights();
      for (const auto& [name, t] : a) EXPECT_EQ(b.at(name).bytes, t.bytes) << what << " " << name;
    }
  c.model.arch = "gpt2";
  c.dtype = "f32";
  const int64_t N = c.batch * c.model.n_ctx, C = c.model.n_embd, L = c.model.n_layer;
  auto arena = [&](int64_t recompute) {
    c.recompute = recompute;
    DecoderGraph m;
    size_t nf = 0;
    Graph g = train_graph(c, c.batch, &m, &nf);
    return int64_t(plan_arena(g));
  };
  // Per layer: two layer norms' outputs (N x C) and the GELU's (N x 4C), in f32.
  const int64_t per_layer = (2 * C + 4 * C) * N * 4;
  EXPECT_GE(arena(0) - arena(1), (L - 1) * per_layer) << arena(0) << " vs " << arena(1);
  c.model.arch = "llama";  // two RMSNorms' outputs (N x C) and SwiGLU's (N x F, F > C)
  EXPECT_GE(arena(0) - arena(1), (L - 1) * 3 * C * N * 4) << arena(0) << " vs " << arena(1);
}

TEST(Train, Bf16KeepsWhatTheBackwardReadsInBf16) {
  // With bf16 matmuls the MLP's pre-activation (N x 4C a layer) and the fused qkv (N x 3C) are
  // kept in bf16 for the backward, each a CAST after its matmul: half their bytes come off the
  // arena of every layer. The CPU takes both, so the trainer turns both on.
  TrainConfig c = tiny("mxn_test_bf16_kept");
  c.dtype = "bf16";
  c.steps = 1;
  {
    Trainer tr(c);
    EXPECT_TRUE(tr.config().gelu_bf16 && tr.config().attn_bf16);
  }
  const int64_t N = c.batch * c.model.n_ctx, C = c.model.n_embd, L = c.model.n_layer;
  auto arena = [&](bool half) {
    c.gelu_bf16 = c.attn_bf16 = half;
    DecoderGraph m;
    size_t nf = 0;
    Graph g = train_graph(c, c.batch, &m, &nf);
    int casts = 0;
    for (const Node& n : g.nodes) casts += n.op == MXN_OP_CAST;
    EXPECT_EQ(casts, half ? 2 * L : 0);
    return int64_t(plan_arena(g));
  };
  EXPECT_GE(arena(false) - arena(true), (L - 1) * (4 * C + 3 * C) * N * 2);
}

TEST(Train, LoraTrainsAdaptersOnlyAndLeavesTheBaseBitIdentical) {
  // A LLaMA-shaped folder with random weights; LoRA on q and v (base in f32 and in bf16) and
  // P-Tuning v2 for 30 steps each: the loss falls, the frozen weights on the device are the
  // folder's bit for bit (bf16: its rounding), and the optimizer state is two moments of the
  // adapters alone.
  const std::string dir = lora_base("mxn_test_lora_base");
  const TensorMap base = load_hf_weights(dir);
  for (const char* mode : {"lora:f32", "lora:bf16", "ptuning:f32"}) {
    const std::string finetune = std::string(mode).substr(0, std::string(mode).find(':'));
    const char* store = std::strchr(mode, ':') + 1;
    TrainConfig c = tiny(std::string("mxn_test_") + finetune + "_" + store);
    c.model.dir = dir;
    c.finetune = finetune;
    c.prefix_len = 8;
    c.lora_r = 4;
    c.lora_alpha = 8;
    c.base_dtype = store;
    c.steps = 30;
    c.warmup = 0;
    c.lr = 1e-2;
    Trainer t(c);
    float first = t.step(), last = first;
    for (int s = 1; s < 30; ++s) last = t.step();
    // A prefix steers a random base less than LoRA's q/v updates do: it falls, less far.
    EXPECT_LT(last, first - (finetune == "lora" ? 0.3f : 0.05f))
        << mode << " " << first << " -> " << last;
    int64_t adapter = 0;
    for (const auto& [name, w] : t.weights()) {
      EXPECT_NE(name.find(finetune == "lora" ? ".lora_" : "prefix."), std::string::npos) << name;
      adapter += w.numel();
    }
    if (finetune == "lora")
      EXPECT_EQ(adapter, 2 * ((4 * 64 + 64 * 4) + (4 * 64 + 32 * 4)));  // 2 layers: q 64, v 32 out
    else
      EXPECT_EQ(adapter, 2 * 2 * 8 * 32);  // 2 layers x (keys, values) x 8 rows x 2 kv heads x 16
    EXPECT_EQ(t.optimizer_bytes(), uint64_t(adapter) * 8);
    const TensorMap frozen = t.frozen_weights();
    EXPECT_EQ(frozen.size(), base.size());
    for (const auto& [name, w] : base) {
      const HostTensor& f = frozen.at(name);
      const bool half = f.dtype == DType::bf16;
      EXPECT_EQ(half, std::string(store) == "bf16" && w.shape.size() == 2) << name;
      for (int64_t i = 0; i < w.numel(); ++i) {
        const float want = half ? round_bf16(w.f32()[i]) : w.f32()[i];
        const float got =
            half ? bf16_to_f32(reinterpret_cast<const uint16_t*>(f.bytes.data())[i]) : f.f32()[i];
        ASSERT_EQ(std::memcmp(&want, &got, 4), 0) << name << "[" << i << "]";
      }
    }
  }
}

TEST(Train, LoraDropoutActsInTrainingOnly) {
  // Dropout on the adapters' input: with B = 0 at the start the first step cannot see it; the
  // second does. Validation runs without it (two evaluations agree).
  TrainConfig c = tiny("mxn_test_lora_dropout");
  c.model.dir = lora_base("mxn_test_lora_dropout_base");
  c.finetune = "lora";
  c.lr = 1e-2;
  c.warmup = 0;
  Trainer off(c);
  c.lora_dropout = 0.5;
  Trainer on(c);
  EXPECT_EQ(off.step(), on.step());
  EXPECT_NE(off.step(), on.step());
  EXPECT_EQ(on.eval_loss(), on.eval_loss());
}

TEST(Train, StepsAllocateNothing) {
  TrainConfig c = tiny("mxn_test_alloc");
  c.accum = 2;
  for (const char* dt : {"f32", "bf16"}) {
    c.dtype = dt;
    Trainer tr(c);
    tr.step();  // the first step sizes the kernels' scratch
    void* warm[2];
    backtrace(warm, 2);  // loads what backtrace needs before counting starts
    g_allocs = 0;
    g_dnnl_allocs = 0;
    g_counting = true;
    for (int s = 0; s < 3; ++s) tr.step();
    g_counting = false;
    EXPECT_EQ(g_allocs.load(), 0) << dt << " (oneDNN-internal: " << g_dnnl_allocs.load() << ")";
  }
}

TEST(Train, AccumulationEqualsOneLargeBatch) {
  // 2 micro-batches of 4 see the same rows as one batch of 8: same loss, same update.
  TrainConfig c = tiny("mxn_test_accum");
  c.steps = 3;
  c.batch = 8;
  Trainer big(c);
  c.batch = 4;
  c.accum = 2;
  Trainer acc(c);
  for (int s = 0; s < 3; ++s) {
    const float lb = big.step(), la = acc.step();
    EXPECT_NEAR(la, lb, 2e-6f * lb);
    EXPECT_NEAR(acc.last_grad_norm(), big.last_grad_norm(), 1e-5f * big.last_grad_norm());
  }
  const TensorMap wb = big.weights(), wa = acc.weights();
  for (const auto& [name, t] : wb) {
    const HostTensor& u = wa.at(name);
    for (int64_t i = 0; i < t.numel(); ++i)
      ASSERT_NEAR(u.f32()[i], t.f32()[i], 1e-5f) << name << "[" << i << "]";
  }
}

TEST(Train, WarmupThenCosine) {
  TrainConfig c = tiny("mxn_test_lr");
  c.steps = 110;
  c.warmup = 10;
  c.lr = 1e-3;
  c.min_lr = 1e-4;
  Trainer tr(c);
  EXPECT_DOUBLE_EQ(tr.lr_at(1), 1e-4);
  EXPECT_DOUBLE_EQ(tr.lr_at(5), 5e-4);
  EXPECT_DOUBLE_EQ(tr.lr_at(10), 1e-3);
  EXPECT_NEAR(tr.lr_at(60), 5.5e-4, 1e-12);  // half way through the cosine
  EXPECT_NEAR(tr.lr_at(110), 1e-4, 1e-12);
}

TEST(Train, RowsPerPassFollowFreeMemory) {
  // A device with room for the whole micro-batch runs it in one pass; with room for three rows'
  // activations (after params, grads and moments, and the 10% reserve) it runs three at a time;
  // with no room at all, one (and the allocation then names what is missing).
  TrainConfig c = tiny("mxn_test_rows");
  c.batch = 8;
  EXPECT_EQ(rows_per_pass(c, uint64_t(1) << 40), 8);
  const double fixed = double(c.decoder_config().param_count()) * 16.0;
  int64_t lo = 1, hi = int64_t(1) << 32;  // the smallest free memory that fits 3 rows
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (rows_per_pass(c, uint64_t(mid)) >= 3)
      hi = mid;
    else
      lo = mid + 1;
  }
  EXPECT_EQ(rows_per_pass(c, uint64_t(lo)), 3);
  EXPECT_EQ(rows_per_pass(c, uint64_t(lo - 1)), 2);  // one byte less: two rows
  EXPECT_GT(double(lo) * 0.9, fixed);
  EXPECT_EQ(rows_per_pass(c, 1000), 1);
}

TEST(Tokenizer, EncodesFromManyThreadsAtOnce) {
  // mxn serve tokenizes on many HTTP threads with one tokenizer: 8 threads encoding 40 KB of
  // the KJV 20 times each give what one thread gives (the pre-tokenizer's match data was shared
  // once, and a request could end in a 500).
  const auto tok = mxn::load_tokenizer_file(std::string(MXN_SOURCE_DIR) +
                                            "/../shared/data/gpt2-bpe/encoder.json");
  std::ifstream f(std::string(MXN_SOURCE_DIR) + "/data/kjv.txt");
  std::string text(40000, '\0');
  f.read(text.data(), std::streamsize(text.size()));
  text.resize(size_t(f.gcount()));
  while (!text.empty() && (uint8_t(text.back()) & 0xC0) == 0x80) text.pop_back();  // whole chars
  if (!text.empty() && uint8_t(text.back()) >= 0xC0) text.pop_back();
  ASSERT_GT(text.size(), 30000u);
  const std::vector<int32_t> want = tok->encode(text);
  std::atomic<int> wrong{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 8; ++t)
    threads.emplace_back([&] {
      for (int i = 0; i < 20; ++i)
        if (tok->encode(text) != want) ++wrong;
    });
  for (auto& t : threads) t.join();
  EXPECT_EQ(wrong.load(), 0);
  EXPECT_GT(want.size(), 8000u);
}

TEST(Tokenizer, ChatFormatFromATemplateText) {
  // A GGUF's tokenizer.chat_template names the format as a folder's tokenizer_config.json does:
  // by the markers in the template; without one, by the tokenizer's special tokens; neither is
  // one Error naming the model.
  mxn::BpeSpec s;
  for (int b = 0; b < 256; ++b) s.vocab.push_back(std::string(1, char(b)));
  for (const char* t : {"<|im_start|>", "<|im_end|>"}) {
    s.added.push_back({t, int32_t(s.vocab.size())});
    s.vocab.push_back(t);
  }
  s.pattern = mxn::kGpt2Pattern;
  const auto tok = mxn::make_bpe(s, "test", "bpe");
  using mxn::ChatFormat;
  EXPECT_EQ(
      mxn::chat_format_of_template("{% for m in messages %}<|im_start|>{{ m.role }}", *tok, "x"),
      ChatFormat::chatml);
  EXPECT_EQ(
      mxn::chat_format_of_template("<|start_header_id|>{{ m.role }}<|end_header_id|>", *tok, "x"),
      ChatFormat::llama3);
  EXPECT_EQ(mxn::chat_format_of_template("", *tok, "x"), ChatFormat::chatml);  // the tokens
  try {
    mxn::chat_format_of_template("{{ bos_token }}{{ m.content }}", *tok, "GGUF file 'm.gguf'");
    FAIL() << "a template with no known markers";
  } catch (const mxn::Error& e) {
    EXPECT_EQ(std::string(e.what()).rfind("GGUF file 'm.gguf' has no chat format mxn knows", 0), 0u)
        << e.what();
  }
}
