// The smaller subcommands: eval, generate, devices, prepare.
#include "cli/commands.h"

#include <climits>
#include <cstdio>
#include <cstdlib>
#include <filesystem>

#include "backend/bench_ops.h"
#include "backend/conformance.h"
#include "backend/device.h"
#include "core/error.h"
#include "core/fs.h"
#include "core/text.h"
#include "data/chat.h"
#include "data/shard.h"
#include "data/tokenizer.h"
#include "infer/model.h"
#include "io/gguf_model.h"
#include "serve/batch.h"

namespace mxn::cli {
namespace {

int32_t parse_id(const std::string& t, const char* flag) {
  char* end = nullptr;
  const long v = std::strtol(t.c_str(), &end, 10);
  if (t.empty() || *end || v < 0 || v > INT32_MAX)
    throw Error(std::string(flag) + ": '" + t + "' is not a token id (expected 1,2,3)");
  return int32_t(v);
}

}  // namespace

std::function<int()> add_eval(CLI::App& app) {
  auto* sub = app.add_subcommand("eval", "validation loss of a model on a data file");
  struct A {
    std::string ckpt, data, device = "cpu";
    int64_t threads = 0, batch = 8, ctx = 0;
    bool perplexity = false;
  };
  auto a = std::make_shared<A>();
  sub->add_option("--checkpoint,--model", a->ckpt,
                  "an mxn checkpoint or run folder, a Hugging Face model folder, or a .gguf file")
      ->required();
  sub->add_option("--ctx", a->ctx, "tokens per window (0: the model's context, at most 1024)");
  sub->add_option("--data", a->data, "token shard or text file")->required();
  sub->add_option("--device", a->device, "device")->capture_default_str();
  sub->add_option("--threads", a->threads, "CPU threads (0: all)");
  sub->add_option("--batch", a->batch, "sequences per forward pass")->check(CLI::PositiveNumber);
  sub->add_flag("--perplexity", a->perplexity,
                "--data is text read with the model's tokenizer: perplexity over chunks of --ctx "
                "tokens, each one's second half scored, as llama.cpp's llama-perplexity");
  return [a] {
    if (a->perplexity) {
      const Perplexity p =
          text_perplexity(a->ckpt, a->data, a->device, a->threads, a->batch, a->ctx);
      std::printf(
          "perplexity: %.4f (mean NLL %.6f) over %lld tokens: %lld chunks of %lld, the "
          "second half of each scored (%lld predictions)\n",
          p.ppl, p.nll, (long long)p.tokens, (long long)p.chunks, (long long)p.ctx,
          (long long)p.scored);
      return 0;
    }
    std::printf("loss: %.6f\n",
                eval_model(a->ckpt, a->data, a->device, a->threads, a->batch, a->ctx));
    return 0;
  };
}

std::function<int()> add_generate(CLI::App& app) {
  auto* sub = app.add_subcommand("generate", "continue a prompt with a trained model");
  struct A {
    GenerateOptions o;
    std::string ids;
    bool print_ids = false, timings = false;
    std::string infill, prompts_file;
    int64_t slots = 8;
    GenerateStats stats;
  };
  auto a = std::make_shared<A>();
  GenerateOptions& o = a->o;
  auto* src = sub->add_option("--checkpoint", o.checkpoint, "an mxn checkpoint or run folder");
  sub->add_option("--model", o.model, "a Hugging Face model folder or a .gguf file")->excludes(src);
  sub->add_option("--adapter", o.adapter,
                  "a LoRA adapter (PEFT folder or mxn LoRA run) applied to the model");
  auto* text = sub->add_option("--prompt", o.prompt, "text to continue");
  sub->add_option("--infill", a->infill,
                  "text whose [MASK]s a GLM-objective checkpoint fills (prints the whole text)")
      ->excludes(text);
  sub->add_option("--prompt-ids", a->ids, "token ids to continue, comma-separated")->excludes(text);
  sub->add_option("--prompts-file", a->prompts_file,
                  "one prompt of comma-separated token ids a line, all generated at once with "
                  "continuous batching; prints each one's new ids on a line")
      ->excludes(text);
  sub->add_option("--slots", a->slots, "with --prompts-file: requests decoded together")
      ->capture_default_str();
  sub->add_flag("--chat", o.chat, "the prompt is a user message in the model's chat format")
      ->excludes("--prompt-ids");
  sub->add_option("--system", o.system, "with --chat: a system message");
  sub->add_option("--max-tokens", o.max_tokens, "tokens to generate")->capture_default_str();
  sub->add_option("--temperature", o.sampling.temperature, "0: greedy")->capture_default_str();
  sub->add_option("--top-k", o.sampling.top_k, "sample from the k likeliest (0: all)")
      ->capture_default_str();
  sub->add_option("--top-p", o.sampling.top_p, "then from the likeliest reaching this mass")
      ->capture_default_str();
  sub->add_option("--seed", o.sampling.seed, "sampling seed")->capture_default_str();
  sub->add_option("--stop", o.stop, "end before this text (repeatable)");
  sub->add_flag("--ignore-eos", o.ignore_eos, "go on past the model's end-of-sequence tokens");
  sub->add_flag("--print-ids", a->print_ids, "print the new token ids instead of text");
  sub->add_flag("--timings", a->timings, "print load, prompt and per-token speeds on stderr");
  sub->add_option("--device", o.device, "device")->capture_default_str();
  sub->add_option("--threads", o.threads, "CPU threads (0: all)");
  sub->add_option("--weights", o.weights,
                  "weights kept as f32, bf16 (f32 arithmetic), or auto: bf16 for 16-bit sources")
      ->capture_default_str();
  return [a] {
    GenerateOptions& o = a->o;
    if (!a->infill.empty()) {
      if (o.checkpoint.empty())
        throw Error("--infill needs --checkpoint (a run trained with --objective glm)");
      std::printf("%s\n", mxn::infill(o.checkpoint, a->infill, o.max_tokens, o.sampling, o.device,
                                      o.threads)
                              .c_str());
      return 0;
    }
    if (!a->prompts_file.empty()) {
      std::vector<std::vector<int32_t>> prompts;
      const std::vector<std::string> lines =
          split(read_file(a->prompts_file, "prompts file"), '\n');
      for (size_t i = 0; i < lines.size(); ++i) {
        if (lines[i].find_first_not_of(" \t\r") == std::string::npos) continue;
        prompts.emplace_back();
        for (const std::string& t : split(lines[i], ','))
          prompts.back().push_back(
              parse_id(t, (a->prompts_file + ":" + std::to_string(i + 1)).c_str()));
      }
      if (a->slots < 1) throw Error("--slots must be >= 1");
      o.stats = &a->stats;
      for (const auto& ids : generate_batch(o, prompts, a->slots)) {
        for (size_t j = 0; j < ids.size(); ++j) std::printf("%s%d", j ? " " : "", ids[j]);
        std::printf("\n");
      }
      const GenerateStats& t = a->stats;
      std::fprintf(stderr,
                   "%zu requests: %lld prompt tokens, %lld of them from shared prefix blocks; "
                   "KV blocks in use at most %lld of %lld; the KV cache holds %lld bytes a token\n",
                   prompts.size(), (long long)t.prompt_tokens, (long long)t.reused_tokens,
                   (long long)t.kv_blocks_peak, (long long)t.kv_blocks,
                   (long long)t.kv_bytes_per_token);
      return 0;
    }
    for (const std::string& t : a->ids.empty() ? std::vector<std::string>{} : split(a->ids, ','))
      o.prompt_ids.push_back(parse_id(t, "--prompt-ids"));
    const bool ids = a->print_ids || !o.prompt_ids.empty();
    o.stats = &a->stats;
    if (!ids) std::fwrite(o.prompt.data(), 1, o.prompt.size(), stdout);
    generate(o, [&](int32_t id, const std::string& s) {
      if (ids && id >= 0) std::printf("%d\n", id);
      if (!ids) std::fwrite(s.data(), 1, s.size(), stdout);  // a piece may hold a NUL byte
      std::fflush(stdout);
    });
    if (!ids) std::fputs("\n", stdout);
    if (a->timings) {
      const GenerateStats& t = a->stats;
      std::fprintf(stderr,
                   "load %.2f s | prompt %lld tokens in %.3f s (%.1f tokens/s) | decode %lld "
                   "tokens in %.3f s (%.1f tokens/s)\n",
                   t.load_s, (long long)t.prompt_tokens, t.prompt_s,
                   double(t.prompt_tokens) / std::max(t.prompt_s, 1e-9), (long long)t.decode_tokens,
                   t.decode_s, double(t.decode_tokens) / std::max(t.decode_s, 1e-9));
    }
    return 0;
  };
}

std::function<int()> add_devices(CLI::App& app) {
  app.add_subcommand("devices", "list every device of every backend");
  return [] {
    for (const auto& b : backends()) {
      if (!b.api) {
        std::printf("%-10s not loaded: %s\n", b.name.c_str(), b.error.c_str());
        continue;
      }
      if (b.api->device_count() == 0)
        std::printf("%-10s loaded; no devices here\n", b.name.c_str());
      for (int i = 0; i < b.api->device_count(); ++i) {
        mxn_device_props p{};
        p.struct_size = sizeof(p);
        b.api->device_props(i, &p);
        std::string dts;
        for (int t = 0; t < MXN_DTYPE_COUNT; ++t)
          if (p.dtype_mask & (1u << t))
            dts += std::string(dts.empty() ? "" : ",") + dtype_name(DType(t));
        std::printf("%s:%d  %s | %s | %.1f GiB | %s | nominal %.0f GFLOP/s f32 | %s\n",
                    b.name.c_str(), i, p.name, p.vendor, double(p.memory_bytes) / (1u << 30),
                    dts.c_str(), p.peak_gflops, p.notes);
      }
    }
    return 0;
  };
}

std::function<int()> add_prepare(CLI::App& app) {
  auto* sub = app.add_subcommand("prepare", "turn a text file into a token shard");
  struct A {
    std::string in, out, tokenizer;
    double val = 0.1;
  };
  auto a = std::make_shared<A>();
  sub->add_option("input", a->in, "text file")->required();
  sub->add_option("--out", a->out, "shard to write")->required();
  sub->add_option("--val-fraction", a->val, "share held out for validation")->capture_default_str();
  sub->add_option("--tokenizer", a->tokenizer,
                  "a model folder or tokenizer file (default: one token per byte)");
  return [a] {
    std::printf("%s\n", prepare_shard(a->in, a->out, a->val, a->tokenizer).c_str());
    return 0;
  };
}

std::function<int()> add_tokenize(CLI::App& app) {
  auto* sub = app.add_subcommand("tokenize", "token ids of a text, or the text of token ids");
  struct A {
    std::string tokenizer, text, file, decode, decode_file, system, sft;
    bool chat = false;
  };
  auto a = std::make_shared<A>();
  sub->add_option("--tokenizer", a->tokenizer, "a model folder or tokenizer file")->required();
  sub->add_flag("--chat", a->chat, "encode the text as a user message in the folder's chat format");
  sub->add_option("--system", a->system, "with --chat: a system message");
  sub->add_option("--sft", a->sft,
                  "a JSONL file of {\"messages\": [...]} rows: prints each conversation's ids "
                  "and loss mask (assistant tokens) as a JSON line");
  auto* t = sub->add_option("--text", a->text, "text to encode");
  auto* f = sub->add_option("--file", a->file, "file to encode")->excludes(t);
  auto* d = sub->add_option("--decode", a->decode, "comma-separated ids to decode");
  d->excludes(t)->excludes(f);
  sub->add_option("--decode-file", a->decode_file, "a file of ids (one per line) to decode")
      ->excludes(t)
      ->excludes(f)
      ->excludes(d);
  return [a] {
    std::unique_ptr<Tokenizer> tok;
    if (std::filesystem::is_directory(a->tokenizer)) {
      tok = load_tokenizer(a->tokenizer);
    } else if (is_gguf_file(a->tokenizer)) {  // the tokenizer a GGUF carries
      tok = tokenizer_from_gguf(gguf_load(a->tokenizer), a->tokenizer);
      if (!tok) throw Error(a->tokenizer + ": this GGUF file carries no tokenizer.ggml.* keys");
    } else {
      tok = load_tokenizer_file(a->tokenizer);
    }
    if (!a->decode.empty() || !a->decode_file.empty()) {
      std::vector<int32_t> ids;
      if (!a->decode.empty())
        for (const std::string& s : split(a->decode, ',')) ids.push_back(parse_id(s, "--decode"));
      if (!a->decode_file.empty())
        for (const std::string& s : split(read_file(a->decode_file, "ids file"), '\n'))
          if (!s.empty()) ids.push_back(parse_id(s, "--decode-file"));
      std::fputs(tok->decode(ids).c_str(), stdout);
      return 0;
    }
    if (!a->sft.empty()) {
      if (!std::filesystem::is_directory(a->tokenizer))
        throw Error("--sft needs a model folder (its tokenizer_config.json names the format)");
      const ChatFormat f = chat_format(a->tokenizer, *tok);
      const std::vector<std::string> lines = split(read_file(a->sft, "SFT data"), '\n');
      for (size_t i = 0; i < lines.size(); ++i) {
        if (lines[i].find_first_not_of(" \t\r") == std::string::npos) continue;
        const std::string where = a->sft + ":" + std::to_string(i + 1);
        const ChatTokens c = chat_conversation(f, chat_messages_from_json(lines[i], where), *tok);
        std::printf("%s\n", nlohmann::json({{"ids", c.ids}, {"loss", c.loss}}).dump().c_str());
      }
      return 0;
    }
    const std::string text = a->file.empty() ? a->text : read_file(a->file, "text file");
    std::vector<int32_t> ids;
    if (a->chat) {
      if (!std::filesystem::is_directory(a->tokenizer))
        throw Error("--chat needs a model folder (its tokenizer_config.json names the format)");
      std::vector<ChatMessage> msgs;
      if (!a->system.empty()) msgs.push_back({"system", a->system});
      msgs.push_back({"user", text});
      ids = chat_prompt(chat_format(a->tokenizer, *tok), msgs, *tok);
    } else {
      ids = tok->encode(text);
    }
    std::string out;
    for (int32_t id : ids) out += std::to_string(id) + "\n";
    std::fputs(out.c_str(), stdout);
    return 0;
  };
}

std::function<int()> add_conformance(CLI::App& app) {
  auto* sub =
      app.add_subcommand("conformance",
                         "check a backend's kernels against the CPU backend (the CPU backend "
                         "against every op in double precision)");
  struct A {
    std::string backend = "cpu", dtype = "f32", op, reference;
  };
  auto a = std::make_shared<A>();
  sub->add_option("--backend", a->backend, "backend or device, e.g. opencl or opencl:1")
      ->capture_default_str();
  sub->add_option("--dtype", a->dtype, "f32 or bf16")->capture_default_str();
  sub->add_option("--op", a->op, "only this op (e.g. matmul)");
  sub->add_option("--reference", a->reference,
                  "cpu or double (default: double for the CPU backend, cpu for the others)")
      ->check(CLI::IsMember({"cpu", "double"}));
  return [a] {
    const DType dt = dtype_from_name(a->dtype);
    if (dt != DType::f32 && dt != DType::bf16) throw mxn::Error("--dtype must be f32 or bf16");
    auto dev = open_device(a->backend);
    const bool exact =
        a->reference.empty() ? std::string(dev->api()->name) == "cpu" : a->reference == "double";
    auto ref = exact ? nullptr : open_device("cpu");
    const auto rows = run_conformance(*dev, ref.get(), dt, a->op);
    const char* against = exact ? "double precision" : "cpu:0";
    const char* name = exact ? "ref" : "cpu";
    std::printf(
        "conformance of %s (%s) against %s, tolerance %.0e (max |out - %s| / max(1, max "
        "|%s|))\n",
        dev->name().c_str(), dev->props().name, against, conformance_tolerance(dt), name, name);
    std::printf("%-18s %-5s %-12s %-10s %s\n", "op", "dtype", "status", "max error", "cases");
    int failed = 0, passed = 0, unsupported = 0;
    for (const auto& r : rows) {
      std::printf("%-18s %-5s %-12s %-10.2e %d\n", r.op.c_str(), r.dtype.c_str(), r.status.c_str(),
                  r.max_err, r.cases);
      (r.status == "pass" ? passed : r.status == "FAIL" ? failed : unsupported)++;
    }
    std::printf("%d passed, %d failed, %d unsupported\n", passed, failed, unsupported);
    return failed ? 1 : 0;
  };
}

std::function<int()> add_bench(CLI::App& app) {
  auto* sub = app.add_subcommand("bench", "benchmarks (not tests)");
  auto* ops = sub->add_subcommand("ops", "per-op throughput at the GPT's shapes, beside the CPU's");
  auto* gemm = sub->add_subcommand("gemm", "oneDNN's GEMM rate on the CPU (bf16 or f32 operands)");
  sub->require_subcommand(1);
  struct A {
    std::string backend = "cpu", dtype = "bf16";
    int reps = 5, threads = 0;
    int64_t m = 4096, n = 3072, k = 768;
  };
  auto a = std::make_shared<A>();
  gemm->add_option("--dtype", a->dtype, "operands: bf16 | f32")
      ->capture_default_str()
      ->check(CLI::IsMember({"bf16", "f32"}));
  gemm->add_option("--m", a->m, "rows of A and C")
      ->capture_default_str()
      ->check(CLI::Range(1, 1 << 16));
  gemm->add_option("--n", a->n, "columns of B and C")
      ->capture_default_str()
      ->check(CLI::Range(1, 1 << 18));
  gemm->add_option("--k", a->k, "the inner dimension")
      ->capture_default_str()
      ->check(CLI::Range(1, 1 << 16));
  gemm->add_option("--reps", a->reps, "timed runs (median)")
      ->capture_default_str()
      ->check(CLI::Range(1, 1000));
  gemm->add_option("--threads", a->threads, "threads (0: every core)")
      ->capture_default_str()
      ->check(CLI::Range(0, 4096));
  ops->add_option("--backend", a->backend, "backend or device")->capture_default_str();
  ops->add_option("--reps", a->reps, "timed runs per op (median)")
      ->capture_default_str()
      ->check(CLI::Range(1, 1000));
  return [a, gemm] {
    if (gemm->parsed()) {
      const double r = cpu_gemm_gflops(a->dtype == "bf16", a->m, a->n, a->k, a->reps, a->threads);
      std::printf("cpu %s gemm %lldx%lldx%lld (M x K x N): %.1f GFLOP/s\n", a->dtype.c_str(),
                  (long long)a->m, (long long)a->k, (long long)a->n, r);
      return 0;
    }
    auto dev = open_device(a->backend);
    auto cpu = dev->name() == "cpu:0" ? nullptr : open_device("cpu");
    Device& ref = cpu ? *cpu : *dev;
    std::printf("%s (%s) beside cpu:0; median of %d runs\n", dev->name().c_str(), dev->props().name,
                a->reps);
    std::printf("%-32s %12s %12s %8s  %s\n", "op", dev->name().c_str(), "cpu:0", "ratio", "unit");
    for (const auto& r : bench_ops(*dev, ref, a->reps))
      std::printf("%-32s %12.2f %12.2f %8.2f  %s\n", r.label.c_str(), r.dev, r.cpu, r.dev / r.cpu,
                  r.unit.c_str());
    return 0;
  };
}

}  // namespace mxn::cli
