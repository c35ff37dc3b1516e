#!/usr/bin/python3
"""Mixed-chip and multi-rank training equals single-device training on the same global batch:
every step's loss within 1e-3 relative over 50 steps (f32), under real mpirun.
  - 4 CPU ranks (mpirun -np 4) against 1 rank;
  - a deliberately uneven split (global batch 7 over 2 ranks: 4 and 3 sequences);
  - a split fixed by hand (--split 3,1) and gradient accumulation over 3 ranks (8 rows in passes);
  - a step-time drift (one rank slowed down from step 10) that the split must follow;
  - CPU + OpenCL through `mxn train --devices cpu,opencl:0` (mxn starts mpirun itself), when the
    OpenCL backend is built; then a checkpoint of that job resumed on 3 CPU ranks; the same for
    a LLaMA-shaped and a GLM-shaped (ChatGLM layout) model, GLM's objective, and LoRA adapters
    and P-Tuning v2 prefixes on a frozen LLaMA base (the adapters themselves within 1e-3 too);
  - a rank killed with SIGKILL: the job stops within seconds naming the rank, its device and the
    last checkpoint, and `--resume` on the remaining device continues to the same losses.
usage: mixed_test.py PATH/TO/mxn PATH/TO/kjv.bin
"""
import json, os, re, signal, subprocess, sys, tempfile, time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "common"))
from train_common import read_f32_safetensors  # noqa: E402

mxn, data = sys.argv[1], sys.argv[2]
base = ["--data", data, "--n_layer", "2", "--n_head", "4", "--n_embd", "64", "--n_ctx", "32",
        "--steps", "50", "--eval_every", "0", "--eval_batches", "2", "--seed", "7", "--threads", "1", "--dtype", "f32"]
mpirun = ["mpirun", "--oversubscribe", "--bind-to", "none"] + (["--allow-run-as-root"] if os.geteuid() == 0 else [])
failed = passed = 0


def losses(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(l)["loss"] for l in f]


def train(out, *extra, launcher=(), env=None, flags=None):
    r = subprocess.run([*launcher, mxn, "train", *(base if flags is None else flags), "--out", out, *extra], check=True,
                       stdout=subprocess.PIPE, text=True, timeout=600, env=env)
    train.log = r.stdout
    return losses(out)


def check(name, ok, detail=""):
    global failed, passed
    print(f"{'ok' if ok else 'FAIL'} {name}{': ' + detail if detail else ''}")
    failed += not ok
    passed += bool(ok)


