#!/usr/bin/python3
"""Surviving faults, under real mpirun on a CPU + OpenCL (PoCL) job supervised by
`mxn train --max-restarts`:
  - FAULTS injected faults in one run: SIGKILL inside a step, inside a gradient all-reduce and
    inside a checkpoint write (MXN_FAULTS failpoints), a rank that hangs (SIGSTOP, found by the
    heartbeat timeout and named), SIGKILL of a random rank at a random moment from outside, and
    a corrupted newest checkpoint. After all of them the job finishes with weights bit-identical to
    an uninterrupted run, every restart resumed from a checkpoint that loaded, and the damaged one
    was named with the one used instead;
  - a device that fails twice without progress is left out, and the job finishes on the other
    (weights within 1e-6 relative of the uninterrupted run's);
  - preemption: SIGTERM to the job stops every rank at one step with a checkpoint and exit 0,
    and `--resume auto` finishes bit-identically;
  - `--resume auto` where a saved device is missing plans for the devices that are there;
  - a full disk (a small tmpfs) during a checkpoint: the write fails with one clear line, the
    previous checkpoint stays loadable, training goes on, and a final checkpoint that cannot be
    written stops the job with exit 1 naming what is left.
usage: fault_test.py PATH/TO/mxn PATH/TO/kjv.bin [FAULTS]
"""
import json, os, random, shutil, signal, subprocess, sys, tempfile, time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "common"))
from train_common import check, finish, read_f32_safetensors  # noqa: E402

MXN, DATA = sys.argv[1], sys.argv[2]
FAULTS = int(sys.argv[3]) if len(sys.argv) > 3 else 20
TINY = ["--n_layer", "1", "--n_head", "2", "--n_embd", "32", "--n_ctx", "32", "--batch", "4",
        "--eval_batches", "2", "--log_every", "1000", "--eval_every", "0", "--data", DATA,
        "--seed", "5", "--dtype", "f32"]
# Two CPU ranks (each on its own core) keep bit-identical replicas, so a restart continues
# exactly; ranks on different chips differ in the last bits of their replicas (drop_device).
JOB = [*TINY, "--devices", "cpu,cpu", "--split", "1,1", "--ckpt_every", "2"]
MIXED = [*TINY, "--devices", "cpu,opencl", "--split", "1,1", "--ckpt_every", "2"]
rng = random.Random(int(os.environ.get("MXN_FAULT_SEED", "14")))


def train(out, *args, env=None, timeout=900):
    e = {**os.environ, **(env or {})}
    return subprocess.run([MXN, "train", "--out", out, *args], capture_output=True, text=True,
                          env=e, timeout=timeout)


def final(out, steps):
    return os.path.join(out, f"ckpt-{steps:08d}", "model.safetensors")


def rel_diff(a, b):
    """The largest tensor-wise relative L2 difference of two weight files."""
    import numpy as np
    ta, tb = read_f32_safetensors(a), read_f32_safetensors(b)
    return max(float(np.linalg.norm(ta[k].astype(np.float64) - tb[k]) / (np.linalg.norm(ta[k]) or 1.0))
               for k in ta)


def restarts(out):
    try:
        with open(os.path.join(out, "metrics.jsonl")) as f:
            return [r for r in map(json.loads, f) if r.get("event") == "restart"]
    except FileNotFoundError:
        return []


def beats(out):
    """Heartbeats of the running attempt: {rank: (pid, step)}."""
    d, got = os.path.join(out, ".heartbeat"), {}
    for name in os.listdir(d) if os.path.isdir(d) else []:
        if name.startswith("rank-") and not name.endswith(".tmp"):
            try:
                what, pid, step = open(os.path.join(d, name)).read().split()
                if what == "run":
                    got[int(name[5:])] = (int(pid), int(step))
            except (OSError, ValueError):
                pass
    return got


