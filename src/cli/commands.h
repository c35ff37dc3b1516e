#pragma once
#include <CLI/CLI.hpp>
#include <functional>

namespace mxn::cli {

// Each adds its subcommand to `app`; the returned function runs it after parsing.
std::function<int()> add_train(CLI::App& app);
std::function<int()> add_eval(CLI::App& app);
std::function<int()> add_generate(CLI::App& app);
std::function<int()> add_devices(CLI::App& app);
std::function<int()> add_prepare(CLI::App& app);
std::function<int()> add_tokenize(CLI::App& app);
std::function<int()> add_convert(CLI::App& app);
std::function<int()> add_merge(CLI::App& app);
std::function<int()> add_serve(CLI::App& app);
std::function<int()> add_plan(CLI::App& app);
std::function<int()> add_conformance(CLI::App& app);
std::function<int()> add_bench(CLI::App& app);
void remember_argv(int argc, char** argv);

}  // namespace mxn::cli
