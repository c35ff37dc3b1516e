// Expert parallelism's exchanges (expert_exchange.h). The training graph is cut at each MoE
// layer's exchanges (DecoderGraph::expert_cuts): a pass runs the Program's nodes up to a cut, moves
// rows between the group's ranks, and goes on. The router's offsets say how many of this rank's
// permuted rows go to each expert; since xp is in expert order and a rank's experts are a
// contiguous range, the rows for rank q are one block of xp. A rank takes each sender's rows
// grouped by expert and places them expert-major (within an expert, by sender: the single
// device's token order), so each expert's GEMM is over its rows in the order one chip would have
// them. The results and gradients travel the same ways back. Both paths follow one list of
// messages (expert_messages): device to device, one message an (expert, rank) pair lands each
// piece where it belongs; through the host, one MPI_Alltoallv block a rank, placed piece by piece.
#include "train/expert_exchange.h"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <map>

#include "core/error.h"
#include "parallel/grad_sync.h"
#include "train/trainer.h"

namespace mxn {
namespace {

enum class Kind { rows_out, results_back, grads_out, grads_back };

// The first `rows` rows of a contiguous (rows', cols) tensor.
Tensor head_rows(const Tensor& t, int64_t rows) {
  return Tensor({rows, t.shape[1]}, t.dtype, t.buffer, t.offset);
}

}  // namespace

void expert_messages(const int64_t* counts, const std::vector<int64_t>& bounds, int64_t me,
                     std::vector<RowMessage>& out) {
  const int64_t ep = int64_t(bounds.size()) - 1, E = bounds.back();
  auto count = [&](int64_t p, int64_t e) { return counts[p * E + e]; };
  out.clear();
  int64_t row = 0;  // xp: this rank's rows by expert, so rank q's are one run, by q's experts
  for (int64_t q = 0; q < ep; ++q)
    for (int64_t e = bounds[size_t(q)]; e < bounds[size_t(q + 1)]; ++e) {
      if (count(me, e)) out.push_back({q, row, count(me, e), false});
      row += count(me, e);
    }
  for (int64_t p = 0; p < ep; ++p) {
    int64_t at = 0;  // xr: my experts' rows, expert by expert, each by sender
    for (int64_t e = bounds[size_t(me)]; e < bounds[size_t(me + 1)]; ++e) {
      int64_t before = 0;
      for (int64_t q = 0; q < p; ++q) before += count(q, e);
      if (count(p, e)) out.push_back({p, at + before, count(p, e), true});
      for (int64_t q = 0; q < ep; ++q) at += count(q, e);
    }
  }
}

struct ExpertExchange::Impl {
  struct Cut {
    size_t at, layer;
    Kind kind;
  };
  struct Layer {
    Tensor offsets, xp, xr, local, yr, yp, d_xp, d_yr, d_xr, d_yp;
  };
  static constexpr int kGroup = 1;           // the device's communicator for the exchanges
  std::vector<Cut> cuts;                     // in node order
  std::map<int, std::vector<Layer>> layers;  // by Program variant
  Device* dev = nullptr;
  Communicator* comm = nullptr;  // the group
  const std::vector<int64_t>* bounds = nullptr;
  int64_t E = 0, C = 0, ep = 1, me = 0;
  bool direct = false;          // device to device (Device::exchange), else through the host
  std::vector<int64_t> counts;  // (layers, ep, E): rows group rank p sends expert e this pass
  std::vector<double> sum;      // (ep, E): the counts' all-reduce
  std::vector<int32_t> off, local;
  std::vector<RowMessage> messages;
  std::vector<mxn_message> wire;
  std::vector<float> send, recv, stage;
  std::vector<int64_t> send_at, recv_at, cursor;  // ep + 1 float offsets of the blocks per rank
  double seconds = 0;                             // in training passes' exchanges, all steps
  bool timing = false;                            // in a training pass

  int64_t first() const { return (*bounds)[size_t(me)]; }
  int64_t mine() const { return (*bounds)[size_t(me + 1)] - first(); }

  // The pass's routing of layer l, from every rank of the group (in the forward, once).
  void learn_counts(size_t l, const Tensor& offsets) {
    dev->download(off.data(), offsets);
    std::fill(sum.begin(), sum.end(), 0.0);
    for (int64_t e = 0; e < E; ++e)
      sum[size_t(me * E + e)] = double(off[size_t(e + 1)] - off[size_t(e)]);
    comm->all_reduce_sum(sum.data(), int64_t(sum.size()));
    for (size_t i = 0; i < sum.size(); ++i) counts[l * sum.size() + i] = int64_t(sum[i]);
  }