def many_faults(tmp, ref, steps):
    """FAULTS faults in one supervised run; the last few from outside the job."""
    out = os.path.join(tmp, "faults")
    kinds = [("kill", "step"), ("kill", "allreduce"), ("kill", "ckpt"), ("hang", "step"),
             ("kill", "allreduce"), ("hang", "allreduce"), ("kill", "ckpt"), ("kill", "step")]
    outside = 4  # random SIGKILLs of a random rank, the last one after corrupting the newest ckpt
    inside = FAULTS - outside
    plan, at = [], 2
    for k in range(inside):  # each well after the one before, so there is progress between
        at += rng.randint(4, 5)
        action, where = kinds[k % len(kinds)]
        if where == "ckpt" and at % 2:  # checkpoints are at even steps
            at += 1
        rank = 0 if where == "ckpt" else rng.randint(0, 1)  # rank 0 writes the checkpoints
        plan.append(f"{k}:{action}:{where}:{at}:{rank}")
    env = {"MXN_FAULTS": ";".join(plan + ["*:sleep=30:compute:1+:0"])}  # steps long enough for a checkpoint
    t0 = time.time()
    p = subprocess.Popen([MXN, "train", "--out", out, *JOB, "--steps", str(steps),
                          "--max-restarts", str(FAULTS + 2), "--hang_timeout", "4"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, **env})
    deadline = time.time() + 1200
    done_outside = 0
    corrupted = None
    while done_outside < outside and p.poll() is None and time.time() < deadline:
        if len(restarts(out)) < inside + done_outside:
            time.sleep(0.05)
            continue
        b = beats(out)
        start = max((s for _, s in b.values()), default=0)
        if len(b) < 2 or start == 0:
            time.sleep(0.05)
            continue
        # Let this attempt make progress past a checkpoint, then kill a rank at a random moment.
        while p.poll() is None and max((s for _, s in beats(out).values()), default=0) < start + 3:
            time.sleep(0.02)
        time.sleep(rng.uniform(0, 0.06))
        last = done_outside == outside - 1
        now = beats(out)
        rank, (pid, _) = (0, now[0]) if last and 0 in now else rng.choice(sorted(now.items()))
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if last:  # rank 0, the writer, is dead: damage the newest checkpoint it left
            with open(os.path.join(out, "latest")) as f:
                corrupted = os.path.join(out, f.read().strip())
            with open(os.path.join(corrupted, "model.safetensors"), "r+b") as f:
                f.seek(200)
                f.write(b"\xde\xad\xbe\xef")
        done_outside += 1
    try:
        so, se = p.communicate(timeout=max(10, deadline - time.time()))
    except subprocess.TimeoutExpired:
        p.kill()
        so, se = p.communicate()
    wall = time.time() - t0
    rs = restarts(out)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        counted = sum(r["step_s"] for r in map(json.loads, f) if "loss" in r)
    # Goodput: wall time on the steps that count (each once, as the final metrics keep them).
    print(f"  goodput: {counted:.1f} s of counted steps in {wall:.1f} s of wall time "
          f"({100 * counted / wall:.1f}%); {wall / max(1, len(rs)):.2f} s per fault")
    check(f"{FAULTS} faults: the job finished", p.returncode == 0 and os.path.exists(final(out, steps)),
          f"exit {p.returncode}, {len(rs)} restarts; stderr tail: {se[-600:]!r}")
    check(f"{FAULTS} faults: as many restarts, each in metrics.jsonl with its cause", len(rs) == FAULTS,
          f"{len(rs)} restarts: " + "; ".join(r["cause"] for r in rs))
    hung = [r for r in rs if "hung" in r["cause"]]
    want_hung = sum(1 for x in plan if ":hang:" in x)
    check("every hung rank was found by its heartbeat and named",
          len(hung) == want_hung and all("no heartbeat" in r["cause"] and
                                         "(cpu:0)" in r["cause"]
                                         for r in hung),
          f"{len(hung)} of {want_hung}: " + "; ".join(r["cause"] for r in hung))
    check("no device was left out (each failed after progress)", all(r["dropped"] == "" for r in rs),
          "; ".join(r["devices"] for r in rs))
    damaged = [l for l in se.splitlines() if "is damaged" in l]
    check("the corrupted newest checkpoint was named and the one before it used",
          corrupted is not None and len(damaged) == 1 and corrupted in damaged[0]
          and "using the one before it" in damaged[0], f"{corrupted}: {damaged}")
    # A checkpoint that fails to load is an error line of a rank (and no restart follows it);
    # "resumed at step" lines are only counted, since mpirun drops a killed job's last output.
    bad = [l for l in se.splitlines() if l.startswith("mxn: error") or "not a checkpoint" in l
           or "corrupt or truncated" in l or "missing tensor" in l]
    check("no checkpoint failed to load", not bad,
          f"{so.count('resumed at step')} 'resumed at step' lines for {FAULTS} restarts; {bad[:3]}")
    if os.path.exists(final(out, steps)):
        same = open(final(out, steps), "rb").read() == open(ref, "rb").read()
        check(f"after {FAULTS} faults the weights are bit-identical to the uninterrupted run's", same,
              f"relative difference {rel_diff(ref, final(out, steps)):.3g}")


def drop_device(tmp, ref, steps):
    out = os.path.join(tmp, "drop")
    env = {"MXN_FAULTS": "0:kill:step:5:1;1:kill:start:0:1"}
    r = train(out, *MIXED, "--steps", str(steps), "--max-restarts", "3", env=env)
    rs = restarts(out)
    ok = (r.returncode == 0 and len(rs) == 2 and rs[1]["dropped"] == "opencl:0"
          and rs[1]["devices"] == "cpu:0" and "opencl:0 left out" in r.stderr)
    check("a device that fails twice without progress is left out; the job ends on the other", ok,
          f"exit {r.returncode}: " + "; ".join(f"{x['cause']} -> {x['devices']}" for x in rs))
    if os.path.exists(final(out, steps)):
        d = rel_diff(ref, final(out, steps))
        # Not 1e-6: the uninterrupted run's two replicas (CPU, OpenCL) already differ in the last
        # bits (their AdamW kernels round differently), and the resumed run goes on from rank 0's.
        check("  its final weights are within 1e-4 relative of the uninterrupted CPU + OpenCL run's",
              d < 1e-4, f"{d:.3g}")


