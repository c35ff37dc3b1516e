#include "plan/planner.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <map>
#include <numeric>
#include <tuple>

#include "core/error.h"

namespace mxn {

namespace {

constexpr double kUsable = 0.9;     // of a chip's memory; the rest is context and fragmentation
constexpr double kLatency = 20e-6;  // seconds a message costs before its bytes (MPI, NCCL)
constexpr double kPassS = 20e-6;    // a layer's kernel launches and sync per pass, each way
constexpr double kGiB = 1024.0 * 1024.0 * 1024.0;

std::string gib(double bytes) {
  char s[32];
  std::snprintf(s, sizeof s, "%.3g GiB", bytes / kGiB);
  return s;
}

// The job at one micro-batch size, and the chips' rates for one set of used types.
struct Ctx {
  const Cluster& c;
  const ModelCost& m;
  const JobSpec& job;
  int64_t b = 1;

  double tokens() const { return double(b) * double(job.seq); }
  int pool(int g) const {
    const int s = c.groups[size_t(g)].shares_cores_with;
    return s >= 0 ? s : g;
  }
  // Groups computing on the same cores split them evenly when all of them are used: each
  // group's rate is divided by the number of used groups on its cores.
  std::vector<double> divisors(const std::vector<bool>& used) const {
    std::vector<double> d(c.groups.size(), 1.0);
    for (size_t g = 0; g < d.size(); ++g) {
      int sharing = 0;
      for (size_t h = 0; h < c.groups.size(); ++h)
        sharing += used[h] && pool(int(h)) == pool(int(g));
      d[g] = std::max(1, sharing);
    }
    return d;
  }
  double rate(int g, const std::vector<double>& divisor) const {
    const NodeGroup& n = c.groups[size_t(g)];
    return n.chip.bf16_tflops * 1e12 * n.mfu / divisor[size_t(g)];
  }
  double usable(int g) const { return c.groups[size_t(g)].chip.memory_gib * kGiB * kUsable; }
};

struct StageShape {
  int64_t first, last, p, s;
  bool recompute;
};

double stage_params(const ModelCost& m, const StageShape& x) {
  double n = double(x.last - x.first) * m.layer_params;
  if (x.s == 0) n += m.embed_params;
  if (x.s == x.p - 1) n += m.head_params + (m.tied && x.p > 1 ? double(m.vocab * m.hidden) : 0);
  return n;
}

// Peak bytes of one stage's chip: weights, gradients, optimizer shard, the activations of the
// micro-batches in flight (1F1B keeps p - s of them), one layer's backward working set, the
// logits on the last stage, send buffers (double-buffered, both directions), two buckets.
double stage_bytes(const Ctx& x, const StageShape& st, int64_t inflight, double shards) {
  const ModelCost& m = x.m;
  const double params = stage_params(m, st), layers = double(st.last - st.first);
  double bytes = params * (m.weight_bytes + m.grad_bytes + m.optim_bytes / shards);
  // Recomputation keeps the inputs of the micro-batches in flight and reruns the stage's forward
  // for one of them at a time (all its layers' activations, as mxn's pipeline does).
  if (st.recompute)
    bytes += x.tokens() * (double(inflight) * layers * m.input_bytes + layers * m.act_bytes);
  else
    bytes += x.tokens() * double(inflight) * layers * m.act_bytes;
  bytes += x.tokens() * m.act_bytes;  // the backward's working set
  if (st.s == st.p - 1) bytes += x.tokens() * m.logits_bytes;
  if (st.p > 1) bytes += 4 * x.tokens() * m.boundary_bytes;
  if (shards > 1) bytes += 2 * x.job.bucket_mb * 1024 * 1024;
  return bytes;
}

double stage_fwd_s(const Ctx& x, const StageShape& st, double rate) {
  double f = double(st.last - st.first) * x.m.layer_flops;
  if (st.s == st.p - 1) f += x.m.head_flops;
  // A replica of one stage runs its micro-batches as one pass: no per-pass cost to split.
  return x.tokens() * f / rate + (st.p > 1 ? double(st.last - st.first) * kPassS : 0);
}

double stage_bwd_s(const Ctx& x, const StageShape& st, double rate) {
  const double recompute = st.recompute ? double(st.last - st.first) * x.m.layer_flops : 0;
  return 2 * stage_fwd_s(x, st, rate) + x.tokens() * recompute / rate +
         (st.recompute && st.p > 1 ? double(st.last - st.first) * kPassS : 0);
}

// A pipeline over `chips` (a group per stage) with the best stage boundaries: the smallest
// bottleneck time whose greedy packing (each stage takes as many layers as fit its time and
// memory, recomputing only when that fits more) places every layer. `shards`: the replicas
// sharing each stage's optimizer state. Returns false with `why` when no packing fits.
bool build_pipeline(const Ctx& x, const std::vector<int>& chips, const std::vector<double>& divisor,
                    double shards, std::vector<StageCost>& out, std::string& why,
                    const std::vector<int64_t>* fixed = nullptr) {
  const int64_t p = int64_t(chips.size()), L = x.m.layers;
  if (p > L) {
    why = std::to_string(p) + " stages for " + std::to_string(L) + " layers";
    return false;
  }
  std::vector<double> rates(static_cast<size_t>(p));
  for (int64_t s = 0; s < p; ++s) rates[size_t(s)] = x.rate(chips[size_t(s)], divisor);
  std::vector<StageShape> shape(static_cast<size_t>(p));
  // Fills `shape` for bottleneck `tau`; false where a stage cannot take its layers.
  auto pack = [&](double tau) {
    int64_t layer = 0;
    for (int64_t s = 0; s < p; ++s) {
      const int64_t most = L - layer - (p - s - 1);
      const int g = chips[size_t(s)];
      int64_t take = 0;
      bool rc = false;
      for (bool r : {false, true}) {
        if (!r && p > 1 && x.job.recompute_all) continue;  // mxn's pipeline recomputes always
        int64_t n = 0;
        for (int64_t k = 1; k <= most; ++k) {
          if (fixed && k != (*fixed)[size_t(s)]) continue;
          const StageShape st{layer, layer + k, p, s, r};
          if (stage_bwd_s(x, st, rates[size_t(s)]) + stage_fwd_s(x, st, rates[size_t(s)]) > tau ||
              stage_bytes(x, st, p - s, shards) > x.usable(g))
            break;
          n = k;
        }
        if (n > take) take = n, rc = r;
      }
      if (take == 0 || (s == p - 1 && take < most)) return false;
      shape[size_t(s)] = {layer, layer + take, p, s, rc};
      layer += take;
    }
    return true;
  };
  double hi = 0;
  for (int64_t s = 0; s < p; ++s)
    hi = std::max(hi, 2 * (stage_fwd_s(x, {0, L, p, p - 1, true}, rates[size_t(s)]) +
                           stage_bwd_s(x, {0, L, p, p - 1, true}, rates[size_t(s)])));
  if (fixed && !pack(hi * 1.01)) {
    for (int64_t s = 0, layer = 0; s < p; layer += (*fixed)[size_t(s)], ++s) {
      const int g = chips[size_t(s)];
      const StageShape st{layer, layer + (*fixed)[size_t(s)], p, s, p > 1};
      if ((*fixed)[size_t(s)] < 1 || stage_bytes(x, st, p - s, shards) > x.usable(g)) {
        why = "stage " + std::to_string(s + 1) + " (" + x.c.groups[size_t(g)].chip.name + ", " +
              std::to_string((*fixed)[size_t(s)]) + " layers) needs " +
              gib(stage_bytes(x, st, p - s, shards)) + "; the chip holds " + gib(x.usable(g));
        return false;
      }
    }
    why = "the stages' layer counts do not add up to the model's " + std::to_string(L);
    return false;
  }
  if (!pack(hi * 1.01)) {
    // Name what does not fit: the first stage that cannot hold its share at any speed.
    for (int64_t s = 0, layer = 0; s < p; ++s) {
      const int g = chips[size_t(s)];
      const StageShape one{layer, layer + 1, p, s, true};
      const std::string& name = x.c.groups[size_t(g)].chip.name;
      if (stage_bytes(x, one, p - s, shards) > x.usable(g)) {
        why = "layer " + std::to_string(layer) +
              (s == 0       ? " with the embeddings"
               : s == p - 1 ? " with the LM head"
                            : "") +
              " needs " + gib(stage_bytes(x, one, p - s, shards)) + " at micro-batch " +
              std::to_string(x.b) + " with recomputation as stage " + std::to_string(s + 1) +
              " of " + std::to_string(p) + "; " + name + " holds " + gib(x.usable(g)) + " (" +
              std::to_string(int(kUsable * 100)) + "% of its " +
              gib(x.c.groups[size_t(g)].chip.memory_gib * kGiB) + ")";
        return false;
      }
      int64_t n = 1;
      while (layer + n < L - (p - s - 1) &&
             stage_bytes(x, {layer, layer + n + 1, p, s, true}, p - s, shards) <= x.usable(g))
        ++n;
      layer += n;
    }
    why = std::to_string(L) + " layers do not fit " + std::to_string(p) +
          " stages at micro-batch " + std::to_string(x.b) + " even with recomputation";
    return false;
  }
  double lo = 0;
  for (int it = 0; it < 50 && hi - lo > hi * 1e-6; ++it) {
    const double mid = 0.5 * (lo + hi);
    (pack(mid) ? hi : lo) = mid;
  }
  pack(hi);
  out.assign(size_t(p), {});
  for (int64_t s = 0; s < p; ++s) {
    const StageShape& st = shape[size_t(s)];
    StageCost& sc = out[size_t(s)];
    sc.group = chips[size_t(s)];
    sc.first = st.first;
    sc.last = st.last;
    sc.recompute = st.recompute;
    sc.fwd_s = stage_fwd_s(x, st, rates[size_t(s)]);
    sc.bwd_s = stage_bwd_s(x, st, rates[size_t(s)]);
    sc.params = stage_params(x.m, st);
    sc.mem_bytes = stage_bytes(x, st, p - s, shards);
    if (s + 1 < p) {
      const NodeGroup &a = x.c.groups[size_t(sc.group)],
                      &b = x.c.groups[size_t(chips[size_t(s + 1)])];
      const bool same_node = chips[size_t(s + 1)] == sc.group && (s + 1) % a.per_node != 0;
      const double bw = same_node ? a.intra_gbs : std::min(a.inter_gbs, b.inter_gbs);
      sc.send_s = x.tokens() * x.m.boundary_bytes / (bw * 1e9) + kLatency;
    }
  }
  return true;
}

struct Candidate {  // a template with the replica count it was built for
  std::vector<StageCost> stages;
  int64_t replicas = 0;
};

// Prices a layout: gradient reduces among every replica holding a layer, the micro-batches
// split so that replicas finish together, each kind simulated with its counts.
bool price(const Ctx& x, const std::vector<const Candidate*>& kinds, LayoutPlan& out,
           bool every_replica = false) {
  int64_t R = 0;
  std::vector<bool> used(x.c.groups.size(), false);
  for (const Candidate* k : kinds) {
    R += k->replicas;
    for (const StageCost& s : k->stages) used[size_t(s.group)] = true;
  }
  if (R == 0) return false;
  // Hierarchical reduce, as NCCL within a chip type and host-staged MPI across types do it:
  // a stage's replicas of one kind reduce among themselves over their own links (the node's
  // fabric when they all sit in one node), then each exchanges its 1/R_k share with the other
  // kinds over the slowest inter-node link in use.
  double cross_bw = 1e30;
  for (size_t g = 0; g < used.size(); ++g)
    if (used[g]) cross_bw = std::min(cross_bw, x.c.groups[g].inter_gbs);
  const double z = x.job.zero1 ? double(R) : 1.0, ways = x.job.zero1 ? 1 : 2;
  const double touched = x.job.dtype == "bf16" ? 30 : 28;  // AdamW's bytes read and written
  std::vector<std::vector<StageCost>> st(kinds.size());
  std::vector<double> a(kinds.size()), slope(kinds.size());
  for (size_t k = 0; k < kinds.size(); ++k) {
    st[k] = kinds[k]->stages;
    const int64_t Rk = kinds[k]->replicas, p = int64_t(st[k].size());
    for (StageCost& s : st[k]) {
      const NodeGroup& g = x.c.groups[size_t(s.group)];
      const double bw = Rk * p <= g.per_node ? g.intra_gbs : g.inter_gbs;
      // Seconds to reduce (or gather) `bytes` per chip: within the kind, then across kinds.
      auto collective = [&](double bytes) {
        if (R == 1) return 0.0;
        double t = double(Rk - 1) / double(Rk) * bytes / (bw * 1e9) + kLatency;
        if (R > Rk) t += bytes / double(Rk) / (cross_bw * 1e9) + kLatency;
        return ways * t;
      };
      s.reduce_s = collective(s.params * x.m.grad_bytes);
      s.gather_s = x.job.zero1 ? collective(s.params * x.m.weight_bytes) : 0;
      s.optim_s = s.params / z * touched / (g.chip.hbm_gbs * 1e9);
    }
    const double t1 = simulate_1f1b(st[k], p).last_backward_s;
    const double t2 = simulate_1f1b(st[k], 2 * p).last_backward_s;
    slope[k] = (t2 - t1) / double(p);
    a[k] = t1 - slope[k] * double(p);
  }
  // Each micro-batch goes to the kind that would finish it soonest (its least-loaded replica).
  const int64_t M = (x.job.global_batch + x.b - 1) / x.b;
  std::vector<int64_t> m(kinds.size(), 0);
  int64_t given = 0;
  if (every_replica) {  // each replica takes at least one micro-batch (to price using a type)
    for (size_t k = 0; k < kinds.size(); ++k) given += m[k] = kinds[k]->replicas;
    if (given > M) return false;
  }
  for (int64_t i = given; i < M; ++i) {
    size_t best = 0;
    double best_t = 1e300;
    for (size_t k = 0; k < kinds.size(); ++k) {
      const int64_t per = (m[k] + 1 + kinds[k]->replicas - 1) / kinds[k]->replicas;
      const double t = a[k] + slope[k] * double(per);
      if (t < best_t) best_t = t, best = k;
    }
    ++m[best];
  }
  out.kinds.clear();
  out.step_s = 0;
  out.micro_batch = x.b;
  out.chips_used.assign(x.c.groups.size(), 0);
  out.peak_bytes.assign(x.c.groups.size(), 0);
  for (size_t k = 0; k < kinds.size(); ++k) {
    if (m[k] == 0) continue;
    ReplicaKind rk;
    rk.stages = st[k];
    const int64_t r = kinds[k]->replicas, hi = (m[k] + r - 1) / r, n_hi = m[k] - (hi - 1) * r;
    for (int64_t i = 0; i < r; ++i) rk.micro.push_back(i < n_hi ? hi : hi - 1);
    rk.replicas = int64_t(rk.micro.size());
    out.step_s = std::max(out.step_s, simulate_1f1b(rk.stages, hi).step_s);
    for (int64_t s = 0; s < int64_t(rk.stages.size()); ++s) {
      StageCost& sc = rk.stages[size_t(s)];
      const StageShape shape{sc.first, sc.last, int64_t(rk.stages.size()), s, sc.recompute};
      sc.mem_bytes = stage_bytes(x, shape, std::min(shape.p - s, hi), z);
      out.chips_used[size_t(sc.group)] += r;
      out.peak_bytes[size_t(sc.group)] = std::max(out.peak_bytes[size_t(sc.group)], sc.mem_bytes);
    }
    out.kinds.push_back(std::move(rk));
  }
  out.tokens_per_s = double(x.job.global_batch * x.job.seq) / out.step_s;
  double price_h = 0;
  bool priced = true;
  for (size_t g = 0; g < x.c.groups.size(); ++g) {
    if (out.chips_used[g] == 0) continue;
    priced &= x.c.groups[g].price_per_hour > 0;
    price_h += double(out.chips_used[g]) * x.c.groups[g].price_per_hour;
  }
  out.cost_per_mtok = priced ? price_h / 3600 / out.tokens_per_s * 1e6 : 0;
  return true;
}

// Templates are built once per (stages, micro-batch, replicas, sharing) and kept.
struct Search {
  const Cluster& c;
  const ModelCost& m;
  const JobSpec& job;
  using Key = std::tuple<std::vector<int>, int64_t, int64_t, std::vector<double>>;
  std::map<Key, Candidate> cache;
  std::map<Key, std::string> failed;
  int64_t priced = 0;

