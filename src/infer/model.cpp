#include "infer/model.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <numeric>

#include "backend/device.h"
#include "core/error.h"
#include "core/fs.h"
#include "core/rng.h"
#include "data/chat.h"
#include "data/glm.h"
#include "data/shard.h"
#include "data/tokenizer.h"
#include "graph/program.h"
#include "infer/adapter.h"
#include "infer/text_stream.h"
#include "io/checkpoint.h"
#include "io/gguf_model.h"
#include "io/hf_folder.h"
#include "io/train_config.h"

namespace mxn {

ModelSource load_model(const std::string& path, const std::string& adapter) {
  namespace fs = std::filesystem;
  ModelSource m;
  if (!fs::exists(path))
    throw Error("model '" + path +
                "' does not exist (expected a Hugging Face model folder, a "
                ".gguf file, or an mxn checkpoint or run folder)");
  if (fs::is_regular_file(path)) {
    if (!is_gguf_file(path))
      throw Error("'" + path +
                  "' is not a GGUF file (expected a Hugging Face model folder, a "
                  ".gguf file, or an mxn checkpoint or run folder)");
    m.what = "GGUF file '" + path + "'";
    const GgufFile f = gguf_load(path);
    m.cfg = decoder_from_gguf(f, m.weights, path);
    try {  // a tokenizer mxn cannot read leaves the model usable from token ids
      m.tokenizer = tokenizer_from_gguf(f, path, &m.chat_template);
    } catch (const Error& e) {
      m.tokenizer_error = e.what();
    }
    if (const GgufTensor* t = f.tensor("token_embd.weight"))
      m.stored_16bit = t->type != GgmlType::f32;
  } else if (!fs::exists(fs::path(path) / "config.json") &&
             !fs::exists(fs::path(path) / "trainer.json") &&
             !fs::exists(fs::path(path) / "latest")) {
    throw Error("'" + path +
                "' is not a checkpoint, run folder or model folder: it has no config.json (a "
                "Hugging Face model folder), trainer.json (an mxn checkpoint) or latest (an mxn "
                "run folder)");
  } else if (fs::exists(fs::path(path) / "config.json")) {
    m.what = "model folder '" + path + "'";
    m.cfg = load_hf_config(path);  // names a missing config.json
    m.weights = load_hf_weights(path);
    m.tokenizer_dir = path;
    const nlohmann::json j = nlohmann::json::parse(
        read_file((fs::path(path) / "config.json").string(), "model config"), nullptr, false);
    m.stored_16bit = j.is_object() && (j.value("torch_dtype", "") == "bfloat16" ||
                                       j.value("torch_dtype", "") == "float16");
  } else {
    Checkpoint ck = load_checkpoint(path, false);
    TrainConfig tc;
    from_json(tc, ck.trainer.at("config"));
    m.what = "checkpoint '" + path + "'";
    m.cfg = tc.decoder_config();
    if (tc.finetune != "full") {  // adapters only: the base from its folder, the adapter applied
      if (!fs::is_directory(tc.model.dir))
        throw Error("checkpoint '" + path + "' holds " + tc.finetune +
                    " adapters of the model folder '" + tc.model.dir +
                    "', which is not there any more");
      m.weights = load_hf_weights(tc.model.dir);
      apply_adapter(m.cfg, m.weights, load_adapter(resolve_checkpoint(path)), m.what);
    } else {
      m.weights = std::move(ck.weights);
    }
    if (!tc.model.dir.empty() && fs::is_directory(tc.model.dir)) m.tokenizer_dir = tc.model.dir;
  }
  m.cfg.validate();
  if (!adapter.empty()) {  // merged in f32
    for (auto& [name, t] : m.weights) t = widen_to_f32(std::move(t));
    apply_adapter(m.cfg, m.weights, load_adapter(adapter), m.what);
    m.what += " with adapter '" + adapter + "'";
  }
  m.weights = decoder_weights(m.cfg, std::move(m.weights), m.what);
  return m;
}

std::shared_ptr<Tokenizer> model_tokenizer(const ModelSource& src) {
  return src.tokenizer_dir.empty() ? src.tokenizer : load_tokenizer(src.tokenizer_dir);
}

ChatFormat model_chat_format(const ModelSource& src, const Tokenizer& tok) {
  return src.tokenizer_dir.empty() ? chat_format_of_template(src.chat_template, tok, src.what)
                                   : chat_format(src.tokenizer_dir, tok);
}

DType weight_dtype(const GenerateOptions& o, const ModelSource& src, const Device& dev) {
  if (o.weights != "auto" && o.weights != "f32" && o.weights != "bf16")
    throw Error("weights '" + o.weights + "': expected auto, f32 or bf16");
  const bool cpu = dev.name().rfind("cpu", 0) == 0;
  return o.weights == "bf16" || (o.weights == "auto" && src.stored_16bit && cpu) ? DType::bf16
                                                                                 : DType::f32;
}

namespace {

// The loss over B sequences of T tokens of a loaded model on a device (its weights moved in):
// each pass's tokens and targets in, the mean loss over the targets that are not -1 out.
class LossPass {
 public:
  LossPass(ModelSource& src, const std::string& device, int64_t threads, int64_t B, int64_t T)
      : dev_(open_device(device, int(threads))) {
    Graph g;
    DecoderOptions o;
    o.with_loss = true;
    m_ = build_decoder(g, src.cfg, B, T, o);
    prog_ = std::make_unique<Program>(std::move(g), *dev_, false);
    upload_weights(*prog_, src.weights, src.what);
    src.weights.clear();
    std::vector<int32_t> pos(size_t(B * T));
    for (int64_t i = 0; i < B * T; ++i) pos[size_t(i)] = int32_t(i % T);
    dev_->upload(prog_->tensor(m_.positions), pos.data());
  }
  float operator()(const std::vector<int32_t>& tokens, const std::vector<int32_t>& targets) {
    dev_->upload(prog_->tensor(m_.tokens), tokens.data());
    dev_->upload(prog_->tensor(m_.targets), targets.data());
    prog_->run(0, prog_->graph().nodes.size());
    float loss;
    dev_->download(&loss, prog_->tensor(m_.loss));
    return loss;
  }

