#pragma once
// The C++ side of the chip contract: a Device wraps one backend's C table and context, turns
// status codes into Errors, and owns Buffers. Everything above backend/ talks to this class.
#include <array>
#include <memory>
#include <string>
#include <vector>

#include "backend/op_params.h"
#include "core/tensor.h"
#include "mxn/backend_abi.h"

namespace mxn {

class Device;

class Buffer {
 public:
  Buffer(Device* dev, void* handle, uint64_t bytes) : dev_(dev), handle_(handle), bytes_(bytes) {}
  ~Buffer();
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  void* handle() const { return handle_; }
  uint64_t bytes() const { return bytes_; }

 private:
  Device* dev_;
  void* handle_;
  uint64_t bytes_;
};

class Device {
 public:
  Device(const mxn_backend_api* api, int index, int threads);
  ~Device();
  Device(const Device&) = delete;
  Device& operator=(const Device&) = delete;

  std::string name() const;  // "cpu:0"
  const mxn_device_props& props() const { return props_; }
  const mxn_backend_api* api() const { return api_; }

  // Throws an Error naming the device, the bytes asked for and the bytes free when it fails.
  std::unique_ptr<Buffer> alloc(uint64_t bytes);
  void upload(const Tensor& dst, const void* src);
  void download(void* dst, const Tensor& src);
  bool supports(mxn_op op, DType t) const;
  // Whether run() would take this whole call (operands' dtypes and shapes, parameters); when not,
  // *why (if given) says why. A plugin older than ABI 8 is asked supports(op, dtype) per operand.
  bool supports(const mxn_op_call& call, std::string* why = nullptr) const;
  void run(const mxn_op_call& call);
  void synchronize();
  void free_buffer(void* handle);

  // Device-direct collectives (NCCL among CUDA GPUs), when the backend has them and its library
  // is present; see mxn_backend_api. The Communicator sets them up; GradSync uses them.
  bool has_collectives() const;
  // Bytes the device could still allocate (the backend's answer, else its total memory).
  uint64_t free_memory() const;
  // A backend's per-device setting (mxn_backend_api::set_option); false when the backend has no
  // such option (or no options: a plugin of ABI 6).
  bool set_option(const std::string& key, int64_t value);
  void comm_id(uint8_t* id);
  void comm_init(const uint8_t* id, int world, int rank);
  void all_reduce_sum(const Tensor& t);  // f32, in place, enqueued
  void comm_wait();
  // Device-direct messages within a group of ranks (ABI 10: NCCL's grouped send/receive), when
  // the backend has them; see mxn_backend_api::exchange.
  bool has_exchange() const;
  void comm_init_group(int group, const uint8_t* id, int world, int rank);
  void exchange(int group, const std::vector<mxn_message>& messages);  // enqueued

  // With MXN_PROFILE=1 in the environment each kernel is timed (the queue is synchronised after
  // each); report() gives a table of time per op, most expensive first.
  bool profiling() const { return profile_; }
  std::string profile_report() const;

 private:
  [[noreturn]] void fail(int32_t status, const char* what);
  const mxn_backend_api* api_;
  int index_;
  void* ctx_ = nullptr;
  mxn_device_props props_{};
  bool profile_ = false;
  double op_seconds_[MXN_OP_COUNT] = {};
  int64_t op_calls_[MXN_OP_COUNT] = {};
};

const char* op_name(int32_t op);

// One op call of the chip contract, ready for Device::run.
mxn_op_call make_op_call(mxn_op op, const std::vector<Tensor>& in, const std::vector<Tensor>& out,
                         const std::array<int64_t, MXN_MAX_IP>& ip = {},
                         const std::array<float, 8>& fp = {});
// The same with the op's parameters by type (op_params.h).
template <typename P>
mxn_op_call make_op_call(mxn_op op, const std::vector<Tensor>& in, const std::vector<Tensor>& out,
                         const P& params) {
  mxn_op_call c = make_op_call(op, in, out);
  set_params(c, params);
  return c;
}

// --- registry ---------------------------------------------------------------------------------
struct BackendEntry {
  std::string name;
  const mxn_backend_api* api = nullptr;  // null when it failed to load
  std::string error;                     // why it did not load
};

const std::vector<BackendEntry>& backends();
// "cpu", "cpu:0", "opencl:1". An unknown or absent device throws an Error listing those that exist.
std::unique_ptr<Device> open_device(const std::string& spec, int threads = 0);
std::vector<std::string> available_devices();
// A device's properties without opening it (no context, no memory); false when unknown.
bool device_props(const std::string& spec, mxn_device_props& out);

}  // namespace mxn
