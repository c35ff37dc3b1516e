#!/usr/bin/python3
"""Tensor parallelism (`mxn train --tp N`) equals single-device training, under real mpirun:
  - the token embeddings and the head split by vocabulary rows (Megatron-LM's vocab-parallel
    cross-entropy: no rank holds (tokens, vocab) logits), the tied table's split kept even across
    a pipeline's first and last stages;
  - every dense family split over CPU + OpenCL (two CPU ranks where OpenCL is not built): LLaMA
    with GQA (--tp_split even), GPT-2 (fused Conv1D qkv, biases; uneven 3,1 heads and MLP
    columns), Qwen2 (qkv biases; auto: by each chip's measured GEMM speed), GLM (fused gate/up)
    ChatGLM (fused qkv, interleaved RoPE) and Qwen3 (per-head q/k norms, their gradients summed
    over the group), each step's loss and validation loss within 1e-6
    relative over 50 steps (f32);
  - the checkpoint gathered into the ordinary layout, weights and AdamW moments within 1e-5 and
    1e-4 of each tensor's largest value of one CPU's (data parallelism over the same chips,
    printed beside, differs from one CPU by as much: splitting a sum changes its rounding);
  - sequence parallelism (--sequence_parallel 1: the rows between the blocks split over the
    group) equal to one CPU as well, LLaMA and GPT-2 (position rows, biases on the residual),
    GLM's objective (block-position rows), bf16, with its activations planned smaller;
  - bf16: --tp 2 --dtype bf16 follows one CPU's bf16 run within 2e-3 (bf16 rounds each partial
    product where one device rounds the whole);
  - LoRA (on split and whole linears' sides), P-Tuning v2 with and without its MLP, fine-tuning a
    folder under --tp 2: losses within 1e-6, the adapter gathered as PEFT's;
  - inside pipeline stages: --tp 2 --pp 2 over 4 ranks, its checkpoint resumed on one device;
  - 2 groups of --tp 2 over 4 ranks (data parallel across the groups; one group CPU + OpenCL);
  - checkpoints resume on any layout: the --tp 2 run's on one device, one device's on --tp 2
    with other shares, the resumed steps equal to the uninterrupted run;
  - bad settings refused with one line naming what was wrong.
usage: tensor_parallel_test.py PATH/TO/mxn PATH/TO/kjv.bin
"""
import json, os, subprocess, sys, tempfile

sys.path[:0] = [os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "common")]
from train_common import check, finish, read_f32_safetensors, worst  # noqa: E402

mxn, data = sys.argv[1], sys.argv[2]
base = ["--data", data, "--n_layer", "2", "--n_head", "4", "--n_embd", "64", "--n_ctx", "32",
        "--steps", "50", "--eval_every", "25", "--eval_batches", "2", "--seed", "7", "--threads", "1",
        "--batch", "8", "--ckpt_every", "30", "--dtype", "f32"]
opencl = "opencl:0" in subprocess.run([mxn, "devices"], stdout=subprocess.PIPE, text=True).stdout
pair = "cpu,opencl:0" if opencl else "cpu,cpu"


def train(out, *extra, shape=True):
    drop = {"--n_layer", "--n_head", "--n_embd"}  # a checkpoint's own shape
    flags = base if shape else [a for i, a in enumerate(base) if a not in drop and base[i - 1] not in drop]
    r = subprocess.run([mxn, "train", *flags, "--out", out, *extra], check=True,
                       stdout=subprocess.PIPE, text=True, timeout=600)
    return r.stdout


def metrics(out, after=0):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["step"] > after]


def same(name, ref, got, after=0, tol=1e-6):
    a, b = metrics(ref, after), metrics(got, after)
    w = max(worst([r["loss"] for r in a], [r["loss"] for r in b]),
            worst([r["val_loss"] for r in a if "val_loss" in r], [r["val_loss"] for r in b if "val_loss" in r]))
    check(name, w < tol and len(b) == len(a) > 0, f"worst relative difference {w:.2e} over {len(b)} steps")


def gap(x, y):
    keys = [k for k in x if abs(x[k]).max() > 0 and "k_proj.bias" not in k]
    return max(float(abs(x[k] - y[k]).max() / abs(x[k]).max()) for k in keys) if sorted(x) == sorted(y) else 1.0