  // Layer l's messages; the host's blocks to and from each rank (rows out: rank q's block is
  // the messages to q, in order); each local expert's first row in the regrouped rows.
  void layout(size_t l) {
    const int64_t* c = counts.data() + l * size_t(ep * E);
    expert_messages(c, *bounds, me, messages);
    send_at.assign(size_t(ep + 1), 0);
    recv_at.assign(size_t(ep + 1), 0);
    for (const RowMessage& m : messages)
      (m.receive ? recv_at : send_at)[size_t(m.peer + 1)] += m.rows * C;
    for (int64_t q = 0; q < ep; ++q)
      send_at[size_t(q + 1)] += send_at[size_t(q)], recv_at[size_t(q + 1)] += recv_at[size_t(q)];
    local.assign(1, 0);
    for (int64_t e = first(); e < first() + mine(); ++e) {
      int64_t n = 0;
      for (int64_t p = 0; p < ep; ++p) n += c[p * E + e];
      local.push_back(local.back() + int32_t(n));
    }
  }

  // Device to device: the messages between xp's rows (global expert order) and xr's (grouped by
  // local expert); `back` swaps sending and receiving.
  void wire_rows(const Tensor& xp, const Tensor& xr, bool back) {
    const uint64_t row = uint64_t(C) * dtype_size(xp.dtype);
    wire.clear();
    for (const RowMessage& m : messages) {
      const Tensor& t = m.receive ? xr : xp;
      wire.push_back({t.buffer, t.offset + uint64_t(m.row) * row, uint64_t(m.rows) * row,
                      int32_t(m.peer), int32_t(m.receive != back)});
    }
    dev->exchange(kGroup, wire);
  }

  // Rows in global expert order (xp, d_yp) to their experts' ranks, arriving grouped by local
  // expert and, within one, by sender (xr, d_yr); with `offsets`, the groups' offsets too.
  void out(size_t l, const Tensor& from, const Tensor& to, const Tensor* offsets) {
    layout(l);
    if (direct) {
      wire_rows(from, to, false);
    } else {
      const int64_t n_from = send_at.back() / C, n_to = local.back();
      if (n_from) dev->download(send.data(), head_rows(from, n_from));
      comm->all_to_all(send.data(), send_at, recv.data(), recv_at);
      cursor.assign(recv_at.begin(), recv_at.end() - 1);  // each sender's block, by my experts
      for (const RowMessage& m : messages)
        if (m.receive) {
          std::memcpy(stage.data() + m.row * C, recv.data() + cursor[size_t(m.peer)],
                      size_t(m.rows * C) * 4);
          cursor[size_t(m.peer)] += m.rows * C;
        }
      if (n_to) dev->upload(head_rows(to, n_to), stage.data());
    }
    if (offsets) dev->upload(*offsets, local.data());
  }

