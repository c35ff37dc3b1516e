#!/usr/bin/python3
"""Expert parallelism (`mxn train --ep N`) equals single-device training, under real mpirun:
  - Qwen2-MoE (a shared expert under its gate, DeepSeek's router-bias balancing) with --ep 2 over
    CPU + OpenCL (two CPU ranks where OpenCL is not built): every step's loss and validation loss
    within 1e-6 relative over 50 steps (f32), the experts' loads identical, and the final weights
    and AdamW moments gathered into the ordinary layout (whole (E, rows, cols) stacks), within
    1e-5 (weights) and 1e-4 (moments) of each tensor's largest value. Not 1e-6: splitting a batch
    changes the order of the gradient sums, and 50 AdamW steps carry that into the weights: data
    parallelism over the same chips differs from one CPU by 2e-6 to 3e-6 (printed beside);
  - uneven placement: --expert_split 1,2 (one rank 2 experts, the other 4) on a GLM-4.5-MoE shape
    (its first layer dense), and 1,0 (a rank with none: its rows only leave and come back);
    uneven rows (--split 7,1, with accumulation: two passes of 7 and 1 sequences a step, every
    rank in step) on Qwen3-MoE; and 2 groups of --ep 2 over 4 ranks (experts' gradients summed
    over the groups): losses within 1e-6;
  - a Mixtral and a DeepSeek-V3 shape fine-tuned from Hugging Face folders with --ep 2 (each rank
    reads its experts); LoRA on the Mixtral's attention and experts with --ep 2 (each rank trains
    its experts' adapters), the adapter gathered equal and resumed on one device; P-Tuning v2
    beside the split experts;
  - inside pipeline stages: --pp 2 --ep 2 over 4 ranks (each stage's two replicas split its
    experts, a CPU and the OpenCL device in each group) equals one CPU, its checkpoint is the
    ordinary layout and resumes on one device, and one device's resumes on --pp 2 --ep 2;
  - checkpoints resume on any --ep: the --ep 2 run's on one device and on --ep 4, the one device's
    on --ep 2 with another placement, the resumed steps equal to the uninterrupted run;
  - bad settings refused with one line naming what was wrong.
(Routing is discrete: where two experts' scores of a token nearly tie, a chip's rounding can pick
the other one, so a loss then moves by more than rounding. The shapes and seeds here have no such
tie in their 50 steps over CPU + OpenCL; the GLM-4.5 shape with --expert_split 1,0 has one at its
step-30 validation (2.4e-6), which is why that case runs on the Qwen2-MoE shape.
The Switch aux loss is a statistic of each pass's tokens, so a split changes it: these runs use
router_aux_coef 0, as the data-parallel tests do. The key projections' biases are left out of the
weight comparison: attention is invariant to them, their true gradient is 0, and AdamW's
m / sqrt(v) turns rounding noise into steps of lr size, on any split of the batch.)
usage: expert_parallel_test.py PATH/TO/mxn PATH/TO/kjv.bin
"""
import json, os, re, subprocess, sys, tempfile

sys.path[:0] = [os.path.dirname(os.path.abspath(__file__)),
                os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "common")]
from train_common import MPIRUN, check, finish, losses, read_f32_safetensors, worst  # noqa: E402

mxn, data = sys.argv[1], sys.argv[2]
base = ["--data", data, "--n_layer", "2", "--n_head", "4", "--n_kv_head", "2", "--n_embd", "64",
        "--n_ctx", "32", "--steps", "50", "--eval_every", "25", "--eval_batches", "2", "--seed", "7",
        "--threads", "1", "--batch", "8", "--ckpt_every", "30", "--router_aux_coef", "0", "--dtype", "f32"]
qwen = ["--arch", "qwen2_moe", "--experts", "6", "--top_k", "2", "--moe_ffn", "32", "--shared_ffn", "48",
        "--router_bias_update", "0.001"]
opencl = "opencl:0" in subprocess.run([mxn, "devices"], stdout=subprocess.PIPE, text=True).stdout
pair = "cpu,opencl:0" if opencl else "cpu,cpu"


