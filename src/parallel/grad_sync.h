#pragma once
// Gradient all-reduce that overlaps the backward pass (what PyTorch DDP calls buckets). The
// autograd adds each param's gradient into its grad buffer as soon as the param's last use has
// been back-propagated, so the node after which each gradient is final is known. Params are
// grouped, in that order, into buckets of about `bucket_floats`; when the backward has run past a
// bucket's last node, the bucket is copied to the host and its all-reduce starts while the
// backward goes on with the layers below. Host-staged through MPI, so any mix of chips can take
// part; when every rank's device has the same backend with device-direct collectives (NCCL among
// CUDA GPUs), each bucket's gradients are summed on the devices instead, on the backend's own
// communication queue, and nothing goes through the host.
#include <chrono>
#include <string>
#include <vector>

#include "graph/program.h"
#include "parallel/comm.h"

namespace mxn {

// True on every rank iff every rank gives rank 0's `what` (up to 255 bytes; collective).
bool same_everywhere(Communicator& comm, const std::string& what);
// True on every rank iff every rank's device has rank 0's backend (collective over `comm`): the
// condition, with the backend's own library present, for device-direct collectives.
bool one_backend(Communicator& comm, const Device& dev);
// Device-direct messages among `comm`'s ranks (ABI 10: NCCL's grouped send/receive among CUDA
// GPUs) as the device's communicator `group`, where every rank has rank 0's backend with them;
// false (nothing set up) otherwise. Collective over `comm`.
bool device_group(Communicator& comm, Device& dev, int group);

class GradSync {
 public:
  GradSync(Program& prog, Communicator& comm, int64_t bucket_floats = int64_t(1) << 18);

  // Runs nodes [begin, end) of `variant` (the backward of a step's last pass) and returns when
  // every gradient holds the sum over ranks. backward_done() is when this rank's own work ended.
  void run(size_t begin, size_t end, int variant);
  std::chrono::steady_clock::time_point backward_done() const { return done_; }
  // Seconds spent after this rank's backward waiting for the reduces to finish, summed over runs:
  // the communication the overlap did not hide.
  double exposed_seconds() const { return exposed_s_; }
  void reset_exposed_seconds() { exposed_s_ = 0; }
  size_t buckets() const { return buckets_.size(); }
  bool device_direct() const { return direct_; }

 private:
  struct Item {
    Tensor grad;
    size_t host;  // float offset into host_
  };
  struct Bucket {
    size_t last_node;  // the bucket can go once this node has run
    size_t begin = 0, floats = 0;
    std::vector<Item> items;
  };
  Program& prog_;
  Communicator& comm_;
  std::vector<Bucket> buckets_;
  std::vector<float> host_;
  bool direct_ = false;
  std::chrono::steady_clock::time_point done_;
  double exposed_s_ = 0;
};

}  // namespace mxn