  // The inverse: rows grouped by local expert (yr, d_xr) back to their ranks, in the order they
  // left (yp, d_xp).
  void back(size_t l, const Tensor& from, const Tensor& to) {
    layout(l);
    if (direct) return wire_rows(to, from, true);
    const int64_t n_from = local.back(), n_to = send_at.back() / C;
    if (n_from) dev->download(stage.data(), head_rows(from, n_from));
    cursor.assign(recv_at.begin(), recv_at.end() - 1);
    for (const RowMessage& m : messages)
      if (m.receive) {
        std::memcpy(send.data() + cursor[size_t(m.peer)], stage.data() + m.row * C,
                    size_t(m.rows * C) * 4);
        cursor[size_t(m.peer)] += m.rows * C;
      }
    comm->all_to_all(send.data(), recv_at, recv.data(), send_at);
    if (n_to) dev->upload(head_rows(to, n_to), recv.data());
  }
};

ExpertExchange::ExpertExchange(Trainer& t, Communicator& group, const std::vector<int64_t>& bounds,
                               int64_t me)
    : x_(std::make_unique<Impl>()), t_(t) {
  Impl& x = *x_;
  const DecoderConfig d = t.cfg_.decoder_config();
  const Graph& g = t.prog_->graph();
  const int64_t ep = group.size();
  x.dev = t.dev_.get();
  x.comm = &group;
  x.bounds = &bounds;
  x.E = d.experts, x.C = d.hidden, x.ep = ep, x.me = me;
  // The cuts: before the first node that reads what crosses, after the last that writes what
  // leaves (checked: the graph's order must allow it).
  auto cut = [&](size_t l, Kind k, int leaves, int arrives) {
    x.cuts.push_back(
        {g.cut_before(arrives, leaves, "expert parallelism: a cut's rows are written after it"), l,
         k});
  };
  const std::vector<ExpertCut>& ec = t.m_.expert_cuts;
  for (size_t l = 0; l < ec.size(); ++l) {  // without local experts, out and back at one point
    const bool here = ec[l].xr >= 0;
    cut(l, Kind::rows_out, ec[l].xp, here ? ec[l].xr : ec[l].yp);
    cut(l, Kind::results_back, ec[l].yr, ec[l].yp);
    cut(l, Kind::grads_out, ec[l].d_yp, here ? ec[l].d_yr : ec[l].d_xp);
    cut(l, Kind::grads_back, ec[l].d_xr, ec[l].d_xp);
  }
  std::stable_sort(x.cuts.begin(), x.cuts.end(),
                   [](const Impl::Cut& a, const Impl::Cut& b) { return a.at < b.at; });
  for (const Trainer::Pass& p : t.passes_) {
    if (p.variant < 0) continue;
    std::vector<Impl::Layer>& ls = x.layers[p.variant];
    for (const ExpertCut& c : ec) {
      auto at = [&](int v) { return v < 0 ? Tensor{} : t.prog_->tensor(v, p.variant); };
      ls.push_back({at(c.offsets), at(c.xp), at(c.xr), at(c.local_offsets), at(c.yr), at(c.yp),
                    at(c.d_xp), at(c.d_yr), at(c.d_xr), at(c.d_yp)});
    }
  }
  const int64_t rows_out = ec.empty() ? 0 : numel(g.v(ec[0].xp).shape);
  const int64_t rows_in = ec.empty() || ec[0].xr < 0 ? 0 : numel(g.v(ec[0].xr).shape);
  x.counts.assign(ec.size() * size_t(ep * d.experts), 0);
  x.sum.assign(size_t(ep * d.experts), 0.0);
  x.off.assign(size_t(d.experts + 1), 0);
  if (ep > 1 && device_group(group, *x.dev, Impl::kGroup)) {
    x.direct = true;
  } else {
    x.send.assign(size_t(std::max(rows_out, rows_in)), 0.f);
    x.recv.assign(x.send.size(), 0.f);
    x.stage.assign(size_t(rows_in), 0.f);
  }
}

ExpertExchange::~ExpertExchange() = default;

void ExpertExchange::set_timing(bool on) { x_->timing = on; }
double ExpertExchange::seconds() const { return x_->seconds; }
const char* ExpertExchange::path() const {
  return x_->direct ? "device-to-device (NCCL)" : "host-staged";
}

void ExpertExchange::run(Program& prog, int variant, size_t end) {
  const std::vector<Impl::Layer>& ls = x_->layers.at(variant);
  size_t at = 0;
  for (const Impl::Cut& c : x_->cuts) {
    if (c.at >= end) break;
    prog.run(at, c.at, variant);
    at = c.at;
    const Impl::Layer& L = ls[c.layer];
    std::chrono::steady_clock::time_point t0;
    if (x_->timing) {  // the exchange's own time: the device has finished the piece before it
      t_.dev_->synchronize();
      t0 = std::chrono::steady_clock::now();
    }
    switch (c.kind) {
      case Kind::rows_out:
        x_->learn_counts(c.layer, L.offsets);
        x_->out(c.layer, L.xp, L.xr, L.local.buffer ? &L.local : nullptr);
        break;
      case Kind::results_back:
        x_->back(c.layer, L.yr, L.yp);
        break;
      case Kind::grads_out:
        x_->out(c.layer, L.d_yp, L.d_yr, nullptr);
        break;
      case Kind::grads_back:
        x_->back(c.layer, L.d_xr, L.d_xp);
        break;
    }
    if (x_->timing) {
      if (x_->direct) t_.dev_->synchronize();  // the messages were only enqueued
      x_->seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    }
  }
  prog.run(at, end, variant);
}

}  // namespace mxn