def train(out, *extra, launcher=(), shape=True):
    drop = {"--n_layer", "--n_head", "--n_kv_head", "--n_embd"}  # a checkpoint's own shape
    flags = base if shape else [a for i, a in enumerate(base) if a not in drop and (i == 0 or base[i - 1] not in drop)]
    r = subprocess.run([*launcher, mxn, "train", *flags, "--out", out, *extra], check=True,
                       stdout=subprocess.PIPE, text=True, timeout=600)
    return r.stdout


def metrics(out, after=0):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["step"] > after]


def same(name, ref, got, after=0):
    a, b = metrics(ref, after), metrics(got, after)
    w = max(worst([r["loss"] for r in a], [r["loss"] for r in b]),
            worst([r["val_loss"] for r in a if "val_loss" in r], [r["val_loss"] for r in b if "val_loss" in r]))
    check(name, w < 1e-6 and len(b) == len(a) > 0, f"worst relative difference {w:.2e} over {len(b)} steps")
    return a, b


def refused(name, args, want, launcher=()):
    r = subprocess.run([*launcher, mxn, "train", *base, *args], stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, text=True, timeout=300)
    lines = [l for l in r.stderr.splitlines() if l.startswith("mxn: error")]
    check(name, r.returncode != 0 and want in r.stderr and len(set(lines)) == 1,
          lines[0] if lines else r.stderr.strip())


