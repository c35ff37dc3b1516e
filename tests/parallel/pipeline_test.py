#!/usr/bin/python3
"""Pipeline parallelism (`mxn train --pp N --stages ...`) equals single-device training on the same
global batch: every step's loss within 1e-3 relative over 50 steps (f32), under real mpirun.
  - 2 stages of 3 and 1 layers (GPT-2, tied embeddings: the first and last stage share them);
  - 3 stages of 1, 2 and 1 layers;
  - 2 stages x 2 replicas over CPU + OpenCL (`--devices cpu,opencl:0,cpu,opencl:0`), when the
    OpenCL backend is built;
  - a LLaMA-shaped model (untied, GQA) over 2 even stages;
  - a mixture of experts (Qwen2-MoE: shared expert, the Switch load-balancing loss and DeepSeek's
    router-bias update) over 2 and 3 stages: each stage's MoE layers add their share of the aux
    loss (seeding their own backward) and count their experts' load, so losses, validation
    losses (within 1e-6) and every layer's expert_load equal one device's;
  - the 2-stage run's checkpoint resumed on the other split (1 and 3 layers) and on one device;
  - `mxn plan --layout ... --out plan.json` then `mxn train --plan plan.json` runs that layout;
  - bad pipeline settings refused naming what was wrong.
usage: pipeline_test.py PATH/TO/mxn PATH/TO/kjv.bin
"""
import json, os, subprocess, sys, tempfile

sys.path[:0] = [os.path.dirname(os.path.abspath(__file__)),
                os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "common")]
from train_common import MPIRUN, check, finish, losses, worst  # noqa: E402

mxn, data = sys.argv[1], sys.argv[2]
base = ["--data", data, "--n_layer", "4", "--n_head", "4", "--n_embd", "64", "--n_ctx", "32",
        "--steps", "50", "--eval_every", "25", "--eval_batches", "2", "--seed", "7", "--threads", "1",
        "--ckpt_every", "30", "--dtype", "f32"]
mpirun = MPIRUN


def train(out, *extra, launcher=()):
    subprocess.run([*launcher, mxn, "train", *base, "--out", out, *extra], check=True,
                   stdout=subprocess.PIPE, text=True, timeout=600)
    return losses(out), losses(out, "val_loss")


def same(name, ref, got, tol=1e-3):
    w = max(worst(ref[0], got[0]), worst(ref[1], got[1]))
    check(name, w < tol, f"worst relative difference {w:.2e} over {len(got[0])} steps, "
          f"{len(got[1])} validations")


def refused(name, args, want, launcher=()):
    r = subprocess.run([*launcher, mxn, "train", *base, *args], stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, text=True, timeout=300)
    lines = [l for l in r.stderr.splitlines() if l.startswith("mxn: error")]
    check(name, r.returncode != 0 and want in r.stderr, lines[0] if lines else r.stderr.strip())


