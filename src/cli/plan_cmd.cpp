// mxn plan: the cluster a job would run on (src/plan/cluster.h), checked and summed up. The
// layout search over it (pipeline stages, ZeRO-1 shards, the simulator) is issue 11's next step.
#include <cstdio>

#include "cli/commands.h"
#include "plan/cluster.h"

namespace mxn::cli {

std::function<int()> add_plan(CLI::App& app) {
  auto* sub = app.add_subcommand("plan", "check a cluster file and sum up its chips");
  auto path = std::make_shared<std::string>();
  sub->add_option("--cluster", *path, "cluster.toml: node groups of one chip type each")
      ->required();
  return [path] {
    const Cluster c = load_cluster(*path);
    int64_t nodes = 0;
    for (const NodeGroup& g : c.groups) nodes += g.nodes();
    std::printf(
        "cluster %s: %lld chips in %zu groups, %lld nodes; %.4g PFLOPS bf16 peak, %.4g TiB\n",
        path->c_str(), (long long)c.chips(), c.groups.size(), (long long)nodes, c.bf16_pflops(),
        c.memory_tib());
    std::printf(
        "| chip | chips | nodes | bf16 TFLOPS | memory GiB | memory GB/s | intra GB/s | "
        "inter GB/s | price/chip-hour | figures from "
        "|\n|---|--:|--:|--:|--:|--:|--:|--:|--:|---|\n");
    for (const NodeGroup& g : c.groups)
      std::printf("| %s | %lld | %lld | %.1f | %.0f | %.0f | %.0f | %.0f | %.2f | %s |\n",
                  g.chip.name.c_str(), (long long)g.count, (long long)g.nodes(), g.chip.bf16_tflops,
                  g.chip.memory_gib, g.chip.hbm_gbs, g.intra_gbs, g.inter_gbs, g.price_per_hour,
                  g.chip.source.c_str());
    return 0;
  };
}

}  // namespace mxn::cli