  const Candidate* get(const std::vector<int>& chips, int64_t b, int64_t replicas,
                       const std::vector<bool>& used, std::string* why) {
    // Only a type that shares cores changes speed with the others in use.
    Ctx x{c, m, job, b};
    const std::vector<double> divisor = x.divisors(used);
    auto key = std::make_tuple(chips, b, replicas, divisor);
    if (auto it = cache.find(key); it != cache.end()) return &it->second;
    if (auto it = failed.find(key); it != failed.end()) {
      if (why) *why = it->second;
      return nullptr;
    }
    Candidate cand;
    cand.replicas = replicas;
    std::string w;
    const double shards = job.zero1 ? double(replicas) : 1.0;
    if (!build_pipeline(x, chips, divisor, shards, cand.stages, w)) {
      if (why) *why = w;
      failed[key] = w;
      return nullptr;
    }
    return &cache.emplace(key, std::move(cand)).first->second;
  }
};

std::vector<int64_t> micro_sizes(const JobSpec& job, const PlanOptions& opt) {
  if (opt.micro_batch > 0) return {opt.micro_batch};
  std::vector<int64_t> out;
  for (int64_t b = 1; b <= job.global_batch && b <= 64; b *= 2)
    if (job.global_batch % b == 0) out.push_back(b);
  return out;
}

// Pipeline depths to try for n chips of one type: the least that fits and a few deeper ones.
std::vector<int64_t> depths(int64_t n, int64_t layers) {
  std::vector<int64_t> out;
  for (int64_t p = 1; p <= std::min(n, layers); p = p < 4 ? p + 1 : p * 2) out.push_back(p);
  if (std::find(out.begin(), out.end(), std::min(n, layers)) == out.end())
    out.push_back(std::min(n, layers));
  return out;
}

}  // namespace

LayoutPlan price_layout(const Cluster& c, const ModelCost& m, const JobSpec& job,
                        const std::vector<std::vector<LayoutStage>>& replicas, int64_t micro) {
  MXN_CHECK(!replicas.empty() && micro > 0, "price_layout needs replicas and a micro-batch");
  Ctx x{c, m, job, micro};
  // Ranks beyond a pool's chips share its cores (several ranks on one CPU, PoCL beside it).
  std::vector<double> ranks(c.groups.size(), 0.0), divisor(c.groups.size(), 1.0);
  for (const auto& r : replicas)
    for (const LayoutStage& st : r) ranks[size_t(x.pool(st.group))] += 1;
  for (size_t g = 0; g < c.groups.size(); ++g)
    divisor[g] = std::max(
        1.0, ranks[size_t(x.pool(int(g)))] / double(c.groups[size_t(x.pool(int(g)))].count));
  std::vector<std::vector<LayoutStage>> kinds;
  std::vector<Candidate> cands;
  auto same = [](const std::vector<LayoutStage>& a, const std::vector<LayoutStage>& b) {
    if (a.size() != b.size()) return false;
    for (size_t i = 0; i < a.size(); ++i)
      if (a[i].group != b[i].group || a[i].layers != b[i].layers) return false;
    return true;
  };
  for (const auto& r : replicas) {
    size_t k = 0;
    while (k < kinds.size() && !same(kinds[k], r)) ++k;
    if (k == kinds.size()) {
      kinds.push_back(r);
      cands.push_back({});
    }
    ++cands[k].replicas;
  }
  for (size_t k = 0; k < kinds.size(); ++k) {
    std::vector<int> chips;
    std::vector<int64_t> layers;
    int64_t sum = 0;
    for (const LayoutStage& st : kinds[k]) {
      chips.push_back(st.group);
      layers.push_back(st.layers);
      sum += st.layers;
    }
    const bool fixed = layers[0] > 0;
    if (fixed && sum != m.layers)
      throw Error("layout: a replica's stages hold " + std::to_string(sum) +
                  " layers; the model has " + std::to_string(m.layers));
    std::string why;
    const double shards = job.zero1 ? double(replicas.size()) : 1.0;
    if (!build_pipeline(x, chips, divisor, shards, cands[k].stages, why, fixed ? &layers : nullptr))
      throw Error("layout does not fit: " + why);
  }
  std::vector<const Candidate*> ptrs;
  for (const Candidate& cd : cands) ptrs.push_back(&cd);
  LayoutPlan lp;
  price(x, ptrs, lp);
  lp.family = "given";
  return lp;
}

std::string LayoutPlan::describe(const Cluster& c) const {
  std::string s;
  for (const ReplicaKind& k : kinds) {
    if (!s.empty()) s += " + ";
    s += std::to_string(k.replicas) + " x ";
    std::vector<std::pair<int, int64_t>> runs;  // consecutive stages of one type
    for (const StageCost& st : k.stages)
      if (!runs.empty() && runs.back().first == st.group)
        ++runs.back().second;
      else
        runs.push_back({st.group, 1});
    if (runs.size() > 1) s += "[";
    for (size_t i = 0; i < runs.size(); ++i) {
      if (i) s += ", ";
      s += c.groups[size_t(runs[i].first)].chip.name;
      if (runs[i].second > 1) s += " x " + std::to_string(runs[i].second);
    }
    if (runs.size() > 1) s += "]";
    s += k.stages.size() > 1 ? " PP" + std::to_string(k.stages.size()) + " (" : " (";
    for (size_t i = 0; i < k.stages.size(); ++i) {
      if (i) s += ",";
      s += std::to_string(k.stages[i].last - k.stages[i].first);
      if (k.stages[i].recompute) s += "r";
    }
    s += ")";
  }
  return s;
}

namespace {

struct Best {  // the fastest per-type choice found: a depth per type (0: left out)
  double step = 1e300;
  int64_t b = 0;
  std::vector<int64_t> choice;
};

// The search over layouts: per-type pipelines (each chip type its own depth, or left out) by
// coordinate descent, the runners-up around the best, and the mixed family (R identical pipelines
// of every type's chips).
class LayoutSearch {
 public:
  LayoutSearch(const Cluster& c, const ModelCost& m, const JobSpec& job, const PlanOptions& opt)
      : c(c), m(m), job(job), opt(opt), G(int(c.groups.size())), S{c, m, job, {}, {}, 0} {}

