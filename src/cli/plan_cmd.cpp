// mxn plan: the cluster a job would run on (src/plan/cluster.h), checked and summed up; with
// --model, the best layouts for training that model on it (src/plan/planner.h), the chosen one's
// stages, the types it leaves out and why, a timeline SVG and a plan file.
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <optional>

#include "cli/commands.h"
#include "core/error.h"
#include "core/fs.h"
#include "core/text.h"
#include "io/hf_folder.h"
#include "io/train_config.h"
#include "plan/experts.h"
#include "plan/local.h"
#include "plan/planner.h"

namespace mxn::cli {

namespace {

struct PlanArgs {
  std::string cluster, model, svg, out, layout, recompute = "auto", data = "data/kjv.bin";
  std::string stages = "balanced", attention = "flash", save_cluster;
  bool measure_links = false;
  int64_t global_batch = 16, seq = 0, micro = 0, top = 5, zero = 1, ep = 0, pp = 0, tp = 0;
  int64_t interleave = 1;
  bool sequence_parallel = false;
  std::string dtype = "auto";
};

// "default" (mxn train's default model), a Hugging Face folder, or a config.json (Hugging
// Face's, or mxn's own form as checkpoints keep it).
DecoderConfig read_model(const std::string& spec) {
  if (spec == "default") {
    const TrainConfig defaults;
    return defaults.decoder_config();
  }
  if (std::filesystem::is_directory(spec)) return load_hf_config(spec);
  const std::string text = read_file(spec, "model config");
  const nlohmann::json j = nlohmann::json::parse(text, nullptr, false);
  if (j.is_discarded() || !j.is_object())
    throw Error(spec + ": not a JSON object (expected a config.json, a model folder or 'default')");
  if (j.contains("model_type") || j.contains("architectures"))
    return decoder_config_from_hf(j, spec);
  DecoderConfig c = DecoderConfig::from_json(j);
  c.validate();
  return c;
}

// mxn plan --ep N: the mixture of experts over EP groups of N chips, priced (plan/experts.h).
int print_expert_parallel(const Cluster& c, const DecoderConfig& dc, const JobSpec& job, int64_t ep,
                          int64_t pp, int64_t micro) {
  const EpEstimate e = price_expert_parallel(c, dc, job, ep, pp, micro > 0 ? micro : 1);
  const std::string stages = pp > 1 ? std::to_string(pp) + " pipeline stages (1F1B, " +
                                          std::to_string(e.micro_batches) +
                                          " micro-batches a replica), in each "
                                    : "";
  std::printf(
      "\nexpert parallel: %s%lld EP groups of %lld chips; %lld experts a layer, %lld a token; "
      "data parallel over the %s for the rest\n| chip | in each group | experts each | tokens "
      "each | compute s | all-to-all s | weights+grads+optimizer GiB |\n"
      "|---|--:|--:|--:|--:|--:|--:|\n",
      stages.c_str(), (long long)e.groups, (long long)e.ep, (long long)dc.experts,
      (long long)dc.top_k, pp > 1 ? "replicas of a stage" : "every chip");
  for (const EpShare& s : e.shares)
    std::printf(
        "| %s | %lld | %lld%s | %.4g%% | %.4g | %.4g | %.4g |\n",
        c.groups[size_t(s.group)].chip.name.c_str(), (long long)s.chips, (long long)s.experts_each,
        s.experts_extra > 0 ? (" (+1 on " + std::to_string(s.experts_extra) + ")").c_str() : "",
        100 * s.tokens_share, s.compute_s, s.a2a_s, s.mem_gib);
  std::printf("predicted step %.4g s (compute %.4g, all-to-all %.4g = %.1f%%, gradient reduce %.4g",
              e.step_s, e.compute_s, e.a2a_s, 100 * e.a2a_share(), e.reduce_s);
  if (pp > 1) std::printf(", pipeline bubble %.4g, stage sends %.4g", e.bubble_s, e.p2p_s);
  std::printf("): %.4g tokens/s, %.4g a chip\n", e.tokens_per_s,
              e.tokens_per_s / double(c.chips()));
  for (const EpShare& s : e.shares) {
    const ChipSpec& chip = c.groups[size_t(s.group)].chip;
    if (s.mem_gib > 0.9 * chip.memory_gib)
      std::printf("does not fit: %s holds %.4g GiB of weights and state, has %.4g%s\n",
                  chip.name.c_str(), s.mem_gib, chip.memory_gib,
                  pp > 1 ? "" : " (--pp: pipeline stages beside EP, as DeepSeek-V3 trained)");
  }
  return 0;
}

// --tp that does not divide the heads: an error.
void check_tensor_parallel(const DecoderConfig& dc, int64_t tp) {
  if (tp > 1 && (dc.heads % tp || dc.n_kv_heads() % tp))
    throw Error("--tp " + std::to_string(tp) + " does not divide the model's " +
                std::to_string(dc.heads) + " heads and " + std::to_string(dc.n_kv_heads()) +
                " kv heads (expected a divisor of both: the planner splits a type's chips "
                "evenly)");
}

// A tensor-parallel group wider than a node of some type: its all-reduces cross the slower
// link, one warning line each with what it costs.
void warn_tensor_parallel(const Cluster& c, const DecoderConfig& dc, const ModelCost& m, int64_t tp,
                          const JobSpec& job) {
  if (tp <= 1) return;
  for (const NodeGroup& g : c.groups) {
    if (tp <= g.per_node) continue;
    // Four all-reduces of a layer's activation a sequence, as the planner prices them.
    auto seconds = [&](double gbs) {
      return 4.0 * double(dc.layers) *
             ring_allreduce_s(tp, double(job.seq) * m.boundary_bytes, gbs, g.latency_s());
    };
    std::printf(
        "warning: a tensor-parallel group of %lld %s spans %lld nodes (%lld a node): its "
        "all-reduces go over %.4g GB/s instead of %.4g, %.4g s a sequence instead of "
        "%.4g\n",
        (long long)tp, g.chip.name.c_str(), (long long)((tp + g.per_node - 1) / g.per_node),
        (long long)g.per_node, g.inter_gbs, g.intra_gbs, seconds(g.inter_gbs),
        seconds(g.intra_gbs));
  }
}

void print_cluster(const std::string& path, const Cluster& c) {
  int64_t nodes = 0;
  for (const NodeGroup& g : c.groups) nodes += g.nodes();
  std::printf("cluster %s: %lld chips in %zu groups, %lld nodes; %.4g PFLOPS bf16 peak, %.4g TiB\n",
              path.c_str(), (long long)c.chips(), c.groups.size(), (long long)nodes,
              c.bf16_pflops(), c.memory_tib());
  std::printf(
      "| chip | chips | nodes | bf16 TFLOPS | memory GiB | memory GB/s | intra GB/s | "
      "inter GB/s | price/chip-hour | figures from "
      "|\n|---|--:|--:|--:|--:|--:|--:|--:|--:|---|\n");
  for (const NodeGroup& g : c.groups)
    std::printf("| %s | %lld | %lld | %.1f | %.0f | %.0f | %.0f | %.0f | %.2f | %s |\n",
                g.chip.name.c_str(), (long long)g.count, (long long)g.nodes(), g.chip.bf16_tflops,
                g.chip.memory_gib, g.chip.hbm_gbs, g.intra_gbs, g.inter_gbs, g.price_per_hour,
                g.chip.source.c_str());
}

nlohmann::json plan_json(const Cluster& c, const LayoutPlan& p, const JobSpec& job,
                         const std::string& model) {
  nlohmann::json kinds = nlohmann::json::array();
  for (const ReplicaKind& k : p.kinds) {
    nlohmann::json stages = nlohmann::json::array();
    for (const StageCost& s : k.stages)
      stages.push_back({{"chip", c.groups[size_t(s.group)].chip.name},
                        {"layers", {s.first, s.last}},
                        {"recompute", s.recompute},
                        {"tensor_parallel", s.tp},
                        {"predicted_bytes", s.mem_bytes}});
    kinds.push_back({{"replicas", k.replicas}, {"micro_batches", k.micro}, {"stages", stages}});
  }
  return {{"model", model},
          {"family", p.family},
          {"global_batch", job.global_batch},
          {"seq", job.seq},
          {"dtype", job.dtype},
          {"zero1", job.zero1},
          {"micro_batch", p.micro_batch},
          {"predicted_step_s", p.step_s},
          {"predicted_tokens_per_s", p.tokens_per_s},
          {"kinds", kinds}};
}

// "cpu:0@3+opencl:0@1,cpu:0@3+opencl:0@1": replicas split by ',', stages by '+', each stage a
// chip of the cluster, (after '*') the chips of its tensor-parallel group and (after '@') its
// layer count: "cpu:0*2@2+cpu:0*2@2".
std::vector<std::vector<LayoutStage>> parse_layout(const std::string& text, const Cluster& c) {
  std::vector<std::vector<LayoutStage>> out;
  std::string names;
  for (const NodeGroup& g : c.groups) names += (names.empty() ? "" : ", ") + g.chip.name;
  for (const std::string& rep : split(text, ',')) {
    out.emplace_back();
    for (const std::string& stage : split(rep, '+')) {
      const size_t at = stage.rfind('@'), star = stage.substr(0, at).rfind('*');
      const std::string chip = stage.substr(0, std::min(at, star));
      LayoutStage st;
      if (star != std::string::npos) {
        char* end = nullptr;
        st.tp = std::strtoll(stage.c_str() + star + 1, &end, 10);
        if ((at == std::string::npos ? *end != '\0' : *end != '@') || st.tp < 1)
          throw Error("--layout '" + text + "': '" + stage +
                      "' (expected CHIP*TP with a positive count of tensor-parallel chips)");
      }
      st.group = -1;
      for (size_t g = 0; g < c.groups.size(); ++g)
        if (c.groups[g].chip.name == chip) st.group = int(g);
      if (st.group < 0)
        throw Error("--layout '" + text + "': unknown chip '" + chip +
                    "' (the cluster's: " + names + ")");
      if (at != std::string::npos) {
        char* end = nullptr;
        st.layers = std::strtoll(stage.c_str() + at + 1, &end, 10);
        if (*end != '\0' || st.layers < 1)
          throw Error("--layout '" + text + "': '" + stage +
                      "' (expected CHIP or CHIP@LAYERS with a positive count)");
      }
      out.back().push_back(st);
    }
    for (const LayoutStage& st : out.back())
      if ((st.layers > 0) != (out.back()[0].layers > 0))
        throw Error("--layout '" + text + "': give every stage of a replica its layers, or none");
  }
  return out;
}

// The cluster to plan on: --cluster here (this machine's devices timed on the model) or a file,
// with the link measured (--measure-links) and saved (--save-cluster) as asked. Nothing on a
// rank other than 0 of a --measure-links run, which only helps time the link.
std::optional<Cluster> plan_cluster(const PlanArgs& a) {
  Cluster c;
  if (a.cluster == "here") {  // this machine's devices, timed on the model to plan
    if (a.model.empty()) throw Error("--cluster here times the devices on a model: give --model");
    TrainConfig t;
    if (a.model != "default") t.model.dir = a.model;
    t.batch = std::min<int64_t>(a.global_batch, 16);
    if (a.seq > 0) t.model.n_ctx = a.seq;  // with a folder: the training sequence length
    t.dtype = a.dtype;
    t.eval_every = 0;
    t.data = a.data;
    c = local_cluster(t);
  } else {
    c = load_cluster(a.cluster);
  }
  if (a.measure_links) {
    Communicator& w = Communicator::world();
    if (w.size() < 2 || a.cluster == "here")
      throw Error(
          "--measure-links times the link between two ranks of a saved cluster file: "
          "mxn plan --cluster here --model M --save-cluster F, then mpirun -np 2 mxn plan "
          "--cluster F --measure-links --save-cluster F");
    const LinkFigures f = measure_links(w);
    if (w.rank() != 0) return std::nullopt;
    std::printf(
        "links measured between ranks 0 and 1: %.4g us a message, %.4g GB/s; a 1 MiB "
        "all-reduce over %d ranks %.4g us\n",
        f.latency_us, f.gbs, w.size(), f.all_reduce_1mib_us);
    for (NodeGroup& g : c.groups) g.intra_gbs = g.inter_gbs = f.gbs, g.latency_us = f.latency_us;
  }
  if (!a.save_cluster.empty()) {
    write_file_atomic(a.save_cluster, "# Written by mxn plan --cluster " + a.cluster +
                                          (a.measure_links ? " --measure-links" : "") + "\n" +
                                          cluster_toml(c));
    std::printf("cluster file: %s\n", a.save_cluster.c_str());
  }
  return c;
}

// The search's options from the flags; errors name the flag.
PlanOptions plan_options(const PlanArgs& a) {
  PlanOptions opt;
  opt.micro_batch = a.micro;
  opt.top = int(a.top);
  opt.tp = a.tp;
  opt.pp = a.pp;
  if (opt.micro_batch < 0 || a.top < 1 || a.tp < 0 || a.pp < 0)
    throw Error(
        "--micro-batch, --tp and --pp must be 0 (searched) or positive and --top at least 1");
  if (a.stages != "balanced" && a.stages != "even")
    throw Error("--stages '" + a.stages + "': expected balanced or even");
  opt.even_stages = a.stages == "even";
  return opt;
}

// --dtype auto (the default, as mxn train's): the job priced in f32 and in bf16 mixed precision,
// each on the cluster as that dtype sees it (Cluster::at_dtype: f32 GEMMs at the chips' f32
// peaks), and the faster kept; a job that fits only in bf16 takes bf16 by fitting. One line says
// what each gave. Returns the cluster at the dtype chosen, `job.dtype` set to it.
Cluster resolve_dtype(const PlanArgs& a, const Cluster& here, const DecoderConfig& dc, JobSpec& job,
                      const PlanOptions& opt) {
  if (job.dtype == "auto" && a.ep > 0) {  // expert parallelism is priced in bf16 only
    std::printf("dtype auto: bf16 (--ep plans are priced in bf16 mixed precision)\n");
    job.dtype = "bf16";
  } else if (job.dtype == "auto") {
    double tps[2] = {0, 0};
    std::string why[2], unknown;
    const char* const dt[2] = {"f32", "bf16"};
    for (int i = 0; i < 2; ++i) {
      JobSpec j = job;
      j.dtype = dt[i];
      const Cluster c = at_dtype(here, j.dtype, &unknown);
      try {
        tps[i] = a.layout.empty() ? plan_layouts(c, model_cost(dc, j), j, opt).best[0].tokens_per_s
                                  : price_layout(c, model_cost(dc, j), j, parse_layout(a.layout, c),
                                                 std::max<int64_t>(a.micro, 1))
                                        .tokens_per_s;
      } catch (const Error& e) {
        if (i == 1 && tps[0] == 0) throw;  // neither fits: bf16's reason
        why[i] = e.what();
      }
    }
    job.dtype = tps[1] >= tps[0] ? "bf16" : "f32";
    auto said = [&](int i) {
      char b[64];
      std::snprintf(b, sizeof b, "%.4g tokens/s", tps[i]);
      return tps[i] > 0 ? std::string(b) : "does not fit (" + why[i] + ")";
    };
    std::printf("dtype auto: %s (bf16 mixed precision %s; f32 %s%s)\n", job.dtype.c_str(),
                said(1).c_str(), said(0).c_str(),
                unknown.empty()
                    ? ""
                    : (", with no f32 figure for " + unknown + ": at its bf16 rate").c_str());
  }
  std::string unknown;
  Cluster c = at_dtype(here, job.dtype, &unknown);
  if (!unknown.empty())
    std::printf("note: no f32 figure for %s: its f32 GEMMs priced at the bf16 rate\n",
                unknown.c_str());
  return c;
}

int run_plan(const PlanArgs& a) {
  const std::optional<Cluster> here = plan_cluster(a);
  if (!here) return 0;
  print_cluster(a.cluster, *here);
  if (a.model.empty()) return 0;
  const auto t0 = std::chrono::steady_clock::now();
  const DecoderConfig dc = read_model(a.model);
  JobSpec job;
  job.global_batch = a.global_batch;
  job.seq = a.seq > 0 ? a.seq : dc.max_pos;
  job.dtype = a.dtype;
  job.zero1 = a.zero != 0;
  if (a.recompute != "auto" && a.recompute != "all" && a.recompute != "full")
    throw Error("--recompute '" + a.recompute + "': expected auto, all or full");
  job.recompute_all = a.recompute == "all";
  job.recompute_full = a.recompute == "full";
  job.sequence_parallel = a.sequence_parallel;
  if (a.interleave < 1) throw Error("--interleave must be at least 1 (model chunks a stage)");
  job.interleave = a.interleave;
  if (a.attention != "flash" && a.attention != "unfused")
    throw Error("--attention '" + a.attention + "': expected flash or unfused");
  job.flash_attention = a.attention == "flash";
  if (job.dtype != "auto" && job.dtype != "f32" && job.dtype != "bf16")
    throw Error("--dtype '" + job.dtype + "': expected auto, f32 or bf16");
  const PlanOptions opt = plan_options(a);
  check_tensor_parallel(dc, a.tp);
  const Cluster c = resolve_dtype(a, *here, dc, job, opt);
  if (a.ep > 0) return print_expert_parallel(c, dc, job, a.ep, std::max<int64_t>(a.pp, 1), a.micro);
  const ModelCost m = model_cost(dc, job);
  if (!a.layout.empty()) {  // price the layout given, no search
    const int64_t micro = a.micro > 0 ? a.micro : 1;
    const LayoutPlan p = price_layout(c, m, job, parse_layout(a.layout, c), micro);
    std::printf("\nlayout %s, micro-batch %lld: %s\npredicted step %.4g s, %.4g tokens/s\n",
                a.layout.c_str(), (long long)micro, p.describe(c).c_str(), p.step_s,
                p.tokens_per_s);
    for (const ReplicaKind& k : p.kinds)
      for (size_t s = 0; s < k.stages.size(); ++s)
        std::printf(
            "  stage %zu %s: layers %lld-%lld%s, %.4g s forward + %.4g s backward a "
            "micro-batch, %.3g GiB\n",
            s + 1, c.groups[size_t(k.stages[s].group)].chip.name.c_str(),
            (long long)k.stages[s].first, (long long)k.stages[s].last - 1,
            k.stages[s].recompute ? " (recomputed)" : "", k.stages[s].fwd_s, k.stages[s].bwd_s,
            k.stages[s].mem_bytes / (1024.0 * 1024 * 1024));
    if (!a.svg.empty()) write_file_atomic(a.svg, timeline_svg(c, p, m, job));
    if (!a.out.empty()) write_file_atomic(a.out, plan_json(c, p, job, a.model).dump(2) + "\n");
    return 0;
  }
  warn_tensor_parallel(c, dc, m, a.tp, job);
  const PlanReport rep = plan_layouts(c, m, job, opt);
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf(
      "\nmodel %s: %s, %lld layers, width %lld, %.4g B parameters; global batch %lld x %lld "
      "tokens, %s, ZeRO-1 %s\n",
      a.model.c_str(), arch_name(dc.arch), (long long)dc.layers, (long long)dc.hidden,
      m.total_params() / 1e9, (long long)job.global_batch, (long long)job.seq, job.dtype.c_str(),
      job.zero1 ? "on" : "off");
  std::printf(
      "\n| # | layout (replicas x stages: layers per stage, r = recomputed) | micro-batch | "
      "step s | tokens/s | het. efficiency | peak GiB per chip | $/M tokens |\n"
      "|--:|---|--:|--:|--:|--:|---|--:|\n");
  for (size_t i = 0; i < rep.best.size(); ++i) {
    const LayoutPlan& p = rep.best[i];
    std::string peak;
    for (size_t g = 0; g < c.groups.size(); ++g)
      if (p.chips_used[g]) {
        char s[96];
        std::snprintf(s, sizeof s, "%s%s %.3g", peak.empty() ? "" : ", ",
                      c.groups[g].chip.name.c_str(), p.peak_bytes[g] / (1024.0 * 1024 * 1024));
        peak += s;
      }
    char cost[32] = "-";
    if (p.cost_per_mtok > 0) std::snprintf(cost, sizeof cost, "%.4g", p.cost_per_mtok);
    std::printf("| %zu | %s: %s | %lld | %.4g | %.4g | %.1f%% | %s | %s |\n", i + 1,
                p.family.c_str(), p.describe(c).c_str(), (long long)p.micro_batch, p.step_s,
                p.tokens_per_s, p.efficiency * 100, peak.c_str(), cost);
  }
  const LayoutPlan& best = rep.best[0];
  std::printf("\nchosen: %s, %.4g s a step, %.4g tokens/s\n", best.describe(c).c_str(), best.step_s,
              best.tokens_per_s);
  for (const LeftOut& l : rep.left_out) std::printf("%s\n", l.why.c_str());
  std::printf("standalone (each type alone, its best layout):");
  for (size_t g = 0; g < c.groups.size(); ++g)
    std::printf(" %s %.4g tokens/s%s", c.groups[g].chip.name.c_str(), rep.standalone_tps[g],
                g + 1 < c.groups.size() ? ";" : "\n");
  std::printf("heterogeneous efficiency %.1f%% (the chosen plan's tokens/s over their sum)\n",
              best.efficiency * 100);
  std::printf("planned in %.2f s (%lld layouts priced)\n", secs, (long long)rep.layouts_priced);
  if (!a.svg.empty()) {
    write_file_atomic(a.svg, timeline_svg(c, best, m, job));
    std::printf("timeline: %s\n", a.svg.c_str());
  }
  if (!a.out.empty()) {
    write_file_atomic(a.out, plan_json(c, best, job, a.model).dump(2) + "\n");
    std::printf("plan: %s\n", a.out.c_str());
  }
  return 0;
}

}  // namespace

std::function<int()> add_plan(CLI::App& app) {
  auto* sub = app.add_subcommand(
      "plan", "check a cluster file; with --model, plan a training job's layout on it");
  auto a = std::make_shared<PlanArgs>();
  sub->add_option("--cluster", a->cluster,
                  "cluster.toml: node groups of one chip type each; here: this machine's devices, "
                  "timed on --model")
      ->required();
  sub->add_option("--model", a->model,
                  "a Hugging Face folder, a config.json, or 'default' (mxn train's model)");
  sub->add_option("--global-batch", a->global_batch, "sequences per optimizer step")
      ->capture_default_str();
  sub->add_option("--seq", a->seq, "tokens per sequence (0: the model's context)")
      ->capture_default_str();
  sub->add_option("--dtype", a->dtype,
                  "auto (both priced, the faster kept: what mxn train's auto chooses), f32, or "
                  "bf16 (mixed precision)")
      ->capture_default_str();
  sub->add_option("--micro-batch", a->micro, "sequences per micro-batch (0: searched)")
      ->capture_default_str();
  sub->add_option("--zero", a->zero, "1: shard the optimizer state over replicas (ZeRO-1)")
      ->capture_default_str();
  sub->add_option("--top", a->top, "plans to list")->capture_default_str();
  sub->add_option("--data", a->data,
                  "with --cluster here: the token shard the devices are timed on")
      ->capture_default_str();
  sub->add_option("--layout", a->layout,
                  "price this layout instead of searching: replicas by ',', stages by '+', "
                  "CHIP, CHIP@LAYERS, CHIP*TP@LAYERS (cpu:0@3+opencl:0@1, cpu:0*2)");
  sub->add_option("--recompute", a->recompute,
                  "auto (only stages short of memory), all (every pipeline stage, as mxn "
                  "train --pp runs) or full (every stage, one-stage replicas too, as "
                  "Megatron-LM's full recomputation)")
      ->capture_default_str();
  sub->add_option("--ep", a->ep,
                  "a mixture of experts: price expert parallelism over groups of this many chips, "
                  "experts placed by chip speed (0: the layout search)");
  sub->add_option("--pp", a->pp,
                  "pipeline stages (0: searched); with --ep: EP groups inside each stage "
                  "(DeepSeek-V3's layout), --micro-batch the 1F1B micro-batch (default 1)")
      ->capture_default_str();
  sub->add_option("--tp", a->tp,
                  "tensor-parallel chips a stage (0: searched among powers of two inside a node)")
      ->capture_default_str();
  sub->add_option("--stages", a->stages,
                  "balanced (layers by time and memory) or even (the same count a stage, as "
                  "Megatron-LM splits)")
      ->capture_default_str();
  sub->add_option("--sequence-parallel", a->sequence_parallel,
                  "price Megatron-LM's sequence parallelism inside tensor-parallel groups")
      ->capture_default_str();
  sub->add_option("--interleave", a->interleave,
                  "model chunks a pipeline stage holds (Megatron-LM's interleaved 1F1B; 1: plain "
                  "1F1B, what mxn train --pp runs)")
      ->capture_default_str();
  sub->add_option("--attention", a->attention,
                  "flash (no scores in memory, mxn's kernels) or unfused (scores materialized)")
      ->capture_default_str();
  sub->add_option("--save-cluster", a->save_cluster,
                  "write the cluster (with --cluster here: this machine's devices as measured) as "
                  "a cluster file");
  sub->add_flag("--measure-links", a->measure_links,
                "under mpirun -np 2: time the link between ranks 0 and 1 (latency, bandwidth) "
                "and put it in every group of the cluster");
  sub->add_option("--svg", a->svg, "draw the chosen plan's step into this SVG file");
  sub->add_option("--out", a->out, "write the chosen plan as JSON");
  return [a] { return run_plan(*a); };
}

}  // namespace mxn::cli
