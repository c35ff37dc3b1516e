#pragma once
// Expert parallelism's four all-to-alls a MoE layer a pass, at the cuts of a training graph built
// with ExpertShard (DecoderGraph::expert_cuts): the rows out to their experts' ranks and the
// results back, in the forward; their gradients the same ways in the backward. Host-staged
// through MPI, or device to device (NCCL) when every rank of the group has the same backend with
// grouped messages (ABI 10). Used by ExpertParallel (--ep) and by Pipeline (--ep inside each
// stage's replicas).
#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

namespace mxn {

// One message of a MoE layer's rows going out to their experts' ranks, as group rank `me` sees
// it: `rows` rows sent to group rank `peer` from row `row` of the rows in global expert order
// (xp), or received from `peer` into row `row` of the rows grouped by local expert and, within
// one, by sender (xr). Both ends list a pair's messages in expert order, so that ordered
// messages (NCCL's grouped send/receive, MPI's) match; the results come back by the same
// messages with sending and receiving swapped. `counts` (ep, E): rows group rank p routes to
// expert e; group rank i holds experts [bounds[i], bounds[i + 1]). Empty messages are left out.
struct RowMessage {
  int64_t peer, row, rows;
  bool receive;
};
void expert_messages(const int64_t* counts, const std::vector<int64_t>& bounds, int64_t me,
                     std::vector<RowMessage>& out);

class Trainer;
class Program;
class Communicator;

class ExpertExchange {
 public:
  // `group`: the ranks that split each MoE layer's experts, this rank the `me`th, group rank i
  // holding experts [bounds[i], bounds[i + 1]). After the Trainer's pass variants exist.
  ExpertExchange(Trainer& t, Communicator& group, const std::vector<int64_t>& bounds, int64_t me);
  ~ExpertExchange();
  // Nodes [0, end) of a pass, with the exchanges at the cuts (every rank of the group in step).
  void run(Program& prog, int variant, size_t end);
  void set_timing(bool on);  // count the exchanges' seconds (training passes after the first)
  double seconds() const;    // in the exchanges: moving rows, waiting for the others
  // How the rows travel, for the plan: "device-to-device (NCCL)" or "host-staged".
  const char* path() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> x_;
  Trainer& t_;
};

}  // namespace mxn