  // choice[g]: a depth for group g's own pipelines, or 0 when the type is left out.
  bool per_type(int64_t b, const std::vector<int64_t>& choice, int64_t gb, LayoutPlan* out,
                bool every_replica = false) {
    std::vector<bool> used(static_cast<size_t>(G));
    for (int g = 0; g < G; ++g) used[size_t(g)] = choice[size_t(g)] > 0;
    std::vector<const Candidate*> kinds;
    for (int g = 0; g < G; ++g) {
      if (!choice[size_t(g)]) continue;
      const int64_t p = choice[size_t(g)], r = c.groups[size_t(g)].count / p;
      const Candidate* k = S.get(std::vector<int>(size_t(p), g), b, r, used, nullptr);
      if (!k) return false;
      kinds.push_back(k);
    }
    JobSpec j = job;
    j.global_batch = gb;
    Ctx x{c, m, j, b};
    LayoutPlan lp;
    if (!price(x, kinds, lp, every_replica)) return false;
    ++S.priced;
    lp.family = "per type";
    if (out) *out = std::move(lp);
    return true;
  }

  double step_of(int64_t b, const std::vector<int64_t>& ch, int64_t gb, bool every = false) {
    LayoutPlan lp;
    return per_type(b, ch, gb, &lp, every) ? lp.step_s : 1e300;
  }

