#include "plan/stages.h"

#include <algorithm>
#include <cstdio>

namespace mxn {

std::string gib(double bytes) {
  char s[32];
  std::snprintf(s, sizeof s, "%.3g GiB", bytes / kGiB);
  return s;
}

int Ctx::pool(int g) const {
  const int s = c.groups[size_t(g)].shares_cores_with;
  return s >= 0 ? s : g;
}

std::vector<double> Ctx::divisors(const std::vector<bool>& used) const {
  std::vector<double> d(c.groups.size(), 1.0);
  for (size_t g = 0; g < d.size(); ++g) {
    int sharing = 0;
    for (size_t h = 0; h < c.groups.size(); ++h) sharing += used[h] && pool(int(h)) == pool(int(g));
    d[g] = std::max(1, sharing);
  }
  return d;
}

double Ctx::rate(int g, const std::vector<double>& divisor) const {
  const NodeGroup& n = c.groups[size_t(g)];
  return n.chip.bf16_tflops * 1e12 * n.mfu / divisor[size_t(g)];
}

double Ctx::usable(int g) const { return c.groups[size_t(g)].chip.memory_gib * kGiB * kUsable; }

double Ctx::tp_allreduce_s(int g, int64_t t, double bytes) const {
  if (t <= 1) return 0;
  const NodeGroup& n = c.groups[size_t(g)];
  // Ranks sharing one chip (a CPU's) talk through its memory, as chips of a node do.
  const double bw = t <= n.per_node || n.count == 1 ? n.intra_gbs : n.inter_gbs;
  return ring_allreduce_s(t, bytes, bw, n.latency_s());
}

double stage_params(const ModelCost& m, const StageShape& x) {
  double n = double(x.last - x.first) * m.layer_params;
  if (x.s == 0) n += m.embed_params;
  if (x.s == x.p - 1) n += m.head_params + (m.tied && x.p > 1 ? double(m.vocab * m.hidden) : 0);
  return n / double(x.t);  // every matrix split over the group, the vocabulary too
}

namespace {

// Of a tensor-parallel group's per-token bytes: `all - shared` divided among its chips, `shared`
// kept whole on each unless sequence parallelism splits it along the sequence.
double per_chip(const Ctx& x, const StageShape& st, double all, double shared) {
  const double t = double(st.t);
  return (all - shared) / t + shared / (x.job.sequence_parallel ? t : 1.0);
}

// One micro-batch's forward through the stage, in parts: the layers' GEMMs and memory-bound ops
// (recomputed in the backward), the head's, the group's all-reduces (two a layer, after
// attention and after the MLP, one after the vocabulary-parallel embedding; the loss's max and
// sum are 8 bytes a token), the kernel launches.
struct Pass {
  double layers = 0, head = 0, layer_comm = 0, comm = 0, launch = 0;
};

Pass forward(const Ctx& x, const StageShape& st, double rate) {
  const NodeGroup& n = x.c.groups[size_t(st.g)];
  const ModelCost& m = x.m;
  const double L = double(st.last - st.first), T = x.tokens(), t = double(st.t);
  const bool last = st.s == st.p - 1;
  Pass p;
  p.layers = T * L * m.layer_flops / (t * rate);
  p.head = last ? T * m.head_flops / (t * rate) : 0;
  if (!n.measured && n.chip.hbm_gbs > 0)
    p.layers += T * L * per_chip(x, st, m.ew_bytes, m.ew_shared_bytes) / (n.chip.hbm_gbs * 1e9);
  p.layer_comm = 2 * L * x.tp_allreduce_s(st.g, st.t, T * m.boundary_bytes);
  p.comm = p.layer_comm + (st.s == 0 ? x.tp_allreduce_s(st.g, st.t, T * m.boundary_bytes) : 0) +
           (last ? x.tp_allreduce_s(st.g, st.t, T * 8) : 0);
  // A replica of one stage runs its micro-batches as one pass: no per-pass cost to split.
  p.launch = st.p > 1 ? L * kPassS : 0;
  return p;
}

}  // namespace

double stage_fwd_s(const Ctx& x, const StageShape& st, double rate) {
  const Pass p = forward(x, st, rate);
  return p.layers + p.head + p.comm + p.launch;
}

// Twice the forward's compute, the same all-reduces (the transposes of the forward's), and
// with recomputation the layers' forward again.
double stage_bwd_s(const Ctx& x, const StageShape& st, double rate) {
  const Pass p = forward(x, st, rate);
  const double again = st.recompute ? p.layers + p.layer_comm + p.launch : 0;
  return 2 * (p.layers + p.head + p.launch) + p.comm + again;
}

double stage_tp_s(const Ctx& x, const StageShape& st) {
  const Pass p = forward(x, st, 1.0);
  return 2 * p.comm + (st.recompute ? p.layer_comm : 0);
}

// Peak bytes of one stage's chip: weights, gradients, optimizer shard, the activations of the
// micro-batches in flight (1F1B keeps p - s of them), one layer's backward working set, the
// logits on the last stage, send buffers (double-buffered, both directions), two buckets.
double stage_bytes(const Ctx& x, const StageShape& st, int64_t inflight, double shards) {
  const ModelCost& m = x.m;
  const double params = stage_params(m, st), layers = double(st.last - st.first);
  const double act = per_chip(x, st, m.act_bytes, m.act_shared_bytes),
               input = per_chip(x, st, m.input_bytes, m.input_bytes);
  double bytes = params * (m.weight_bytes + m.grad_bytes + m.optim_bytes / shards);
  // Recomputation keeps the inputs of the micro-batches in flight and reruns the stage's forward
  // for one of them at a time (all its layers' activations, as mxn's pipeline does).
  if (st.recompute)
    bytes += x.tokens() * (double(inflight) * layers * input + layers * act);
  else
    bytes += x.tokens() * double(inflight) * layers * act;
  bytes += x.tokens() * act;  // the backward's working set
  if (st.s == st.p - 1) bytes += x.tokens() * m.logits_bytes / double(st.t);  // vocab-parallel
  if (st.p > 1) bytes += 4 * x.tokens() * per_chip(x, st, m.boundary_bytes, m.boundary_bytes);
  if (shards > 1) bytes += 2 * x.job.bucket_mb * 1024 * 1024;
  return bytes;
}

bool build_pipeline(const Ctx& x, const std::vector<int>& chips, int64_t t,
                    const std::vector<double>& divisor, double shards, std::vector<StageCost>& out,
                    std::string& why, const std::vector<int64_t>* fixed) {
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
        // mxn's pipeline recomputes always; Megatron-LM's full recomputation everywhere.
        if (!r && ((p > 1 && x.job.recompute_all) || x.job.recompute_full)) continue;
        int64_t n = 0;
        for (int64_t k = 1; k <= most; ++k) {
          if (fixed && k != (*fixed)[size_t(s)]) continue;
          const StageShape st{layer, layer + k, p, s, r, t, g};
          if (stage_bwd_s(x, st, rates[size_t(s)]) + stage_fwd_s(x, st, rates[size_t(s)]) > tau ||
              stage_bytes(x, st, p - s, shards) > x.usable(g))
            break;
          n = k;
        }
        if (n > take) take = n, rc = r;
      }
      if (take == 0 || (s == p - 1 && take < most)) return false;
      shape[size_t(s)] = {layer, layer + take, p, s, rc, t, g};
      layer += take;
    }
    return true;
  };
  double hi = 0;
  for (int64_t s = 0; s < p; ++s)
    hi = std::max(
        hi, 2 * (stage_fwd_s(x, {0, L, p, p - 1, true, t, chips[size_t(s)]}, rates[size_t(s)]) +
                 stage_bwd_s(x, {0, L, p, p - 1, true, t, chips[size_t(s)]}, rates[size_t(s)])));
  if (fixed && !pack(hi * 1.01)) {
    for (int64_t s = 0, layer = 0; s < p; layer += (*fixed)[size_t(s)], ++s) {
      const int g = chips[size_t(s)];
      const StageShape st{layer, layer + (*fixed)[size_t(s)], p, s, p > 1, t, g};
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
      const StageShape one{layer, layer + 1, p, s, true, t, g};
      const std::string& name = x.c.groups[size_t(g)].chip.name;
      if (stage_bytes(x, one, p - s, shards) > x.usable(g)) {
        why = "layer " + std::to_string(layer) +
              (s == 0       ? " with the embeddings"
               : s == p - 1 ? " with the LM head"
                            : "") +
              " needs " + gib(stage_bytes(x, one, p - s, shards)) + " at micro-batch " +
              std::to_string(x.b) + " with recomputation as stage " + std::to_string(s + 1) +
              " of " + std::to_string(p) +
              (t > 1 ? " split over " + std::to_string(t) + " chips" : "") + "; " + name +
              " holds " + gib(x.usable(g)) + " (" + std::to_string(int(kUsable * 100)) +
              "% of its " + gib(x.c.groups[size_t(g)].chip.memory_gib * kGiB) + ")";
        return false;
      }
      int64_t n = 1;
      while (layer + n < L - (p - s - 1) &&
             stage_bytes(x, {layer, layer + n + 1, p, s, true, t, g}, p - s, shards) <= x.usable(g))
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
    sc.tp = t;
    sc.tp_s = stage_tp_s(x, st);
    sc.fwd_s = stage_fwd_s(x, st, rates[size_t(s)]);
    sc.bwd_s = stage_bwd_s(x, st, rates[size_t(s)]);
    sc.params = stage_params(x.m, st);
    sc.mem_bytes = stage_bytes(x, st, p - s, shards);
    if (s + 1 < p) {
      const NodeGroup &a = x.c.groups[size_t(sc.group)],
                      &b = x.c.groups[size_t(chips[size_t(s + 1)])];
      const bool same_node = chips[size_t(s + 1)] == sc.group && (s + 1) * t % a.per_node != 0;
      const double bw = same_node ? a.intra_gbs : std::min(a.inter_gbs, b.inter_gbs);
      sc.send_s = x.tokens() * x.m.boundary_bytes / (bw * 1e9) + a.latency_s();
    }
  }
  return true;
}

}  // namespace mxn
