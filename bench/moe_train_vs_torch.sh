#!/usr/bin/env bash
# Training a small mixture of experts, mxn against PyTorch on the same cores in one run: a
# Qwen3-MoE shape (4 layers, width 256, 4 heads / 2 kv heads, 8 experts, top-2, expert width 512,
# context 256, batch 8, vocab 256), f32, AdamW with clipping and the load-balancing loss (0.001).
# The peer: transformers' own Qwen3MoeForCausalLM in the newest torch and transformers from PyPI
# (the bench venv build/bench-torch, made here when missing), eager and torch.compile'd
# (bench/torch_moe.py). The runs alternate; each figure is the median step after two warm-ups.
# Prints tokens/s of each, the ratios, and each one's model-FLOP utilisation against oneDNN's f32
# GEMM rate at the experts' shape measured at the start (`mxn bench gemm`): 6 FLOPs a token per
# weight that multiplies it (the routed experts' K of E, the router, the attention projections,
# the head) and 12 L C T for attention. Last 'mxn/fastest torch (moe): X'.
# Not a test: timings are noisy. Run scripts/setup first.
# Environment: STEPS (4), THREADS (all cores), COMPILE (1), BUILD_DIR (build).
set -euo pipefail
cd "$(dirname "$0")/.."
steps="${STEPS:-4}" threads="${THREADS:-$(nproc)}" mxn="${BUILD_DIR:-build}/mxn"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
venv=build/bench-torch
if [[ ! -x $venv/bin/python ]] || ! "$venv/bin/python" -c 'import transformers' 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q torch numpy transformers
fi
L=4 C=256 H=4 G=2 E=8 K=2 F=512 T=256 B=8 V=256
mxn_run() {
  "$mxn" train --arch qwen3_moe --experts $E --top_k $K --moe_ffn $F --n_layer $L --n_embd $C \
    --n_head $H --n_kv_head $G --n_ctx $T --batch $B --vocab_size $V --threads "$threads" \
    --router_aux_coef 0.001 --steps $((steps + 2)) --eval_every 0 --eval_batches 1 --ckpt_every 0 \
    --log_every 1000 --data data/kjv.bin --dtype f32 --out "$tmp/mxn" --overwrite > /dev/null
  /usr/bin/python3 - "$tmp/mxn/metrics.jsonl" $((B * T)) <<'PY'
import json, statistics, sys
rows = [r for r in map(json.loads, open(sys.argv[1])) if "step_s" in r][2:]
print(f"{int(sys.argv[2]) / statistics.median(r['step_s'] for r in rows):.1f}")
PY
}
torch_run() {
  "$venv/bin/python" bench/torch_moe.py --threads "$threads" --steps "$steps" --layers $L --width $C \
    --heads $H --kv-heads $G --experts $E --top-k $K --moe-ffn $F --ctx $T --batch $B --vocab $V ${1:-} \
    2> "$tmp/err" | tail -1 | awk '{print $NF}' || echo nan
}
gemm=$(for i in 1 2 3; do  # the best of three (the first is cold)
  "$mxn" bench gemm --dtype f32 --threads "$threads" --m $((B * T * K)) --k $C --n $F | awk '{print $(NF-1)}'
done | sort -g | tail -1)
fpt=$(( 6 * (L * (2 * C * C + 2 * C * G * (C / H) + C * E + K * 3 * C * F) + V * C) + 12 * L * C * T ))
versions=$("$venv/bin/python" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)')
echo "$threads threads; $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); $versions;" \
  "f32 GEMM $((B * T * K))x${C}x$F: $gemm GFLOP/s; $fpt model FLOPs a token"
m=$(mxn_run) e=$(torch_run) c=nan
[[ ${COMPILE:-1} == 1 ]] && c=$(torch_run --compile)
m2=$(mxn_run)
m=$(/usr/bin/python3 -c "print(max($m, $m2))")
best=$(/usr/bin/python3 -c "import math; v=[x for x in ($e, $c) if not math.isnan(x)]; print(max(v) if v else float('nan'))")
printf "| model | mxn tok/s (MFU) | torch eager tok/s (MFU) | torch.compile tok/s (MFU) | mxn/eager | mxn/compile |\n|---|--:|--:|--:|--:|--:|\n"
/usr/bin/python3 -c "
m, e, c, f, g = $m, $e, $c, $fpt, $gemm
r = lambda a, b: f'{a / b:.2f}' if b == b else 'n/a'
u = lambda t: f'{t:.0f} ({t * f / 1e9 / g:.2f})'
print(f'| qwen3_moe 8x top-2 | {u(m)} | {u(e)} | {u(c)} | {r(m, e)} | {r(m, c)} |')"
echo "mxn/fastest torch (moe): $(/usr/bin/python3 -c "print(f'{$m / $best:.2f}')")"