  // Coordinate descent over each type's depth (0 = left out) from several starting points.
  Best descend(const std::vector<bool>& allowed, int64_t gb) {
    Best best;
    for (int64_t b : micro_sizes(job, opt)) {
      std::vector<std::vector<int64_t>> options(static_cast<size_t>(G));
      for (int g = 0; g < G; ++g) {
        options[size_t(g)].push_back(0);
        if (!allowed[size_t(g)]) continue;
        for (int64_t p : depths(c.groups[size_t(g)].count, m.layers)) {
          std::vector<bool> alone(size_t(G), false);
          alone[size_t(g)] = true;
          std::string why;
          if (S.get(std::vector<int>(size_t(p), g), b, c.groups[size_t(g)].count / p, alone, &why))
            options[size_t(g)].push_back(p);
          else if (p == std::min(c.groups[size_t(g)].count, m.layers))
            reasons.push_back(c.groups[size_t(g)].chip.name + ": " + why);
        }
      }
      std::vector<std::vector<int64_t>> starts;
      std::vector<int64_t> all(size_t(G), 0);
      for (int g = 0; g < G; ++g)
        if (options[size_t(g)].size() > 1) all[size_t(g)] = options[size_t(g)][1];
      starts.push_back(all);
      for (int g = 0; g < G; ++g)
        if (options[size_t(g)].size() > 1 && G > 1) {
          std::vector<int64_t> one(size_t(G), 0);
          one[size_t(g)] = options[size_t(g)][1];
          starts.push_back(one);
        }
      for (std::vector<int64_t> ch : starts) {
        double t = step_of(b, ch, gb);
        for (int round = 0; round < 3; ++round) {
          bool better = false;
          for (int g = 0; g < G; ++g)
            for (int64_t p : options[size_t(g)]) {
              std::vector<int64_t> tryc = ch;
              tryc[size_t(g)] = p;
              const double tt = step_of(b, tryc, gb);
              if (tt < t * (1 - 1e-9)) t = tt, ch = tryc, better = true;
            }
          if (!better) break;
        }
        if (t < best.step) best = {t, b, ch};
      }
    }
    return best;
  }

