#!/usr/bin/python3
"""The PyTorch peer for bench/train_vs_torch.sh: the same GPT-2 trained with AdamW on random
tokens, in f32 or with bf16 autocast, written as nanoGPT writes it: scaled_dot_product_attention
where torch has it, GELU with GPT-2's tanh approximation, GPT-2's initialisation, the fused AdamW
where torch offers it on the CPU, and with --compile torch.compile (inductor).
Prints its peak resident memory, then last 'torch <dtype> tokens/s: X'.
usage: torch_gpt.py --dtype f32|bf16 --threads N --steps N [--compile] [--layers 6 --width 384 --heads 6 --ctx 256 --batch 8 --vocab 256]
"""
import argparse, math, resource, statistics, time

import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    def __init__(self, C, H):
        super().__init__()
        self.H = H
        self.ln_1, self.ln_2 = nn.LayerNorm(C), nn.LayerNorm(C)
        self.c_attn, self.c_proj = nn.Linear(C, 3 * C), nn.Linear(C, C)
        self.c_fc, self.mlp_proj = nn.Linear(C, 4 * C), nn.Linear(4 * C, C)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
        q, k, v = (z.view(B, T, self.H, C // self.H).transpose(1, 2) for z in (q, k, v))
        if hasattr(F, "scaled_dot_product_attention"):  # torch >= 2: fused, no (B,H,T,T) kept
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(C // self.H))
            mask = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            att = att.masked_fill(~mask, float("-inf")).softmax(-1)
            y = att @ v
        y = y.transpose(1, 2).reshape(B, T, C)
        x = x + self.c_proj(y)
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class GPT(nn.Module):
    def __init__(self, L, C, H, ctx, V):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(V, C), nn.Embedding(ctx, C)
        self.h = nn.ModuleList(Block(C, H) for _ in range(L))
        self.ln_f = nn.LayerNorm(C)
        for name, p in self.named_parameters():  # GPT-2's initialisation, as nanoGPT
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * L) if name.endswith("proj.weight") else 0.02
                nn.init.normal_(p, 0.0, std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, idx, tgt):
        T = idx.shape[1]
        x = self.wte(idx) + self.wpe(torch.arange(T))
        for b in self.h:
            x = b(x)
        logits = self.ln_f(x) @ self.wte.weight.T
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), tgt.view(-1))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--dtype", default="f32")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--width", type=int, default=384)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--ctx", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--compile", action="store_true", help="torch.compile the model (torch >= 2)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    m = GPT(a.layers, a.width, a.heads, a.ctx, a.vocab)
    kw = dict(lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)
    try:  # the fused (one kernel over all tensors) AdamW, on the CPU since torch 2.4
        opt = torch.optim.AdamW(m.parameters(), fused=True, **kw)
        fused = True
    except (TypeError, RuntimeError):
        opt = torch.optim.AdamW(m.parameters(), **kw)
        fused = False
    run = torch.compile(m) if a.compile else m
    idx = torch.randint(0, a.vocab, (a.batch, a.ctx))
    tgt = torch.randint(0, a.vocab, (a.batch, a.ctx))
    times = []
    for s in range(a.steps + 2):  # two warm-up steps
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=a.dtype == "bf16"):
            loss = run(idx, tgt)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        opt.step()
        if s >= 2:
            times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"torch {torch.__version__} peak resident memory: {peak:.2f} GiB"
          f" (sdpa {hasattr(F, 'scaled_dot_product_attention')}, fused adamw {fused},"
          f" compile {a.compile})")
    print(f"torch {a.dtype} tokens/s: {a.batch * a.ctx / statistics.median(times):.1f}")


if __name__ == "__main__":
    main()
