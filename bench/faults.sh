#!/usr/bin/env bash
# Surviving faults, measured (not a test): (1) what a checkpoint costs a step, written
# asynchronously (--ckpt_async 1: a host copy, then a thread writes it) and synchronously (the
# step waits for the disk), on the small bench GPT (6 x 384, context 256, batch 8, vocab 256,
# 10.8M parameters, 130 MB a checkpoint), every 4th step; (2) the fault harness with 100 injected faults
# (tests/parallel/fault_test.py), its goodput. Environment: STEPS (42), FAULTS (100; 0: only the checkpoint cost).
set -euo pipefail
cd "$(dirname "$0")/.."
mxn="${BUILD_DIR:-build}/mxn" steps="${STEPS:-42}" faults="${FAULTS:-100}"
tmp="$(mktemp -d -p "${TMPDIR:-/tmp}")"
trap 'rm -rf "$tmp"' EXIT
shape=(--n_layer 6 --n_embd 384 --n_head 6 --n_ctx 256 --batch 8 --vocab_size 256 --eval_every 0
       --log_every 1000 --steps "$steps" --dtype f32)
echo "checkpoint cost, GPT 10.8M (130 MB a checkpoint), $steps steps, every 4th checkpointed; $(nproc) cores; $(df -h "$tmp" | awk 'NR==2{print $1}')"
# The third run leaves the writer a core of its own (one training thread), as a GPU host has.
for async in 1 0 "1 --threads 1"; do
  # shellcheck disable=SC2086
  "$mxn" train "${shape[@]}" --ckpt_every 4 --ckpt_async $async --out "$tmp/a${async// /}" > /dev/null
  # A checkpoint's cost: its own time in the loop (ckpt_s) plus how much the next step (which
  # the asynchronous write overlaps) ran over the median step of the same run; median of them.
  /usr/bin/python3 - "$tmp/a${async// /}/metrics.jsonl" "$async" <<'PY'
import json, statistics, sys
r = {x["step"]: x for x in map(json.loads, open(sys.argv[1])) if "loss" in x}
ck = [s for s in r if "ckpt_s" in r[s] and s + 1 in r and s > 1]
plain = statistics.median(r[s]["step_s"] for s in r if s > 1 and s not in ck and s - 1 not in ck)
cost = statistics.median(r[s]["ckpt_s"] + r[s + 1]["step_s"] - plain for s in ck)
print(f"  ckpt_async {sys.argv[2]}: a step {plain:.3f} s; a checkpoint adds {cost:.3f} s "
      f"({100 * cost / plain:+.1f}% of a step; median of {len(ck)})")
PY
done
((faults > 0)) || exit 0  # FAULTS=0: the checkpoint cost alone
echo "fault harness, $faults faults:"
/usr/bin/python3 tests/parallel/fault_test.py "$mxn" data/kjv.bin "$faults"
