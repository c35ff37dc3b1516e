#!/usr/bin/python3
"""The PyTorch peer for bench/moe_train_vs_torch.sh: transformers' own Qwen3MoeForCausalLM (its MoE
layer as transformers ships it) trained with AdamW on random tokens, f32, in the newest torch and
transformers (the bench venv), eager or torch.compile'd. The same shape as mxn's run.
Prints its peak resident memory, then last 'torch tokens/s: X'.
usage: torch_moe.py --threads N --steps N [--compile] --layers L --width C --heads H --kv-heads G
                    --experts E --top-k K --moe-ffn F --ctx T --batch B --vocab V
"""
import argparse, resource, statistics, time

import torch
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM


def main():
    p = argparse.ArgumentParser()
    for k, d in (("threads", 2), ("steps", 3), ("layers", 4), ("width", 256), ("heads", 4), ("kv-heads", 2),
                 ("experts", 8), ("top-k", 2), ("moe-ffn", 512), ("ctx", 256), ("batch", 8), ("vocab", 256)):
        p.add_argument("--" + k, type=int, default=d)
    p.add_argument("--compile", action="store_true")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    cfg = Qwen3MoeConfig(vocab_size=a.vocab, hidden_size=a.width, num_hidden_layers=a.layers,
                         num_attention_heads=a.heads, num_key_value_heads=a.kv_heads,
                         head_dim=a.width // a.heads, intermediate_size=4 * a.width, num_experts=a.experts,
                         num_experts_per_tok=a.top_k, moe_intermediate_size=a.moe_ffn, norm_topk_prob=True,
                         max_position_embeddings=a.ctx, tie_word_embeddings=False, output_router_logits=True,
                         router_aux_loss_coef=0.001, attn_implementation="sdpa")
    m = Qwen3MoeForCausalLM(cfg).train()
    opt = torch.optim.AdamW(m.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    run = torch.compile(m) if a.compile else m
    idx = torch.randint(0, a.vocab, (a.batch, a.ctx))
    times = []
    for s in range(a.steps + 2):  # two warm-up steps
        t0 = time.perf_counter()
        loss = run(input_ids=idx, labels=idx).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        opt.step()
        if s >= 2:
            times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    import transformers
    print(f"torch {torch.__version__} transformers {transformers.__version__} peak resident memory: "
          f"{peak:.2f} GiB (compile {a.compile})")
    print(f"torch tokens/s: {a.batch * a.ctx / statistics.median(times):.1f}")


if __name__ == "__main__":
    main()
