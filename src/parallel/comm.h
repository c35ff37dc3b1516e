#pragma once
// Ranks and the communicator. One rank (process) per device, started by an existing launcher:
// OpenMPI's mpirun, Slurm's srun --mpi=pmix, or anything that sets RANK / WORLD_SIZE. Collectives
// are host-staged through MPI so any mix of chips can join; the interface is NCCL-shaped so a
// device-direct library can sit behind it later.
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace mxn {

struct RankInfo {
  int rank = 0, world = 1, local_rank = 0;
  std::string launcher = "none";  // "openmpi", "slurm", "env" or "none"
};

// Identity from the launcher's environment, before any communicator exists.
RankInfo rank_from_env();

class Communicator {
 public:
  // Joins the job's ranks (MPI_Init) when the environment says there is more than one.
  static Communicator& world();
  int rank() const { return info_.rank; }
  int size() const { return info_.world; }
  const RankInfo& info() const { return info_; }
  // In-place sum over ranks of a host buffer; a no-op on one rank.
  void all_reduce_sum(float* data, int64_t n);
  void all_reduce_sum(double* data, int64_t n);
  // Starts an in-place sum and returns at once (NCCL-style: the data must stay put until
  // wait_all). progress() lets pending ones advance; wait_all() finishes every one.
  void start_all_reduce_sum(float* data, int64_t n);
  void progress();
  void wait_all();
  void barrier();
  // In place over one array split by `bounds` (world + 1 offsets): rank r's floats
  // [bounds[r], bounds[r + 1]) reach every rank (all_gather) or only `root` (gather).
  void all_gather(float* data, const std::vector<int64_t>& bounds);
  void gather(float* data, const std::vector<int64_t>& bounds, int root);
  // In place over the same split: the whole array summed over the ranks, rank r keeping its
  // floats [bounds[r], bounds[r + 1]) of the sum (MPI_Reduce_scatter; the rest left as it was).
  void reduce_scatter(float* data, const std::vector<int64_t>& bounds);
  // Expert parallelism's exchange (MPI_Alltoallv, host-staged): rank r sends floats
  // [send_bounds[j], send_bounds[j + 1]) of `send` to rank j and receives rank j's block for it
  // at [recv_bounds[j], recv_bounds[j + 1]) of `recv` (world + 1 offsets each; the receivers'
  // sizes must agree with the senders'). One rank: its own block copied.
  void all_to_all(const float* send, const std::vector<int64_t>& send_bounds, float* recv,
                  const std::vector<int64_t>& recv_bounds);
  // The same for one int64 a rank pair (counts, before the data): out[j] = rank j's in[rank].
  void all_to_all_counts(const int64_t* in, int64_t* out);
  // The ranks that give the same `color`, ranked by `key` (MPI_Comm_split): a pipeline's
  // stages, or one stage's data-parallel replicas. Collective over this communicator.
  std::unique_ptr<Communicator> split(int color, int key);
  // Point to point between pipeline stages: send() starts a message and returns (the data must
  // stay put until wait_sends); recv() blocks until its message is in. Messages between two
  // ranks with one tag arrive in the order they were sent.
  void send(const float* data, int64_t n, int to, int tag);
  void recv(float* data, int64_t n, int from, int tag);
  void wait_sends();
  // Copies `bytes` from rank `root` to every rank.
  void broadcast(void* data, int64_t bytes, int root);
  // True on every rank iff `yes` on every rank.
  bool all(bool yes);
  ~Communicator();

 private:
  Communicator();
  RankInfo info_;
  bool mpi_ = false;
  void* comm_ = nullptr;              // an MPI_Comm; null: MPI_COMM_WORLD
  std::vector<void*> pending_;        // MPI_Request handles; capacity kept between steps
  std::vector<void*> sends_;          // send()'s requests
  std::vector<int> counts_, displs_;  // a gather's or scatter's shares; capacity kept
};

}  // namespace mxn
