"""What the multi-rank training tests share: mpirun's command line, a check that counts, a run's
losses and the worst relative difference between two loss curves, and the closing line."""
import json, os, sys

MPIRUN = ["mpirun", "--oversubscribe", "--bind-to", "none"] + (["--allow-run-as-root"] if os.geteuid() == 0 else [])
counts = {"passed": 0, "failed": 0}


def check(name, ok, detail=""):
    print(f"{'ok' if ok else 'FAIL'} {name}{': ' + detail if detail else ''}")
    counts["passed" if ok else "failed"] += 1


def losses(out, key="loss"):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [r[key] for r in map(json.loads, f) if key in r]


def read_f32_safetensors(path):
    """{name: float32 array} of a safetensors file of f32 tensors (no venv needed here)."""
    import numpy as np
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header, data = json.loads(f.read(n)), f.read()
    return {k: np.frombuffer(data[v["data_offsets"][0]:v["data_offsets"][1]], np.float32).reshape(v["shape"])
            for k, v in header.items() if k != "__metadata__" and v["dtype"] == "F32"}


def worst(ref, got):
    return max(abs(a - b) / abs(a) for a, b in zip(ref, got)) if len(ref) == len(got) else float("inf")


def finish():
    print(f"{counts['passed']} passed, {counts['failed']} failed")
    sys.exit(1 if counts["failed"] else 0)