  // Every depth of the best micro-batch around the best choice, for the table of runners-up.
  void runners_up(const Best& best) {
    if (best.b <= 0) return;
    LayoutPlan lp;
    per_type(best.b, best.choice, job.global_batch, &lp);
    found.push_back(lp);
    for (int g = 0; g < G; ++g)
      for (int64_t p : depths(c.groups[size_t(g)].count, m.layers)) {
        std::vector<int64_t> ch = best.choice;
        if (ch[size_t(g)] == p || p == 0) continue;
        ch[size_t(g)] = p;
        if (per_type(best.b, ch, job.global_batch, &lp)) found.push_back(lp);
      }
    for (int64_t b : micro_sizes(job, opt))
      if (b != best.b && per_type(b, best.choice, job.global_batch, &lp)) found.push_back(lp);
  }

  void mixed_family() {
    const std::vector<bool> everyone(size_t(G), true);
    // The mixed family: R identical pipelines, each with count / R chips of every type.
    int64_t gcd = 0;
    for (const NodeGroup& g : c.groups) gcd = std::gcd(gcd, g.count);
    std::vector<int> order(static_cast<size_t>(G));
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) {
      return c.groups[size_t(a)].chip.memory_gib > c.groups[size_t(b)].chip.memory_gib;
    });
    for (int64_t R = 1; G > 1 && R <= gcd; ++R) {
      if (gcd % R) continue;
      std::vector<int> chips;
      for (int g : order)
        for (int64_t i = 0; i < c.groups[size_t(g)].count / R; ++i) chips.push_back(g);
      if (int64_t(chips.size()) > m.layers) continue;
      for (int64_t b : micro_sizes(job, opt)) {
        std::string why;
        const Candidate* k = S.get(chips, b, R, everyone, &why);
        if (!k) {
          if (b == 1)
            reasons.push_back("mixed pipelines of " + std::to_string(chips.size()) +
                              " stages: " + why);
          continue;
        }
        Ctx x{c, m, job, b};
        LayoutPlan lp;
        if (price(x, {k}, lp)) {
          ++S.priced;
          lp.family = "mixed";
          found.push_back(lp);
        }
      }
    }
  }

