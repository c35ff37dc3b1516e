"""PyTorch's side of bench/finetune.sh: fine-tune a Hugging Face LLaMA folder on an mxn token
shard, fully (AdamW over every weight), with peft's LoRA on q_proj and v_proj, or with peft's
prefix tuning (P-Tuning v2: --prefix rows of keys and values per layer), in f32, and print
trainable parameters, peak resident memory and tokens/s (median step after the first).
usage: torch_finetune.py --model DIR --data SHARD --mode full|lora|ptuning [--r 8 --alpha 16]
       [--prefix 64]
       [--steps 3 --seq 256 --batch 1 --threads N]"""
import argparse, resource, statistics, time

import numpy as np
import torch

p = argparse.ArgumentParser()
p.add_argument("--model", required=True)
p.add_argument("--data", required=True)
p.add_argument("--mode", choices=["full", "lora", "ptuning"], required=True)
p.add_argument("--prefix", type=int, default=64)
p.add_argument("--r", type=int, default=8)
p.add_argument("--alpha", type=float, default=16)
p.add_argument("--steps", type=int, default=3)
p.add_argument("--seq", type=int, default=256)
p.add_argument("--batch", type=int, default=1)
p.add_argument("--threads", type=int, default=0)
a = p.parse_args()
if a.threads:
    torch.set_num_threads(a.threads)
from transformers import AutoModelForCausalLM  # noqa: E402

raw = np.fromfile(a.data, np.uint8)
n_train = int(np.frombuffer(raw[16:24].tobytes(), np.uint64)[0])
tokens = np.frombuffer(raw[32:].tobytes(), np.uint16)[:n_train].astype(np.int64)
model = AutoModelForCausalLM.from_pretrained(a.model, torch_dtype=torch.float32)
if a.mode == "lora":
    from peft import LoraConfig, get_peft_model
    model = get_peft_model(model, LoraConfig(r=a.r, lora_alpha=a.alpha, lora_dropout=0.0,
                                             target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
if a.mode == "ptuning":
    from peft import PrefixTuningConfig, get_peft_model
    model = get_peft_model(model, PrefixTuningConfig(num_virtual_tokens=a.prefix, task_type="CAUSAL_LM"))
model.train()
params = [q for q in model.parameters() if q.requires_grad]
new = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 4)  # fused AdamW on CPU
opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True if new else None)
rng = np.random.default_rng(0)
times = []
for step in range(a.steps):
    off = rng.integers(0, len(tokens) - a.seq - 1, a.batch)
    x = torch.tensor(np.stack([tokens[o:o + a.seq] for o in off]))
    y = torch.tensor(np.stack([tokens[o + 1:o + a.seq + 1] for o in off]))
    t0 = time.perf_counter()
    logits = model(input_ids=x).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    times.append(time.perf_counter() - t0)
    print(f"step {step + 1}: loss {loss.item():.4f}, {times[-1]:.2f} s", flush=True)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
tps = a.batch * a.seq / statistics.median(times[1:] or times)
print(f"torch {torch.__version__} {a.mode}: trainable {sum(q.numel() for q in params)}, "
      f"peak resident memory {peak:.2f} GiB, {tps:.1f} tokens/s")
