// The communicator's collectives that training does not already exercise, under a real mpirun:
// all_to_all with uneven blocks (expert parallelism's exchange of token rows: rank r sends
// r + j + 1 rows of 3 floats to rank j, some ranks nothing to some), and all_to_all_counts.
// Every float received is checked against the value its sender wrote: (from, to, index).
// Prints "all_to_all: N ranks, M floats received, all as sent" on rank 0; exit 1 otherwise.
// usage: mpirun -np N comm_check
#include <cstdio>
#include <vector>

#include "core/error.h"
#include "parallel/comm.h"

using namespace mxn;

int main() try {
  Communicator& comm = Communicator::world();
  const int r = comm.rank(), n = comm.size();
  auto rows = [](int from, int to) { return (from + to) % 3 == 2 ? 0 : from + to + 1; };
  std::vector<int64_t> counts(static_cast<size_t>(n)), got(static_cast<size_t>(n));
  for (int j = 0; j < n; ++j) counts[size_t(j)] = rows(r, j) * 3;
  comm.all_to_all_counts(counts.data(), got.data());
  std::vector<int64_t> sb{0}, rb{0};
  for (int j = 0; j < n; ++j) {
    sb.push_back(sb.back() + counts[size_t(j)]);
    rb.push_back(rb.back() + got[size_t(j)]);
  }
  std::vector<float> send(static_cast<size_t>(sb.back())),
      recv(static_cast<size_t>(rb.back()), -1.f);
  for (int j = 0; j < n; ++j)
    for (int64_t i = 0; i < counts[size_t(j)]; ++i)
      send[size_t(sb[size_t(j)] + i)] = float(r * 10000 + j * 100 + i);
  comm.all_to_all(send.data(), sb, recv.data(), rb);
  int64_t bad = 0;
  for (int j = 0; j < n; ++j) {
    bad += got[size_t(j)] != rows(j, r) * 3;
    for (int64_t i = 0; i < got[size_t(j)]; ++i)
      bad += recv[size_t(rb[size_t(j)] + i)] != float(j * 10000 + r * 100 + i);
  }
  double all_bad = double(bad), total = double(recv.size());
  comm.all_reduce_sum(&all_bad, 1);
  comm.all_reduce_sum(&total, 1);
  if (r == 0)
    std::printf("all_to_all: %d ranks, %.0f floats received, %s\n", n, total,
                all_bad == 0 ? "all as sent" : "WRONG");
  return all_bad == 0 ? 0 : 1;
} catch (const Error& e) {
  std::fprintf(stderr, "comm_check: %s\n", e.what());
  return 1;
}
