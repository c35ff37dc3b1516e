#include "train/metrics.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <vector>

#include "core/fs.h"

namespace mxn {

void append_metrics(const std::string& run_dir, const nlohmann::json& row) {
  std::ofstream f(std::filesystem::path(run_dir) / "metrics.jsonl", std::ios::app);
  f << row.dump() << "\n";
}

void truncate_metrics(const std::string& run_dir, int64_t step) {
  const auto path = std::filesystem::path(run_dir) / "metrics.jsonl";
  std::ifstream f(path);
  if (!f) return;
  std::string line, kept;
  while (std::getline(f, line)) {
    auto j = nlohmann::json::parse(line, nullptr, false);
    // Restarts stay: they are the run's history, not a step's record.
    if (!j.is_discarded() && j.contains("step") &&
        (j["step"].get<int64_t>() <= step || j.value("event", "") == "restart"))
      kept += line + "\n";
  }
  write_file_atomic(path.string(), kept);
}

void write_loss_svg(const std::string& run_dir) {
  std::ifstream f(std::filesystem::path(run_dir) / "metrics.jsonl");
  std::vector<std::pair<double, double>> train, val;
  std::string line;
  while (std::getline(f, line)) {
    auto j = nlohmann::json::parse(line, nullptr, false);
    if (j.is_discarded() || !j.contains("step")) continue;
    if (j.contains("loss")) train.emplace_back(j["step"].get<double>(), j["loss"].get<double>());
    if (j.contains("val_loss"))
      val.emplace_back(j["step"].get<double>(), j["val_loss"].get<double>());
  }
  if (train.empty()) return;
  double x1 = 1, y0 = 1e30, y1 = -1e30;
  for (const auto* s : {&train, &val})
    for (auto [x, y] : *s) {
      x1 = std::max(x1, x);
      y0 = std::min(y0, y);
      y1 = std::max(y1, y);
    }
  if (y1 - y0 < 1e-6) y1 = y0 + 1;
  const double W = 640, H = 400, L = 60, R = 20, T = 30, B = 40;
  auto px = [&](double x) { return L + (W - L - R) * x / x1; };
  auto py = [&](double y) { return T + (H - T - B) * (1 - (y - y0) / (y1 - y0)); };
  std::ostringstream s;
  s << "<svg xmlns='http://www.w3.org/2000/svg' width='" << W << "' height='" << H
    << "' font-family='sans-serif' font-size='12'>\n<rect width='100%' height='100%' "
       "fill='white'/>\n"
    << "<text x='" << L << "' y='18'>loss by step (blue: train, orange: validation)</text>\n"
    << "<line x1='" << L << "' y1='" << H - B << "' x2='" << W - R << "' y2='" << H - B
    << "' stroke='black'/>\n"
    << "<line x1='" << L << "' y1='" << T << "' x2='" << L << "' y2='" << H - B
    << "' stroke='black'/>\n";
  for (int i = 0; i <= 4; ++i) {
    const double y = y0 + (y1 - y0) * i / 4;
    char buf[32];
    std::snprintf(buf, sizeof(buf), "%.3f", y);
    s << "<text x='4' y='" << py(y) + 4 << "'>" << buf << "</text>\n";
  }
  s << "<text x='" << W - R - 60 << "' y='" << H - 10 << "'>step " << x1 << "</text>\n";
  auto poly = [&](const std::vector<std::pair<double, double>>& pts, const char* color) {
    s << "<polyline fill='none' stroke='" << color << "' stroke-width='1.5' points='";
    for (auto [x, y] : pts) s << px(x) << "," << py(y) << " ";
    s << "'/>\n";
  };
  poly(train, "#1f77b4");
  if (!val.empty()) poly(val, "#ff7f0e");
  s << "</svg>\n";
  write_file_atomic((std::filesystem::path(run_dir) / "loss.svg").string(), s.str());
}

namespace {
bool is_checkpoint_dir(const std::filesystem::directory_entry& e) {
  return e.is_directory() && e.path().filename().string().rfind("ckpt-", 0) == 0;
}
}  // namespace

int64_t run_found(const std::string& run_dir) {
  namespace fs = std::filesystem;
  std::error_code ec;
  if (!fs::is_directory(run_dir, ec)) return -1;
  int64_t step = -1;
  for (const auto& e : fs::directory_iterator(run_dir, ec))
    if (is_checkpoint_dir(e) && e.path().extension() != ".tmp")
      step = std::max<int64_t>(step, std::strtoll(e.path().filename().c_str() + 5, nullptr, 10));
  if (step >= 0) return step;
  std::ifstream f(fs::path(run_dir) / "metrics.jsonl");
  if (!f) return -1;
  step = 0;
  for (std::string line; std::getline(f, line);) {
    const auto j = nlohmann::json::parse(line, nullptr, false);
    if (j.is_object() && j.contains("step") && j["step"].is_number_integer())
      step = std::max<int64_t>(step, j["step"].get<int64_t>());
  }
  return step;
}

void clear_run(const std::string& run_dir) {
  namespace fs = std::filesystem;
  std::error_code ec;
  std::vector<fs::path> doomed;
  for (const auto& e : fs::directory_iterator(run_dir, ec))
    if (is_checkpoint_dir(e)) doomed.push_back(e.path());
  for (const char* f : {"latest", "metrics.jsonl", "loss.svg"})
    doomed.push_back(fs::path(run_dir) / f);
  for (const auto& p : doomed) fs::remove_all(p);
}

}  // namespace mxn
