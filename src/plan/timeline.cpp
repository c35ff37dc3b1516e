// The chosen plan's step as an SVG timeline: a lane per chip type used (the stage of that type
// with the most compute, from its replica with the most micro-batches), compute above, the
// stage's sends and collectives below, the bubble as the lane's bare background.
#include <algorithm>
#include <cstdio>

#include "plan/planner.h"

namespace mxn {

std::string timeline_svg(const Cluster& c, const LayoutPlan& p, const ModelCost& m,
                         const JobSpec& job) {
  struct Lane {
    int group;
    const ReplicaKind* kind;
    int stage;
    double busy;
  };
  std::vector<Lane> lanes;
  for (const ReplicaKind& k : p.kinds) {
    const int64_t micro = *std::max_element(k.micro.begin(), k.micro.end());
    const PipelineRun run = simulate_pipeline(k.stages, micro, job.interleave);
    for (size_t s = 0; s < k.stages.size(); ++s) {
      const int g = k.stages[s].group;
      auto it =
          std::find_if(lanes.begin(), lanes.end(), [g](const Lane& l) { return l.group == g; });
      if (it == lanes.end())
        lanes.push_back({g, &k, int(s), run.busy_s[s]});
      else if (run.busy_s[s] > it->busy)
        *it = {g, &k, int(s), run.busy_s[s]};
    }
  }
  const double W = 1000, left = 210, lane_h = 46, top = 56;
  const double H = top + lane_h * double(lanes.size()) + 40;
  const double scale = (W - left - 20) / p.step_s;
  std::string svg;
  char buf[512];
  auto add = [&](const char* fmt, auto... args) {
    std::snprintf(buf, sizeof buf, fmt, args...);
    svg += buf;
  };
  add("<svg xmlns='http://www.w3.org/2000/svg' width='%.0f' height='%.0f' font-family='sans-serif' "
      "font-size='12'>\n<rect width='100%%' height='100%%' fill='white'/>\n",
      W, H);
  add("<text x='10' y='20' font-size='14'>predicted step: %.4g s, %.4g tokens/s, micro-batch %lld, "
      "global batch %lld x %lld tokens (%s)</text>\n",
      p.step_s, p.tokens_per_s, (long long)p.micro_batch, (long long)job.global_batch,
      (long long)job.seq, m.tied ? "tied embeddings" : "untied embeddings");
  const char* colour[] = {"#4e79a7", "#f28e2b", "#76b7b2", "#e15759", "#59a14f", "#edc948"};
  const char* label[] = {"forward", "backward", "send", "reduce", "optimizer", "all-gather"};
  for (int i = 0; i < 6; ++i) {
    add("<rect x='%d' y='30' width='12' height='12' fill='%s'/>", 10 + i * 120, colour[i]);
    add("<text x='%d' y='40'>%s</text>\n", 26 + i * 120, label[i]);
  }
  add("<text x='%d' y='40'>bubble: grey</text>\n", 10 + 6 * 120);
  for (size_t l = 0; l < lanes.size(); ++l) {
    const Lane& ln = lanes[l];
    const StageCost& st = ln.kind->stages[size_t(ln.stage)];
    const double y = top + lane_h * double(l);
    const int64_t micro = *std::max_element(ln.kind->micro.begin(), ln.kind->micro.end());
    add("<text x='10' y='%.0f'>%s</text>", y + 16, c.groups[size_t(ln.group)].chip.name.c_str());
    add("<text x='10' y='%.0f' font-size='10'>stage %d/%zu, layers %lld-%lld%s, %lld "
        "micro</text>\n",
        y + 30, ln.stage + 1, ln.kind->stages.size(), (long long)st.first, (long long)st.last - 1,
        st.recompute ? " r" : "", (long long)micro);
    add("<rect x='%.1f' y='%.1f' width='%.1f' height='36' fill='#dddddd'/>\n", left, y,
        p.step_s * scale);
    for (const Event& e : simulate_pipeline(ln.kind->stages, micro, job.interleave, true).events) {
      if (e.stage != ln.stage) continue;
      const bool below = e.kind != EventKind::forward && e.kind != EventKind::backward &&
                         e.kind != EventKind::optimizer;
      add("<rect x='%.2f' y='%.1f' width='%.2f' height='%d' fill='%s'><title>%s %lld: %.4g-%.4g "
          "s</title></rect>\n",
          left + e.start * scale, y + (below ? 26 : 2), std::max(0.5, (e.end - e.start) * scale),
          below ? 10 : 22, colour[int(e.kind)], label[int(e.kind)], (long long)e.micro, e.start,
          e.end);
    }
  }
  const double yb = top + lane_h * double(lanes.size()) + 16;
  for (int i = 0; i <= 4; ++i)
    add("<text x='%.1f' y='%.0f' text-anchor='middle'>%.3g s</text>",
        left + (W - left - 20) * i / 4, yb, p.step_s * i / 4);
  svg += "\n</svg>\n";
  return svg;
}

}  // namespace mxn
