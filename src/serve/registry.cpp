#include "serve/registry.h"

#include <algorithm>
#include <cstdio>
#include <filesystem>

#include "core/error.h"
#include "core/faults.h"
#include "io/hf_folder.h"
#include "serve/request.h"

namespace mxn {

Registry::Registry(const ServeOptions& o) : o_(o) {
  for (const auto& [name, path] : o.models) {
    if (entries_.count(name)) throw Error("model name '" + name + "' is given twice");
    if (!std::filesystem::exists(path))
      throw Error("model '" + name + "': '" + path + "' does not exist");
    entries_[name].path = path;
  }
  for (const ServeOptions::AdapterSpec& a : o.adapters) {
    const std::string id = a.base + ":" + a.name;
    if (!entries_.count(a.base))
      throw Error("adapter '" + id + "': no model named '" + a.base + "' (give it with --model)");
    if (!std::filesystem::exists(a.path))
      throw Error("adapter '" + id + "': '" + a.path + "' does not exist");
    if (std::find(adapters_.begin(), adapters_.end(), id) != adapters_.end())
      throw Error("adapter '" + id + "' is given twice");
    adapters_.push_back(id);
  }
}

std::pair<std::shared_ptr<ServedModel>, int> Registry::resolve(const std::string& name) {
  std::string base = name, adapter;
  if (!entries_.count(name) && name.rfind(':') != std::string::npos) {
    base = name.substr(0, name.rfind(':'));
    adapter = name.substr(name.rfind(':') + 1);
    if (std::find(adapters_.begin(), adapters_.end(), name) == adapters_.end()) return {};
  }
  std::shared_ptr<ServedModel> m = get(base);
  if (!m) return {};
  return {m, m->adapter_id(adapter)};
}

std::vector<std::string> Registry::names() const {
  std::vector<std::string> out;
  for (const auto& [n, e] : entries_) out.push_back(n);
  return out;
}

std::shared_ptr<ServedModel> Registry::get(const std::string& name) {
  std::unique_lock<std::mutex> l(m_);
  auto it = entries_.find(name);
  if (it == entries_.end()) return nullptr;
  Entry& e = it->second;
  e.last = ++clock_;
  loaded_.wait(l, [&] { return !e.loading; });
  if (e.model) return e.model;
  const uint64_t need = estimate(e.path);
  make_room(name, need);
  e.loading = true;
  e.bytes = need;  // held for it while it loads, so a concurrent load cannot take the room
  l.unlock();
  std::shared_ptr<ServedModel> m;
  try {
    std::fprintf(stderr, "loading %s from %s\n", name.c_str(), e.path.c_str());
    fault_point("serve_load", 0);  // tests: a slow load
    m = std::make_shared<ServedModel>(name, e.path, o_);
  } catch (...) {
    l.lock();
    e.loading = false;
    e.bytes = 0;
    loaded_.notify_all();
    throw;
  }
  l.lock();
  e.model = m;
  e.bytes = m->bytes();
  e.loading = false;
  ++e.loads;
  loaded_.notify_all();
  return m;
}

std::vector<std::string> Registry::down() {
  std::lock_guard<std::mutex> l(m_);
  std::vector<std::string> out;
  for (const auto& [n, e] : entries_)
    if (e.model && !e.model->healthy()) out.push_back(n);
  return out;
}

std::string Registry::metrics() {
  std::lock_guard<std::mutex> l(m_);
  std::string out =
      "# TYPE mxn_model_loaded gauge\n# TYPE mxn_model_loads_total counter\n"
      "# TYPE mxn_model_bytes gauge\n";
  for (const auto& [n, e] : entries_) {
    const std::string lbl = "{model=\"" + n + "\"}";
    out += "mxn_model_loaded" + lbl + (e.model ? " 1\n" : " 0\n");
    out += "mxn_model_loads_total" + lbl + " " + std::to_string(e.loads) + "\n";
    out += "mxn_model_bytes" + lbl + " " + std::to_string(e.model ? e.bytes : 0) + "\n";
  }
  for (const auto& [n, e] : entries_)
    if (e.model) out += e.model->metrics();
  return out;
}

uint64_t Registry::estimate(const std::string& path) const {
  if (!std::filesystem::exists(std::filesystem::path(path) / "config.json")) return 0;
  const DecoderConfig c = load_hf_config(path);
  return ServedModel::bytes_of(
             c, ServedModel::kv_blocks(
                    o_, std::min<int64_t>(c.max_pos, o_.context > 0 ? o_.context : 2048))) *
         o_.devices.size();
}

void Registry::make_room(const std::string& name, uint64_t need) {
  if (o_.memory_budget == 0) return;
  while (true) {
    uint64_t used = 0;
    for (const auto& [n, e] : entries_) used += e.model || e.loading ? e.bytes : 0;
    if (used + need <= o_.memory_budget) return;
    Entry* lru = nullptr;
    for (auto& [n, e] : entries_)
      if (e.model && n != name && e.model.use_count() == 1 && e.model->idle() &&
          (!lru || e.last < lru->last))
        lru = &e;
    if (!lru) {
      if (used == 0) return;  // alone it does not fit: load it anyway, the budget is a soft one
      throw HttpError{503, "the model memory budget is full and every loaded model is busy",
                      "server_error", "overloaded"};
    }
    lru->model.reset();
  }
}

}  // namespace mxn
