#include "parallel/comm.h"

#include <mpi.h>

#include <cstdlib>
#include <cstring>

#include "core/error.h"

namespace mxn {
namespace {

static_assert(sizeof(MPI_Comm) <= sizeof(void*), "MPI_Comm must fit a pointer");
static_assert(sizeof(MPI_Request) <= sizeof(void*), "MPI_Request must fit a pointer");

MPI_Comm as_comm(void* c) {
  if (!c) return MPI_COMM_WORLD;
  MPI_Comm m;
  std::memcpy(&m, &c, sizeof(m));
  return m;
}

// Requests are kept as pointers so that comm.h needs no mpi.h.
void* to_slot(MPI_Request req) {
  void* slot = nullptr;
  std::memcpy(&slot, &req, sizeof(req));
  return slot;
}

void wait_slots(std::vector<void*>& slots) {
  for (void* slot : slots) {
    MPI_Request req;
    std::memcpy(&req, &slot, sizeof(req));
    if (req != MPI_REQUEST_NULL) MPI_Wait(&req, MPI_STATUS_IGNORE);
  }
  slots.clear();
}

int env_int(const char* name, int fallback) {
  const char* v = std::getenv(name);
  return v && *v ? std::atoi(v) : fallback;
}

}  // namespace

RankInfo rank_from_env() {
  RankInfo r;
  if (std::getenv("OMPI_COMM_WORLD_SIZE")) {
    r = {env_int("OMPI_COMM_WORLD_RANK", 0), env_int("OMPI_COMM_WORLD_SIZE", 1),
         env_int("OMPI_COMM_WORLD_LOCAL_RANK", 0), "openmpi"};
  } else if (std::getenv("SLURM_NTASKS") && std::getenv("SLURM_PROCID")) {
    r = {env_int("SLURM_PROCID", 0), env_int("SLURM_NTASKS", 1), env_int("SLURM_LOCALID", 0),
         "slurm"};
  } else if (std::getenv("WORLD_SIZE")) {
    r = {env_int("RANK", 0), env_int("WORLD_SIZE", 1), env_int("LOCAL_RANK", 0), "env"};
  }
  if (r.world < 1 || r.rank < 0 || r.rank >= r.world)
    throw Error("bad rank environment: rank " + std::to_string(r.rank) + " of world size " +
                std::to_string(r.world) + " (from " + r.launcher + ")");
  return r;
}

Communicator& Communicator::world() {
  static Communicator c;
  return c;
}

Communicator::Communicator() : info_(rank_from_env()) {
  if (info_.world <= 1) return;
  int inited = 0;
  MPI_Initialized(&inited);
  if (!inited) {
    int provided = 0;
    MPI_Init_thread(nullptr, nullptr, MPI_THREAD_FUNNELED, &provided);
  }
  mpi_ = true;
  pending_.reserve(1024);
  int rank = 0, size = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  if (rank != info_.rank || size != info_.world)
    throw Error("MPI says rank " + std::to_string(rank) + " of " + std::to_string(size) +
                ", the launcher's environment says " + std::to_string(info_.rank) + " of " +
                std::to_string(info_.world));
  // A failed rank must end the job, not hang it: MPI errors abort (the default on COMM_WORLD).
}

Communicator::~Communicator() {
  if (mpi_ && !comm_) {  // the world's; a split one ends with it
    int fin = 0;
    MPI_Finalized(&fin);
    if (!fin) MPI_Finalize();
  }
}

void Communicator::all_reduce_sum(float* data, int64_t n) {
  if (!mpi_ || n == 0) return;
  for (int64_t off = 0; off < n; off += (1 << 30)) {
    const int cnt = int(std::min<int64_t>(n - off, 1 << 30));
    MPI_Allreduce(MPI_IN_PLACE, data + off, cnt, MPI_FLOAT, MPI_SUM, as_comm(comm_));
  }
}

void Communicator::all_reduce_sum(double* data, int64_t n) {
  if (!mpi_ || n == 0) return;
  MPI_Allreduce(MPI_IN_PLACE, data, int(n), MPI_DOUBLE, MPI_SUM, as_comm(comm_));
}

void Communicator::start_all_reduce_sum(float* data, int64_t n) {
  if (!mpi_ || n == 0) return;
  MXN_CHECK(n < (int64_t(1) << 31), "one non-blocking all-reduce holds at most 2^31 floats");
  MPI_Request req;
  MPI_Iallreduce(MPI_IN_PLACE, data, int(n), MPI_FLOAT, MPI_SUM, as_comm(comm_), &req);
  pending_.push_back(to_slot(req));
}

void Communicator::progress() {
  for (void*& slot : pending_) {
    MPI_Request req;
    std::memcpy(&req, &slot, sizeof(req));
    if (req == MPI_REQUEST_NULL) continue;
    int done = 0;
    MPI_Test(&req, &done, MPI_STATUS_IGNORE);
    std::memcpy(&slot, &req, sizeof(req));
  }
}

void Communicator::wait_all() { wait_slots(pending_); }

namespace {
// MPI's counts and displacements are ints: one rank's share must stay below 2^31 floats.
void counts_of(const std::vector<int64_t>& bounds, std::vector<int>& counts,
               std::vector<int>& displs) {
  counts.clear();
  displs.clear();
  for (size_t r = 0; r + 1 < bounds.size(); ++r) {
    MXN_CHECK(bounds[r + 1] >= bounds[r] && bounds[r + 1] < (int64_t(1) << 31),
              "a gather's shares must be ordered and below 2^31 floats");
    counts.push_back(int(bounds[r + 1] - bounds[r]));
    displs.push_back(int(bounds[r]));
  }
}
}  // namespace

void Communicator::all_gather(float* data, const std::vector<int64_t>& bounds) {
  if (!mpi_) return;
  MXN_CHECK(int(bounds.size()) == info_.world + 1, "all_gather needs world + 1 bounds");
  counts_of(bounds, counts_, displs_);
  MPI_Allgatherv(MPI_IN_PLACE, 0, MPI_DATATYPE_NULL, data, counts_.data(), displs_.data(),
                 MPI_FLOAT, as_comm(comm_));
}

void Communicator::reduce_scatter(float* data, const std::vector<int64_t>& bounds) {
  if (!mpi_) return;
  MXN_CHECK(int(bounds.size()) == info_.world + 1, "reduce_scatter needs world + 1 bounds");
  counts_of(bounds, counts_, displs_);
  // In place, MPI leaves this rank's block of the sum at the array's start: moved to its place.
  const int r = info_.rank;
  MPI_Reduce_scatter(MPI_IN_PLACE, data, counts_.data(), MPI_FLOAT, MPI_SUM, as_comm(comm_));
  std::memmove(data + bounds[size_t(r)], data, size_t(counts_[size_t(r)]) * sizeof(float));
}

void Communicator::gather(float* data, const std::vector<int64_t>& bounds, int root) {
  if (!mpi_) return;
  MXN_CHECK(int(bounds.size()) == info_.world + 1, "gather needs world + 1 bounds");
  counts_of(bounds, counts_, displs_);
  const int r = info_.rank;
  if (r == root)
    MPI_Gatherv(MPI_IN_PLACE, counts_[size_t(r)], MPI_FLOAT, data, counts_.data(), displs_.data(),
                MPI_FLOAT, root, as_comm(comm_));
  else
    MPI_Gatherv(data + bounds[size_t(r)], counts_[size_t(r)], MPI_FLOAT, nullptr, nullptr, nullptr,
                MPI_FLOAT, root, as_comm(comm_));
}

void Communicator::all_to_all(const float* send, const std::vector<int64_t>& send_bounds,
                              float* recv, const std::vector<int64_t>& recv_bounds) {
  MXN_CHECK(
      int(send_bounds.size()) == info_.world + 1 && int(recv_bounds.size()) == info_.world + 1,
      "all_to_all needs world + 1 bounds on each side");
  if (!mpi_) {
    std::memcpy(recv + recv_bounds[0], send + send_bounds[0],
                size_t(send_bounds[1] - send_bounds[0]) * sizeof(float));
    return;
  }
  std::vector<int> sc, sd, rc, rd;
  counts_of(send_bounds, sc, sd);
  counts_of(recv_bounds, rc, rd);
  MPI_Alltoallv(send, sc.data(), sd.data(), MPI_FLOAT, recv, rc.data(), rd.data(), MPI_FLOAT,
                as_comm(comm_));
}

void Communicator::all_to_all_counts(const int64_t* in, int64_t* out) {
  if (!mpi_) {
    out[0] = in[0];
    return;
  }
  MPI_Alltoall(in, 1, MPI_INT64_T, out, 1, MPI_INT64_T, as_comm(comm_));
}

std::unique_ptr<Communicator> Communicator::split(int color, int key) {
  std::unique_ptr<Communicator> c(new Communicator(*this));
  c->pending_.clear();
  c->sends_.clear();
  if (!mpi_) return c;
  MPI_Comm m;
  MPI_Comm_split(as_comm(comm_), color, key, &m);
  std::memcpy(&c->comm_, &m, sizeof(m));
  MPI_Comm_rank(m, &c->info_.rank);
  MPI_Comm_size(m, &c->info_.world);
  c->mpi_ = c->info_.world > 1;
  return c;
}

void Communicator::send(const float* data, int64_t n, int to, int tag) {
  MXN_CHECK(mpi_ && n < (int64_t(1) << 31), "send needs MPI and fewer than 2^31 floats");
  MPI_Request req;
  MPI_Isend(data, int(n), MPI_FLOAT, to, tag, as_comm(comm_), &req);
  sends_.push_back(to_slot(req));
}

void Communicator::recv(float* data, int64_t n, int from, int tag) {
  MXN_CHECK(mpi_ && n < (int64_t(1) << 31), "recv needs MPI and fewer than 2^31 floats");
  MPI_Recv(data, int(n), MPI_FLOAT, from, tag, as_comm(comm_), MPI_STATUS_IGNORE);
}

void Communicator::wait_sends() { wait_slots(sends_); }

void Communicator::broadcast(void* data, int64_t bytes, int root) {
  if (!mpi_) return;
  constexpr int64_t kChunk = int64_t(1) << 30;  // MPI counts are ints
  for (int64_t at = 0; at < bytes; at += kChunk)
    MPI_Bcast(static_cast<char*>(data) + at, int(std::min(kChunk, bytes - at)), MPI_BYTE, root,
              as_comm(comm_));
}

bool Communicator::all(bool yes) {
  if (!mpi_) return yes;
  int v = yes ? 1 : 0, out = 0;
  MPI_Allreduce(&v, &out, 1, MPI_INT, MPI_MIN, as_comm(comm_));
  return out == 1;
}

void Communicator::barrier() {
  if (mpi_) MPI_Barrier(as_comm(comm_));
}

}  // namespace mxn
