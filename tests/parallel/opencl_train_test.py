#!/usr/bin/python3
"""The same GPT trained on opencl:0 (PoCL here) and on the CPU: over 30 steps from the same seed
and data, the OpenCL loss stays within 1e-3 relative of the CPU's at every step (f32). Also: the
compiled OpenCL program is cached on disk, and a model too big for the device gets one line
naming the device, the bytes asked for and the bytes free.
usage: opencl_train_test.py PATH/TO/mxn PATH/TO/kjv.bin
"""
import json, os, subprocess, sys, tempfile

mxn, data = sys.argv[1], sys.argv[2]
args = ["--n_layer", "2", "--n_head", "4", "--n_embd", "64", "--n_ctx", "64", "--batch", "8",
        "--steps", "30", "--eval_every", "0", "--eval_batches", "2", "--seed", "11", "--data", data,
        "--dtype", "f32"]
losses = {}
with tempfile.TemporaryDirectory() as tmp:
    env = dict(os.environ, XDG_CACHE_HOME=os.path.join(tmp, "cache"))
    for dev in ("cpu", "opencl:0"):
        out = os.path.join(tmp, dev.replace(":", "_"))
        subprocess.run([mxn, "train", "--device", dev, "--out", out, *args], check=True,
                       stdout=subprocess.DEVNULL, env=env)
        with open(os.path.join(out, "metrics.jsonl")) as f:
            losses[dev] = [json.loads(l)["loss"] for l in f]
    cached = os.listdir(os.path.join(tmp, "cache", "mxn", "opencl"))
    assert len(cached) == 1 and cached[0].endswith(".bin"), cached
    r = subprocess.run([mxn, "train", "--device", "opencl:0", "--n_layer", "8", "--n_embd", "8192",
                        "--n_head", "8", "--n_ctx", "64", "--batch", "1", "--steps", "1", "--data", data,
                        "--out", os.path.join(tmp, "oom")], capture_output=True, text=True, env=env)
    assert r.returncode == 1, (r.returncode, r.stderr)
    assert r.stderr.startswith("mxn: error: opencl:0: out of memory: asked for 25783762944 bytes; "
                               "the device has ") and r.stderr.rstrip().endswith("bytes free"), r.stderr
cpu, ocl = losses["cpu"], losses["opencl:0"]
assert len(cpu) == len(ocl) == 30, (len(cpu), len(ocl))
worst = max(abs(a - b) / abs(b) for a, b in zip(ocl, cpu))
bad = [(i + 1, a, b) for i, (a, b) in enumerate(zip(ocl, cpu)) if abs(a - b) > 1e-3 * abs(b)]
print(f"30 steps: loss {cpu[0]:.4f} -> {cpu[-1]:.4f} on cpu; worst relative gap opencl/cpu {worst:.2e}")
for s, a, b in bad:
    print(f"step {s}: opencl {a:.6f} cpu {b:.6f}")
print(f"{30 - len(bad)} passed, {len(bad)} failed")
sys.exit(1 if bad else 0)
