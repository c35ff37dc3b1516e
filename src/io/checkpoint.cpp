#include "io/checkpoint.h"

#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <thread>

#include "core/error.h"
#include "core/faults.h"
#include "core/fs.h"

namespace fs = std::filesystem;

namespace mxn {
namespace {

bool is_checkpoint(const fs::path& p) {
  return fs::is_regular_file(p / "model.safetensors") && fs::is_regular_file(p / "trainer.json");
}

// A checkpoint half-written: a fault plan may kill or stop the process here, or widen the window
// (core/faults.h).
void half_written(int64_t step) { fault_point("ckpt", step); }

std::string sum_hex(uint64_t sum) {
  char b[24];
  std::snprintf(b, sizeof(b), "%016llx", static_cast<unsigned long long>(sum));
  return b;
}

// The checkpoint folders of a run folder, oldest first (finished ones: no .tmp).
std::vector<fs::path> checkpoint_folders(const fs::path& run_dir) {
  std::vector<fs::path> all;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(run_dir, ec))
    if (e.path().filename().string().rfind("ckpt-", 0) == 0 && e.path().extension() != ".tmp")
      all.push_back(e.path());
  std::sort(all.begin(), all.end());
  return all;
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
  nlohmann::json trainer = ck.trainer;
  nlohmann::json& files = trainer["files"] = nlohmann::json::object();
  auto record = [&](const std::string& file, uint64_t sum) {
    files[file] = {{"bytes", fs::file_size(tmp / file)}, {"xxh3", sum_hex(sum)}};
  };
  try {
    record("model.safetensors", safetensors_save((tmp / "model.safetensors").string(), ck.weights));
    half_written(step);
    record("optimizer.safetensors",
           safetensors_save((tmp / "optimizer.safetensors").string(), ck.optimizer));
    for (const auto& [file, t] : ck.tensors)
      record(file, safetensors_save((tmp / file).string(), t));
    for (const auto& [file, text] : ck.files) {
      write_file_atomic((tmp / file).string(), text);
      record(file, checksum_of({text}));
    }
    write_file_atomic((tmp / "trainer.json").string(), trainer.dump(2));
  } catch (const std::exception& e) {  // a full disk: free what was written, keep the rest
    fs::remove_all(tmp, ec);
    throw Error(std::string(e.what()) + "; checkpoint " + name + " was not written");
  }
  fsync_dir(tmp.string());
  fs::remove_all(final_dir, ec);
  fs::rename(tmp, final_dir, ec);
  if (ec) throw Error("cannot move checkpoint into " + final_dir.string() + ": " + ec.message());
  fsync_dir(run_dir);
  write_file_atomic((fs::path(run_dir) / "latest").string(), std::string(name) + "\n");
  // Keep the newest `keep`.
  const std::vector<fs::path> all = checkpoint_folders(run_dir);
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

namespace {
// `bytes` of a checkpoint's file against what trainer.json recorded (nothing recorded: a
// checkpoint from before the checksums, or a file it does not list).
void check_file(const nlohmann::json& j, const std::string& file, const std::string& path,
                std::string_view bytes) {
  if (!j.contains("files") || !j["files"].contains(file)) return;
  const nlohmann::json& want = j["files"][file];
  const uint64_t size = want.value("bytes", uint64_t(0));
  if (bytes.size() != size)
    throw Error("checkpoint file '" + path + "' is corrupt: " + std::to_string(bytes.size()) +
                " bytes, trainer.json recorded " + std::to_string(size));
  const std::string sum = sum_hex(checksum_of({bytes}));
  if (sum != want.value("xxh3", std::string()))
    throw Error("checkpoint file '" + path + "' is corrupt: checksum " + sum +
                ", trainer.json recorded " + want.value("xxh3", std::string("none")));
}

nlohmann::json read_trainer_json(const fs::path& dir) {
  const std::string tj = (dir / "trainer.json").string();
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(read_file(tj, "checkpoint file"));
  } catch (const nlohmann::json::exception& e) {
    throw Error("checkpoint file '" + tj + "' is corrupt: " + e.what());
  }
  if (!j.is_object() || !j.contains("model") || !j.contains("step"))
    throw Error("checkpoint file '" + tj + "' is corrupt: expected an object with model and step");
  return j;
}

// One pass over a checkpoint folder: trainer.json read once, each file it lists checked as it is
// read, and the tensors parsed from those same bytes (with `tensors`). `parse_first`: a file's
// own errors (a truncated tensor) are named before its size and checksum are compared.
Checkpoint read_checkpoint(const fs::path& dir, bool tensors, bool with_optimizer,
                           bool parse_first = false) {
  Checkpoint ck;
  ck.trainer = read_trainer_json(dir);
  std::vector<std::string> files;
  if (ck.trainer.contains("files"))
    for (const auto& [file, want] : ck.trainer["files"].items()) files.push_back(file);
  for (const char* file : {"model.safetensors", "optimizer.safetensors"})
    if (tensors && std::find(files.begin(), files.end(), file) == files.end())
      files.push_back(file);  // a checkpoint from before the checksums
  for (const std::string& file : files) {
    const std::string path = (dir / file).string();
    const bool weights = file == "model.safetensors";
    const bool moments = file == "optimizer.safetensors";
    if (tensors && moments && !with_optimizer) continue;  // inference: the moments unread
    if (tensors && (weights || moments)) {
      const std::string bytes = read_file(path, "checkpoint file");
      if (!parse_first) check_file(ck.trainer, file, path, bytes);
      (weights ? ck.weights : ck.optimizer) = safetensors_parse(bytes, path);
      if (parse_first) check_file(ck.trainer, file, path, bytes);
    } else {
      const MappedFile m(path, "checkpoint file");
      check_file(ck.trainer, file, path, std::string_view(m.data() ? m.data() : "", m.size()));
    }
  }
  return ck;
}
}  // namespace

void verify_checkpoint(const std::string& dir) { read_checkpoint(dir, false, false); }

namespace {
// The first checkpoint of `path` that `read` accepts: a named checkpoint folder, or a run
// folder's `latest` and then the rest from the newest down, each damaged one said to `warn`.
template <typename Read>
auto first_good(const std::string& path, const std::function<void(const std::string&)>& warn,
                Read read) {
  const std::string first = resolve_checkpoint(path);
  if (first == fs::path(path).string())  // a checkpoint folder, named: no other to fall back to
    return read(first);
  std::vector<fs::path> all = checkpoint_folders(path);
  std::reverse(all.begin(), all.end());
  all.erase(std::remove(all.begin(), all.end(), fs::path(first)), all.end());
  all.insert(all.begin(), fs::path(first));
  std::string why;
  for (const fs::path& c : all) {
    if (!is_checkpoint(c)) continue;
    try {
      auto got = read(c.string());
      if (!why.empty()) warn(why + "; using the one before it, " + c.string());
      return got;
    } catch (const Error& e) {
      if (!why.empty()) warn(why);
      why = "checkpoint " + c.string() + " is damaged (" + e.what() + ")";
    }
  }
  throw Error("no checkpoint in '" + path + "' passes its checks: " + why);
}
}  // namespace

std::string find_good_checkpoint(const std::string& path,
                                 const std::function<void(const std::string&)>& warn) {
  return first_good(path, warn, [](const std::string& dir) {
    verify_checkpoint(dir);
    return dir;
  });
}

std::pair<std::string, Checkpoint> load_good_checkpoint(
    const std::string& path, const std::function<void(const std::string&)>& warn) {
  return first_good(path, warn, [](const std::string& dir) {
    return std::pair<std::string, Checkpoint>{dir, read_checkpoint(dir, true, true)};
  });
}

std::string newest_checkpoint(const std::string& run_dir) {
  try {
    return resolve_checkpoint(run_dir);
  } catch (const Error&) {
    return "";
  }
}

nlohmann::json load_trainer_json(const std::string& path) {
  return read_trainer_json(resolve_checkpoint(path));
}

Checkpoint load_checkpoint(const std::string& path, bool with_optimizer) {
  return read_checkpoint(resolve_checkpoint(path), true, with_optimizer, true);
}

CheckpointWriter::CheckpointWriter() : thread_([this] { loop(); }) {}

CheckpointWriter::~CheckpointWriter() {
  {
    std::lock_guard<std::mutex> l(mu_);
    quit_ = true;
  }
  cv_.notify_all();
  thread_.join();  // the loop finishes a pending write first
}

void CheckpointWriter::start(const std::string& run_dir, int64_t step, const Checkpoint* ck,
                             int keep) {
  std::unique_lock<std::mutex> l(mu_);
  cv_.wait(l, [&] { return !pending_; });
  dir_ = run_dir;
  step_ = step;
  ck_ = ck;
  keep_ = keep;
  pending_ = true;
  cv_.notify_all();
}

CheckpointWriter::Result CheckpointWriter::wait() {
  std::unique_lock<std::mutex> l(mu_);
  cv_.wait(l, [&] { return !pending_; });
  Result r = std::move(result_);
  result_ = {};
  return r;
}

bool CheckpointWriter::busy() {
  std::lock_guard<std::mutex> l(mu_);
  return pending_;
}

void CheckpointWriter::loop() {
  std::unique_lock<std::mutex> l(mu_);
  for (;;) {
    cv_.wait(l, [&] { return pending_ || quit_; });
    if (!pending_) return;
    const std::string dir = dir_;
    const int64_t step = step_;
    const Checkpoint* ck = ck_;
    const int keep = keep_;
    l.unlock();
    Result r;
    r.step = step;
    try {
      r.dir = save_checkpoint(dir, step, *ck, keep);
    } catch (const std::exception& e) {
      r.error = e.what();
    }
    l.lock();
    result_ = std::move(r);
    pending_ = false;
    cv_.notify_all();
  }
}

}  // namespace mxn
