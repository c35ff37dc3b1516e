// mxn: one binary for every job. Errors a user can cause end as one line on stderr and exit 1.
#include <cstdio>
#include <map>

#include "backend/device.h"
#include "cli/commands.h"
#include "core/error.h"

namespace {

// "mxn 0.2.0 (commit abc1234, chip-contract ABI 2); backends: cpu opencl cuda (...)"
std::string version_line() {
  std::string s = std::string("mxn ") + MXN_VERSION + " (commit " + MXN_COMMIT +
                  ", chip-contract ABI " + std::to_string(MXN_ABI_VERSION) + "); backends:";
  for (const auto& b : mxn::backends())
    s += " " + b.name + (b.api ? "" : " (built, not loadable here)");
  return s;
}

// `mxn` alone lists the subcommands, a line each, as git does.
int usage(const CLI::App& app) {
  std::printf("usage: mxn <command> [options]   (mxn <command> --help for its options)\n\n");
  for (const CLI::App* sub : app.get_subcommands({}))
    std::printf("  %-12s %s\n", sub->get_name().c_str(), sub->get_description().c_str());
  std::printf("\n%s\n", version_line().c_str());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  mxn::cli::remember_argv(argc, argv);
  CLI::App app{
      "mxn: M models on N chips: train, evaluate, generate and convert models on any "
      "backend, or a mix of them"};
  app.require_subcommand(0, 1);
  app.set_version_flag("--version", [] { return version_line(); });
  std::map<CLI::App*, std::function<int()>> run;
  for (auto add :
       {mxn::cli::add_train, mxn::cli::add_eval, mxn::cli::add_generate, mxn::cli::add_devices,
        mxn::cli::add_prepare, mxn::cli::add_tokenize, mxn::cli::add_convert, mxn::cli::add_merge,
        mxn::cli::add_serve, mxn::cli::add_plan, mxn::cli::add_conformance, mxn::cli::add_bench}) {
    auto fn = add(app);
    run[app.get_subcommands({}).back()] = fn;
  }
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  if (app.get_subcommands().empty()) return usage(app);
  try {
    for (auto& [sub, fn] : run)
      if (sub->parsed()) return fn();
  } catch (const mxn::Error& e) {
    std::fprintf(stderr, "mxn: error: %s\n", e.what());
    return 1;
  } catch (const std::bad_alloc&) {
    std::fprintf(stderr, "mxn: error: out of host memory\n");
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "mxn: error: %s\n", e.what());
    return 1;
  }
  return 0;
}
