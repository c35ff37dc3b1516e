#!/usr/bin/python3
"""ZeRO-1 (`mxn train --zero 1`): AdamW's moments sharded over the ranks, each rank's share in
proportion to its device's free memory, under real mpirun.
  - 2 CPU ranks: every loss of 50 steps within 1e-5 of the unsharded run's;
  - CPU + OpenCL: within 1e-3 of the single-CPU run; each rank's optimizer memory is exactly its
    share (8 bytes a parameter), the shares tile the parameters and follow the free memory;
  - the sharded job's checkpoint resumed on one CPU, and an unsharded checkpoint resumed sharded
    on 2 ranks, continue to the same losses;
  - by default (--zero -1) ZeRO-1 is on exactly where the ranks' chips differ: on CPU + OpenCL
    every rank's weights end bit-identical to rank 0's (compared at the end of the run), while
    --zero 0 lets each chip's AdamW drift; two CPU ranks stay unsharded (and identical);
  - a bad --zero value is refused with one line.
usage: zero_test.py PATH/TO/mxn PATH/TO/kjv.bin
"""
import json, os, re, struct, subprocess, sys, tempfile

sys.path[:0] = [os.path.dirname(os.path.abspath(__file__)),
                os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "common")]
from train_common import MPIRUN, check, finish, losses, worst  # noqa: E402

mxn, data = sys.argv[1], sys.argv[2]
base = ["--data", data, "--n_layer", "2", "--n_head", "4", "--n_embd", "64", "--n_ctx", "32",
        "--steps", "50", "--eval_every", "0", "--eval_batches", "2", "--seed", "7", "--threads", "1",
        "--ckpt_every", "30", "--dtype", "f32"]
mpirun = MPIRUN + ["-np", "2"]


def train(out, *extra, launcher=()):
    r = subprocess.run([*launcher, mxn, "train", *base, "--out", out, *extra], check=True,
                       stdout=subprocess.PIPE, text=True, timeout=600)
    return losses(out), r.stdout


def param_count(ckpt):
    with open(os.path.join(ckpt, "model.safetensors"), "rb") as f:
        header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
    n = 0
    for k, v in header.items():
        if k != "__metadata__":
            p = 1
            for d in v["shape"]:
                p *= d
            n += p
    return n


with tempfile.TemporaryDirectory() as tmp:
    ref, _ = train(f"{tmp}/one")
    plain, _ = train(f"{tmp}/plain", "--zero", "0", launcher=mpirun)
    sharded, log = train(f"{tmp}/zero", "--zero", "1", launcher=mpirun)
    check("2 CPU ranks, ZeRO-1 = unsharded", worst(plain, sharded) < 1e-5,
          f"worst relative difference {worst(plain, sharded):.2e} over {len(sharded)} steps")

    resumed, _ = train(f"{tmp}/plain", "--zero", "1", "--resume", f"{tmp}/plain/ckpt-00000030",
                       launcher=mpirun)
    check("an unsharded checkpoint resumed sharded on 2 ranks", worst(plain[30:], resumed[30:]) < 1e-5,
          f"{worst(plain[30:], resumed[30:]):.2e}")

    if "opencl:0" in subprocess.run([mxn, "devices"], stdout=subprocess.PIPE, text=True).stdout:
        mixed, log = train(f"{tmp}/mixed", "--devices", "cpu,opencl:0", "--zero", "1")
        check("CPU + OpenCL with ZeRO-1 = one CPU", worst(ref, mixed) < 1e-3, f"{worst(ref, mixed):.2e}")
        line = re.search(r"optimizer state sharded \(ZeRO-1, by free memory\):(.*)", log).group(1)
        shares = [(int(a), int(b), int(c)) for a, b, c in
                  re.findall(r"params \[(\d+), (\d+)\), (\d+) bytes of moments", line)]
        free = [float(x) for x in re.findall(r"per pass \(([0-9.]+) GiB free\)", log)]
        P = param_count(f"{tmp}/mixed/ckpt-00000050")
        check("each rank's optimizer memory is its share",
              len(shares) == 2 and all(c == 8 * (b - a) for a, b, c in shares), str(shares))
        check("the shares tile the parameters", shares[0][0] == 0 and shares[0][1] == shares[1][0]
              and shares[1][1] == P, f"{shares} of {P}")
        want = free[0] / sum(free)
        check("shares follow free memory", abs(shares[0][1] / P - want) < 0.05,
              f"rank 0 holds {shares[0][1] / P:.3f}, free memory says {want:.3f}")
        again, _ = train(f"{tmp}/mixed", "--resume", f"{tmp}/mixed/ckpt-00000030")
        check("the sharded checkpoint resumed on one CPU", worst(ref[30:], again[30:]) < 1e-3,
              f"{worst(ref[30:], again[30:]):.2e}")

    # The default on two CPU ranks: the same chip, so no sharding, and the replicas agree anyway.
    same, log = train(f"{tmp}/same", launcher=mpirun)
    check("2 CPU ranks: unsharded by default", "optimizer state sharded" not in log
          and worst(plain, same) < 1e-6, f"{worst(plain, same):.2e}")
    check("2 CPU ranks: replicas bit-identical", "bit-identical to rank 0's" in log,
          next((l for l in log.splitlines() if l.startswith("replicas:")), "no replicas line"))

    if "opencl:0" in subprocess.run([mxn, "devices"], stdout=subprocess.PIPE, text=True).stdout:
        auto, log = train(f"{tmp}/auto", "--devices", "cpu,opencl:0")
        # (the shares follow each run's free memory, so the sums round a little differently)
        check("CPU + OpenCL: ZeRO-1 on by default, = --zero 1",
              "on by default: the ranks' chips differ" in log and worst(mixed, auto) < 1e-6,
              f"{worst(mixed, auto):.2e}")
        check("CPU + OpenCL: every rank's weights bit-identical to rank 0's after 50 steps",
              "replicas: every rank's weights bit-identical to rank 0's" in log,
              next((l for l in log.splitlines() if l.startswith("replicas:")), "no replicas line"))
        drift, log = train(f"{tmp}/drift", "--devices", "cpu,opencl:0", "--zero", "0")
        m = re.search(r"replicas: weights differ from rank 0's by up to ([0-9.e+-]+)", log)
        check("CPU + OpenCL with --zero 0: the replicas drift", m is not None and float(m.group(1)) > 0,
              m.group(0) if m else log[-300:])

    r = subprocess.run([mxn, "train", *base, "--out", f"{tmp}/bad", "--zero", "2"],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = r.stderr.strip().splitlines()
    check("--zero 2 is refused with one line", r.returncode != 0 and len(lines) == 1
          and "zero = 2, expected 0, 1 or -1" in lines[0], r.stderr.strip())

finish()
