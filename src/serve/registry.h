#pragma once
// The served models by name: each loaded on first use; when loading one would pass the memory
// budget, the least recently used idle ones are let go first (a busy one is never dropped).
#include <condition_variable>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "serve/served_model.h"
#include "serve/server.h"

namespace mxn {

class Registry {
 public:
  explicit Registry(const ServeOptions& o);
  const std::vector<std::string>& adapters() const { return adapters_; }  // "base:name"
  // A request's model: a served name, or "base:adapter" for an adapter served on base. The
  // model (nullptr: none such) and the engine's adapter number.
  std::pair<std::shared_ptr<ServedModel>, int> resolve(const std::string& name);
  std::vector<std::string> names() const;
  // nullptr: no such model. HttpError 503 when the budget cannot make room (all busy). A model
  // loads outside the registry's lock: requests for other models go on meanwhile, and those for
  // the same one wait for it.
  std::shared_ptr<ServedModel> get(const std::string& name);
  // The loaded models none of whose replicas is up.
  std::vector<std::string> down();
  std::string metrics();

 private:
  struct Entry {
    std::string path;
    std::shared_ptr<ServedModel> model;
    bool loading = false;
    uint64_t last = 0, bytes = 0;
    int64_t loads = 0;
  };
  // A Hugging Face folder's size before loading it (others are known once loaded).
  uint64_t estimate(const std::string& path) const;
  void make_room(const std::string& name, uint64_t need);
  const ServeOptions& o_;
  std::mutex m_;
  std::condition_variable loaded_;
  std::map<std::string, Entry> entries_;
  std::vector<std::string> adapters_;
  uint64_t clock_ = 0;
};

}  // namespace mxn