with tempfile.TemporaryDirectory() as tmp:
    ref = train(f"{tmp}/one")
    same("2 stages (3 + 1 layers)", ref,
         train(f"{tmp}/pp2", "--pp", "2", "--stages", "3,1", launcher=mpirun + ["-np", "2"]))
    same("3 stages (1 + 2 + 1 layers)", ref,
         train(f"{tmp}/pp3", "--pp", "3", "--stages", "1,2,1", launcher=mpirun + ["-np", "3"]))
    if "opencl:0" in subprocess.run([mxn, "devices"], stdout=subprocess.PIPE, text=True).stdout:
        same("2 stages x 2 replicas over CPU + OpenCL", ref,
             train(f"{tmp}/ppdp", "--pp", "2", "--devices", "cpu,opencl:0,cpu,opencl:0"))

    # mxn plan --layout ... --out plan.json, then mxn train --plan plan.json runs that layout.
    with open(f"{tmp}/one/ckpt-00000050/trainer.json") as f:
        model = json.load(f)["model"]
    with open(f"{tmp}/model.json", "w") as f:
        json.dump(model, f)
    cluster = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "examples", "cluster-small.toml")
    subprocess.run([mxn, "plan", "--cluster", cluster, "--model", f"{tmp}/model.json", "--global-batch", "16",
                    "--seq", "32", "--layout", "cpu:0@1+cpu:0@3", "--micro-batch", "4", "--out", f"{tmp}/plan.json"],
                   check=True, stdout=subprocess.PIPE)
    got = train(f"{tmp}/planned", "--plan", f"{tmp}/plan.json")
    with open(f"{tmp}/planned/ckpt-00000050/trainer.json") as f:
        saved = json.load(f)["config"]
    check("mxn train --plan runs the plan's layout", (saved["pp"], saved["stages"], saved["micro"], saved["devices"])
          == (2, "1,3", 4, "cpu:0,cpu:0"), str((saved["pp"], saved["stages"], saved["micro"], saved["devices"])))
    same("... with the single-device losses", ref, got)

    llama = ["--arch", "llama", "--n_kv_head", "2"]
    same("LLaMA-shaped, 2 even stages", train(f"{tmp}/llama1", *llama),
         train(f"{tmp}/llama2", *llama, "--pp", "2", launcher=mpirun + ["-np", "2"]))

    # A mixture of experts: the aux loss is a statistic of a pass's tokens, so the pipeline's one
    # micro-batch a step (--micro 8) meets one device's one pass of the same 8 sequences.
    moe = ["--arch", "qwen2_moe", "--n_layer", "3", "--n_kv_head", "2", "--experts", "6", "--top_k", "2",
           "--moe_ffn", "32", "--shared_ffn", "48", "--router_aux_coef", "0.01", "--router_bias_update", "0.001",
           "--batch", "8", "--eval_batches", "1", "--steps", "20", "--eval_every", "10"]
    moe_ref = train(f"{tmp}/moe1", *moe)
    for n in (2, 3):
        same(f"Qwen2-MoE with the aux loss and router-bias balancing, {n} stages", moe_ref,
             train(f"{tmp}/moe{n}", *moe, "--pp", str(n), "--micro", "8", launcher=mpirun + ["-np", str(n)]), 1e-6)
        loads = [[json.loads(l)["expert_load"] for l in open(f"{tmp}/moe{k}/metrics.jsonl")] for k in (1, n)]
        check(f"... every layer's expert load, each step, as one device's ({n} stages)", loads[0] == loads[1],
              f"{len(loads[0][0])} layers; step 20 {loads[1][-1]}")

    tail = (ref[0][30:], ref[1][1:])
    got = train(f"{tmp}/pp2", "--pp", "2", "--stages", "1,3", "--resume", f"{tmp}/pp2/ckpt-00000030",
                launcher=mpirun + ["-np", "2"])
    same("resumed on another split (1 + 3 layers)", tail, (got[0][30:], got[1][1:]))
    got = train(f"{tmp}/pp2", "--resume", f"{tmp}/pp2/ckpt-00000030")
    same("resumed on one device", tail, (got[0][30:], got[1][1:]))

    with open(f"{tmp}/bad.json", "w") as f:
        f.write('{"kinds": []}')
    refused("a plan file without replicas", ["--out", f"{tmp}/bad", "--plan", f"{tmp}/bad.json"],
            f"plan '{tmp}/bad.json': no \"kinds\" of replicas (expected a plan written by mxn plan --out)")
    np2 = mpirun + ["-np", "2"]
    refused("--pp 3 on 2 ranks", ["--out", f"{tmp}/bad", "--pp", "3"], "--pp 3 needs a multiple of 3 ranks; the job has 2", np2)
    refused("stages that do not sum to the layers", ["--out", f"{tmp}/bad", "--pp", "2", "--stages", "2,3"],
            "stages '2,3': expected 2 positive layer counts (one a stage) that sum to the model's 4 layers", np2)
    refused("--pp with GLM's objective", ["--out", f"{tmp}/bad", "--pp", "2", "--objective", "glm"],
            "--pp 2 trains every weight on next-token prediction for now", np2)

finish()
