// NCCL for the CUDA backend's collectives, opened at run time (dlopen) so the plugin loads and
// runs single-GPU where NCCL is not installed; then comm_id(ctx, NULL) says no and mxn reduces
// through the host. Only the functions mxn needs are looked up.
#pragma once
#include <dlfcn.h>
#include <nccl.h>

#include "mxn/backend_abi.h"

namespace mxn::cuda {

struct Nccl {
  decltype(&ncclGetUniqueId) get_unique_id = nullptr;
  decltype(&ncclCommInitRank) comm_init_rank = nullptr;
  decltype(&ncclAllReduce) all_reduce = nullptr;
  decltype(&ncclCommDestroy) comm_destroy = nullptr;
  decltype(&ncclGetErrorString) error_string = nullptr;
  decltype(&ncclSend) send = nullptr;  // expert parallelism's exchange (ABI 10)
  decltype(&ncclRecv) recv = nullptr;
  decltype(&ncclGroupStart) group_start = nullptr;
  decltype(&ncclGroupEnd) group_end = nullptr;
  bool ok = false;
  bool p2p = false;  // send, recv and the group calls (NCCL 2.7 and later)

  static const Nccl& get() {
    static const Nccl n = [] {
      Nccl x;
      void* lib = dlopen("libnccl.so.2", RTLD_NOW | RTLD_LOCAL);
      if (!lib) lib = dlopen("libnccl.so", RTLD_NOW | RTLD_LOCAL);
      if (!lib) return x;
      x.get_unique_id = reinterpret_cast<decltype(&ncclGetUniqueId)>(dlsym(lib, "ncclGetUniqueId"));
      x.comm_init_rank =
          reinterpret_cast<decltype(&ncclCommInitRank)>(dlsym(lib, "ncclCommInitRank"));
      x.all_reduce = reinterpret_cast<decltype(&ncclAllReduce)>(dlsym(lib, "ncclAllReduce"));
      x.comm_destroy = reinterpret_cast<decltype(&ncclCommDestroy)>(dlsym(lib, "ncclCommDestroy"));
      x.error_string =
          reinterpret_cast<decltype(&ncclGetErrorString)>(dlsym(lib, "ncclGetErrorString"));
      x.send = reinterpret_cast<decltype(&ncclSend)>(dlsym(lib, "ncclSend"));
      x.recv = reinterpret_cast<decltype(&ncclRecv)>(dlsym(lib, "ncclRecv"));
      x.group_start = reinterpret_cast<decltype(&ncclGroupStart)>(dlsym(lib, "ncclGroupStart"));
      x.group_end = reinterpret_cast<decltype(&ncclGroupEnd)>(dlsym(lib, "ncclGroupEnd"));
      x.ok =
          x.get_unique_id && x.comm_init_rank && x.all_reduce && x.comm_destroy && x.error_string;
      x.p2p = x.ok && x.send && x.recv && x.group_start && x.group_end;
      return x;
    }();
    return n;
  }
};

static_assert(sizeof(ncclUniqueId) == MXN_COMM_ID_BYTES, "NCCL's id must fit the ABI's");

}  // namespace mxn::cuda
