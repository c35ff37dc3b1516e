// Which tokenizer a model folder ships, and the readers of each file format.
#include "data/tokenizer.h"

#include <sentencepiece_processor.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "core/error.h"
#include "core/fs.h"
#include "data/bpe.h"

namespace mxn {
namespace fs = std::filesystem;
namespace {

nlohmann::json parse_json(const std::string& path, const std::string& what) {
  try {
    return nlohmann::json::parse(read_file(path, what));
  } catch (const nlohmann::json::exception& e) {
    throw Error(path + ": not valid JSON (" + e.what() + ")");
  }
}

std::string to_bytes(const std::string& key, const std::string& path) {
  bool ok = false;
  std::string b = bytes_from_gpt2_unicode(key, &ok);
  if (!ok) throw Error(path + ": token '" + key + "' is not in GPT-2's byte-level alphabet");
  return b;
}

// vocab (token text -> id, in GPT-2's byte alphabet) into BpeSpec's id -> bytes.
void read_vocab(const nlohmann::json& v, const std::string& path, BpeSpec& s) {
  if (!v.is_object()) throw Error(path + ": the vocab is not an object of token -> id");
  for (auto& [k, id] : v.items()) {
    if (!id.is_number_integer() || id.get<int64_t>() < 0 || id.get<int64_t>() > (1 << 24))
      throw Error(path + ": token '" + k + "' has id " + id.dump() + ", expected 0..16777216");
    const size_t i = id.get<size_t>();
    if (s.vocab.size() <= i) s.vocab.resize(i + 1);
    s.vocab[i] = to_bytes(k, path);
  }
}

void add_merge(const std::string& a, const std::string& b, const std::string& path,
               const std::unordered_map<std::string, int32_t>& ids, BpeSpec& s) {
  auto ia = ids.find(to_bytes(a, path)), ib = ids.find(to_bytes(b, path));
  if (ia == ids.end() || ib == ids.end())
    throw Error(path + ": merge '" + a + " " + b + "' names a token not in the vocab");
  s.merges.push_back({ia->second, ib->second});
}

std::unordered_map<std::string, int32_t> index(const BpeSpec& s) {
  std::unordered_map<std::string, int32_t> ids;
  for (size_t i = 0; i < s.vocab.size(); ++i)
    if (!s.vocab[i].empty()) ids.emplace(s.vocab[i], int32_t(i));
  return ids;
}

// GPT-2's vocab.json (encoder.json) + merges.txt (vocab.bpe).
std::unique_ptr<Tokenizer> load_gpt2(const std::string& vocab, const std::string& merges) {
  BpeSpec s;
  read_vocab(parse_json(vocab, "tokenizer vocab"), vocab, s);
  const auto ids = index(s);
  std::istringstream in(read_file(merges, "tokenizer merges"));
  std::string line;
  while (std::getline(in, line)) {
    if (line.empty() || line.rfind("#version", 0) == 0) continue;
    const size_t sp = line.find(' ');
    if (sp == std::string::npos) throw Error(merges + ": line '" + line + "' is not 'a b'");
    add_merge(line.substr(0, sp), line.substr(sp + 1), merges, ids, s);
  }
  s.pattern = kGpt2Pattern;
  const auto eot = ids.find("<|endoftext|>");
  if (eot != ids.end()) s.added.push_back({"<|endoftext|>", eot->second});
  return make_bpe(std::move(s), vocab, "gpt2-bpe");
}

// A pre_tokenizer's split regex: a Split with a Regex, or ByteLevel's own (GPT-2's).
void find_pattern(const nlohmann::json& p, const std::string& path, std::string& pattern) {
  if (!p.is_object()) return;
  const std::string type = p.value("type", "");
  if (type == "Sequence" && p.contains("pretokenizers"))
    for (const auto& q : p["pretokenizers"]) find_pattern(q, path, pattern);
  else if (type == "Split" && p.contains("pattern") && p["pattern"].contains("Regex"))
    pattern = p["pattern"]["Regex"].get<std::string>();
  else if (type == "ByteLevel" && p.value("use_regex", true) && pattern.empty())
    pattern = kGpt2Pattern;
  else if (type == "ByteLevel" && p.value("add_prefix_space", false))
    throw Error(path + ": ByteLevel add_prefix_space is not supported");
  else if (type != "ByteLevel" && type != "Split" && type != "Sequence")
    throw Error(path + ": pre-tokenizer '" + type +
                "' is not supported (byte-level BPE: Split, ByteLevel, Sequence)");
}

std::unique_ptr<Tokenizer> bpe_from_json(const nlohmann::json& j, const std::string& path) {
  if (!j.is_object() || !j.contains("model") || !j["model"].is_object())
    throw Error(path + ": no 'model' object (expected a Hugging Face tokenizer.json)");
  const nlohmann::json& m = j["model"];
  if (m.value("type", "") != "BPE")
    throw Error(path + ": model type '" + m.value("type", "?") +
                "' is not supported (byte-level BPE; SentencePiece models load from "
                "tokenizer.model)");
  if (j.contains("normalizer") && !j["normalizer"].is_null() &&
      j["normalizer"].value("type", "") != "NFC")
    throw Error(path + ": normalizer '" + j["normalizer"].value("type", "?") +
                "' is not supported (none, or NFC)");
  BpeSpec s;
  if (!m.contains("vocab")) throw Error(path + ": model has no vocab");
  read_vocab(m["vocab"], path, s);
  const auto ids = index(s);
  if (m.contains("merges") && m["merges"].is_array())
    for (const auto& mg : m["merges"]) {
      if (mg.is_string()) {
        const std::string t = mg.get<std::string>();
        const size_t sp = t.find(' ');
        if (sp == std::string::npos) throw Error(path + ": merge '" + t + "' is not 'a b'");
        add_merge(t.substr(0, sp), t.substr(sp + 1), path, ids, s);
      } else if (mg.is_array() && mg.size() == 2 && mg[0].is_string() && mg[1].is_string()) {
        add_merge(mg[0].get<std::string>(), mg[1].get<std::string>(), path, ids, s);
      } else {
        throw Error(path + ": merge " + mg.dump() + " is neither 'a b' nor [a, b]");
      }
    }
  if (j.contains("pre_tokenizer")) find_pattern(j["pre_tokenizer"], path, s.pattern);
  if (s.pattern.empty()) throw Error(path + ": no byte-level pre-tokenizer found");
  if (j.contains("added_tokens") && j["added_tokens"].is_array())
    for (const auto& a : j["added_tokens"]) {
      if (!a.contains("id") || !a.contains("content") || !a["id"].is_number_integer())
        throw Error(path + ": an added token lacks its id or content");
      const int32_t id = a["id"].get<int32_t>();
      if (id < 0 || id > (1 << 24)) throw Error(path + ": added token id out of range");
      const std::string text = a["content"].get<std::string>();
      if (s.vocab.size() <= size_t(id)) s.vocab.resize(size_t(id) + 1);
      s.vocab[size_t(id)] = text;
      s.added.push_back({text, id});
    }
  s.ignore_merges = m.value("ignore_merges", false);
  return make_bpe(std::move(s), path, "tokenizer.json");
}

std::unique_ptr<Tokenizer> load_tokenizer_json(const std::string& path) {
  return tokenizer_from_json(read_file(path, "tokenizer"), path);
}

// GLM-4's tokenizer.model: "base64(token) rank" per line, tiktoken's format.
bool looks_tiktoken(const std::string& bytes) {
  const size_t nl = bytes.find('\n');
  const std::string first = bytes.substr(0, nl == std::string::npos ? bytes.size() : nl);
  const size_t sp = first.find(' ');
  return sp != std::string::npos && sp > 0 &&
         first.find_first_not_of(
             "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=") == sp &&
         first.find_first_not_of("0123456789", sp + 1) == std::string::npos;
}

std::string base64_decode(const std::string& s, bool* ok) {
  static const std::string abc = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  std::string out;
  uint32_t acc = 0;
  int bits = 0;
  *ok = true;
  for (char c : s) {
    if (c == '=') break;
    const size_t v = abc.find(c);
    if (v == std::string::npos) {
      *ok = false;
      return out;
    }
    acc = acc << 6 | uint32_t(v);
    bits += 6;
    if (bits >= 8) {
      bits -= 8;
      out.push_back(char((acc >> bits) & 0xFF));
    }
  }
  return out;
}

std::unique_ptr<Tokenizer> load_tiktoken(const std::string& path, const std::string& bytes) {
  BpeSpec s;
  std::istringstream in(bytes);
  std::string line;
  int64_t n = 0;
  while (std::getline(in, line)) {
    ++n;
    if (line.empty()) continue;
    const size_t sp = line.find(' ');
    bool ok = sp != std::string::npos;
    const std::string tok = ok ? base64_decode(line.substr(0, sp), &ok) : "";
    char* end = nullptr;
    const long rank = ok ? std::strtol(line.c_str() + sp + 1, &end, 10) : -1;
    if (!ok || !end || *end || rank < 0 || rank > (1 << 24) || tok.empty())
      throw Error(path + ": line " + std::to_string(n) + " is not 'base64 rank'");
    if (s.vocab.size() <= size_t(rank)) s.vocab.resize(size_t(rank) + 1);
    s.vocab[size_t(rank)] = tok;
  }
  // GLM-4's special tokens follow its 151329 ranks (../shared/GLM.md).
  const char* specials[] = {"<|endoftext|>",
                            "[MASK]",
                            "[gMASK]",
                            "[sMASK]",
                            "<sop>",
                            "<eop>",
                            "<|system|>",
                            "<|user|>",
                            "<|assistant|>",
                            "<|observation|>",
                            "<|begin_of_image|>",
                            "<|end_of_image|>",
                            "<|begin_of_video|>",
                            "<|end_of_video|>"};
  int32_t id = int32_t(s.vocab.size());
  for (const char* t : specials) {
    s.vocab.push_back(t);
    s.added.push_back({t, id++});
  }
  s.pattern = kGpt4Pattern;
  return make_bpe(std::move(s), path, "tiktoken");
}

class SentencePiece final : public Tokenizer {
 public:
  SentencePiece(const std::string& path, const std::string& bytes,
                const std::vector<std::string>& extra) {
    const auto st = sp_.LoadFromSerializedProto(bytes);
    if (!st.ok())
      throw Error(path + ": not a SentencePiece model nor a tiktoken file (" + st.ToString() + ")");
    n_ = sp_.GetPieceSize();
    for (const char* t : {"<s>", "</s>", "<unk>"})
      if (sp_.PieceToId(t) != sp_.unk_id() || std::string(t) == "<unk>")
        specials_.push_back({t, sp_.PieceToId(t)});
    for (const std::string& t : extra) specials_.push_back({t, int32_t(n_++)});
    std::sort(specials_.begin(), specials_.end(),
              [](auto& a, auto& b) { return a.first.size() > b.first.size(); });
  }
  std::vector<int32_t> encode(std::string_view text,
                              Specials specials = Specials::parse) const override {
    std::vector<int32_t> out;
    size_t seg = 0;
    auto flush = [&](size_t end) {
      if (end > seg) {
        std::vector<int> ids;
        sp_.Encode(std::string(text.substr(seg, end - seg)), &ids);
        out.insert(out.end(), ids.begin(), ids.end());
      }
    };
    for (size_t i = 0; specials == Specials::parse && i < text.size(); ++i)
      for (const auto& [t, id] : specials_)
        if (text.compare(i, t.size(), t) == 0) {
          flush(i);
          out.push_back(id);
          i += t.size() - 1;
          seg = i + 1;
          break;
        }
    flush(text.size());
    return out;
  }
  // One token's text for streaming: "▁" is a space, a byte-fallback piece its byte.
  std::string piece(int32_t id) const override {
    for (const auto& [t, sid] : specials_)
      if (sid == id) return t;
    if (id < 0 || id >= sp_.GetPieceSize() || sp_.IsControl(id)) return "";
    std::string p = sp_.IdToPiece(id);
    if (sp_.IsByte(id) && p.size() == 6)
      return std::string(1, char(std::stoi(p.substr(3, 2), nullptr, 16)));
    for (size_t at; (at = p.find("\xE2\x96\x81")) != std::string::npos;) p.replace(at, 3, " ");
    return p;
  }
  // SentencePiece's own decoding (it drops the dummy prefix's space), special tokens as text.
  std::string decode(const std::vector<int32_t>& ids) const override {
    std::string out;
    std::vector<int> run;
    auto flush = [&] {
      if (run.empty()) return;
      out += sp_.DecodeIds(run);
      run.clear();
    };
    for (int32_t id : ids) {
      if (id >= 0 && id < sp_.GetPieceSize() && !sp_.IsControl(id)) {
        run.push_back(id);
        continue;
      }
      flush();
      out += piece(id);
    }
    flush();
    return out;
  }
  int64_t vocab_size() const override { return n_; }
  int32_t token_id(std::string_view text) const override {
    for (const auto& [t, id] : specials_)
      if (t == text) return id;
    return -1;
  }
  const char* kind() const override { return "sentencepiece"; }

