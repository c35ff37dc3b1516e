// mxn: one binary for every job. Errors a user can cause end as one line on stderr and exit 1.
#include <cstdio>
#include <map>

#include "cli/commands.h"
#include "core/error.h"

int main(int argc, char** argv) {
  mxn::cli::remember_argv(argc, argv);
  CLI::App app{"mxn: M models on N chips: train, evaluate and sample GPT models on any backend"};
  app.require_subcommand(1);
  std::map<CLI::App*, std::function<int()>> run;
  for (auto add :
       {mxn::cli::add_train, mxn::cli::add_eval, mxn::cli::add_generate, mxn::cli::add_devices,
        mxn::cli::add_prepare, mxn::cli::add_conformance, mxn::cli::add_bench}) {
    auto fn = add(app);
    run[app.get_subcommands({}).back()] = fn;
  }
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
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