 private:
  std::unique_ptr<Device> dev_;
  DecoderGraph m_;
  std::unique_ptr<Program> prog_;
};

}  // namespace

double eval_model(const std::string& model, const std::string& data_path, const std::string& device,
                  int64_t threads, int64_t batch, int64_t ctx) {
  TokenData data = TokenData::open(data_path);
  ModelSource src = load_model(model);
  const DecoderConfig& cfg = src.cfg;
  const int64_t T = std::min({cfg.max_pos, ctx > 0 ? ctx : int64_t(1024), data.n_val() - 1});
  if (T < 1) throw Error("data '" + data_path + "' has too few validation tokens to evaluate");
  if (data.vocab() > cfg.vocab_size)
    throw Error("data '" + data_path + "' has vocab " + std::to_string(data.vocab()) +
                ", the model's is " + std::to_string(cfg.vocab_size));
  const int64_t windows = (data.n_val() - 1) / T;
  const int64_t B = std::max<int64_t>(1, std::min(batch, windows));
  LossPass pass(src, device, threads, B, T);
  std::vector<int32_t> tok(size_t(B * T)), tgt(size_t(B * T));
  double sum = 0;
  int64_t n = 0;
  // Non-overlapping windows over the whole split; the last partial batch is dropped.
  for (int64_t w0 = 0; w0 + B <= windows; w0 += B) {
    for (int64_t b = 0; b < B; ++b)
      for (int64_t t = 0; t < T; ++t) {
        tok[size_t(b * T + t)] = int32_t(data.val()[(w0 + b) * T + t]);
        tgt[size_t(b * T + t)] = int32_t(data.val()[(w0 + b) * T + t + 1]);
      }
    sum += pass(tok, tgt);
    ++n;
  }
  return sum / double(n);
}

Perplexity text_perplexity(const std::string& model, const std::string& text_path,
                           const std::string& device, int64_t threads, int64_t batch, int64_t ctx) {
  ModelSource src = load_model(model);
  const DecoderConfig& cfg = src.cfg;
  const std::shared_ptr<Tokenizer> tok = model_tokenizer(src);
  if (!tok)
    throw Error(src.tokenizer_error.empty()
                    ? src.what + " has no tokenizer to read the text '" + text_path + "' with"
                    : src.tokenizer_error);
  const std::vector<int32_t> ids =
      tok->encode(read_file(text_path, "text"), Tokenizer::Specials::as_text);
  Perplexity p;
  p.tokens = int64_t(ids.size());
  p.ctx = std::min(cfg.max_pos, ctx > 0 ? ctx : int64_t(1024));
  p.chunks = p.tokens / p.ctx;
  if (p.chunks < 1 || p.ctx < 4)
    throw Error("text '" + text_path + "' is " + std::to_string(p.tokens) +
                " tokens: fewer than one window of " + std::to_string(p.ctx));
  for (int32_t id : ids)
    if (id >= cfg.vocab_size)
      throw Error("text '" + text_path + "' tokenizes to id " + std::to_string(id) +
                  ", outside the model's vocabulary of " + std::to_string(cfg.vocab_size));
  const int64_t T = p.ctx, first = T / 2, B = std::max<int64_t>(1, std::min(batch, p.chunks));
  LossPass pass(src, device, threads, B, T);
  std::vector<int32_t> in(size_t(B * T)), tgt(size_t(B * T));
  double sum = 0;
  for (int64_t c0 = 0; c0 < p.chunks; c0 += B) {
    const int64_t n = std::min(B, p.chunks - c0);  // the last pass's unused rows score nothing
    for (int64_t b = 0; b < B; ++b)
      for (int64_t t = 0; t < T; ++t) {
        const int64_t at = (c0 + b) * T + t;
        const bool live = b < n;
        in[size_t(b * T + t)] = live ? ids[size_t(at)] : 0;
        // Position t predicts the chunk's token t + 1; only the second half is scored.
        tgt[size_t(b * T + t)] = live && t >= first && t + 1 < T ? ids[size_t(at + 1)] : -1;
      }
    const int64_t scored = n * (T - 1 - first);
    sum += double(pass(in, tgt)) * double(scored);
    p.scored += scored;
  }
  p.nll = sum / double(p.scored);
  p.ppl = std::exp(p.nll);
  return p;
}

std::string infill(const std::string& checkpoint, const std::string& text, int64_t max_tokens,
                   const SamplingOptions& sampling, const std::string& device, int64_t threads) {
  Checkpoint ck = load_checkpoint(checkpoint, false);
  TrainConfig tc;
  from_json(tc, ck.trainer.at("config"));
  if (tc.objective != "glm")
    throw Error("checkpoint '" + checkpoint +
                "' was not trained with --objective glm; --infill needs a blank-infilling model");
  const DecoderConfig cfg = tc.decoder_config();
  cfg.validate();
  // Byte-level runs: the specials follow the 256 byte ids, as the trainer placed them.
  const GlmTokens t = GlmTokens::after(ByteTokenizer::kVocab);
  // Part A: [CLS], the text's bytes, one mask token per blank; `pieces` keeps the text between
  // blanks for the answer.
  std::vector<int32_t> ids{t.cls};
  std::vector<int32_t> blanks;  // positions of the mask tokens
  std::vector<std::string> pieces(1);
  for (size_t i = 0; i < text.size();) {
    bool g = text.compare(i, 7, "[gMASK]") == 0;
    if (g || text.compare(i, 6, "[MASK]") == 0) {
      blanks.push_back(int32_t(ids.size()));
      ids.push_back(g ? t.gmask : t.mask);
      pieces.emplace_back();
      i += g ? 7 : 6;
    } else {
      pieces.back().push_back(text[i]);
      ids.push_back(uint8_t(text[i++]));
    }
  }
  if (blanks.empty()) throw Error("--infill text has no [MASK] or [gMASK] to fill");
  const int64_t T = cfg.max_pos, sep = int64_t(ids.size());
  if (sep + 2 > T)
    throw Error("--infill text takes " + std::to_string(sep) + " tokens; the model's context is " +
                std::to_string(T));
  auto dev = open_device(device, int(threads));
  Graph g;
  DecoderOptions o;
  o.mask = MXN_MASK_PREFIX;
  o.block_positions = true;
  o.last_logits = true;
  const DecoderGraph m = build_decoder(g, cfg, 1, T, o);
  Program prog(std::move(g), *dev, false);
  upload_weights(prog, ck.weights, "checkpoint '" + checkpoint + "'");
  std::vector<int32_t> pos(size_t(T), 0), blk(size_t(T), 0), tok(size_t(T), 0);
  for (int64_t i = 0; i < sep; ++i) pos[size_t(i)] = int32_t(i), tok[size_t(i)] = ids[size_t(i)];
  const int32_t prefix = int32_t(sep);
  dev->upload(prog.tensor(m.prefix), &prefix);
  Sampler sampler(sampling);
  std::vector<float> logits(size_t(cfg.vocab_size));
  std::vector<std::string> fills(blanks.size());
  int64_t len = sep;
  for (size_t b = 0; b < blanks.size(); ++b) {  // Part B: [sop] then the span, per blank
    for (int64_t k = 0; k < max_tokens && len < T; ++k) {
      tok[size_t(len)] = k == 0 ? t.sop : tok[size_t(len)];
      pos[size_t(len)] = blanks[b];
      blk[size_t(len)] = int32_t(k + 1);
      ++len;
      const int32_t last = int32_t(len - 1);
      dev->upload(prog.tensor(m.tokens), tok.data());
      dev->upload(prog.tensor(m.positions), pos.data());
      dev->upload(prog.tensor(m.block_positions), blk.data());
      dev->upload(prog.tensor(m.last_rows), &last);
      prog.run(0, prog.graph().nodes.size());
      dev->download(logits.data(), prog.tensor(m.logits));
      const int32_t next = sampler.next(logits.data(), cfg.vocab_size);
      if (next == t.eop || next >= 256 || len >= T) break;
      fills[b].push_back(char(uint8_t(next)));
      tok[size_t(len)] = next;  // the next row's input
    }
  }
  std::string out = pieces[0];
  for (size_t b = 0; b < blanks.size(); ++b) out += fills[b] + pieces[b + 1];
  return out;
}

int64_t generate(const GenerateOptions& o,
                 const std::function<void(int32_t id, const std::string& text)>& on_token) {
  if (o.sampling.temperature < 0) throw Error("temperature must be >= 0");
  if (o.sampling.top_p <= 0 || o.sampling.top_p > 1) throw Error("top_p must be in (0, 1]");
  if (o.max_tokens < 0) throw Error("max_tokens must be >= 0");
  if (o.checkpoint.empty() == o.model.empty())
    throw Error("generate needs one of --checkpoint (an mxn run) or --model (a model folder)");
  using clock = std::chrono::steady_clock;
  auto since = [](clock::time_point t) {
    return std::chrono::duration<double>(clock::now() - t).count();
  };
  GenerateStats st;
  auto t0 = clock::now();
  ModelSource src = load_model(o.checkpoint.empty() ? o.model : o.checkpoint, o.adapter);
  DecoderConfig& cfg = src.cfg;
  // mxn's own runs are byte-level; other models read text with their folder's tokenizer.
  const bool bytes =
      src.tokenizer_dir.empty() && !src.tokenizer && cfg.vocab_size <= ByteTokenizer::kVocab;
  // Token ids given: no folder tokenizer read (a GGUF's comes with the file anyway).
  const std::shared_ptr<Tokenizer> tok =
      o.prompt_ids.empty() ? model_tokenizer(src) : src.tokenizer;
  if (!bytes && !tok && o.prompt_ids.empty())
    throw Error(src.tokenizer_error.empty()
                    ? src.what + " comes without tokenizer files: give the prompt as --prompt-ids"
                    : src.tokenizer_error + ": give the prompt as --prompt-ids");
  std::vector<int32_t> ids;
  if (o.chat) {
    if (!tok) throw Error("--chat needs a model with its tokenizer and a text prompt");
    const ChatFormat f = model_chat_format(src, *tok);
    std::vector<ChatMessage> msgs;
    if (!o.system.empty()) msgs.push_back({"system", o.system});
    msgs.push_back({"user", o.prompt});
    ids = chat_prompt(f, msgs, *tok);
    for (int32_t id : chat_stop_ids(f, *tok)) cfg.eos.push_back(id);
  } else {
    ids = !o.prompt_ids.empty() ? o.prompt_ids
          : tok                 ? tok->encode(o.prompt)
                                : ByteTokenizer().encode(o.prompt);
  }
  if (ids.empty()) ids.push_back(bytes ? '\n' : 0);
  for (int32_t id : ids)
    if (id < 0 || id >= cfg.vocab_size)
      throw Error("prompt token " + std::to_string(id) + " is outside the vocabulary [0, " +
                  std::to_string(cfg.vocab_size) + ")");
  auto dev = open_device(o.device, int(o.threads));
  const int64_t capacity = std::min<int64_t>(cfg.max_pos, int64_t(ids.size()) + o.max_tokens);
  Generator gen(cfg, src.weights, src.what, *dev, std::max<int64_t>(capacity, 1), 256,
                weight_dtype(o, src, *dev));
  src.weights.clear();
  Sampler sampler(o.sampling);
  Utf8Stream utf8;
  StopFilter stop(o.stop);
  // A prompt longer than the cache keeps its last tokens.
  int64_t start = std::max<int64_t>(0, int64_t(ids.size()) - gen.capacity());
  st.load_s = since(t0);
  t0 = clock::now();
  const std::vector<float>* logits = &gen.feed(ids.data() + start, int64_t(ids.size()) - start);
  st.prompt_s = since(t0);
  st.prompt_tokens = int64_t(ids.size()) - start;
  t0 = clock::now();
  int64_t n = 0;
  for (; n < o.max_tokens; ++n) {
    const int32_t next = sampler.next(logits->data(), cfg.vocab_size);
    if (!o.ignore_eos && std::find(cfg.eos.begin(), cfg.eos.end(), next) != cfg.eos.end()) break;
    ids.push_back(next);
    bool done = false;
    std::string text;
    if (bytes) text = stop.push(utf8.push(uint8_t(next)), done);
    if (tok)
      for (char ch : tok->piece(next)) text += stop.push(utf8.push(uint8_t(ch)), done);
    on_token(next, text);
    if (done || n + 1 == o.max_tokens) {
      ++n;
      break;
    }
    if (gen.length() == gen.capacity()) {  // full: keep the last half as the new context
      const int64_t keep = std::max<int64_t>(1, gen.capacity() / 2);
      gen.reset();
      logits = &gen.feed(ids.data() + ids.size() - size_t(keep), keep);
    } else {
      logits = &gen.feed(&ids.back(), 1);
      ++st.decode_tokens;
    }
  }
  st.decode_s = since(t0);
  if (o.stats) *o.stats = st;
  if (dev->profiling()) std::fprintf(stderr, "%s", dev->profile_report().c_str());
  if (bytes || tok) {
    const std::string rest = stop.flush();
    if (!rest.empty()) on_token(-1, rest);
  }
  return n;
}

}  // namespace mxn