 private:
  sentencepiece::SentencePieceProcessor sp_;
  int64_t n_ = 0;
  std::vector<std::pair<std::string, int32_t>> specials_;
};

std::unique_ptr<Tokenizer> load_model_file(const std::string& path,
                                           const std::vector<std::string>& extra) {
  const std::string bytes = read_file(path, "tokenizer model");
  if (looks_tiktoken(bytes)) return load_tiktoken(path, bytes);
  return std::make_unique<SentencePiece>(path, bytes, extra);
}

// ChatGLM2/3 append their special tokens after the SentencePiece vocabulary, in this order.
std::vector<std::string> chatglm_specials(const std::string& dir) {
  const fs::path cfg = fs::path(dir) / "tokenizer_config.json";
  if (!fs::exists(cfg)) return {};
  const nlohmann::json j = parse_json(cfg.string(), "tokenizer config");
  if (j.value("tokenizer_class", "") != "ChatGLMTokenizer") return {};
  return {"[MASK]",   "[gMASK]",       "[sMASK]",        "sop", "eop", "<|system|>",
          "<|user|>", "<|assistant|>", "<|observation|>"};
}

}  // namespace

std::unique_ptr<Tokenizer> sentencepiece_from_proto(const std::string& bytes,
                                                    const std::string& source) {
  return std::make_unique<SentencePiece>(source, bytes, std::vector<std::string>{});
}

std::unique_ptr<Tokenizer> tokenizer_from_json(const std::string& text, const std::string& path) {
  try {
    return bpe_from_json(nlohmann::json::parse(text), path);
  } catch (const nlohmann::json::parse_error& e) {
    throw Error(path + ": not valid JSON (" + e.what() + ")");
  } catch (const nlohmann::json::exception& e) {  // a field of the wrong type
    throw Error(path + ": not a tokenizer.json mxn can read (" + e.what() + ")");
  }
}

std::unique_ptr<Tokenizer> load_tokenizer_file(const std::string& path) {
  if (!fs::exists(path)) throw Error("tokenizer file '" + path + "' does not exist");
  const std::string name = fs::path(path).filename().string();
  if (name.size() >= 5 && name.compare(name.size() - 5, 5, ".json") == 0 && name != "vocab.json" &&
      name != "encoder.json")
    return load_tokenizer_json(path);
  if (name == "vocab.json" || name == "encoder.json") {
    const fs::path dir = fs::path(path).parent_path();
    const fs::path merges = fs::exists(dir / "merges.txt") ? dir / "merges.txt" : dir / "vocab.bpe";
    return load_gpt2(path, merges.string());
  }
  return load_model_file(path, chatglm_specials(fs::path(path).parent_path().string()));
}

std::unique_ptr<Tokenizer> load_tokenizer(const std::string& dir) {
  const fs::path d(dir);
  for (const char* f : {"tokenizer.json", "vocab.json", "encoder.json", "tokenizer.model"})
    if (fs::exists(d / f)) return load_tokenizer_file((d / f).string());
  throw Error("model folder '" + dir +
              "' has no tokenizer (tokenizer.json, vocab.json + merges.txt, or tokenizer.model)");
}

}  // namespace mxn
