#include "parallel/grad_sync.h"

#include <algorithm>
#include <cstdio>
#include <cstring>

#include "core/faults.h"

namespace mxn {

bool same_everywhere(Communicator& comm, const std::string& what) {
  char mine[256] = {};
  std::snprintf(mine, sizeof(mine), "%s", what.c_str());
  char root[sizeof(mine)];
  std::memcpy(root, mine, sizeof(root));
  comm.broadcast(root, sizeof(root), 0);
  return comm.all(std::memcmp(root, mine, sizeof(root)) == 0);
}

bool one_backend(Communicator& comm, const Device& dev) {
  return same_everywhere(comm, dev.api()->name);
}

bool device_group(Communicator& comm, Device& dev, int group) {
  const bool same = one_backend(comm, dev);  // collective: before any rank's &&
  if (!comm.all(same && dev.has_exchange())) return false;
  uint8_t id[MXN_COMM_ID_BYTES] = {};
  if (comm.rank() == 0) dev.comm_id(id);
  comm.broadcast(id, sizeof(id), 0);
  dev.comm_init_group(group, id, comm.size(), comm.rank());
  return true;
}

GradSync::GradSync(Program& prog, Communicator& comm, int64_t bucket_floats)
    : prog_(prog), comm_(comm) {
  const Graph& g = prog.graph();
  // The last node that writes each grad value; a gradient no node writes stays zero and goes
  // in the last bucket.
  std::vector<size_t> last(g.values.size(), g.nodes.size());
  for (size_t i = 0; i < g.nodes.size(); ++i)
    for (int id : g.nodes[i].out)
      if (g.v(id).kind == ValueKind::grad) last[size_t(id)] = i;
  std::vector<int> params = g.params();
  std::stable_sort(params.begin(), params.end(), [&](int a, int b) {
    return last[size_t(g.v(a).grad)] < last[size_t(g.v(b).grad)];
  });
  size_t host = 0;
  for (int p : params) {
    const int gid = g.v(p).grad;
    if (buckets_.empty() || int64_t(buckets_.back().floats) >= bucket_floats)
      buckets_.push_back({0, host, 0, {}});
    Bucket& b = buckets_.back();
    const Tensor t = prog.tensor(gid);
    b.items.push_back({t, host});
    b.floats += size_t(t.numel());
    b.last_node = std::min(last[size_t(gid)] + 1, g.nodes.size());
    host += size_t(t.numel());
  }
  host_.resize(host);
  // Device-direct only if every rank can: rank 0's backend everywhere, with its collectives.
  Device& dev = prog.device();
  const bool same = one_backend(comm, dev);
  if (comm.all(same && dev.has_collectives())) {
    uint8_t id[MXN_COMM_ID_BYTES] = {};
    if (comm.rank() == 0) dev.comm_id(id);
    comm.broadcast(id, sizeof(id), 0);
    dev.comm_init(id, comm.size(), comm.rank());
    direct_ = true;
  }
}

void GradSync::run(size_t begin, size_t end, int variant) {
  Device& dev = prog_.device();
  size_t at = begin;
  for (Bucket& b : buckets_) {
    const size_t upto = std::clamp(b.last_node, at, end);
    prog_.run(at, upto, variant);
    at = upto;
    if (direct_) {  // on the device's communication queue, beside the rest of the backward
      for (const Item& it : b.items) dev.all_reduce_sum(it.grad);
    } else {
      for (const Item& it : b.items) dev.download(host_.data() + it.host, it.grad);
      comm_.start_all_reduce_sum(host_.data() + b.begin, int64_t(b.floats));
      fault_point("allreduce");
      comm_.progress();
    }
  }
  prog_.run(at, end, variant);
  if (direct_) dev.comm_wait();
  dev.synchronize();
  done_ = std::chrono::steady_clock::now();
  if (direct_) return;
  comm_.wait_all();
  for (const Bucket& b : buckets_)
    for (const Item& it : b.items) dev.upload(it.grad, host_.data() + it.host);
  exposed_s_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - done_).count();
}

}  // namespace mxn
