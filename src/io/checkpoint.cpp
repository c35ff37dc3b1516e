#include "io/checkpoint.h"

#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <thread>

#include "core/error.h"
#include "core/fs.h"

namespace fs = std::filesystem;

namespace mxn {
namespace {

bool is_checkpoint(const fs::path& p) {
  return fs::is_regular_file(p / "model.safetensors") && fs::is_regular_file(p / "trainer.json");
}

// Tests set this to widen the window in which a checkpoint is half-written.
void test_pause() {
  if (const char* ms = std::getenv("MXN_TEST_CHECKPOINT_PAUSE_MS"))
    std::this_thread::sleep_for(std::chrono::milliseconds(std::atoi(ms)));
}

}  // namespace

std::string save_checkpoint(const std::string& run_dir, int64_t step, const Checkpoint& ck,
                            int keep) {
  char name[32];
  std::snprintf(name, sizeof(name), "ckpt-%08lld", static_cast<long long>(step));
  const fs::path final_dir = fs::path(run_dir) / name;
  const fs::path tmp = fs::path(run_dir) / (std::string(name) + ".tmp");
  std::error_code ec;
  fs::remove_all(tmp, ec);
  fs::create_directories(tmp, ec);
  if (ec) throw Error("cannot create checkpoint folder " + tmp.string() + ": " + ec.message());
  safetensors_save((tmp / "model.safetensors").string(), ck.weights);
  test_pause();
  safetensors_save((tmp / "optimizer.safetensors").string(), ck.optimizer);
  for (const auto& [name, t] : ck.tensors) safetensors_save((tmp / name).string(), t);
  for (const auto& [name, text] : ck.files) write_file_atomic((tmp / name).string(), text);
  write_file_atomic((tmp / "trainer.json").string(), ck.trainer.dump(2));
  fsync_dir(tmp.string());
  fs::remove_all(final_dir, ec);
  fs::rename(tmp, final_dir, ec);
  if (ec) throw Error("cannot move checkpoint into " + final_dir.string() + ": " + ec.message());
  fsync_dir(run_dir);
  write_file_atomic((fs::path(run_dir) / "latest").string(), std::string(name) + "\n");
  // Keep the newest `keep`.
  std::vector<fs::path> all;
  for (const auto& e : fs::directory_iterator(run_dir, ec))
    if (e.path().filename().string().rfind("ckpt-", 0) == 0 && e.path().extension() != ".tmp")
      all.push_back(e.path());
  std::sort(all.begin(), all.end());
  for (size_t i = 0; i + size_t(keep) < all.size(); ++i) fs::remove_all(all[i], ec);
  return final_dir.string();
}

std::string resolve_checkpoint(const std::string& path) {
  const fs::path p(path);
  if (!fs::exists(p)) throw Error("checkpoint '" + path + "' does not exist");
  if (is_checkpoint(p)) return p.string();
  if (fs::is_directory(p)) {
    std::error_code ec;
    std::string latest;
    if (fs::is_regular_file(p / "latest")) {
      latest = read_file((p / "latest").string(), "checkpoint pointer");
      latest.erase(latest.find_last_not_of(" \n\r\t") + 1);
      if (is_checkpoint(p / latest)) return (p / latest).string();
    }
    std::vector<fs::path> all;  // fall back to the newest complete one
    for (const auto& e : fs::directory_iterator(p, ec))
      if (e.path().filename().string().rfind("ckpt-", 0) == 0 && is_checkpoint(e.path()))
        all.push_back(e.path());
    if (!all.empty()) return std::max_element(all.begin(), all.end())->string();
  }
  throw Error("'" + path +
              "' is not a checkpoint (expected a folder with model.safetensors and "
              "trainer.json, or a run folder holding ckpt-* folders)");
}

Checkpoint load_checkpoint(const std::string& path, bool with_optimizer) {
  const fs::path dir = resolve_checkpoint(path);
  Checkpoint ck;
  const std::string tj = (dir / "trainer.json").string();
  try {
    ck.trainer = nlohmann::json::parse(read_file(tj, "checkpoint file"));
  } catch (const nlohmann::json::exception& e) {
    throw Error("checkpoint file '" + tj + "' is corrupt: " + e.what());
  }
  if (!ck.trainer.is_object() || !ck.trainer.contains("model") || !ck.trainer.contains("step"))
    throw Error("checkpoint file '" + tj + "' is corrupt: expected an object with model and step");
  ck.weights = safetensors_load((dir / "model.safetensors").string());
  if (with_optimizer) ck.optimizer = safetensors_load((dir / "optimizer.safetensors").string());
  return ck;
}

}  // namespace mxn
