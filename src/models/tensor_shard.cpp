// Tensor parallelism's shares of each weight (DecoderOptions::tp): which pieces of a whole tensor
// a rank holds, from the weight's name and the rank's heads and MLP columns.
#include <algorithm>

#include "models/builder.h"

namespace mxn {
namespace {

// A block linear's pieces along its outputs (`columns`: q/k/v, fc, gate/up) or its inputs (o,
// down); empty for a module tensor parallelism leaves whole.
std::vector<std::array<int64_t, 2>> module_pieces(const std::string& module, const DecoderConfig& c,
                                                  const TensorShard& s, bool& columns) {
  const Names nm = names_for(c.arch);
  const int64_t H = c.heads, G = c.n_kv_heads(), D = c.hd(), F = c.ffn_width();
  const std::array<int64_t, 2> q{s.head0 * D, s.heads * D}, kv{s.kv0 * D, s.kv * D},
      f{s.ffn0, s.ffn};
  columns = module != nm.o && module != nm.down;
  if (module.empty()) return {};  // (a family's unused names are empty)
  if (module == nm.q) return {q};
  if (module == nm.k || module == nm.v) return {kv};
  if (module == nm.qkv) return {q, {H * D + kv[0], kv[1]}, {(H + G) * D + kv[0], kv[1]}};
  if (module == nm.o) return {q};
  if (module == nm.fc || module == nm.gate || module == nm.up) return {f};
  if (module == nm.gate_up) return {f, {F + f[0], f[1]}};
  if (module == nm.down) return {f};
  return {};
}

// The block module a layer weight belongs to ("self_attn.q_proj" of
// "model.layers.3.self_attn.q_proj.lora_A.weight"), its leaf ("lora_A.weight") in *leaf.
std::string module_of(const std::string& name, const DecoderConfig& c, std::string* leaf) {
  const Names nm = names_for(c.arch);
  const size_t dot = name.find('.', nm.layers.size());
  if (name.rfind(nm.layers, 0) != 0 || dot == std::string::npos) return "";
  for (const char* l : {".lora_A.weight", ".lora_B.weight", ".weight", ".bias"})
    if (name.ends_with(l)) {
      *leaf = l + 1;
      return name.substr(dot + 1, name.size() - dot - 1 - std::char_traits<char>::length(l));
    }
  return "";
}

}  // namespace

ShardPieces shard_pieces(const std::string& name, const DecoderConfig& c, const TensorShard& s) {
  ShardPieces out;
  if (!s.on()) return out;
  const std::array<int64_t, 2> kv{s.kv0 * c.hd(), s.kv * c.hd()};
  // P-Tuning v2: the prefix rows (prefix_len, kv heads x head dim) and their MLP's output layers
  // per layer, by kv heads.
  const std::string enc = kPrefixEncoder;
  if (name.rfind("prefix.", 0) == 0) return {1, {kv}};
  if (name.rfind(enc, 0) == 0 &&
      (name.find(".key.") != std::string::npos || name.find(".value.") != std::string::npos))
    return {0, {kv}};
  const Names nm = names_for(c.arch);
  if (name == nm.embed + ".weight" || name == nm.lm_head + ".weight")
    return {0, {{s.vocab0, s.vocab}}};  // vocabulary rows
  std::string leaf;
  bool columns = false;
  const auto pieces = module_pieces(module_of(name, c, &leaf), c, s, columns);
  if (pieces.empty()) return out;
  if (leaf == "lora_A.weight") {  // (r, in): split with a row-split linear's inputs
    if (!columns) out = {1, pieces};
  } else if (leaf == "lora_B.weight") {  // (out, r): with a column-split linear's outputs
    if (columns) out = {0, pieces};
  } else if (leaf == "bias") {  // along the outputs; a row-split linear's is whole
    if (columns) out = {0, pieces};
  } else {  // GPT-2's Conv1D stores (in, out), nn.Linear (out, in)
    out = {columns == c.gpt2() ? 1 : 0, pieces};
  }
  return out;
}

std::array<int64_t, 2> seq_rows(const TensorShard& s, int64_t N) {
  const int64_t base = N / s.ranks, extra = N % s.ranks;
  return {s.rank * base + std::min(s.rank, extra), base + (s.rank < extra ? 1 : 0)};
}

SeqCutPoints seq_cut_points(const Graph& g, const DecoderGraph::SeqCut& c) {
  const char* what = "sequence parallelism: a cut's rows are written after they cross";
  SeqCutPoints p;
  p.forward = g.cut_before(c.to, c.from, what);
  p.backward = g.cut_before(c.d_from, c.d_to, what);
  // A gather's rows are gathered again even where no backward node reads them (a fused head
  // makes its gradients in the forward), at the latest with the gradient's exchange: every rank
  // of the group takes part in the same collectives in the same order, whatever its graph.
  if (c.again >= 0) p.again = std::min(g.cut_before(c.again, c.again_from, what), p.backward);
  return p;
}

bool partial_gradient(const std::string& name, const DecoderConfig& c, const TensorShard& s) {
  if (!s.on()) return false;
  // Sequence parallelism: a whole weight is either read on this rank's rows only (norms, the
  // biases added to the residual stream, position tables) or partial already (below).
  if (s.seq) return shard_pieces(name, c, s).pieces.empty();
  if (name.rfind(kPrefixEncoder, 0) == 0) return shard_pieces(name, c, s).pieces.empty();
  std::string leaf;
  bool columns = false;
  const std::string module = module_of(name, c, &leaf);
  const Names nm = names_for(c.arch);
  if (!module.empty() && (module == nm.q_norm || module == nm.k_norm))
    return true;  // over this rank's heads only
  const auto pieces = module_pieces(module, c, s, columns);
  return !pieces.empty() && leaf.rfind("lora_", 0) == 0 && shard_pieces(name, c, s).pieces.empty();
}

}  // namespace mxn
