#include "plan/planner.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <map>
#include <numeric>
#include <tuple>

#include "core/error.h"
#include "plan/stages.h"

namespace mxn {

namespace {

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
      const double bw = Rk * p * s.tp <= g.per_node ? g.intra_gbs : g.inter_gbs;
      // Seconds to reduce (or gather) `bytes` per chip: within the kind, then across kinds.
      auto collective = [&](double bytes) {
        if (R == 1) return 0.0;
        double t = double(Rk - 1) / double(Rk) * bytes / (bw * 1e9) + g.latency_s();
        if (R > Rk) t += bytes / double(Rk) / (cross_bw * 1e9) + g.latency_s();
        return ways * t;
      };
      s.reduce_s = collective(s.params * x.m.grad_bytes);
      s.gather_s = x.job.zero1 ? collective(s.params * x.m.weight_bytes) : 0;
      s.optim_s = s.params / z * touched / (g.chip.hbm_gbs * 1e9);
    }
    const double t1 = simulate_pipeline(st[k], p, x.job.interleave).last_backward_s;
    const double t2 = simulate_pipeline(st[k], 2 * p, x.job.interleave).last_backward_s;
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
    out.step_s = std::max(out.step_s, simulate_pipeline(rk.stages, hi, x.job.interleave).step_s);
    for (int64_t s = 0; s < int64_t(rk.stages.size()); ++s) {
      StageCost& sc = rk.stages[size_t(s)];
      const StageShape shape{sc.first, sc.last, int64_t(rk.stages.size()), s, sc.recompute,
                             sc.tp,    sc.group};
      sc.mem_bytes = stage_bytes(x, shape, std::min(shape.p - s, hi), z);
      out.chips_used[size_t(sc.group)] += r * sc.tp;
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
  const PlanOptions& opt;
  using Key = std::tuple<std::vector<int>, int64_t, int64_t, int64_t, std::vector<double>>;
  std::map<Key, Candidate> cache;
  std::map<Key, std::string> failed;
  int64_t priced = 0;

  // `chips`: a group per stage, each stage `t` chips of it.
  const Candidate* get(const std::vector<int>& chips, int64_t t, int64_t b, int64_t replicas,
                       const std::vector<bool>& used, std::string* why) {
    // Only a type that shares cores changes speed with the others in use.
    Ctx x{c, m, job, b};
    const std::vector<double> divisor = x.divisors(used);
    auto key = std::make_tuple(chips, t, b, replicas, divisor);
    if (auto it = cache.find(key); it != cache.end()) return &it->second;
    if (auto it = failed.find(key); it != failed.end()) {
      if (why) *why = it->second;
      return nullptr;
    }
    Candidate cand;
    cand.replicas = replicas;
    std::string w;
    const double shards = job.zero1 ? double(replicas) : 1.0;
    const int64_t p = int64_t(chips.size());
    const std::vector<int64_t> even(size_t(p), m.layers / p);
    const bool fixed = opt.even_stages && m.layers % p == 0;
    if (!build_pipeline(x, chips, t, divisor, shards, cand.stages, w, fixed ? &even : nullptr)) {
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

// Pipeline depths to try for n stages' worth of chips: the least that fits and deeper ones.
std::vector<int64_t> depths(int64_t n, int64_t layers) {
  std::vector<int64_t> out;
  for (int64_t p = 1; p <= std::min(n, layers); p = p < 4 ? p + 1 : p * 2) out.push_back(p);
  if (std::find(out.begin(), out.end(), std::min(n, layers)) == out.end())
    out.push_back(std::min(n, layers));
  return out;
}

// A type's own pipelines: their depth and the tensor-parallel chips of each stage (p 0: the
// type is left out).
struct Shape {
  int64_t p = 0, t = 1;
  bool operator==(const Shape&) const = default;
};

// Tensor-parallel degrees for a group: powers of two inside one node that divide its chips and
// the heads and kv heads evenly (--tp: that degree alone, even across nodes).
std::vector<int64_t> tp_degrees(const NodeGroup& n, const ModelCost& m, const PlanOptions& opt) {
  std::vector<int64_t> out;
  for (int64_t t = 1; t <= std::max(n.per_node, opt.tp); t *= 2)
    if ((opt.tp == 0 ? t <= n.per_node : t == opt.tp) && n.count % t == 0 && m.heads % t == 0 &&
        m.kv_heads % t == 0)
      out.push_back(t);
  return out;
}

std::vector<Shape> shapes(const NodeGroup& n, const ModelCost& m, const PlanOptions& opt) {
  std::vector<Shape> out;
  for (int64_t t : tp_degrees(n, m, opt))
    if (opt.pp > 0) {
      if (opt.pp * t <= n.count && opt.pp <= m.layers) out.push_back({opt.pp, t});
    } else {
      for (int64_t p : depths(n.count / t, m.layers)) out.push_back({p, t});
    }
  return out;
}

}  // namespace

namespace {

// A layout as given, priced with each group's rate divided by `divisor`.
LayoutPlan price_given(const Ctx& x, const std::vector<std::vector<LayoutStage>>& replicas,
                       const std::vector<double>& divisor) {
  const ModelCost& m = x.m;
  const JobSpec& job = x.job;
  std::vector<std::vector<LayoutStage>> kinds;
  std::vector<Candidate> cands;
  auto same = [](const std::vector<LayoutStage>& a, const std::vector<LayoutStage>& b) {
    if (a.size() != b.size()) return false;
    for (size_t i = 0; i < a.size(); ++i)
      if (a[i].group != b[i].group || a[i].layers != b[i].layers || a[i].tp != b[i].tp)
        return false;
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
      if (st.tp != kinds[k][0].tp)
        throw Error("layout: a replica's stages must split over the same number of chips (got " +
                    std::to_string(kinds[k][0].tp) + " and " + std::to_string(st.tp) + ")");
    }
    const bool fixed = layers[0] > 0;
    if (fixed && sum != m.layers)
      throw Error("layout: a replica's stages hold " + std::to_string(sum) +
                  " layers; the model has " + std::to_string(m.layers));
    std::string why;
    const double shards = job.zero1 ? double(replicas.size()) : 1.0;
    if (!build_pipeline(x, chips, kinds[k][0].tp, divisor, shards, cands[k].stages, why,
                        fixed ? &layers : nullptr))
      throw Error("layout does not fit: " + why);
  }
  std::vector<const Candidate*> ptrs;
  for (const Candidate& cd : cands) ptrs.push_back(&cd);
  LayoutPlan lp;
  price(x, ptrs, lp, true);  // every rank of a run given takes its share
  return lp;
}

}  // namespace

LayoutPlan price_layout(const Cluster& c, const ModelCost& m, const JobSpec& job,
                        const std::vector<std::vector<LayoutStage>>& replicas, int64_t micro) {
  MXN_CHECK(!replicas.empty() && micro > 0, "price_layout needs replicas and a micro-batch");
  Ctx x{c, m, job, micro};
  // Ranks beyond a pool's chips share its cores (several ranks on one CPU, PoCL beside it):
  // at first each gets an even share; then each rank is slowed only by the others' busy time
  // (a pipeline stage that mostly waits leaves its cores to the rest), repriced until it holds.
  std::vector<double> ranks(c.groups.size(), 0.0), divisor(c.groups.size(), 1.0);
  for (const auto& r : replicas)
    for (const LayoutStage& st : r) ranks[size_t(x.pool(st.group))] += double(st.tp);
  for (size_t g = 0; g < c.groups.size(); ++g)
    divisor[g] = std::max(
        1.0, ranks[size_t(x.pool(int(g)))] / double(c.groups[size_t(x.pool(int(g)))].count));
  LayoutPlan lp;
  for (int round = 0; round < 6; ++round) {
    lp = price_given(x, replicas, divisor);
    std::vector<double> load(c.groups.size(), 0.0), own(c.groups.size(), 0.0),
        n(c.groups.size(), 0.0);
    for (const ReplicaKind& k : lp.kinds) {
      const int64_t most = *std::max_element(k.micro.begin(), k.micro.end());
      const PipelineRun run = simulate_pipeline(k.stages, most, job.interleave);
      for (size_t s = 0; s < k.stages.size(); ++s) {
        const int g = k.stages[s].group;
        const double busy = std::min(1.0, run.busy_s[s] / lp.step_s),
                     ranks_here = double(k.replicas * k.stages[s].tp);
        load[size_t(x.pool(g))] += busy * ranks_here;
        own[size_t(g)] += busy * ranks_here;
        n[size_t(g)] += ranks_here;
      }
    }
    for (size_t g = 0; g < c.groups.size(); ++g) {
      if (n[g] == 0) continue;
      const double mine = own[g] / n[g], chips = double(c.groups[size_t(x.pool(int(g)))].count);
      divisor[g] = std::max(1.0, (1.0 + load[size_t(x.pool(int(g)))] - mine) / chips);
    }
  }
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
    if (k.stages[0].tp > 1) s += " TP" + std::to_string(k.stages[0].tp);
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

struct Best {  // the fastest per-type choice found: a shape per type
  double step = 1e300;
  int64_t b = 0;
  std::vector<Shape> choice;
};

// The search over layouts: per-type pipelines (each chip type its own depth, or left out) by
// coordinate descent, the runners-up around the best, and the mixed family (R identical pipelines
// of every type's chips).
class LayoutSearch {
 public:
  LayoutSearch(const Cluster& c, const ModelCost& m, const JobSpec& job, const PlanOptions& opt)
      : c(c), m(m), job(job), opt(opt), G(int(c.groups.size())), S{c, m, job, opt, {}, {}, 0} {}

  // choice[g]: group g's own pipelines (depth 0: the type is left out).
  bool per_type(int64_t b, const std::vector<Shape>& choice, int64_t gb, LayoutPlan* out,
                bool every_replica = false) {
    std::vector<bool> used(static_cast<size_t>(G));
    for (int g = 0; g < G; ++g) used[size_t(g)] = choice[size_t(g)].p > 0;
    std::vector<const Candidate*> kinds;
    for (int g = 0; g < G; ++g) {
      const auto [p, t] = choice[size_t(g)];
      if (!p) continue;
      const int64_t r = c.groups[size_t(g)].count / (p * t);
      const Candidate* k = S.get(std::vector<int>(size_t(p), g), t, b, r, used, nullptr);
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

  double step_of(int64_t b, const std::vector<Shape>& ch, int64_t gb, bool every = false) {
    LayoutPlan lp;
    return per_type(b, ch, gb, &lp, every) ? lp.step_s : 1e300;
  }

  // Each type's best layout alone, its own cores undivided (computed once).
  const std::vector<Best>& standalone() {
    if (alone.empty())
      for (int g = 0; g < G; ++g) {
        std::vector<bool> only(size_t(G), false);
        only[size_t(g)] = true;
        alone.push_back(descend(only, job.global_batch));
      }
    return alone;
  }

  // Coordinate descent over each type's depth (0 = left out) from several starting points:
  // every type's first shape that fits, each type alone, and with `seeded` every type in the
  // shape it takes alone.
  Best descend(const std::vector<bool>& allowed, int64_t gb, bool seeded = false) {
    Best best;
    for (int64_t b : micro_sizes(job, opt)) {
      std::vector<std::vector<Shape>> options(static_cast<size_t>(G));
      for (int g = 0; g < G; ++g) {
        options[size_t(g)].push_back({});
        if (!allowed[size_t(g)]) continue;
        const NodeGroup& n = c.groups[size_t(g)];
        std::string why, widest;  // why the shape over the most chips (the deepest) fails
        Shape most;
        for (const Shape& sh : shapes(n, m, opt)) {
          std::vector<bool> alone(size_t(G), false);
          alone[size_t(g)] = true;
          if (S.get(std::vector<int>(size_t(sh.p), g), sh.t, b, n.count / (sh.p * sh.t), alone,
                    &why))
            options[size_t(g)].push_back(sh);
          else if (std::pair(sh.p * sh.t, sh.p) > std::pair(most.p * most.t, most.p))
            most = sh, widest = why;
        }
        if (options[size_t(g)].size() == 1 && !widest.empty())
          reasons.push_back(n.chip.name + ": " + widest);
      }
      // Start from each type's first shape that fits (the shallowest pipeline of the least
      // tensor parallelism): all types, then each alone.
      std::vector<std::vector<Shape>> starts;
      std::vector<Shape> all(static_cast<size_t>(G));
      for (int g = 0; g < G; ++g)
        if (options[size_t(g)].size() > 1) all[size_t(g)] = options[size_t(g)][1];
      starts.push_back(all);
      for (int g = 0; g < G; ++g)
        if (options[size_t(g)].size() > 1 && G > 1) {
          std::vector<Shape> one(static_cast<size_t>(G));
          one[size_t(g)] = options[size_t(g)][1];
          starts.push_back(one);
        }
      if (seeded) {
        std::vector<Shape> own(static_cast<size_t>(G));
        for (int g = 0; g < G; ++g)
          if (allowed[size_t(g)] && !alone[size_t(g)].choice.empty())
            own[size_t(g)] = alone[size_t(g)].choice[size_t(g)];
        starts.push_back(own);
      }
      for (std::vector<Shape> ch : starts) {
        double t = step_of(b, ch, gb);
        for (int round = 0; round < 8; ++round) {
          bool better = false;
          for (int g = 0; g < G; ++g)
            for (const Shape& p : options[size_t(g)]) {
              std::vector<Shape> tryc = ch;
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
      for (const Shape& p : shapes(c.groups[size_t(g)], m, opt)) {
        std::vector<Shape> ch = best.choice;
        if (ch[size_t(g)] == p) continue;
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
    // Every stage t chips of one type, t a degree every type allows.
    std::vector<int64_t> ts = tp_degrees(c.groups[0], m, opt);
    for (const NodeGroup& g : c.groups) {
      const std::vector<int64_t> here = tp_degrees(g, m, opt);
      std::erase_if(
          ts, [&](int64_t t) { return std::find(here.begin(), here.end(), t) == here.end(); });
    }
    for (int64_t R = 1; G > 1 && R <= gcd; ++R)
      for (int64_t t : ts) {
        if (gcd % (R * t)) continue;
        std::vector<int> chips;
        for (int g : order)
          for (int64_t i = 0; i < c.groups[size_t(g)].count / (R * t); ++i) chips.push_back(g);
        if (int64_t(chips.size()) > m.layers || (opt.pp > 0 && int64_t(chips.size()) != opt.pp))
          continue;
        for (int64_t b : micro_sizes(job, opt)) {
          std::string why;
          const Candidate* k = S.get(chips, t, b, R, everyone, &why);
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
      const Best& b = standalone()[size_t(g)];
      if (b.b > 0) rep.standalone_tps[size_t(g)] = double(job.global_batch * job.seq) / b.step;
      sum += rep.standalone_tps[size_t(g)];
    }
    for (LayoutPlan& lp : rep.best) lp.efficiency = sum > 0 ? lp.tokens_per_s / sum : 0;
  }

  // A type the best per-type layout leaves out: what using it would cost, and from which global
  // batch it would pay (the smallest, in micro-batches of the best size).
  void left_out(const Best& best, PlanReport& rep, int g) {
    // Left out: not chosen, or chosen and given no micro-batch by the split.
    if (best.choice[size_t(g)].p != 0 && rep.best[0].chips_used[size_t(g)] > 0) return;
    const NodeGroup& ng = c.groups[size_t(g)];
    std::vector<Shape> without_g = best.choice;
    without_g[size_t(g)] = {};
    auto without = [&](int64_t gb) { return step_of(best.b, without_g, gb); };
    auto with = [&](int64_t gb) {  // every replica of the type at work, at its best depth and
      double t = 1e300;            // micro-batch
      for (int64_t b : micro_sizes(job, opt))
        for (const Shape& p : shapes(ng, m, opt)) {
          std::vector<Shape> ch = without_g;
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
  std::vector<Best> alone;
};

}  // namespace

PlanReport plan_layouts(const Cluster& c, const ModelCost& m, const JobSpec& job,
                        const PlanOptions& opt) {
  LayoutSearch search(c, m, job, opt);
  search.standalone();
  const Best best =
      search.descend(std::vector<bool>(c.groups.size(), true), job.global_batch, true);
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