def rank_pid(out, rank):
    """The pid of the rank process of the job writing to `out`."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().split(b"\0")
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except OSError:
            continue
        if out.encode() in cmd and f"OMPI_COMM_WORLD_RANK={rank}".encode() in env:
            return int(pid)
    return None


def ctrl_c(tmp):
    """Ctrl-C (SIGINT to the terminal's process group) stops a cpu+opencl job with a checkpoint."""
    out = os.path.join(tmp, "interrupted")
    p = subprocess.Popen([mxn, "train", *base, "--batch", "8", "--out", out, "--steps", "100000",
                          "--devices", "cpu,opencl:0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, start_new_session=True)
    deadline = time.time() + 120
    while not os.path.exists(os.path.join(out, "metrics.jsonl")) and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(p.pid, signal.SIGINT)
    try:
        so, se = p.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        check("Ctrl-C stops a 2-rank job", False, "still running 60 s after SIGINT")
        return
    step = int(so.split("stopped at step ")[1].split(";")[0]) if "stopped at step " in so else -1
    latest = open(os.path.join(out, "latest")).read().strip() if os.path.exists(os.path.join(out, "latest")) else ""
    check("Ctrl-C stops a 2-rank job with a checkpoint, exit 130", p.returncode == 130 and latest == f"ckpt-{step:08d}",
          f"exit {p.returncode}, stopped at step {step}, latest {latest!r} {se.strip()[-300:]}")


def kill_rank_and_resume(tmp, ref):
    """SIGKILL rank 1 (opencl:0) of a cpu+opencl job after its first checkpoint."""
    out = os.path.join(tmp, "killed")
    env = dict(os.environ, MXN_FAULTS="*:sleep=1500:ckpt:*:*")
    p = subprocess.Popen([mxn, "train", *base, "--batch", "8", "--out", out, "--ckpt_every", "10",
                          "--devices", "cpu,opencl:0"], stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 120
    while not os.path.exists(os.path.join(out, "latest")) and time.time() < deadline:
        time.sleep(0.05)
    pid = rank_pid(out, 1)
    if pid is None:
        p.kill()
        check("a killed rank stops the job", False, "rank 1 not found")
        return
    os.kill(pid, signal.SIGKILL)
    t0 = time.time()
    try:
        _, err = p.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        p.kill()
        check("a killed rank stops the job", False, "still running 60 s after the kill")
        return
    took = time.time() - t0
    with open(os.path.join(out, "latest")) as f:
        latest = f.read().strip()
    last = err.strip().splitlines()[-1] if err.strip() else ""
    ok = (p.returncode != 0 and took < 10 and "rank 1 (opencl:0) died" in last
          and latest in last and "--devices cpu:0" in last and "-----" not in err
          and f"MXN_DEVICES=cpu:0 sbatch --ntasks 1 examples/slurm/train.sbatch --resume {out}" in last)
    check("SIGKILL of rank 1 stops the job", ok, f"{took:.1f} s after the kill, exit {p.returncode}: {last!r}")
    train(out, "--resume", out, "--devices", "cpu")
    compare(f"resumed from {latest} on the remaining cpu = cpu", ref, losses(out))


def compare(name, ref, got, tol=1e-3):
    global failed, passed
    assert len(ref) == len(got) == 50, (name, len(ref), len(got))
    bad = [(i + 1, a, b) for i, (a, b) in enumerate(zip(got, ref)) if abs(a - b) > tol * abs(b)]
    worst = max(abs(a - b) / abs(b) for a, b in zip(got, ref))
    print(f"{'FAIL' if bad else 'ok'} {name}: 50 steps, loss {ref[0]:.4f} -> {ref[-1]:.4f}, worst relative gap {worst:.2e}")
    for s, a, b in bad[:5]:
        print(f"   step {s}: {a:.6f} vs {b:.6f}")
    failed += bool(bad)
    passed += not bad


with tempfile.TemporaryDirectory() as tmp:
    p = lambda n: os.path.join(tmp, n)
    one8 = train(p("one8"), "--batch", "8")
    compare("4 CPU ranks = 1 rank (batch 8)", one8, train(p("four"), "--batch", "8", launcher=[*mpirun, "-np", "4"]))
    compare("4 CPU ranks, 10 KB gradient buckets = 1 rank", one8, train(p("buckets"), "--batch", "8", "--bucket_mb", "0.01", launcher=[*mpirun, "-np", "4"]))
    check("small buckets: many all-reduces overlap the backward", "gradients in 1 buckets" not in train.log and " buckets of up to 0.01 MB" in train.log,
          next((l.strip() for l in train.log.splitlines() if "gradients in" in l), "no bucket line"))
    one7 = train(p("one7"), "--batch", "7")
    compare("uneven 4+3 over 2 ranks = 1 rank (batch 7)", one7, train(p("uneven"), "--batch", "7", "--split", "even", launcher=[*mpirun, "-np", "2"]))
    compare("split 3,1 (6+2) over 2 ranks = 1 rank (batch 8)", one8, train(p("w31"), "--batch", "8", "--split", "3,1", launcher=[*mpirun, "-np", "2"]))
    acc = train(p("acc1"), "--batch", "4", "--accum", "2")
    compare("accum 2 x batch 4 over 3 ranks = 1 rank", acc, train(p("acc3"), "--batch", "4", "--accum", "2", launcher=[*mpirun, "-np", "3"]))
    slow = dict(os.environ, MXN_FAULTS="*:sleep=40:compute:10+:1")  # rank 1, from step 10, 40 ms a step
    compare("rank 1 slowed from step 10 (drift) = 1 rank", one8, train(p("drift"), "--batch", "8", launcher=[*mpirun, "-np", "2"], env=slow))
    # "rebalanced after step S: rows a->b c->d (...)": rank 1 must give rows away after step 10.
    moved = [l for l in train.log.splitlines() if l.startswith("rebalanced")]
    def rank1_gives(l):
        step = int(l.split("step ")[1].split(":")[0])
        old, new = map(int, l.split("rows ")[1].split()[1].split("->"))
        return step >= 10 and new < old
    check("the split follows the drift (rank 1 gives rows away)", any(map(rank1_gives, moved)), "; ".join(moved) or "no rebalance")
    r = subprocess.run([mxn, "devices"], capture_output=True, text=True)
    if "opencl:0" in r.stdout:
        compare("cpu + opencl:0 = cpu (batch 8)", one8, train(p("mixed"), "--batch", "8", "--devices", "cpu,opencl:0"))
        plan = [l.strip() for l in train.log.splitlines() if "rank " in l and "sequences (" in l or l.startswith("plan:")]
        check("the plan names each rank's device, share and times", len(plan) == 3 and "cpu:0" in plan[0] and "opencl:0" in plan[1], " | ".join(plan))
        train(p("moved"), "--batch", "8", "--devices", "cpu,opencl:0", "--stop-at", "20")
        compare("cpu+opencl to step 20, resumed on 3 CPU ranks = cpu", one8,
                train(p("moved"), "--resume", p("moved"), "--devices", "", launcher=[*mpirun, "-np", "3"]))
        kill_rank_and_resume(tmp, one8)
        r = subprocess.run([mxn, "train", *base, "--batch", "8", "--out", p("dry"), "--devices", "all", "--dry-run"],
                           capture_output=True, text=True, timeout=300)
        ranks = [l.split()[2] for l in r.stdout.splitlines() if l.strip().startswith("rank ") and "sequences (" in l]
        pocl = "pthread" in subprocess.run([mxn, "devices"], stdout=subprocess.PIPE, text=True).stdout
        # PoCL computes on the CPU's own cores: `all` leaves it out (adding it makes the job slower).
        want = [] if pocl else ["cpu:0", "opencl:0"]
        left = "opencl:0 left out of --devices all: it computes on cpu:0's cores" in r.stdout
        check("--devices all --dry-run: every device that adds speed, nothing written",
              r.returncode == 0 and ranks == want and left == pocl and not os.path.exists(p("dry")),
              f"ranks {ranks}, PoCL left out: {left}, exit {r.returncode}")
        # bf16 matmuls: the CPU's bf16 GEMM and OpenCL's (rounded operands, f32 GEMM) sum in
        # different orders, so the trajectories part a little more than in f32.
        bf = train(p("bf_one"), "--batch", "8", "--dtype", "bf16")
        compare("bf16: cpu + opencl:0 = cpu (within 2e-3)", bf, train(p("bf_mixed"), "--batch", "8", "--dtype", "bf16", "--devices", "cpu,opencl:0"), tol=2e-3)
        # --dtype auto: each rank times the model's GEMM in f32 and with bf16 operands and takes
        # bf16 where it is at least 10% faster; the run is then the chosen dtype's, loss for loss.
        auto = train(p("auto"), "--batch", "8", "--split", "7,1", "--dtype", "auto", "--devices", "cpu,opencl:0")
        m = re.search(r"dtype (f32|bf16) \(auto: a \d+x\d+x\d+ GEMM took ([0-9.]+) ms in f32 and "
                      r"([0-9.]+) ms with bf16 operands\)", train.log)
        ranks = re.findall(r"rank (\d) (\S+) (f32|bf16) ", train.log)
        check("--dtype auto: rank 0 chose by its measured GEMM times, every rank's choice shown",
              m is not None and (m.group(1) == "bf16") == (float(m.group(3)) < 0.9 * float(m.group(2)))
              and len(ranks) == 2 and ranks[0][2] == m.group(1), train.log[:600])
        # One chip: one choice; and auto is the default (no --dtype given).
        one = train(p("auto_one"), "--batch", "8", flags=[a for a in base if a not in ("--dtype", "f32")])
        m = re.search(r"dtype (f32|bf16) \(auto:", train.log)
        if m:
            compare(f"--dtype auto = --dtype {m.group(1)} (one CPU)", train(p("auto_" + m.group(1)),
                    "--batch", "8", "--dtype", m.group(1)), one, tol=1e-7)
        else:
            check("--dtype auto on one CPU says what it chose", False, train.log[:400])
        # The same machinery for every family: LLaMA-shaped (RMSNorm, RoPE, SwiGLU, GQA) and
        # GLM-shaped (ChatGLM's fused qkv, interleaved partial RoPE, multi-query groups).
        for arch in ("llama", "chatglm"):
            fam = ["--arch", arch, "--n_kv_head", "2", "--batch", "8"]
            compare(f"{arch}: cpu + opencl:0 = cpu (batch 8)", train(p(arch + "_one"), *fam),
                    train(p(arch + "_mixed"), *fam, "--devices", "cpu,opencl:0"))
        # A mixture of experts (routing, the permutations, grouped GEMMs and a shared expert on each
        # chip's own kernels), balanced without an aux loss: the loads are summed over the ranks,
        # so every rank moves the routers' biases alike. (The Switch aux loss is a statistic of
        # each pass's tokens, so a split changes it: it is not used here.)
        moe = ["--arch", "qwen2_moe", "--experts", "6", "--top_k", "2", "--moe_ffn", "32", "--shared_ffn", "48",
               "--n_kv_head", "2", "--batch", "8", "--router_aux_coef", "0", "--router_bias_update", "0.001"]
        compare("qwen2_moe: cpu + opencl:0 = cpu (batch 8)", train(p("moe_one"), *moe),
                train(p("moe_mixed"), *moe, "--devices", "cpu,opencl:0"))
        # GLM's blank infilling: rows are sampled from (seed, row) and the loss is weighted by
        # each pass's Part B tokens, so any split of the rows gives the single-device run.
        glm = ["--arch", "glm", "--n_kv_head", "2", "--batch", "8", "--objective", "glm", "--gmask", "0.3"]
        compare("glm objective: cpu + opencl:0 = cpu (batch 8)", train(p("glmobj_one"), *glm),
                train(p("glmobj_mixed"), *glm, "--devices", "cpu,opencl:0"))
        # LoRA: only the adapters' gradients are reduced; a LLaMA base made here (a short run,
        # converted to a Hugging Face folder) stays frozen on both chips.
        train(p("lora_pre"), "--arch", "llama", "--n_kv_head", "2", "--batch", "8", "--steps", "20")
        subprocess.run([mxn, "convert", p("lora_pre"), p("lora_base")], check=True, stdout=subprocess.DEVNULL)
        # with LoRA dropout: the masks are a function of (seed, step, row), so they agree too
        lora = ["--model", p("lora_base"), "--finetune", "lora", "--lora_r", "4", "--batch", "8", "--lr", "3e-3",
                "--lora_dropout", "0.1"]
        compare("lora: cpu + opencl:0 = cpu (batch 8)", train(p("lora_one"), *lora),
                train(p("lora_mixed"), *lora, "--devices", "cpu,opencl:0"))
        a, b = (read_f32_safetensors(os.path.join(p(n), "ckpt-00000050", "adapter_model.safetensors")) for n in ("lora_one", "lora_mixed"))
        gap = max(float(abs(a[k] - b[k]).max() / abs(a[k]).max()) for k in a)
        check("lora: the adapter trained on cpu + opencl:0 equals the cpu one within 1e-3",
              sorted(a) == sorted(b) and len(a) == 8 and gap < 1e-3, f"{len(a)} tensors, worst relative gap {gap:.2e}")
        pt = ["--model", p("lora_base"), "--finetune", "ptuning", "--prefix_len", "4", "--batch", "8", "--lr", "3e-3"]
        compare("ptuning: cpu + opencl:0 = cpu (batch 8)", train(p("pt_one"), *pt),
                train(p("pt_mixed"), *pt, "--devices", "cpu,opencl:0"))
        a, b = (read_f32_safetensors(os.path.join(p(n), "ckpt-00000050", "adapter_model.safetensors")) for n in ("pt_one", "pt_mixed"))
        gap = float(abs(a["prompt_embeddings"] - b["prompt_embeddings"]).max() / abs(a["prompt_embeddings"]).max())
        check("ptuning: the prefix trained on cpu + opencl:0 equals the cpu one within 1e-3", gap < 1e-3, f"worst relative gap {gap:.2e}")
        ctrl_c(tmp)
print(f"{passed} passed, {failed} failed")
sys.exit(1 if failed else 0)
