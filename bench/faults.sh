#!/usr/bin/env bash
# Surviving faults, measured (not a test): (1) what a checkpoint costs a step, written
# asynchronously (--ckpt_async 1: a host copy, then a thread writes it) and synchronously (the
# step waits for the disk), on the small bench GPT (6 x 384, context 256, batch 8, vocab 256,
# 10.8M parameters, 130 MB a checkpoint); (2) the fault harness with 100 injected faults
# (tests/faults/fault_test.py), its goodput. Environment: STEPS (30), FAULTS (100).
set -euo pipefail
cd "$(dirname "$0")/.."
mxn="${BUILD_DIR:-build}/mxn" steps="${STEPS:-30}" faults="${FAULTS:-100}"
tmp="$(mktemp -d -p "${TMPDIR:-/tmp}")"
trap 'rm -rf "$tmp"' EXIT
shape=(--n_layer 6 --n_embd 384 --n_head 6 --n_ctx 256 --batch 8 --vocab_size 256 --eval_every 0
       --log_every 1000 --steps "$steps")
total() {  # seconds of steps 2.. and the checkpoints among them
  /usr/bin/python3 -c "import json,sys; r=[json.loads(l) for l in open(sys.argv[1])]; \
print(sum(x['step_s']+x.get('ckpt_s',0) for x in r if x['step']>1 and 'loss' in x))" "$1"
}
"$mxn" train "${shape[@]}" --ckpt_every 0 --out "$tmp/none" > /dev/null
base=$(total "$tmp/none/metrics.jsonl")
echo "checkpoint cost, GPT 10.8M (130 MB a checkpoint), $steps steps, every 5th step checkpointed; $(nproc) cores; $(df -h "$tmp" | awk 'NR==2{print $1}')"
for async in 1 0; do
  "$mxn" train "${shape[@]}" --ckpt_every 5 --ckpt_async "$async" --out "$tmp/a$async" > /dev/null
  t=$(total "$tmp/a$async/metrics.jsonl")
  /usr/bin/python3 -c "
b,t,n,s=$base,$t,($steps-1)//5,$steps-1
print(f'  ckpt_async $async: {t:.2f} s against {b:.2f} s without checkpoints: a checkpointed step costs {100*(t-b)/n/(b/s):+.1f}% of a step')"
done
echo "fault harness, $faults faults:"
/usr/bin/python3 tests/faults/fault_test.py "$mxn" data/kjv.bin "$faults"
