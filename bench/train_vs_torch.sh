#!/usr/bin/env bash
# mxn against PyTorch, training on the same cores in one run. Two GPT-2 shapes: "small" (6 layers,
# width 384, 6 heads, context 256, batch 8, vocab 256) and "124M" (12 x 768, 12 heads, context
# 1024, batch 4, vocab 50257), each in f32 and bf16, AdamW with clipping.
# The peers: the newest torch from PyPI in a bench venv (build/bench-torch, made here when missing
# and then reused), nanoGPT-style (bench/torch_gpt.py: scaled_dot_product_attention, tanh GELU,
# fused AdamW), eager and torch.compile'd; and Debian's torch 1.13 (/usr/bin/python3) beside it.
# Prints tokens/s (median step after two warm-up steps), peak resident memory and model-FLOP
# utilisation against oneDNN's GEMM rate measured at the start (`mxn bench gemm`; or just before
# the row's mxn run where that is higher), the ratios
# against the fastest PyTorch configuration, and last 'mxn/torch bf16 ratio (124M): X'.
# Not a test: timings are noisy. Run scripts/setup first.
# Environment: STEPS (3), THREADS (all cores), SHAPES ("small 124M"), DTYPES ("f32 bf16"),
# COMPILE (1: also torch.compile), TORCH113 (1: also Debian's torch), BUILD_DIR (build).
set -euo pipefail
cd "$(dirname "$0")/.."
steps="${STEPS:-3}" threads="${THREADS:-$(nproc)}" mxn="${BUILD_DIR:-build}/mxn"
shapes="${SHAPES:-small 124M}" dtypes="${DTYPES:-f32 bf16}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
venv=build/bench-torch
if [[ ! -x $venv/bin/python ]]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q torch numpy
fi
mkdir -p build/bench
shard=build/bench/kjv-gpt2.bin
[[ -f $shard ]] || "$mxn" prepare data/kjv.txt --out "$shard" \
  --tokenizer ../shared/data/gpt2-bpe/encoder.json > /dev/null

declare -A L C H T B V DATA
L[small]=6 C[small]=384 H[small]=6 T[small]=256 B[small]=8 V[small]=256 DATA[small]=data/kjv.bin
L[124M]=12 C[124M]=768 H[124M]=12 T[124M]=1024 B[124M]=4 V[124M]=50257 DATA[124M]=$shard

rate() { "$mxn" bench gemm --dtype "$1" --threads "$threads" --m 4096 --k 768 --n 3072 | awk '{print $(NF-1)}'; }
declare -A gemm=([bf16]=$(rate bf16) [f32]=$(rate f32))
echo "$threads threads; $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs);" \
  "oneDNN GEMM 4096x768x3072: bf16 ${gemm[bf16]} GFLOP/s, f32 ${gemm[f32]} GFLOP/s"

mxn_run() {  # shape dtype -> "tokens/s GiB"
  local s=$1 out
  out=$("$mxn" train --n_layer "${L[$s]}" --n_embd "${C[$s]}" --n_head "${H[$s]}" --n_ctx "${T[$s]}" \
    --batch "${B[$s]}" --vocab_size "${V[$s]}" --dtype "$2" --threads "$threads" \
    --steps $((steps + 2)) --eval_every 0 --eval_batches 1 --ckpt_every 0 --log_every 1000 \
    --data "${DATA[$s]}" --out "$tmp/$s-$2")
  /usr/bin/python3 - "$tmp/$s-$2/metrics.jsonl" "$((B[$s] * T[$s]))" \
    "$(grep -o 'peak resident memory: [0-9.]*' <<< "$out" | awk '{print $4}')" <<'PY'
import json, statistics, sys
rows = [r for r in map(json.loads, open(sys.argv[1])) if "step_s" in r][2:]
print(f"{int(sys.argv[2]) / statistics.median(r['step_s'] for r in rows):.1f} {sys.argv[3]}")
PY
}
torch_run() {  # python shape dtype [--compile] -> "tokens/s GiB", or "nan nan" when it fails
  local py=$1 s=$2 out
  if out=$("$py" bench/torch_gpt.py --layers "${L[$s]}" --width "${C[$s]}" --heads "${H[$s]}" \
    --ctx "${T[$s]}" --batch "${B[$s]}" --vocab "${V[$s]}" --dtype "$3" --threads "$threads" \
    --steps "$steps" ${4:-} 2> "$tmp/err"); then
    echo "$(tail -1 <<< "$out" | awk '{print $NF}') $(grep -o 'memory: [0-9.]*' <<< "$out" | awk '{print $2}')"
  else
    echo "torch run failed ($py $s $3 ${4:-}): $(tail -1 "$tmp/err")" >&2
    echo "nan nan"
  fi
}

