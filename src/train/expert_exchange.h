#pragma once
// Expert parallelism's four host-staged all-to-alls a MoE layer a pass, at the cuts of a training
// graph built with ExpertShard (DecoderGraph::expert_cuts): the rows out to their experts' ranks
// and the results back, in the forward; their gradients the same ways in the backward. Used by
// ExpertParallel (--ep) and by Pipeline (--ep inside each stage's replicas).
#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

namespace mxn {

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

 private:
  struct Impl;
  std::unique_ptr<Impl> x_;
  Trainer& t_;
};

}  // namespace mxn