def refused(name, args, want):
    r = subprocess.run([mxn, "train", *base, "--out", os.path.join(tmp, "refused"), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       text=True, timeout=300)
    lines = [l for l in r.stderr.splitlines() if l.startswith("mxn: error")]
    check(name, r.returncode != 0 and want in r.stderr and len(set(lines)) == 1,
          lines[0] if lines else r.stderr.strip())


with tempfile.TemporaryDirectory() as tmp:
    p = lambda name: os.path.join(tmp, name)  # noqa: E731
    llama = ["--arch", "llama", "--n_kv_head", "2"]
    train(p("one"), *llama)
    out = train(p("tp"), *llama, "--devices", pair, "--tp", "2", "--tp_split", "even")
    check("--tp 2 --tp_split even: the plan gives each rank one kv head, half the MLP and half the vocabulary",
          "kv heads 1 1, MLP columns 96 96, vocabulary rows 128 128" in out, next((l.strip() for l in out.splitlines() if "plan:" in l), ""))
    same(f"llama (GQA), --tp 2 over {pair} = one cpu (50 steps)", p("one"), p("tp"))
    check("... each rank's whole weights (norms) bit-identical to its group's first rank's",
          "replicas: every copy of each weight bit-identical to the first rank's of those that hold it" in out,
          next((l for l in out.splitlines() if l.startswith("replicas:")), "no replicas line"))
    train(p("dp"), *llama, "--devices", pair)
    for f, tol in (("model", 1e-5), ("optimizer", 1e-4)):
        x, y, z = (read_f32_safetensors(p(f"{n}/ckpt-00000050/{f}.safetensors")) for n in ("one", "tp", "dp"))
        check(f"... its {f} tensors gathered whole, within {tol:g} of each tensor's largest",
              all(x[k].shape == y.get(k, x[k][:0]).shape for k in x) and gap(x, y) < tol,
              f"{len(y)} tensors, worst {gap(x, y):.2e} (data parallel over {pair}: {gap(x, z):.2e})")

    for arch, split in (("gpt2", "3,1"), ("qwen2", "auto"), ("glm", "1,3"), ("chatglm", "2,2"), ("qwen3", "1,1")):
        a = ["--arch", arch, "--steps", "30", "--eval_every", "15"]
        train(p(arch), *a)
        out = train(p(arch + "_tp"), *a, "--devices", pair, "--tp", "2", "--tp_split", split)
        plan = next((l.strip() for l in out.splitlines() if "plan:" in l), "")
        same(f"{arch}, --tp 2 --tp_split {split} over {pair} = one cpu [{plan.split('block ')[-1].split(';')[0]}]",
             p(arch), p(arch + "_tp"))
        if arch == "gpt2":  # sequence parallel: position rows and biases on the split residual rows
            train(p("gpt2_sp"), *a, "--devices", pair, "--tp", "2", "--tp_split", split, "--sequence_parallel", "1")
            same(f"gpt2, --tp 2 --sequence_parallel 1 over {pair} = one cpu", p(arch), p("gpt2_sp"))

    # Sequence parallelism: the rows between the blocks split over the group (norms, residuals,
    # the biases added to them, GPT-2's position rows), the sums reduce-scatters and the norms'
    # outputs all-gathers (again in the backward): the same numbers, less activation memory.
    train(p("llama_sp"), *llama, "--devices", pair, "--tp", "2", "--tp_split", "3,1", "--sequence_parallel", "1")
    same(f"llama, --tp 2 --sequence_parallel 1 over {pair} = one cpu (50 steps)", p("one"), p("llama_sp"))
    # ... with GLM's objective (GPT-2's block-position rows on the split rows, the prefix mask),
    # and in bf16.
    glm = ["--arch", "gpt2", "--objective", "glm", "--steps", "10", "--eval_every", "5"]
    train(p("glm_one"), *glm)
    train(p("glm_sp"), *glm, "--devices", pair, "--tp", "2", "--sequence_parallel", "1")
    same(f"gpt2 --objective glm, --tp 2 --sequence_parallel 1 over {pair} = one cpu", p("glm_one"), p("glm_sp"))
    bfs = [*llama, "--dtype", "bf16", "--steps", "10", "--eval_every", "5"]
    train(p("bfs_one"), *bfs)
    train(p("bfs_sp"), *bfs, "--devices", "cpu,cpu", "--tp", "2", "--sequence_parallel", "1")
    same("llama bf16, --tp 2 --sequence_parallel 1 = one cpu's bf16 run", p("bfs_one"), p("bfs_sp"), tol=2e-3)

    # Its memory: the residual rows each layer keeps for the backward held 1/tp (GPT-2 124M at
    # 4 x 1024 tokens: 926 -> 788 MiB of activations a rank, docs/training.md); here a small
    # shape, the plan's figure (the arena's peak, exact).
    sp = ["--arch", "gpt2", "--n_layer", "4", "--n_embd", "256", "--n_ctx", "512", "--batch", "4", "--steps", "1", "--eval_every", "0",
          "--devices", "cpu,cpu", "--tp", "2"]
    act = lambda o: float(next(l for l in o.splitlines() if "memory on" in l).split("activations ")[1].split(" MiB")[0])  # noqa: E731
    a0, a1 = act(train(p("act0"), *sp)), act(train(p("act1"), *sp, "--sequence_parallel", "1"))
    check("... its activations planned smaller (GPT-2, 512 tokens x 4 rows, --tp 2)", a1 < 0.95 * a0,
          f"{a0:g} MiB without, {a1:g} MiB with sequence parallelism")

    bf = [*llama, "--dtype", "bf16", "--steps", "30"]
    train(p("bf_one"), *bf)
    train(p("bf_tp"), *bf, "--devices", "cpu,cpu", "--tp", "2")
    same("llama bf16, --tp 2 = one cpu's bf16 run", p("bf_one"), p("bf_tp"), tol=2e-3)

    four = "cpu,opencl:0,cpu,cpu" if opencl else "cpu,cpu,cpu,cpu"
    out = train(p("four"), *llama, "--devices", four, "--tp", "2", "--tp_split", "3,1", "--n_head", "8",
                "--n_kv_head", "4", "--steps", "30")
    train(p("four_one"), *llama, "--n_head", "8", "--n_kv_head", "4", "--steps", "30")
    same(f"2 groups of --tp 2 (3 + 1 kv heads) over {four} = one cpu", p("four_one"), p("four"))
    check("... every copy of every weight bit-identical (within groups and across replicas)",
          "replicas: every copy of each weight bit-identical to the first rank's of those that hold it" in out,
          next((l for l in out.splitlines() if l.startswith("replicas:")), "no replicas line"))

    # Inside pipeline stages (--tp 2 --pp 2 over 4 ranks, rank = replica x 2 + stage): each
    # stage's two replicas split its blocks (stage 0: a CPU and the OpenCL device, 3 + 1 kv heads).
    quad = "cpu,cpu,opencl:0,cpu" if opencl else "cpu,cpu,cpu,cpu"
    pq = [*llama, "--n_head", "8", "--n_kv_head", "4", "--n_layer", "3", "--steps", "20", "--eval_every", "10",
          "--ckpt_every", "10"]
    train(p("pq_one"), *pq)
    out = train(p("pq"), *pq, "--devices", quad, "--pp", "2", "--tp", "2", "--tp_split", "3,1")
    check("--tp 2 --pp 2: the plan says each stage's replicas split its blocks 3 + 1 kv heads",
          "each 2 replicas of a stage split its blocks (3,1; this stage kv heads 3 1" in out,
          next((l.strip()[-90:] for l in out.splitlines() if "split its blocks" in l), ""))
    same(f"llama, --tp 2 --pp 2 over {quad} = one cpu", p("pq_one"), p("pq"))
    check("... every copy of each weight bit-identical (whole ones in each group, the tied embeddings "
          "of the first and last stage, the replicas)",
          "replicas: every copy of each weight bit-identical to the first rank's of those that hold it" in out,
          next((l for l in out.splitlines() if l.startswith("replicas:")), "no replicas line"))
    x, y = (read_f32_safetensors(p(f"{r}/ckpt-00000020/model.safetensors")) for r in ("pq_one", "pq"))
    check("... its checkpoint: the ordinary layout, weights as one cpu's", gap(x, y) < 1e-5,
          f"{len(y)} tensors, worst {gap(x, y):.2e} of a tensor's max")
    train(p("pq_r"), "--resume", p("pq/ckpt-00000010"), "--steps", "20", "--eval_every", "10", shape=False)
    same("... its checkpoint resumed on one device", p("pq_one"), p("pq_r"), after=10)

    # GPT-2's tied table under --tp 2 --pp 2: each copy (first and last stage) cut into the same
    # vocabulary rows, their gradients summed, the last stage's counted once in the norm.
    g2 = ["--arch", "gpt2", "--steps", "10", "--eval_every", "5"]
    train(p("g2_one"), *g2)
    train(p("g2"), *g2, "--devices", quad, "--pp", "2", "--tp", "2", "--tp_split", "3,1")
    same(f"gpt2 (tied embeddings), --tp 2 --pp 2 over {quad} = one cpu", p("g2_one"), p("g2"))

    # Resuming on any layout: the --tp 2 run's step-30 checkpoint on one device, and one device's
    # on --tp 2 with uneven shares; steps 31-50 as the uninterrupted runs.
    train(p("r1"), "--resume", p("tp/ckpt-00000030"), "--steps", "50", shape=False)
    same("the --tp 2 checkpoint resumed on one device", p("one"), p("r1"), after=30)
    train(p("r2"), "--resume", p("one/ckpt-00000030"), "--steps", "50", "--devices", pair, "--tp", "2",
          shape=False)
    same(f"one device's checkpoint resumed with --tp 2 over {pair} (auto shares)", p("one"), p("r2"), after=30)

    # Fine-tuning a folder under --tp: LoRA on split and whole linears' inputs and outputs (A of a
    # column-split linear and B of a row-split one whole, their gradients summed over the group),
    # P-Tuning v2's rows by kv heads, with and without its MLP; the adapter gathered as PEFT's and
    # its checkpoint resumed on one device.
    subprocess.run([mxn, "convert", p("one"), p("hf")], check=True, stdout=subprocess.DEVNULL)
    for name, ft in (("lora", ["--finetune", "lora", "--lora_r", "3", "--lora_targets",
                               "q_proj,v_proj,o_proj,gate_proj,down_proj", "--ckpt_every", "10"]),
                     ("ptuning", ["--finetune", "ptuning", "--prefix_len", "5", "--prefix_projection", "16"]),
                     ("prefix", ["--finetune", "ptuning", "--prefix_len", "4"])):
        a = ["--model", p("hf"), "--steps", "20", "--eval_every", "10", *ft]
        train(p(name), *a, shape=False)
        train(p(name + "_tp"), *a, "--devices", pair, "--tp", "2", shape=False)
        same(f"{name} on the folder, --tp 2 over {pair} = one cpu", p(name), p(name + "_tp"))
    x, y = (read_f32_safetensors(p(f"{r}/ckpt-00000020/adapter_model.safetensors")) for r in ("lora", "lora_tp"))
    check("... the LoRA adapter gathered into PEFT's whole tensors, within 1e-4 of one cpu's",
          all(x[k].shape == y.get(k, x[k][:0]).shape for k in x) and gap(x, y) < 1e-4,
          f"{len(y)} tensors, worst {gap(x, y):.2e} of a tensor's max")
    train(p("lora_r"), "--resume", p("lora_tp/ckpt-00000010"), "--steps", "20", "--eval_every", "10", shape=False)
    same("... its --tp 2 checkpoint resumed on one device", p("lora"), p("lora_r"), after=10)

    refused("--tp 3 over 2 devices", [*llama, "--devices", "cpu,cpu", "--tp", "3"],
            "--tp 3 needs a multiple of 3 ranks; the job has 2")
    refused("--tp 4 with 2 kv heads", [*llama, "--devices", "cpu,cpu,cpu,cpu", "--tp", "4"],
            "the model has 2 kv heads; each rank of a group needs at least one")
    refused("--tp_split even with 3 kv heads", ["--arch", "llama", "--n_head", "6", "--n_kv_head", "3", "--n_embd",
            "96", "--devices", "cpu,cpu", "--tp", "2", "--tp_split", "even"],
            "--tp_split even: the model's 3 kv heads and 256 MLP columns must divide by 2")
    refused("--tp on a mixture of experts", ["--arch", "mixtral", "--experts", "4", "--devices", "cpu,cpu",
            "--tp", "2"], "mixture-of-experts layers (use --ep)")
    refused("--tp with --ep", ["--arch", "mixtral", "--experts", "4", "--devices", "cpu,cpu,cpu,cpu", "--tp", "2",
            "--ep", "2"], "--tp 2 is not combined with --ep yet")
    refused("--tp 2 --pp 2 over 6 ranks", [*llama, "--devices", "cpu,cpu,cpu,cpu,cpu,cpu", "--tp", "2", "--pp", "2"],
            "--tp 2 --pp 2 needs a multiple of 4 ranks; the job has 6")
    refused("LoRA dropout under --tp", ["--model", p("hf"), "--finetune", "lora", "--lora_dropout", "0.1",
            "--devices", "cpu,cpu", "--tp", "2"], "--tp 2 with --lora_dropout 0.1: dropout")
    refused("--sequence_parallel with --pp", [*llama, "--devices", "cpu,cpu,cpu,cpu", "--tp", "2", "--pp", "2",
            "--sequence_parallel", "1"], "--tp 2 --sequence_parallel 1 is not combined with --pp yet")
    refused("--sequence_parallel without --tp", [*llama, "--sequence_parallel", "1"],
            "sequence_parallel = 1 splits the rows of a tensor-parallel group: it needs tp 2 or more")
    refused("a bad --tp_split", [*llama, "--devices", "cpu,cpu", "--tp", "2", "--tp_split", "fast"],
            "tp_split = 'fast', expected auto, even, or weights such as 3,1")
finish()
