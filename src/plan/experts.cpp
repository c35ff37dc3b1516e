#include "plan/experts.h"

#include <algorithm>
#include <climits>
#include <cmath>

#include "core/error.h"
#include "train/strategy.h"

namespace mxn {

EpEstimate price_expert_parallel(const Cluster& cl, const DecoderConfig& c, const JobSpec& job,
                                 int64_t ep, int64_t pp, int64_t micro) {
  if (c.experts == 0) throw Error("--ep: the model has no experts (not a mixture of experts)");
  const int64_t chips = cl.chips();
  if (pp < 1 || pp > c.layers || chips % pp != 0)
    throw Error("--pp " + std::to_string(pp) + ": expected 1 to the model's " +
                std::to_string(c.layers) + " layers, dividing the cluster's " +
                std::to_string(chips) + " chips");
  if (ep < 1 || (chips / pp) % ep != 0)
    throw Error("--ep " + std::to_string(ep) + ": the cluster's " + std::to_string(chips) +
                " chips" + (pp > 1 ? " in " + std::to_string(pp) + " stages" : "") +
                " do not divide into groups of that many");
  if (ep > c.experts)
    throw Error("--ep " + std::to_string(ep) + " is more than the model's " +
                std::to_string(c.experts) + " experts a layer");
  auto speed_of = [](const NodeGroup& ng) { return ng.chip.bf16_tflops * 1e12 * ng.mfu; };
  EpEstimate est;
  est.ep = ep;
  est.pp = pp;
  est.groups = chips / pp / ep;                                  // in each stage
  const int64_t replicas = chips / pp, slabs = pp * est.groups;  // a type's chips split this many
  const ModelCost m = model_cost(c, job);
  const double C = double(c.hidden), E = double(c.experts), K = double(c.top_k);
  double moe_layers = 0;
  for (int64_t l = 0; l < c.layers; ++l) moe_layers += c.moe_layer(l) ? 1 : 0;
  const double slot_flops = 2 * 3 * C * double(c.moe_ffn);  // one (token, expert) row, forward
  const double expert_params = moe_layers * E * 3 * C * double(c.moe_ffn);
  const double per_token = double(c.layers) * m.layer_flops + m.head_flops;
  const double dense_flops = per_token - moe_layers * K * slot_flops;  // a token, forward
  const double dense_params = m.total_params() - expert_params;
  const double tokens = double(job.global_batch) * double(job.seq);
  // Each EP group: every type's chips in the cluster's proportion.
  double group_speed = 0, total_speed = 0;
  for (size_t g = 0; g < cl.groups.size(); ++g) {
    const NodeGroup& ng = cl.groups[g];
    if (ng.count % slabs != 0)
      throw Error("--ep " + std::to_string(ep) + ": " + ng.chip.name + "'s " +
                  std::to_string(ng.count) + " chips do not split over " + std::to_string(slabs) +
                  " EP groups" + (pp > 1 ? " (" + std::to_string(pp) + " stages)" : ""));
    const double speed = speed_of(ng);
    group_speed += speed * double(ng.count / slabs);
    total_speed += speed * double(ng.count);
  }
  // Experts per chip as the runtime places them (place_experts, train/strategy.h): whole experts
  // in proportion to speed, a chip too slow for an expert's share holding none. A type's chips
  // differ by one at most: experts_each, and experts_extra of them one more.
  std::vector<double> speeds;
  std::vector<size_t> type_of;
  for (size_t g = 0; g < cl.groups.size(); ++g)
    for (int64_t i = 0; i < cl.groups[g].count / slabs; ++i)
      speeds.push_back(speed_of(cl.groups[g])), type_of.push_back(g);
  const std::vector<int64_t> placed = place_experts(c.experts, speeds, true);
  std::vector<int64_t> n(cl.groups.size(), INT64_MAX), extra(cl.groups.size(), 0),
      most(cl.groups.size(), 0);
  for (size_t i = 0; i < placed.size(); ++i) {
    n[type_of[i]] = std::min(n[type_of[i]], placed[i]);
    most[type_of[i]] = std::max(most[type_of[i]], placed[i]);
  }
  for (size_t i = 0; i < placed.size(); ++i) extra[type_of[i]] += placed[i] > n[type_of[i]];
  const double bpp = m.weight_bytes + m.grad_bytes;
  for (size_t g = 0; g < cl.groups.size(); ++g) {
    const NodeGroup& ng = cl.groups[g];
    EpShare s;
    s.group = int(g);
    s.chips = ng.count / slabs;
    s.experts_each = n[g];
    s.experts_extra = extra[g];
    const int64_t busiest = most[g];  // the busiest chip of the type
    const double speed = speed_of(ng);
    // With pp stages a chip takes pp times the tokens through 1/pp of the layers: its compute
    // and all-to-all are pp = 1's; its weights and state are 1/pp.
    s.tokens_share = speed / total_speed;
    const double t = tokens * s.tokens_share;                               // this chip's tokens
    const double slots = tokens / double(slabs) * K * double(busiest) / E;  // rows it computes
    s.compute_s = 3 * (dense_flops * t + moe_layers * slots * slot_flops) / speed;
    const double remote = t * K * (1 - double(busiest) / E) * C * 2 * 4 * moe_layers;
    const double same_node = double(std::min(ng.per_node, s.chips) - 1),
                 intra = ep > 1 ? same_node / double(ep - 1) : 0;
    s.a2a_s = remote * intra / (ng.intra_gbs * 1e9) + remote * (1 - intra) / (ng.inter_gbs * 1e9);
    const double mine = double(busiest) * expert_params / E / double(pp);
    const double dense = dense_params / double(pp);
    s.mem_gib = (dense * (bpp + m.optim_bytes / double(replicas)) +
                 mine * (bpp + m.optim_bytes / double(est.groups))) /
                double(1ull << 30);
    const double dp = 2 * dense * m.grad_bytes * double(replicas - 1) / double(replicas);
    const double ex = 2 * mine * m.grad_bytes * double(est.groups - 1) / double(est.groups);
    const double reduce = (dp + ex) / (ng.inter_gbs * 1e9);
    // A stage's activations out and their gradients back, in bf16, across nodes.
    const double p2p = pp > 1 ? 2 * t * double(pp) * C * 2 / (ng.inter_gbs * 1e9) : 0;
    if (s.compute_s + s.a2a_s > est.compute_s + est.a2a_s)
      est.compute_s = s.compute_s, est.a2a_s = s.a2a_s;
    est.reduce_s = std::max(est.reduce_s, reduce);
    est.p2p_s = std::max(est.p2p_s, p2p);
    est.shares.push_back(s);
  }
  // 1F1B over m micro-batches a replica: the pipeline fills and drains over pp - 1 of them.
  const double seqs = double(job.global_batch) / double(replicas);
  const double m_micro = std::max(1.0, std::floor(seqs / double(std::max<int64_t>(1, micro))));
  est.micro_batches = int64_t(m_micro);
  est.bubble_s = (est.compute_s + est.a2a_s) * double(pp - 1) / m_micro;
  est.step_s = est.compute_s + est.a2a_s + est.bubble_s + est.p2p_s + est.reduce_s;
  est.tokens_per_s = tokens / est.step_s;
  return est;
}

}  // namespace mxn