def preempt(tmp, ref, steps):
    out = os.path.join(tmp, "preempt")
    p = subprocess.Popen([MXN, "train", "--out", out, *JOB, "--steps", str(steps)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "MXN_FAULTS": "*:sleep=40:compute:1+:0"})
    while p.poll() is None and max((s for _, s in beats(out).values()), default=0) < 8:
        time.sleep(0.02)
    p.send_signal(signal.SIGTERM)
    so, se = p.communicate(timeout=120)
    line = [l for l in so.splitlines() if "preempted by" in l]
    check("SIGTERM: every rank stops at one step, checkpoints and exits 0 with how to resume",
          p.returncode == 0 and len(line) == 1 and f"--resume auto --out {out}" in line[0],
          f"exit {p.returncode}: {line or se[-300:]}")
    r = train(out, *JOB, "--steps", str(steps), "--resume", "auto")
    same = r.returncode == 0 and open(final(out, steps), "rb").read() == open(ref, "rb").read()
    check("  --resume auto finishes with the uninterrupted run's weights, bit for bit", same,
          f"exit {r.returncode} {r.stderr[-300:]}")


def resume_elsewhere(tmp):
    """--resume auto where a saved device is missing: this binary copied beside no plugins/ folder
    sees the CPU only, as a machine without the OpenCL chip would."""
    out, bare = os.path.join(tmp, "moved"), os.path.join(tmp, "bare")
    os.makedirs(bare)
    shutil.copy(MXN, os.path.join(bare, "mxn"))
    r = train(out, *MIXED, "--steps", "12", "--stop-at", "6")
    r2 = subprocess.run([os.path.join(bare, "mxn"), "train", "--out", out, *TINY, "--steps", "12",
                         "--resume", "auto"], capture_output=True, text=True, timeout=300)
    ok = (r.returncode == 0 and r2.returncode == 0 and "resumed at step 6" in r2.stdout
          and "the saved run used --devices cpu:0,opencl:0; here: cpu:0" in r2.stdout
          and os.path.exists(final(out, 12)))
    check("--resume auto on a machine without a saved device plans for the ones there", ok,
          f"exit {r.returncode}/{r2.returncode}: {(r2.stdout + r2.stderr)[-400:]!r}")


def full_disk(tmp):
    mnt = os.path.join(tmp, "small")
    os.makedirs(mnt)
    # Each checkpoint of this model is about 270 kB; 700 kB hold two, not the third beside them.
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=700k", "tmpfs", mnt],
                      capture_output=True).returncode != 0:
        print("SKIPPED full disk: cannot mount a tmpfs here (needs root); not counted")
        return
    try:
        out = os.path.join(mnt, "run")
        r = train(out, *TINY, "--steps", "12", "--ckpt_every", "2")
        warn = [l for l in r.stderr.splitlines() if "was not written" in l]
        check("full disk: a checkpoint that cannot be written is one clear line, naming the intact one",
              len(warn) >= 1 and "No space left on device" in warn[0] and "is intact" in warn[0]
              and "training goes on" in warn[0], f"{warn[:1] or r.stderr[-300:]}")
        with open(os.path.join(out, "metrics.jsonl")) as f:
            steps = [x["step"] for x in map(json.loads, f) if "loss" in x]
        check("  training went on to the last step", steps == list(range(1, 13)), f"{steps}")
        err = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else ""
        check("  the final checkpoint cannot be skipped: exit 1, naming what is on disk",
              r.returncode == 1 and err.startswith("mxn: error:") and "No space left" in err
              and "the newest checkpoint on disk is" in err, f"exit {r.returncode}: {err!r}")
        left = [d for d in os.listdir(out) if d.startswith("ckpt-")]
        e = subprocess.run([MXN, "eval", "--checkpoint", out, "--data", DATA, "--batch", "4"],
                           capture_output=True, text=True)
        check("  the previous checkpoints are intact and load", e.returncode == 0 and
              all(not d.endswith(".tmp") for d in left), f"{left}; eval exit {e.returncode} {e.stderr[-200:]}")
    finally:
        subprocess.run(["umount", mnt])


def main():
    with tempfile.TemporaryDirectory() as tmp:
        steps = 5 * FAULTS + 24
        r = train(os.path.join(tmp, "ref"), *JOB, "--steps", str(steps))
        if r.returncode != 0:
            print(r.stderr)
            sys.exit(1)
        ref = final(os.path.join(tmp, "ref"), steps)
        t = time.time()
        many_faults(tmp, ref, steps)
        print(f"  ({FAULTS} faults took {time.time() - t:.0f} s)")
        train(os.path.join(tmp, "ref20"), *JOB, "--steps", "20")
        train(os.path.join(tmp, "mixed20"), *MIXED, "--steps", "20")
        drop_device(tmp, final(os.path.join(tmp, "mixed20"), 20), 20)
        preempt(tmp, final(os.path.join(tmp, "ref20"), 20), 20)
        resume_elsewhere(tmp)
        full_disk(tmp)
    finish()


main()
