// mxn serve: the OpenAI-compatible server (src/serve/server.h).
#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <fstream>

#include "backend/device.h"
#include "cli/commands.h"
#include "core/error.h"
#include "core/text.h"
#include "serve/server.h"

namespace mxn::cli {

std::function<int()> add_serve(CLI::App& app) {
  auto* sub =
      app.add_subcommand("serve", "an OpenAI-compatible HTTP server over one or more models");
  struct Args {
    ServeOptions o;
    std::vector<std::string> models;
    double budget_mb = 0;
    std::string devices = "cpu";
    std::vector<std::string> adapters;
    std::string api_key_file;
  };
  auto a = std::make_shared<Args>();
  sub->add_option("--model", a->models,
                  "NAME=PATH: a Hugging Face folder, .gguf file or mxn run served as NAME "
                  "(repeatable)")
      ->required();
  sub->add_option("--adapter", a->adapters,
                  "BASE:NAME=DIR: a LoRA or P-Tuning v2 adapter (a PEFT folder or an mxn adapter "
                  "run) served on model BASE as \"BASE:NAME\", batched with BASE's own requests "
                  "(repeatable)");
  sub->add_option("--host", a->o.host, "address to listen on")->capture_default_str();
  sub->add_option("--port", a->o.port, "port")->capture_default_str();
  sub->add_option("--devices,--device", a->devices,
                  "devices to serve on, a replica of each model on each (e.g. cpu,opencl:0, or "
                  "all); each request goes to the one predicted to finish it first")
      ->capture_default_str();
  sub->add_option("--threads", a->o.threads, "CPU threads (0: all)");
  sub->add_option("--slots", a->o.slots, "requests decoded together, per model")
      ->capture_default_str();
  sub->add_option("--ctx", a->o.context,
                  "tokens per request, prompt and answer (0: the model's, "
                  "at most 2048)");
  sub->add_option("--kv-blocks", a->o.kv_blocks,
                  "KV-cache blocks of 16 tokens per model, shared by its requests and their common "
                  "prompt prefixes (0: enough for every slot at the full context)");
  sub->add_option("--weights", a->o.weights,
                  "f32 or bf16: bf16 stores 2-D weights in bf16 (CPU): half the memory, slower "
                  "at many rows a pass")
      ->capture_default_str()
      ->check(CLI::IsMember({"f32", "bf16"}));
  sub->add_option("--max-queue", a->o.max_queue,
                  "requests waiting per model; more are refused with 429")
      ->capture_default_str();
  sub->add_option("--api-key", a->o.api_key,
                  "require 'Authorization: Bearer KEY' (on /metrics too); visible to ps: prefer "
                  "--api-key-file or MXN_API_KEY");
  sub->add_option("--api-key-file", a->api_key_file, "read the API key from this file");
  sub->add_option("--max-client-connections", a->o.max_client_connections,
                  "connections open at once from one client address")
      ->capture_default_str();
  sub->add_option("--memory-budget-mb", a->budget_mb,
                  "MB of weights and KV caches for all models: load on first use, evict the least "
                  "recently used idle one (0: no limit, all loaded at the start)");
  return [a] {
    for (const std::string& m : a->models) {
      const size_t eq = m.find('=');
      if (eq == std::string::npos || eq == 0 || eq + 1 == m.size())
        throw Error("--model '" + m + "': expected NAME=PATH, e.g. qwen=models/Qwen2-0.5B");
      a->o.models.emplace_back(m.substr(0, eq), m.substr(eq + 1));
    }
    for (const std::string& s : a->adapters) {
      const size_t colon = s.find(':'), eq = s.find('=', colon == std::string::npos ? 0 : colon);
      if (colon == std::string::npos || colon == 0 || eq == std::string::npos || eq == colon + 1 ||
          eq + 1 == s.size())
        throw Error("--adapter '" + s + "': expected BASE:NAME=DIR, e.g. qwen:sql=runs/sql-lora");
      a->o.adapters.push_back(
          {s.substr(0, colon), s.substr(colon + 1, eq - colon - 1), s.substr(eq + 1)});
    }
    if (a->o.slots < 1) throw Error("--slots must be >= 1");
    if (!a->api_key_file.empty()) {
      if (!a->o.api_key.empty()) throw Error("give --api-key or --api-key-file, not both");
      std::ifstream f(a->api_key_file);
      if (!f) throw Error("--api-key-file '" + a->api_key_file + "' cannot be read");
      std::getline(f, a->o.api_key);
      while (!a->o.api_key.empty() && std::isspace(uint8_t(a->o.api_key.back())))
        a->o.api_key.pop_back();
      if (a->o.api_key.empty())
        throw Error("--api-key-file '" + a->api_key_file + "' holds no key on its first line");
    } else if (const char* k = std::getenv("MXN_API_KEY"); a->o.api_key.empty() && k && *k) {
      a->o.api_key = k;
    }
    if (a->o.max_client_connections < 1) throw Error("--max-client-connections must be >= 1");
    const std::vector<std::string> here = available_devices();
    a->o.devices.clear();
    for (std::string d : a->devices == "all" ? here : split(a->devices, ',')) {
      if (d.find(':') == std::string::npos) d += ":0";
      if (std::find(here.begin(), here.end(), d) == here.end()) {
        std::string names;
        for (const auto& h : here) names += (names.empty() ? "" : ", ") + h;
        throw Error("unknown device '" + d + "' in --devices (devices here: " + names + ")");
      }
      if (std::find(a->o.devices.begin(), a->o.devices.end(), d) != a->o.devices.end())
        throw Error("device '" + d + "' appears twice in --devices");
      a->o.devices.push_back(d);
    }
    if (a->o.devices.empty()) throw Error("--devices names no device");
    if (a->o.kv_blocks < 0) throw Error("--kv-blocks must be >= 0");
    if (a->o.max_queue < 0) throw Error("--max-queue must be >= 0");
    if (a->budget_mb < 0) throw Error("--memory-budget-mb must be >= 0");
    a->o.memory_budget = uint64_t(a->budget_mb * 1048576.0);
    if (a->o.port < 1 || a->o.port > 65535) throw Error("--port must be 1..65535");
    return serve(a->o);
  };
}

}  // namespace mxn::cli
