/* A backend built against the last ABI (6): its table ends before set_option. mxn must load it
 * and list its device; asking it for an option it does not have is a plain "no". */
#include <stddef.h>
#include <string.h>

#include "mxn/backend_abi.h"

static int32_t device_count(void) { return 1; }
static int32_t device_props(int32_t device, mxn_device_props* out) {
  (void)device;
  strncpy(out->name, "a plugin of ABI 6", sizeof(out->name) - 1);
  strncpy(out->vendor, "mxn tests", sizeof(out->vendor) - 1);
  out->memory_bytes = 1u << 20;
  out->dtype_mask = 1u << MXN_DTYPE_F32;
  return 0;
}
static int32_t init(int32_t device, const mxn_backend_options* opts, void** ctx) {
  (void)device;
  (void)opts;
  static int state;
  *ctx = &state;
  return 0;
}
static void shutdown(void* ctx) { (void)ctx; }
static const char* last_error(void* ctx) {
  (void)ctx;
  return "a test plugin computes nothing";
}
static int32_t alloc(void* c, uint64_t n, void** out) {
  (void)c, (void)n, (void)out;
  return MXN_STATUS_UNSUPPORTED;
}
static void release(void* c, void* b) { (void)c, (void)b; }
static int32_t to_device(void* c, void* d, uint64_t o, const void* s, uint64_t n) {
  (void)c, (void)d, (void)o, (void)s, (void)n;
  return MXN_STATUS_UNSUPPORTED;
}
static int32_t to_host(void* c, void* d, const void* s, uint64_t o, uint64_t n) {
  (void)c, (void)d, (void)s, (void)o, (void)n;
  return MXN_STATUS_UNSUPPORTED;
}
static int32_t supports(void* c, int32_t op, int32_t dtype) {
  (void)c, (void)op, (void)dtype;
  return 0;
}
static int32_t run(void* c, const mxn_op_call* call) {
  (void)c, (void)call;
  return MXN_STATUS_UNSUPPORTED;
}
static int32_t synchronize(void* c) {
  (void)c;
  return 0;
}

/* ABI 6's table: everything up to memory_free, with 6 as its version. */
static mxn_backend_api api;
const mxn_backend_api* mxn_backend_get_api(void) {
  api.struct_size = offsetof(mxn_backend_api, set_option);
  api.abi_version = 6;
  api.name = "abi6";
  api.device_count = device_count;
  api.device_props = device_props;
  api.init = init;
  api.shutdown = shutdown;
  api.last_error = last_error;
  api.buffer_alloc = alloc;
  api.buffer_free = release;
  api.copy_to_device = to_device;
  api.copy_to_host = to_host;
  api.supports = supports;
  api.run = run;
  api.synchronize = synchronize;
  return &api;
}
