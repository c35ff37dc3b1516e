#!/usr/bin/python3
"""mxn's GPT-2 against PyTorch: logits, loss and every parameter gradient, same weights and batch.

Runs tests/tools/gpt_dump (mxn on the CPU backend) for each shape and dtype, recomputes the same
step in PyTorch in float64, and asserts max|mxn - torch| / max|torch| per tensor is within the
tolerance: 1e-4 in f32; in bf16 (matmul operands rounded to bf16, f32 accumulation) 3e-2.
usage: torch_reference.py PATH/TO/gpt_dump
"""
import json, math, os, struct, subprocess, sys, tempfile

import numpy as np
import torch
import torch.nn.functional as F

TOL = {"f32": 1e-4, "bf16": 3e-2}
# (n_layer, n_head, n_embd, vocab, n_ctx, batch, seq): one aligned shape, one with odd sizes.
SHAPES = [(2, 4, 64, 256, 32, 4, 32), (3, 3, 57, 101, 29, 3, 23)]


def load_safetensors(path):
    with open(path, "rb") as f:
        raw = f.read()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    out = {}
    for name, e in header.items():
        if name == "__metadata__":
            continue
        b, e2 = e["data_offsets"]
        dt = {"F32": np.float32, "I32": np.int32}[e["dtype"]]
        out[name] = np.frombuffer(raw[8 + n + b:8 + n + e2], dtype=dt).reshape(e["shape"])
    return out


def torch_step(t, L, H, C, V, B, T):
    W = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True)
         for k, v in t.items() if k.startswith("transformer.")}
    tok = torch.tensor(t["tokens"].astype(np.int64)).view(B, T)
    tgt = torch.tensor(t["targets"].astype(np.int64)).view(B, T)
    hd = C // H
    x = W["transformer.wte.weight"][tok] + W["transformer.wpe.weight"][torch.arange(T)][None]
    mask = torch.tril(torch.ones(T, T, dtype=torch.bool))
    for l in range(L):
        p = f"transformer.h.{l}."
        h = F.layer_norm(x, (C,), W[p + "ln_1.weight"], W[p + "ln_1.bias"], 1e-5)
        qkv = h @ W[p + "attn.c_attn.weight"] + W[p + "attn.c_attn.bias"]
        q, k, v = qkv.split(C, dim=2)
        q, k, v = (z.view(B, T, H, hd).transpose(1, 2) for z in (q, k, v))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(hd)
        att = att.masked_fill(~mask, float("-inf")).softmax(-1)
        y = (att @ v).transpose(1, 2).reshape(B, T, C)
        x = x + y @ W[p + "attn.c_proj.weight"] + W[p + "attn.c_proj.bias"]
        h = F.layer_norm(x, (C,), W[p + "ln_2.weight"], W[p + "ln_2.bias"], 1e-5)
        h = F.gelu(h @ W[p + "mlp.c_fc.weight"] + W[p + "mlp.c_fc.bias"], approximate="tanh")
        x = x + h @ W[p + "mlp.c_proj.weight"] + W[p + "mlp.c_proj.bias"]
    x = F.layer_norm(x, (C,), W["transformer.ln_f.weight"], W["transformer.ln_f.bias"], 1e-5)
    logits = x @ W["transformer.wte.weight"].T
    loss = F.cross_entropy(logits.view(-1, V), tgt.view(-1))
    loss.backward()
    return logits.view(B * T, V), loss, W


def rel_err(a, b):
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def main():
    dump = sys.argv[1]
    failures, checked = 0, 0
    with tempfile.TemporaryDirectory() as tmp:
        for shape in SHAPES:
            L, H, C, V, ctx, B, T = shape
            for dtype in ("f32", "bf16"):
                path = os.path.join(tmp, f"dump_{dtype}.safetensors")
                args = [str(s) for s in (L, H, C, V, ctx, B, T)] + [dtype, "42", path]
                subprocess.run([dump] + args, check=True)
                t = load_safetensors(path)
                logits, loss, W = torch_step(t, L, H, C, V, B, T)
                errs = {"logits": rel_err(t["logits"], logits.detach()),
                        "loss": rel_err(t["loss"], loss.detach().reshape(1))}
                for name, w in W.items():
                    errs["grad." + name] = rel_err(t["grad." + name], w.grad)
                worst = max(errs, key=errs.get)
                bad = {k: v for k, v in errs.items() if v > TOL[dtype]}
                checked += len(errs)
                status = "ok" if not bad else "FAIL"
                print(f"{status} shape={shape} dtype={dtype}: {len(errs)} tensors, "
                      f"worst {worst} rel err {errs[worst]:.2e} (tolerance {TOL[dtype]:.0e})")
                for k, v in bad.items():
                    print(f"   {k}: {v:.3e}")
                failures += len(bad)
    print(f"{checked - failures} passed, {failures} failed")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