with tempfile.TemporaryDirectory() as tmp:
    p = lambda name: os.path.join(tmp, name)  # noqa: E731
    train(p("one"), *qwen)
    out = train(p("ep2"), *qwen, "--devices", pair, "--ep", "2")
    placed = [l.split()[4].rstrip(",") for l in out.splitlines() if l.strip().startswith("rank ") and "experts" in l]
    check(f"--ep 2 over {pair}: the plan places the 6 experts by measured speed (a chip too slow "
          "for one holds none)", len(placed) == 2 and placed[0].startswith("0-") and
          (placed[1].endswith("-5") or placed == ["0-5", "none"]), " | ".join(placed))
    a, b = same(f"qwen2_moe, --ep 2 over {pair} = one cpu (50 steps)", p("one"), p("ep2"))
    check("... every copy of each weight bit-identical to the first holder's (mixed chips: aligned each step)",
          "replicas: every copy of each weight bit-identical to the first rank's of those that hold it" in out,
          next((l for l in out.splitlines() if l.startswith("replicas:")), "no replicas line"))
    check("... the experts' loads identical every step", [r["expert_load"] for r in a] == [r["expert_load"] for r in b])
    train(p("dp2"), *qwen, "--devices", pair)  # data parallelism over the same chips, for scale
    for f, tol in (("model", 1e-5), ("optimizer", 1e-4)):
        x, y, z = (read_f32_safetensors(os.path.join(p(n), "ckpt-00000050", f + ".safetensors"))
                   for n in ("one", "ep2", "dp2"))
        keys = [k for k in x if "k_proj.bias" not in k and abs(x[k]).max() > 0]

        def gap(o):
            return max(float(abs(x[k] - o[k]).max() / abs(x[k]).max()) for k in keys)
        stacks = [k for k in y if ".experts." in k]
        check(f"... the checkpoint's {f} tensors gathered whole and within {tol:g} of each tensor's largest",
              sorted(x) == sorted(y) and stacks and all(y[k].shape[0] == 6 for k in stacks) and gap(y) < tol,
              f"{len(y)} tensors, {len(stacks)} expert stacks, worst gap {gap(y):.2e} "
              f"(data parallel over {pair}: {gap(z):.2e})")

    glm = ["--arch", "glm4_moe", "--n_layer", "3", "--experts", "6", "--top_k", "2", "--moe_ffn", "32",
           "--shared_ffn", "32", "--steps", "30"]
    train(p("glm_one"), *glm)
    out = train(p("glm_ep"), *glm, "--devices", pair, "--ep", "2", "--expert_split", "1,2")
    placed = [l.split()[4].rstrip(",") for l in out.splitlines() if l.strip().startswith("rank ") and "experts" in l]
    check("--expert_split 1,2 places 2 and 4 experts", placed == ["0-1", "2-5"], " | ".join(placed))
    same("glm4_moe (first layer dense), uneven placement = one cpu", p("glm_one"), p("glm_ep"))
    out = train(p("none"), *qwen, "--devices", pair, "--ep", "2", "--expert_split", "1,0")
    placed = [l.split("experts")[1].split(",")[0].strip() for l in out.splitlines() if l.strip().startswith("rank ")]
    check("--expert_split 1,0: all 6 experts on rank 0, none on rank 1", placed == ["0-5", "none"], " | ".join(placed))
    same("... its tokens' rows still go to rank 0's experts and back: = one cpu", p("one"), p("none"))

    q3 = ["--arch", "qwen3_moe", "--n_layer", "3", "--experts", "8", "--top_k", "3", "--moe_ffn", "16",
          "--accum", "2", "--steps", "30", "--eval_batches", "3"]
    train(p("q3_one"), *q3)
    out = train(p("q3_ep"), *q3, "--devices", pair, "--ep", "2", "--split", "7,1")
    check("rows 14 + 2 (--split 7,1, accum 2) in 2 passes of 7 + 1 a step",
          "in 2 passes a step" in out and " 14 sequences" in out and " 2 sequences" in out,
          next((l.strip() for l in out.splitlines() if "plan:" in l), ""))
    same("qwen3_moe, uneven rows in several passes = one cpu", p("q3_one"), p("q3_ep"))

    mixtral = ["--arch", "mixtral", "--experts", "4", "--top_k", "2", "--moe_ffn", "32", "--steps", "30"]
    train(p("mix_one"), *mixtral)
    train(p("mix_4"), *mixtral, "--devices", "cpu,cpu,cpu,cpu", "--ep", "2")
    same("mixtral, 2 groups of --ep 2 over 4 ranks = one cpu", p("mix_one"), p("mix_4"))
    subprocess.run([mxn, "convert", p("mix_one"), p("mix_hf")], check=True, stdout=subprocess.DEVNULL)
    ft = ["--model", p("mix_hf"), "--steps", "20"]
    train(p("ft_one"), *ft)
    train(p("ft_ep"), *ft, "--devices", "cpu,cpu", "--ep", "2", "--expert_split", "3,1")
    same("mixtral fine-tuned from a Hugging Face folder, --ep 2 (3 + 1 experts) = one cpu", p("ft_one"), p("ft_ep"))
    # LoRA on attention and every expert (each rank trains its experts' pairs): the losses, the
    # adapter gathered into PEFT's per-expert tensors, and its checkpoint resumed on one device.
    lora = [*ft, "--finetune", "lora", "--lora_r", "3", "--lora_targets", "q_proj,w1,w2,w3", "--ckpt_every", "10"]
    train(p("lo_one"), *lora)
    train(p("lo_ep"), *lora, "--devices", pair, "--ep", "2", "--expert_split", "3,1")
    same(f"mixtral LoRA on the experts, --ep 2 over {pair} (3 + 1 experts) = one cpu", p("lo_one"), p("lo_ep"))
    train(p("lo_dp"), *lora, "--devices", pair)

    def adapter_gap(run):  # the worst tensor's largest difference over its largest value
        a1, a2 = (read_f32_safetensors(p(f"{r}/ckpt-00000020/adapter_model.safetensors")) for r in ("lo_one", run))
        if sorted(a1) != sorted(a2):
            return 1.0, 0
        gap = max(float(abs(a1[k] - a2[k]).max() / max(float(abs(a1[k]).max()), 1e-30)) for k in a1)
        return gap, sum(".experts." in k for k in a1)
    (e, n_exp), (e_dp, _) = adapter_gap("lo_ep"), adapter_gap("lo_dp")
    # (A fresh B's entries with near-zero gradients take lr-sized AdamW steps from rounding noise,
    # as the key biases above: data parallelism over the same chips shows the same gap.)
    check("... its adapter: the same PEFT tensors (4 experts' pairs in 2 layers x 3 linears)",
          n_exp == 48 and e < 1e-4, f"{n_exp} experts' A and B; worst {e:.2e} of a tensor's max "
          f"(data parallel over {pair}: {e_dp:.2e})")
    # P-Tuning v2 (prefix rows through the MLP reparameterisation) beside the split experts
    pt = [*ft, "--finetune", "ptuning", "--prefix_len", "5", "--prefix_projection", "16"]
    train(p("pt_one"), *pt)
    train(p("pt_ep"), *pt, "--devices", pair, "--ep", "2", "--expert_split", "3,1")
    same(f"mixtral P-Tuning v2 (5 rows, projection 16), --ep 2 over {pair} = one cpu", p("pt_one"), p("pt_ep"))
    train(p("lo_r"), "--steps", "20", "--resume", p("lo_ep/ckpt-00000010"), shape=False)
    same("... its --ep 2 checkpoint resumed on one device", p("lo_one"), p("lo_r"), after=10)

    # DeepSeek-V3's shape from a Hugging Face folder (multi-head latent attention, group-limited
    # sigmoid routing with the selection bias, shared experts, a dense first layer), written by the
    # test venv's helpers; fine-tuned with --ep 2, and its checkpoint resumed on one device.
    venv = os.path.join(os.path.dirname(os.path.abspath(mxn)), "test-venv", "bin", "python")
    common = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "common")
    subprocess.run([venv, "-c", f"""
import sys; sys.path.insert(0, {common!r})
from moe_common import deepseek_config, random_weights, write_folder
c = deepseek_config(False); c["vocab_size"] = 256
write_folder({p("ds_hf")!r}, c, random_weights(c, seed=3))"""], check=True)
    ds = ["--model", p("ds_hf"), "--steps", "20", "--ckpt_every", "10"]
    train(p("ds_one"), *ds)
    train(p("ds_ep"), *ds, "--devices", pair, "--ep", "2")
    same(f"DeepSeek-V3 shape (MLA, groups, shared experts) fine-tuned, --ep 2 over {pair} = one cpu",
         p("ds_one"), p("ds_ep"))
    train(p("ds_r"), *ds[2:], "--resume", p("ds_ep/ckpt-00000010"), shape=False)
    same("... its --ep 2 checkpoint resumed on one device", p("ds_one"), p("ds_r"), after=10)

    # Inside pipeline stages (--pp 2 --ep 2 over 4 ranks): each stage's two replicas split its
    # experts (rank = replica x 2 + stage, so cpu,cpu,opencl:0,opencl:0 puts a CPU and the
    # OpenCL device in each stage's group); losses, weights, and resuming both ways.
    pq = [*qwen, "--steps", "20", "--eval_every", "10", "--ckpt_every", "10"]
    train(p("pq_one"), *pq)
    quad = "cpu,cpu,opencl:0,opencl:0" if opencl else "cpu,cpu,cpu,cpu"
    out = train(p("pq"), *pq, "--devices", quad, "--pp", "2", "--ep", "2", "--expert_split", "2,1")
    check("--pp 2 --ep 2: the plan says each stage's replicas split the experts 4 + 2",
          "--ep 2: each 2 replicas of a stage split its MoE layers' experts (2,1; this stage 4, 2)" in out,
          out[-400:])
    same(f"qwen2_moe, --pp 2 --ep 2 over {quad} (4 + 2 experts) = one cpu", p("pq_one"), p("pq"))
    w1, w2 = (read_f32_safetensors(p(f"{r}/ckpt-00000020/model.safetensors")) for r in ("pq_one", "pq"))
    keys = [k for k in w1 if "k_proj.bias" not in k]
    gap = max(float(abs(w1[k] - w2[k]).max() / max(float(abs(w1[k]).max()), 1e-30)) for k in keys)
    check("... its checkpoint: the ordinary layout, whole expert stacks, weights as one cpu's",
          sorted(w1) == sorted(w2) and gap < 1e-5, f"{len(w1)} tensors, worst {gap:.2e} of a tensor's max")
    # auto: each place's chips timed (an expert's GEMM); PoCL, 29x slower, holds no expert (its
    # rows only leaving and coming back) or fewer; on four CPUs about 3 + 3
    out = train(p("pq_auto"), *pq, "--devices", quad, "--pp", "2", "--ep", "2")
    m = re.search(r"\(auto; this stage (\d+), (\d+)\)", out)
    a, b = (int(m.group(1)), int(m.group(2))) if m else (0, 0)
    # (timed: alone PoCL, ~29x slower, gets none or one; a loaded machine's timings can give any
    # split, so only the whole placement is checked, and the losses below)
    check(f"--pp 2 --ep 2 auto over {quad}: the measured placement places every expert once",
          a + b == 6, m.group(0) if m else out[-400:])
    same("... = one cpu", p("pq_one"), p("pq_auto"))
    train(p("pq_r1"), "--steps", "20", "--resume", p("pq/ckpt-00000010"), shape=False)
    same("... resumed on one device", p("pq_one"), p("pq_r1"), after=10)
    train(p("pq_r2"), "--steps", "20", "--resume", p("pq_one/ckpt-00000010"), "--devices", "cpu,cpu,cpu,cpu",
          "--pp", "2", "--ep", "2", "--expert_split", "1,2", shape=False)
    same("one device's checkpoint resumed on --pp 2 --ep 2 (2 + 4 experts)", p("pq_one"), p("pq_r2"), after=10)

    train(p("r1"), *qwen, "--resume", p("ep2/ckpt-00000030"))
    same("the --ep 2 checkpoint resumed on one device", p("one"), p("r1"), after=30)
    train(p("r2"), *qwen, "--resume", p("ep2/ckpt-00000030"), "--devices", "cpu,cpu,cpu,cpu", "--ep", "4")
    same("... and on --ep 4", p("one"), p("r2"), after=30)
    train(p("r3"), *qwen, "--resume", p("one/ckpt-00000030"), "--devices", pair, "--ep", "2", "--expert_split", "2,1")
    same("one device's checkpoint resumed on --ep 2 (4 + 2 experts)", p("one"), p("r3"), after=30)

    bad = ["--out", p("bad")]
    refused("--ep 2 on a dense model", [*bad, "--devices", "cpu,cpu", "--ep", "2", "--arch", "llama"],
            "--ep 2 splits a mixture of experts' experts over ranks; this model is dense")
    refused("--ep 3 on 2 ranks", [*bad, *qwen, "--devices", "cpu,cpu", "--ep", "3"],
            "--ep 3 needs a multiple of 3 ranks; the job has 2")
    refused("a batch smaller than the ranks", [*bad, *qwen, "--devices", "cpu,cpu,cpu", "--ep", "3", "--batch", "2"],
            "the global batch (2 sequences) is smaller than the 3")
    refused("an even split of 5 experts over 2 ranks",
            [*bad, *qwen, "--experts", "5", "--devices", "cpu,cpu", "--ep", "2", "--expert_split", "even"],
            "--expert_split even: the model's 5 experts a layer do not divide evenly over 2 ranks")
    refused("more ranks than experts", [*bad, *qwen, "--experts", "2", "--devices", "cpu,cpu,cpu,cpu", "--ep", "4"],
            "--ep 4: more ranks than the model's 2 experts a layer")
    refused("--expert_split with the wrong count", [*bad, *qwen, "--devices", "cpu,cpu", "--ep", "2", "--expert_split", "1,2,3"],
            "--expert_split '1,2,3' gives 3 weights for --ep 2: expected one a rank")
    refused("--ep with ZeRO-1", [*bad, *qwen, "--devices", "cpu,cpu", "--ep", "2", "--zero", "1"],
            "--ep 2 is not combined with --zero 1 yet")
    refused("--ep 2 with --pp 2 over 6 ranks", [*bad, *qwen, "--devices", "cpu,cpu,cpu,cpu,cpu,cpu", "--pp", "2",
                                                "--ep", "2"],
            "--ep 2 needs a multiple of 2 replicas of each pipeline stage; --pp 2 over 6 ranks has 3")
    refused("--pp --ep with a batch the replicas do not share evenly",
            [*bad, *qwen, "--devices", "cpu,cpu,cpu,cpu", "--pp", "2", "--ep", "2", "--batch", "7"],
            "--ep 2 with --pp 2: the step's 7 sequences and the 14 validation windows must divide evenly over the 2 replicas")

finish()
