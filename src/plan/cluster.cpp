#include "plan/cluster.h"

#include <toml++/toml.h>

#include <algorithm>
#include <optional>
#include <sstream>

#include "core/error.h"

namespace mxn {

int64_t Cluster::chips() const {
  int64_t n = 0;
  for (const NodeGroup& g : groups) n += g.count;
  return n;
}

double Cluster::bf16_pflops() const {
  double f = 0;
  for (const NodeGroup& g : groups) f += double(g.count) * g.chip.bf16_tflops / 1000;
  return f;
}

double Cluster::memory_tib() const {
  double m = 0;
  for (const NodeGroup& g : groups) m += double(g.count) * g.chip.memory_gib / 1024;
  return m;
}

Cluster load_cluster(const std::string& path) {
  toml::table tbl;
  try {
    tbl = toml::parse_file(path);
  } catch (const toml::parse_error& e) {
    throw Error(path + ": not a valid TOML file (" + std::string(e.description()) + " at line " +
                std::to_string(e.source().begin.line) + ")");
  }
  for (const auto& [k, v] : tbl)
    if (k.str() != "group")
      throw Error(path + ": unknown table or key '" + std::string(k.str()) +
                  "' (a cluster file holds [[group]] tables)");
  const toml::array* groups = tbl["group"].as_array();
  if (!groups || groups->empty())
    throw Error(path + ": no [[group]] tables (each names a chip type and its count)");
  Cluster c;
  for (size_t i = 0; i < groups->size(); ++i) {
    const toml::table* g = (*groups)[i].as_table();
    const std::string where = path + ": group " + std::to_string(i + 1);
    if (!g) throw Error(where + ": expected a table");
    static const char* const keys[] = {"chip",
                                       "count",
                                       "per_node",
                                       "intra_gbs",
                                       "inter_gbs",
                                       "price_per_hour",
                                       "bf16_tflops",
                                       "memory_gib",
                                       "hbm_gbs",
                                       "mfu",
                                       "shares_cores_with",
                                       "measured",
                                       "latency_us",
                                       "source",
                                       "f32_tflops"};
    for (const auto& [k, v] : *g)
      if (std::find(std::begin(keys), std::end(keys), k.str()) == std::end(keys))
        throw Error(where + ": unknown key '" + std::string(k.str()) +
                    "' (expected chip, count, per_node, intra_gbs, inter_gbs, latency_us, "
                    "price_per_hour, mfu, measured, shares_cores_with, f32_tflops, and for a chip "
                    "of your own bf16_tflops, memory_gib, hbm_gbs)");
    auto number = [&](const char* key, bool required, double dflt, const char* what) {
      const toml::node* n = g->get(key);
      if (!n) {
        if (required) throw Error(where + ": " + key + " (" + what + ") is missing");
        return dflt;
      }
      const std::optional<double> d = n->value<double>();
      if (!d || !(*d > 0))
        throw Error(where + ": " + key + " (" + what + ") must be a positive number");
      return *d;
    };
    NodeGroup ng;
    const std::optional<std::string> chip = (*g)["chip"].value<std::string>();
    if (!chip) throw Error(where + ": chip (the chip type, e.g. \"H100-SXM\") is missing");
    const bool own =
        g->contains("bf16_tflops") || g->contains("memory_gib") || g->contains("hbm_gbs");
    if (const ChipSpec* known = find_chip(*chip); known && !own) {
      ng.chip = *known;
    } else if (own) {
      ng.chip.name = *chip;
      ng.chip.bf16_tflops = number("bf16_tflops", true, 0, "its bf16 peak, TFLOPS");
      ng.chip.memory_gib = number("memory_gib", true, 0, "its memory, GiB");
      ng.chip.hbm_gbs = number("hbm_gbs", true, 0, "its memory bandwidth, GB/s");
      ng.chip.source = "the cluster file";
      if (const std::optional<std::string> src = (*g)["source"].value<std::string>())
        ng.chip.source = *src;
    } else {
      std::string names;
      for (const ChipSpec& s : chip_table()) names += (names.empty() ? "" : ", ") + s.name;
      throw Error(where + ": unknown chip type '" + *chip + "' (known: " + names +
                  "; or give bf16_tflops, memory_gib and hbm_gbs for a chip of your own)");
    }
    if (g->contains("f32_tflops"))
      ng.chip.f32_tflops = number("f32_tflops", false, 0, "its f32 peak, TFLOPS");
    const toml::node* count = g->get("count");
    const std::optional<int64_t> n = count ? count->value_exact<int64_t>() : std::nullopt;
    if (!n || *n < 1)
      throw Error(where + " (" + *chip +
                  "): count must be a positive integer (chips of this type)");
    ng.count = *n;
    const toml::node* per = g->get("per_node");
    const std::optional<int64_t> p = per ? per->value_exact<int64_t>() : std::nullopt;
    if (per && (!p || *p < 1))
      throw Error(where + " (" + *chip + "): per_node must be a positive integer");
    ng.per_node = std::min<int64_t>(p ? *p : 8, ng.count);
    ng.intra_gbs = number("intra_gbs", true, 0, "GB/s between chips of a node");
    ng.inter_gbs = number("inter_gbs", true, 0, "GB/s a chip sends across nodes");
    ng.latency_us = number("latency_us", false, 20, "microseconds a message costs");
    ng.price_per_hour = g->contains("price_per_hour")
                            ? number("price_per_hour", false, 0, "a chip-hour's price")
                            : 0;
    if (g->contains("mfu")) {
      ng.mfu = number("mfu", false, 0, "the share of the peak a training step reaches");
      if (ng.mfu > 1) throw Error(where + ": mfu must be at most 1 (a share of the peak)");
    }
    if (const toml::node* m = g->get("measured")) {
      const std::optional<bool> b = m->value_exact<bool>();
      if (!b)
        throw Error(where +
                    ": measured must be true or false (mfu measured on whole training "
                    "steps, memory-bound ops included)");
      ng.measured = *b;
    }
    c.groups.push_back(ng);
  }
  // Sharing names a group by its chip, so it is resolved once every group is read.
  for (size_t i = 0; i < groups->size(); ++i) {
    const toml::node* share = (*(*groups)[i].as_table())["shares_cores_with"].node();
    if (!share) continue;
    const std::string where = path + ": group " + std::to_string(i + 1);
    const std::optional<std::string> other = share->value<std::string>();
    for (size_t j = 0; other && j < c.groups.size(); ++j)
      if (j != i && c.groups[j].chip.name == *other) c.groups[i].shares_cores_with = int(j);
    if (c.groups[i].shares_cores_with < 0)
      throw Error(where + ": shares_cores_with must name another group's chip (got " +
                  (other ? "'" + *other + "'" : std::string("a non-string")) + ")");
  }
  return c;
}

Cluster at_dtype(const Cluster& c, const std::string& dtype, std::string* unknown) {
  Cluster out = c;
  if (dtype != "f32") return out;
  for (NodeGroup& g : out.groups)
    if (g.chip.f32_tflops > 0)
      g.chip.bf16_tflops = g.chip.f32_tflops;
    else if (unknown)
      *unknown += (unknown->empty() ? "" : ", ") + g.chip.name;
  return out;
}

double ring_allreduce_s(int64_t t, double bytes, double gbs, double latency_s) {
  return t <= 1 ? 0 : 2.0 * double(t - 1) / double(t) * bytes / (gbs * 1e9) + latency_s;
}

std::string cluster_toml(const Cluster& c) {
  toml::array groups;
  for (const NodeGroup& g : c.groups) {
    toml::table t{{"chip", g.chip.name},
                  {"count", g.count},
                  {"per_node", g.per_node},
                  {"bf16_tflops", g.chip.bf16_tflops},
                  {"memory_gib", g.chip.memory_gib},
                  {"hbm_gbs", g.chip.hbm_gbs},
                  {"mfu", g.mfu},
                  {"measured", g.measured},
                  {"intra_gbs", g.intra_gbs},
                  {"inter_gbs", g.inter_gbs},
                  {"latency_us", g.latency_us}};
    if (g.chip.f32_tflops > 0) t.insert("f32_tflops", g.chip.f32_tflops);
    if (g.price_per_hour > 0) t.insert("price_per_hour", g.price_per_hour);
    if (g.shares_cores_with >= 0)
      t.insert("shares_cores_with", c.groups[size_t(g.shares_cores_with)].chip.name);
    if (!g.chip.source.empty()) t.insert("source", g.chip.source);
    groups.push_back(std::move(t));
  }
  std::ostringstream out;
  out << toml::table{{"group", std::move(groups)}} << "\n";
  return out.str();
}

}  // namespace mxn