new=$("$venv/bin/python" -c 'import torch; print(torch.__version__)')
old=$(/usr/bin/python3 -c 'import torch; print(torch.__version__)')
printf "%-5s %-4s | %-22s | %-16s | %-16s | %-16s | %s\n" shape dt "mxn tok/s GiB MFU" \
  "torch $new" "$new compile" "torch $old" "mxn/fastest torch: speed, memory"
declare -A ratio
rates=""
for s in $shapes; do
  # Model FLOPs a token: 6 per weight that multiplies (every weight but the positions; the head
  # is the tied embeddings) and 12 L C T for attention's two products, forward and backward.
  fpt=$(( 6 * (V[$s] * C[$s] + L[$s] * (12 * C[$s] * C[$s] + 13 * C[$s]) + 2 * C[$s]) + 12 * L[$s] * C[$s] * T[$s] ))
  for dt in $dtypes; do
    # This machine's GEMM rate drifts by 10-20% over minutes (shared cores): measured again just
    # before mxn's run, MFU is taken against the higher of that and the start's rate.
    here=$(rate "$dt")
    best=$(/usr/bin/python3 -c "print(max(${gemm[$dt]}, $here))")
    rates+="$s $dt $here, "
    read -r m_tps m_gib <<< "$(mxn_run "$s" "$dt")"
    read -r e_tps e_gib <<< "$(torch_run "$venv/bin/python" "$s" "$dt")"
    c_tps=nan c_gib=nan o_tps=nan o_gib=nan
    [[ ${COMPILE:-1} == 1 ]] && read -r c_tps c_gib <<< "$(torch_run "$venv/bin/python" "$s" "$dt" --compile)"
    [[ ${TORCH113:-1} == 1 ]] && read -r o_tps o_gib <<< "$(torch_run /usr/bin/python3 "$s" "$dt")"
    line=$(/usr/bin/python3 - "$m_tps" "$m_gib" "$e_tps" "$e_gib" "$c_tps" "$c_gib" "$o_tps" "$o_gib" \
      "$fpt" "$best" <<'PY'
import math, sys
a = [float(x) for x in sys.argv[1:]]
m, mg, fpt, rate = a[0], a[1], a[8], a[9]
peers = [(a[i], a[i + 1]) for i in (2, 4, 6) if not math.isnan(a[i])]
tps, gib = max(peers) if peers else (math.nan, math.nan)
cells = " | ".join(f"{t:8.1f} {g:5.2f}G" if not math.isnan(t) else f"{'-':>16}" for t, g in
                   [(a[i], a[i + 1]) for i in (2, 4, 6)])
print(f"{m:8.1f} {mg:5.2f}G {100 * m * fpt / (rate * 1e9):4.1f}% | {cells} | "
      f"{m / tps:.2f}x, {mg / gib:.2f}x;{m / tps:.2f}")
PY
)
    printf "%-5s %-4s | %s\n" "$s" "$dt" "${line%;*}"
    ratio[$s-$dt]=${line##*;}
  done
done
echo "GEMM rate (GFLOP/s) just before each mxn run: ${rates%, }"
for k in "${!ratio[@]}"; do
  [[ $k == 124M-bf16 ]] || echo "mxn/torch ${k#*-} ratio (${k%-*}): ${ratio[$k]}"
done
[[ -n ${ratio[124M-bf16]:-} ]] && echo "mxn/torch bf16 ratio (124M): ${ratio[124M-bf16]}"
exit 0
