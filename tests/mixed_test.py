#!/usr/bin/python3
"""Mixed-chip and multi-rank training equals single-device training on the same global batch:
every step's loss within 1e-3 relative over 50 steps (f32), under real mpirun.
  - 4 CPU ranks (mpirun -np 4) against 1 rank;
  - a deliberately uneven split (global batch 7 over 2 ranks: 4 and 3 sequences);
  - CPU + OpenCL through `mxn train --devices cpu,opencl:0` (mxn starts mpirun itself), when the
    OpenCL backend is built.
usage: mixed_test.py PATH/TO/mxn PATH/TO/kjv.bin
"""
import json, os, subprocess, sys, tempfile

mxn, data = sys.argv[1], sys.argv[2]
base = ["--data", data, "--n_layer", "2", "--n_head", "4", "--n_embd", "64", "--n_ctx", "32",
        "--steps", "50", "--eval_every", "0", "--eval_batches", "2", "--seed", "7", "--threads", "1"]
mpirun = ["mpirun", "--oversubscribe", "--bind-to", "none"] + (["--allow-run-as-root"] if os.geteuid() == 0 else [])
failed = passed = 0


def losses(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(l)["loss"] for l in f]


def train(out, *extra, launcher=()):
    subprocess.run([*launcher, mxn, "train", *base, "--out", out, *extra], check=True,
                   stdout=subprocess.DEVNULL, timeout=600)
    return losses(out)


def compare(name, ref, got):
    global failed, passed
    assert len(ref) == len(got) == 50, (name, len(ref), len(got))
    bad = [(i + 1, a, b) for i, (a, b) in enumerate(zip(got, ref)) if abs(a - b) > 1e-3 * abs(b)]
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
    one7 = train(p("one7"), "--batch", "7")
    compare("uneven 4+3 over 2 ranks = 1 rank (batch 7)", one7, train(p("uneven"), "--batch", "7", launcher=[*mpirun, "-np", "2"]))
    r = subprocess.run([mxn, "devices"], capture_output=True, text=True)
    if "opencl:0" in r.stdout:
        compare("cpu + opencl:0 = cpu (batch 8)", one8, train(p("mixed"), "--batch", "8", "--devices", "cpu,opencl:0"))
print(f"{passed} passed, {failed} failed")
sys.exit(1 if failed else 0)