  // The best layouts, fastest first, one of each description; an Error naming every reason when
  // none fits.
  void pick(PlanReport& rep) {
    rep.layouts_priced = S.priced;
    if (found.empty()) {
      std::string all;
      for (const std::string& r : reasons)
        if (all.find(r) == std::string::npos) all += (all.empty() ? "" : "; ") + r;
      throw Error("no layout fits: " +
                  (all.empty() ? std::string("no chip can hold a stage") : all));
    }
    std::stable_sort(found.begin(), found.end(),
                     [](const LayoutPlan& a, const LayoutPlan& b) { return a.step_s < b.step_s; });
    std::vector<std::string> seen;
    for (const LayoutPlan& lp : found) {
      const std::string d = lp.describe(c);
      if (std::find(seen.begin(), seen.end(), d) != seen.end()) continue;
      seen.push_back(d);
      rep.best.push_back(lp);
      if (int(rep.best.size()) == opt.top) break;
    }
  }

  // Heterogeneous efficiency: against each type's best alone (its own cores undivided).
  void efficiency(PlanReport& rep) {
    rep.standalone_tps.assign(size_t(G), 0);
    double sum = 0;
    for (int g = 0; g < G; ++g) {
      std::vector<bool> only(size_t(G), false);
      only[size_t(g)] = true;
      const Best b = descend(only, job.global_batch);
      if (b.b > 0) rep.standalone_tps[size_t(g)] = double(job.global_batch * job.seq) / b.step;
      sum += rep.standalone_tps[size_t(g)];
    }
    for (LayoutPlan& lp : rep.best) lp.efficiency = sum > 0 ? lp.tokens_per_s / sum : 0;
  }

