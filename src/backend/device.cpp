#include "backend/device.h"

#include <dlfcn.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdio>
#include <cstdlib>
#include <filesystem>

#include "backend/op_shapes.h"
#include "core/error.h"

extern "C" const mxn_backend_api* mxn_cpu_backend_get_api(void);

namespace mxn {

Buffer::~Buffer() { dev_->free_buffer(handle_); }

Device::Device(const mxn_backend_api* api, int index, int threads) : api_(api), index_(index) {
  props_.struct_size = sizeof(props_);
  if (api_->device_props(index, &props_) != 0) throw Error("cannot query device " + name());
  mxn_backend_options opts{sizeof(mxn_backend_options), threads};
  int32_t st = api_->init(index, &opts, &ctx_);
  if (st != 0) {
    const std::string why = ctx_ ? api_->last_error(ctx_) : "";
    if (ctx_) api_->shutdown(ctx_);
    ctx_ = nullptr;
    throw Error("cannot initialise device " + name() + (why.empty() ? "" : ": " + why));
  }
  const char* prof = std::getenv("MXN_PROFILE");
  profile_ = prof && *prof && std::string(prof) != "0";
}

const char* op_name(int32_t op) {
  static const char* names[MXN_OP_COUNT] = {"matmul",
                                            "add",
                                            "add_bias",
                                            "sum_rows",
                                            "scale",
                                            "gelu",
                                            "gelu_bwd",
                                            "softmax",
                                            "softmax_bwd",
                                            "layernorm",
                                            "layernorm_bwd",
                                            "attention",
                                            "attention_bwd",
                                            "embedding",
                                            "embedding_bwd",
                                            "cross_entropy",
                                            "cross_entropy_bwd",
                                            "adamw",
                                            "cast",
                                            "copy",
                                            "fill",
                                            "sum_squares",
                                            "rmsnorm",
                                            "rmsnorm_bwd",
                                            "rope",
                                            "silu",
                                            "silu_bwd",
                                            "swiglu",
                                            "swiglu_bwd",
                                            "set_rows",
                                            "dropout",
                                            "tanh",
                                            "tanh_bwd",
                                            "mul",
                                            "classifier_ce",
                                            "classifier_ce_bwd",
                                            "moe_route",
                                            "moe_route_bwd",
                                            "moe_permute",
                                            "moe_unpermute",
                                            "moe_unpermute_bwd",
                                            "grouped_matmul",
                                            "strided_copy"};
  return op >= 0 && op < MXN_OP_COUNT ? names[op] : "?";
}

mxn_op_call make_op_call(mxn_op op, const std::vector<Tensor>& in, const std::vector<Tensor>& out,
                         const std::array<int64_t, MXN_MAX_IP>& ip,
                         const std::array<float, 8>& fp) {
  MXN_CHECK(in.size() <= MXN_MAX_OPERANDS && out.size() <= MXN_MAX_OPERANDS, "too many operands");
  mxn_op_call c{};
  c.struct_size = sizeof(c);
  c.op = op;
  c.n_inputs = int32_t(in.size());
  c.n_outputs = int32_t(out.size());
  for (size_t i = 0; i < in.size(); ++i) c.inputs[i] = in[i].to_abi();
  for (size_t i = 0; i < out.size(); ++i) c.outputs[i] = out[i].to_abi();
  std::copy(ip.begin(), ip.end(), c.ip);
  std::copy(fp.begin(), fp.end(), c.fp);
  return c;
}

std::string Device::profile_report() const {
  std::vector<int> order;
  double total = 0;
  for (int i = 0; i < MXN_OP_COUNT; ++i)
    if (op_calls_[i]) {
      order.push_back(i);
      total += op_seconds_[i];
    }
  std::sort(order.begin(), order.end(),
            [&](int a, int b) { return op_seconds_[a] > op_seconds_[b]; });
  std::string out = "kernel time on " + name() + " (MXN_PROFILE):\n";
  char line[128];
  for (int i : order) {
    std::snprintf(line, sizeof(line), "  %-18s %9.3f s  %5.1f%%  %8lld calls\n", op_name(i),
                  op_seconds_[i], 100.0 * op_seconds_[i] / total, (long long)op_calls_[i]);
    out += line;
  }
  return out;
}

Device::~Device() {
  if (ctx_) api_->shutdown(ctx_);
}

std::string Device::name() const { return std::string(api_->name) + ":" + std::to_string(index_); }

void Device::fail(int32_t status, const char* what) {
  throw Error(name() + ": " + what + " failed (status " + std::to_string(status) +
              "): " + api_->last_error(ctx_));
}

std::unique_ptr<Buffer> Device::alloc(uint64_t bytes) {
  void* h = nullptr;
  int32_t st = api_->buffer_alloc(ctx_, bytes, &h);
  if (st == MXN_STATUS_OUT_OF_MEMORY)
    throw Error(name() + ": out of memory: asked for " + std::to_string(bytes) + " bytes; " +
                api_->last_error(ctx_));
  if (st != 0) fail(st, "buffer_alloc");
  return std::make_unique<Buffer>(this, h, bytes);
}

void Device::free_buffer(void* handle) { api_->buffer_free(ctx_, handle); }

uint64_t Device::free_memory() const {
  uint64_t n = 0;
  if (api_->struct_size >= offsetof(mxn_backend_api, memory_free) + sizeof(void*) &&
      api_->memory_free && api_->memory_free(ctx_, &n) == 0)
    return n;
  return props_.memory_bytes;
}

bool Device::supports(const mxn_op_call& call, std::string* why) const {
  // ABI 9's ops, and RMSNORM over groups of columns, are unknown to an older plugin.
  const bool abi9 = call.op >= MXN_OP_MOE_ROUTE ||
                    (call.op == MXN_OP_ROPE && params_of<RopeParams>(call).scaling == 3) ||
                    ((call.op == MXN_OP_RMSNORM || call.op == MXN_OP_RMSNORM_BWD) &&
                     count(call.inputs[call.op == MXN_OP_RMSNORM ? 1 : 2]) !=
                         last(call.inputs[call.op == MXN_OP_RMSNORM ? 0 : 1]));
  if (abi9 && api_->abi_version < 9) {
    if (why)
      *why = std::string(op_name(call.op)) + " needs a backend of ABI 9 (this one is ABI " +
             std::to_string(api_->abi_version) + ")";
    return false;
  }
  // ABI 11's vocabulary slices of EMBEDDING(_BWD) and CROSS_ENTROPY(_BWD) (the same op codes).
  const bool abi11 = ((call.op == MXN_OP_EMBEDDING || call.op == MXN_OP_EMBEDDING_BWD) &&
                      params_of<EmbeddingParams>(call).partial) ||
                     ((call.op == MXN_OP_CROSS_ENTROPY || call.op == MXN_OP_CROSS_ENTROPY_BWD) &&
                      params_of<XentParams>(call).part != 0);
  if (abi11 && api_->abi_version < 11) {
    if (why)
      *why = std::string(op_name(call.op)) + " over a vocabulary slice needs a backend of ABI 11 " +
             "(this one is ABI " + std::to_string(api_->abi_version) + ")";
    return false;
  }
  if (api_->struct_size >= offsetof(mxn_backend_api, supports_call) + sizeof(void*) &&
      api_->supports_call) {
    if (api_->supports_call(ctx_, &call) == 1) return true;
    if (why) *why = api_->last_error(ctx_);
    return false;
  }
  for (int i = 0; i < call.n_inputs + call.n_outputs; ++i) {
    const int32_t dt =
        i < call.n_inputs ? call.inputs[i].dtype : call.outputs[i - call.n_inputs].dtype;
    if (dt != MXN_DTYPE_I32 && api_->supports(ctx_, call.op, dt) != 1) {
      if (why) *why = std::string(op_name(call.op)) + " does not take " + dtype_name(DType(dt));
      return false;
    }
  }
  return true;
}

bool Device::set_option(const std::string& key, int64_t value) {
  return api_->struct_size >= offsetof(mxn_backend_api, set_option) + sizeof(void*) &&
         api_->set_option && api_->set_option(ctx_, key.c_str(), value) == 0;
}

bool Device::has_collectives() const {
  return api_->struct_size >= offsetof(mxn_backend_api, comm_wait) + sizeof(void*) &&
         api_->comm_id && api_->comm_init && api_->all_reduce_sum && api_->comm_wait &&
         api_->comm_id(ctx_, nullptr) == 0;
}

void Device::comm_id(uint8_t* id) {
  if (int32_t st = api_->comm_id(ctx_, id)) fail(st, "comm_id");
}

void Device::comm_init(const uint8_t* id, int world, int rank) {
  if (int32_t st = api_->comm_init(ctx_, id, world, rank)) fail(st, "comm_init");
}

void Device::all_reduce_sum(const Tensor& t) {
  if (int32_t st = api_->all_reduce_sum(ctx_, t.buffer, t.offset, uint64_t(t.numel())))
    fail(st, "all_reduce_sum");
}

bool Device::has_exchange() const {
  return api_->struct_size >= offsetof(mxn_backend_api, exchange) + sizeof(void*) &&
         api_->comm_id && api_->comm_init_group && api_->exchange &&
         api_->comm_id(ctx_, nullptr) == 0 && api_->comm_init_group(ctx_, 1, nullptr, 0, 0) == 0;
}

void Device::comm_init_group(int group, const uint8_t* id, int world, int rank) {
  if (int32_t st = api_->comm_init_group(ctx_, group, id, world, rank)) fail(st, "comm_init_group");
}

void Device::exchange(int group, const std::vector<mxn_message>& messages) {
  if (int32_t st = api_->exchange(ctx_, group, messages.data(), int32_t(messages.size())))
    fail(st, "exchange");
}

void Device::comm_wait() {
  if (int32_t st = api_->comm_wait(ctx_)) fail(st, "comm_wait");
}

void Device::upload(const Tensor& dst, const void* src) {
  int32_t st = api_->copy_to_device(ctx_, dst.buffer, dst.offset, src, dst.nbytes());
  if (st != 0) fail(st, "copy_to_device");
}

void Device::download(void* dst, const Tensor& src) {
  int32_t st = api_->copy_to_host(ctx_, dst, src.buffer, src.offset, src.nbytes());
  if (st != 0) fail(st, "copy_to_host");
}

bool Device::supports(mxn_op op, DType t) const {
  return api_->supports(ctx_, op, int32_t(t)) == 1;
}

void Device::run(const mxn_op_call& call) {
  if (!profile_) {
    int32_t st = api_->run(ctx_, &call);
    if (st != 0) fail(st, "kernel");
    return;
  }
  auto t0 = std::chrono::steady_clock::now();
  int32_t st = api_->run(ctx_, &call);
  if (st == 0) st = api_->synchronize(ctx_);
  if (st != 0) fail(st, "kernel");
  if (call.op >= 0 && call.op < MXN_OP_COUNT) {
    op_seconds_[call.op] +=
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    ++op_calls_[call.op];
  }
}

void Device::synchronize() {
  int32_t st = api_->synchronize(ctx_);
  if (st != 0) fail(st, "synchronize");
}

namespace {

// "libmxn_backend_opencl.so" -> "opencl"
std::string plugin_name(const std::filesystem::path& p) {
  std::string n = p.filename().string();
  const std::string pre = "libmxn_backend_", suf = ".so";
  if (n.rfind(pre, 0) == 0) n = n.substr(pre.size());
  if (n.size() > suf.size() && n.compare(n.size() - suf.size(), suf.size(), suf) == 0)
    n.resize(n.size() - suf.size());
  return n;
}

BackendEntry load_plugin(const std::filesystem::path& path) {
  BackendEntry e{plugin_name(path), nullptr, ""};
  // Plugins stay loaded for the life of the process: their tables are used until exit.
  void* lib = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (!lib) {
    const char* why = dlerror();
    e.error = why ? why : "dlopen failed";
    return e;
  }
  auto get = reinterpret_cast<mxn_backend_get_api_fn>(dlsym(lib, "mxn_backend_get_api"));
  if (!get) {
    e.error = path.string() + " does not export mxn_backend_get_api";
    return e;
  }
  const mxn_backend_api* api = get();
  // A plugin of an older ABI down to MXN_ABI_OLDEST loads: its table is shorter (the struct-size
  // rule), and what it lacks is asked for by size before each use.
  if (!api || api->struct_size < MXN_BACKEND_API_CORE_SIZE || api->abi_version > MXN_ABI_VERSION ||
      api->abi_version < MXN_ABI_OLDEST || !api->name) {
    e.error = path.string() + " speaks chip-contract ABI version " +
              std::to_string(api ? api->abi_version : 0) + ", this mxn needs " +
              std::to_string(MXN_ABI_VERSION) + " (or " + std::to_string(MXN_ABI_OLDEST) +
              " and later) with the full function table";
    return e;
  }
  e.name = api->name;
  e.api = api;
  return e;
}

// Where plugins are looked for: `plugins/` beside the mxn binary, then each folder of
// MXN_PLUGIN_PATH (colon-separated).
std::vector<std::filesystem::path> plugin_dirs() {
  std::vector<std::filesystem::path> dirs;
  std::error_code ec;
  const auto exe = std::filesystem::read_symlink("/proc/self/exe", ec);
  if (!ec) dirs.push_back(exe.parent_path() / "plugins");
  if (const char* env = std::getenv("MXN_PLUGIN_PATH")) {
    std::string s = env;
    for (size_t b = 0; b <= s.size();) {
      size_t e = s.find(':', b);
      if (e == std::string::npos) e = s.size();
      if (e > b) dirs.emplace_back(s.substr(b, e - b));
      b = e + 1;
    }
  }
  return dirs;
}

}  // namespace

const std::vector<BackendEntry>& backends() {
  // The CPU reference backend is linked in; every other chip is a plugin found at start.
  static const std::vector<BackendEntry> list = [] {
    std::vector<BackendEntry> v;
    const mxn_backend_api* cpu = mxn_cpu_backend_get_api();
    v.push_back({cpu->name, cpu, ""});
    for (const auto& dir : plugin_dirs()) {
      std::error_code ec;
      std::vector<std::filesystem::path> files;
      for (const auto& f : std::filesystem::directory_iterator(dir, ec))
        if (f.path().filename().string().rfind("libmxn_backend_", 0) == 0)
          files.push_back(f.path());
      std::sort(files.begin(), files.end());
      for (const auto& f : files) {
        BackendEntry e = load_plugin(f);
        const bool dup = std::any_of(v.begin(), v.end(), [&](const BackendEntry& x) {
          return x.api && e.api && x.name == e.name;
        });
        if (dup)
          e = {e.name, nullptr,
               f.string() + ": a backend named '" + e.name + "' is already loaded"};
        v.push_back(e);
      }
    }
    return v;
  }();
  return list;
}

std::vector<std::string> available_devices() {
  std::vector<std::string> out;
  for (const auto& b : backends()) {
    if (!b.api) continue;
    for (int i = 0; i < b.api->device_count(); ++i) out.push_back(b.name + ":" + std::to_string(i));
  }
  return out;
}

namespace {
// "cpu", "cpu:0", "opencl:1" -> its backend and index; null when there is no such device.
const mxn_backend_api* find_device(const std::string& spec, int& index) {
  std::string kind = spec;
  index = 0;
  const auto colon = spec.find(':');
  if (colon != std::string::npos) {
    kind = spec.substr(0, colon);
    const std::string idx = spec.substr(colon + 1);
    if (idx.empty() || idx.find_first_not_of("0123456789") != std::string::npos || idx.size() >= 6)
      return nullptr;
    index = std::stoi(idx);
  }
  for (const auto& b : backends())
    if (b.name == kind && b.api && index < b.api->device_count()) return b.api;
  return nullptr;
}
}  // namespace

std::unique_ptr<Device> open_device(const std::string& spec, int threads) {
  int index = 0;
  if (const mxn_backend_api* api = find_device(spec, index))
    return std::make_unique<Device>(api, index, threads);
  std::string names;
  for (const auto& d : available_devices()) names += (names.empty() ? "" : ", ") + d;
  throw Error("unknown device '" + spec + "' (devices here: " + names + ")");
}

bool device_props(const std::string& spec, mxn_device_props& out) {
  int index = 0;
  const mxn_backend_api* api = find_device(spec, index);
  out = {};
  out.struct_size = sizeof out;
  return api && api->device_props(index, &out) == 0;
}

}  // namespace mxn