  // A type the best per-type layout leaves out: what using it would cost, and from which global
  // batch it would pay (the smallest, in micro-batches of the best size).
  void left_out(const Best& best, PlanReport& rep, int g) {
    // Left out: not chosen, or chosen and given no micro-batch by the split.
    if (best.choice[size_t(g)] != 0 && rep.best[0].chips_used[size_t(g)] > 0) return;
    const NodeGroup& ng = c.groups[size_t(g)];
    std::vector<int64_t> without_g = best.choice;
    without_g[size_t(g)] = 0;
    auto without = [&](int64_t gb) { return step_of(best.b, without_g, gb); };
    auto with = [&](int64_t gb) {  // every replica of the type at work, at its best depth and
      double t = 1e300;            // micro-batch
      for (int64_t b : micro_sizes(job, opt))
        for (int64_t p : depths(ng.count, m.layers)) {
          std::vector<int64_t> ch = without_g;
          ch[size_t(g)] = p;
          t = std::min(t, step_of(b, ch, gb, true));
        }
      return t;
    };
    LeftOut lo;
    lo.group = g;
    lo.step_with_s = with(job.global_batch);
    if (lo.step_with_s >= 1e300) return;  // cannot hold the model: reported above
    int64_t lo_b = job.global_batch, hi_b = 0;
    for (int64_t gb = job.global_batch * 2; gb <= job.global_batch * 1024; gb *= 2)
      if (with(gb) < without(gb)) {
        hi_b = gb;
        break;
      } else {
        lo_b = gb;
      }
    while (hi_b > 0 && hi_b - lo_b > best.b) {  // the smallest batch that pays, to a micro-batch
      const int64_t mid = (lo_b + hi_b) / 2 / best.b * best.b;
      if (mid <= lo_b) break;
      (with(mid) < without(mid) ? hi_b : lo_b) = mid;
    }
    lo.helps_from_batch = hi_b;
    char line[512];
    std::snprintf(line, sizeof line,
                  "%s left out: with it the step would take %.4g s, without %.4g s",
                  ng.chip.name.c_str(), lo.step_with_s, rep.best[0].step_s);
    lo.why = line;
    if (ng.shares_cores_with >= 0 || [&] {
          for (const NodeGroup& o : c.groups)
            if (o.shares_cores_with == g) return true;
          return false;
        }())
      lo.why += " (it computes on cores another chip uses, so both slow down)";
    if (hi_b > 0)
      lo.why += "; it would help from a global batch of " + std::to_string(hi_b) + " sequences";
    else
      lo.why += "; it would not help at any global batch up to " +
                std::to_string(job.global_batch * 1024) + " sequences";
    rep.left_out.push_back(lo);
  }

 private:
  const Cluster& c;
  const ModelCost& m;
  const JobSpec& job;
  const PlanOptions& opt;
  const int G;
  Search S;
  std::vector<LayoutPlan> found;
  std::vector<std::string> reasons;
};

}  // namespace

PlanReport plan_layouts(const Cluster& c, const ModelCost& m, const JobSpec& job,
                        const PlanOptions& opt) {
  LayoutSearch search(c, m, job, opt);
  const Best best = search.descend(std::vector<bool>(c.groups.size(), true), job.global_batch);
  search.runners_up(best);
  search.mixed_family();
  PlanReport rep;
  search.pick(rep);
  search.efficiency(rep);
  if (best.b > 0 && rep.best[0].family == "per type")
    for (int g = 0; g < int(c.groups.size()); ++g) search.left_out(best, rep, g);
  return rep;
}

}  // namespace mxn
