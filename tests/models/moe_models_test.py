#!/usr/bin/python3
"""mxn's mixture-of-experts families (and dense Qwen3) against PyTorch references.

Mixtral and Qwen2-MoE: transformers' own classes (4.49, the test venv). Qwen3, Qwen3-MoE and
GLM-4.5 (Glm4MoeForCausalLM) have no class in a transformers that runs on Debian's torch 1.13, so
reference() below is our PyTorch reading of transformers' modeling_qwen3.py, modeling_qwen3_moe.py
and modeling_glm4_moe.py (and of the Mixtral and Qwen2-MoE files); it must itself match
MixtralForCausalLM and Qwen2MoeForCausalLM first (1e-6), which checks everything in it but the
lines those families add: per-head q and k norms, partial half-split RoPE, and DeepSeek-V3's
router (sigmoid scores, a selection bias, group-limited top-k, the scaling factor; masked groups
as DeepSeek's inference/model.py masks them, with -inf) with unconditional shared experts.
Asserted, in f32 against float64, max|mxn - ref| / max|ref| per tensor, on two shapes with odd
sizes per family: logits <= 1e-5; the loss; every parameter's gradient of one step <= 1e-4 (each
expert's weights stacked as mxn keeps them); each MoE layer's chosen experts identical for every
token; 64 greedy tokens with the KV cache identical.  usage: moe_models_test.py MXN DECODER_DUMP
"""
import os, subprocess, sys, tempfile, unittest, warnings

sys.path[:0] = [os.path.dirname(os.path.abspath(__file__)),
                os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "common")]
from hf_common import greedy_mxn, greedy_ref, np, perturb, rel, run_dump, torch  # noqa: E402  (may re-exec)
from moe_common import make_hf, own_config, random_weights, write_folder  # noqa: E402

MXN, DUMP = sys.argv[1], sys.argv[2]
LOGITS_TOL, GRAD_TOL = 1e-5, 1e-4
F = torch.nn.functional


def yarn(c, dim):
    """transformers' _compute_yarn_parameters: (inv_freq in float32, attention_factor)."""
    import math
    rs, base = c["rope_scaling"], c.get("rope_theta", 10000.0)
    factor, omp = rs["factor"], rs.get("original_max_position_embeddings", c["max_position_embeddings"])
    ms = lambda scale, m=1.0: 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0
    af = ms(factor, rs["mscale"]) / ms(factor, rs["mscale_all_dim"]) if rs.get("mscale") and rs.get(
        "mscale_all_dim") else ms(factor)
    corr = lambda rot: (dim * math.log(omp / (rot * 2 * math.pi))) / (2 * math.log(base))
    low, high = max(math.floor(corr(rs.get("beta_fast", 32))), 0), min(math.ceil(corr(rs.get("beta_slow", 1))), dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos = base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)
    extra = 1 - ramp
    return (1.0 / (factor * pos)) * (1 - extra) + (1.0 / pos) * extra, af


def layout(family):
    """(the MoE block's prefix, its router, its experts' gate, up and down names)"""
    if family == "mixtral":
        return "block_sparse_moe.", "gate", "w1", "w3", "w2"  # noqa: E501
    return "mlp.", "gate", "gate_proj", "up_proj", "down_proj"


def reference(W, c, ids, family):
    """The forward of transformers' Mixtral / Qwen2-MoE / Qwen3 / Qwen3-MoE, in W's dtype; returns the
    logits and each MoE layer's experts per token (descending router score)."""
    B, T = ids.shape
    C, H, G, L = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"], c["num_hidden_layers"]
    D = c.get("head_dim") or C // H
    if "kv_lora_rank" in c:
        D = c["qk_rope_head_dim"]  # (RoPE's tables: the DeepSeek attention rotates dr dims)
    eps = c.get("rms_norm_eps", 1e-6)
    moe_blk, router, eg, eu, ed = layout(family)

    def rms(x, w):
        return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + eps) * w

    # transformers computes the frequencies in float32 whatever the model's dtype
    R = int(D * c.get("partial_rotary_factor", 1.0))  # rotated dims a head (the first R)
    inv = 1.0 / (c.get("rope_theta", 10000.0) ** (torch.arange(0, R, 2, dtype=torch.int64).float() / R))
    af = 1.0
    if c.get("rope_scaling") and "kv_lora_rank" not in c:
        inv, af = yarn(c, R)
    ang = torch.arange(T, dtype=torch.float32)[:, None] * inv[None]
    emb = torch.cat([ang, ang], -1)
    cos, sin = (emb.cos() * af).to(W["model.norm.weight"].dtype), (emb.sin() * af).to(W["model.norm.weight"].dtype)

    def rope(x):  # (B, T, heads, D): LLaMA's halves over the first R dims
        r, rest = x[..., :R], x[..., R:]
        x1, x2 = r[..., :R // 2], r[..., R // 2:]
        return torch.cat([r * cos[None, :, None] + torch.cat([-x2, x1], -1) * sin[None, :, None], rest], -1)

    def mlp(h, p):
        return (F.silu(h @ W[p + "gate_proj.weight"].T) * (h @ W[p + "up_proj.weight"].T)) @ W[p + "down_proj.weight"].T

    def gqa(h, p):  # LLaMA-shaped attention (Qwen3's q/k norms, GLM-4.5's partial RoPE)
        q, k, v = (h @ W[p + f"self_attn.{n}_proj.weight"].T + (W[p + f"self_attn.{n}_proj.bias"]
                   if p + f"self_attn.{n}_proj.bias" in W else 0) for n in "qkv")
        q, k, v = q.view(B, T, H, D), k.view(B, T, G, D), v.view(B, T, G, D)
        if p + "self_attn.q_norm.weight" in W:  # Qwen3: RMSNorm over each head's dims, before RoPE
            q, k = rms(q, W[p + "self_attn.q_norm.weight"]), rms(k, W[p + "self_attn.k_norm.weight"])
        q, k = rope(q), rope(k)
        k, v = k.repeat_interleave(H // G, 2), v.repeat_interleave(H // G, 2)
        s = torch.einsum("bthd,bshd->bhts", q, k) / D ** 0.5
        y = torch.einsum("bhts,bshd->bthd", s.masked_fill(~mask, float("-inf")).softmax(-1), v)
        return y.reshape(B, T, H * D) @ W[p + "self_attn.o_proj.weight"].T

    def moe(h, m):  # the router, the experts, the shared expert(s)
        E = W[m + router + ".weight"].shape[0]
        K = c["num_experts_per_tok"]
        if family in ("glm4_moe", "deepseek"):  # DeepSeek-V3's router (route_tokens_to_experts)
            s_ = torch.sigmoid(h @ W[m + router + ".weight"].T)
            sel = s_ + W[m + router + ".e_score_correction_bias"]
            G_, gs = c["n_group"], E // c["n_group"]
            group = sel.view(-1, G_, gs).topk(min(2, gs), -1)[0].sum(-1)
            keep = torch.zeros_like(group).scatter_(1, group.topk(c["topk_group"], -1)[1], 1)
            sel = sel.masked_fill(~keep.repeat_interleave(gs, 1).bool(), float("-inf"))
            top_i = sel.topk(K, -1)[1]
            top_w = s_.gather(1, top_i)
            if c["norm_topk_prob"]:
                top_w = top_w / (top_w.sum(-1, keepdim=True) + 1e-20)
            top_w = top_w * c["routed_scaling_factor"]
        else:
            probs = (h @ W[m + router + ".weight"].T).softmax(-1)
            top_w, top_i = probs.topk(K, -1)
            if family == "mixtral" or c.get("norm_topk_prob", False):
                top_w = top_w / top_w.sum(-1, keepdim=True)
        chosen.append(top_i)
        out = torch.zeros_like(h)
        for e in range(E):
            rows, slot = (top_i == e).nonzero(as_tuple=True)
            q_ = f"{m}experts.{e}."
            he = h[rows]
            ye = (F.silu(he @ W[q_ + eg + ".weight"].T) * (he @ W[q_ + eu + ".weight"].T)) @ W[q_ + ed + ".weight"].T
            out = out.index_add(0, rows, ye * top_w[rows, slot, None])
        if m + "shared_expert_gate.weight" in W:
            out = out + torch.sigmoid(h @ W[m + "shared_expert_gate.weight"].T) * mlp(h, m + "shared_expert.")
        if m + "shared_experts.gate_proj.weight" in W:  # GLM-4.5 / DeepSeek-V3: no gate
            out = out + mlp(h, m + "shared_experts.")
        return out

    def mla(h, a):  # modeling_deepseek_v3.py's DeepseekV3Attention (rope_interleave), not absorbed
        dn, dr, dv, R = c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"], c["kv_lora_rank"]
        eps6 = lambda x, w: x * torch.rsqrt((x * x).mean(-1, keepdim=True) + 1e-6) * w
        if c.get("q_lora_rank"):
            q = eps6(h @ W[a + "q_a_proj.weight"].T, W[a + "q_a_layernorm.weight"]) @ W[a + "q_b_proj.weight"].T
        else:
            q = h @ W[a + "q_proj.weight"].T
        q_pass, q_rot = q.view(B, T, H, dn + dr).split([dn, dr], -1)
        k_pass, k_rot = (h @ W[a + "kv_a_proj_with_mqa.weight"].T).split([R, dr], -1)
        kv = (eps6(k_pass, W[a + "kv_a_layernorm.weight"]) @ W[a + "kv_b_proj.weight"].T).view(B, T, H, dn + dv)
        k_pass, v = kv.split([dn, dv], -1)
        inter = lambda x: x.view(*x.shape[:-1], dr // 2, 2).transpose(-1, -2).reshape(x.shape)
        q_rot, k_rot = rope_d(inter(q_rot), dr), rope_d(inter(k_rot.view(B, T, 1, dr)), dr)
        q = torch.cat([q_pass, q_rot], -1)
        k = torch.cat([k_pass, k_rot.expand(B, T, H, dr)], -1)
        scale = (dn + dr) ** -0.5
        if c.get("rope_scaling"):  # DeepseekV3Attention: times yarn's mscale(factor, mscale_all_dim)^2
            import math
            m = 0.1 * c["rope_scaling"]["mscale_all_dim"] * math.log(c["rope_scaling"]["factor"]) + 1.0
            scale = scale * m * m
        s = torch.einsum("bthd,bshd->bhts", q, k) * scale
        y = torch.einsum("bhts,bshd->bthd", s.masked_fill(~mask, float("-inf")).softmax(-1), v)
        return y.reshape(B, T, H * dv) @ W[a + "o_proj.weight"].T

    def rope_d(x, d):  # LLaMA's halves over all d dims, frequencies of d (yarn's where set)
        inv_d = 1.0 / (c.get("rope_theta", 10000.0) ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
        if c.get("rope_scaling"):
            inv_d = yarn(c, d)[0]
        e = torch.arange(T, dtype=torch.float32)[:, None] * inv_d[None]
        e = torch.cat([e, e], -1)
        cs, sn = e.cos().to(x.dtype)[None, :, None], e.sin().to(x.dtype)[None, :, None]
        return x * cs + torch.cat([-x[..., d // 2:], x[..., :d // 2]], -1) * sn

    x = W["model.embed_tokens.weight"][ids]
    mask = torch.tril(torch.ones(T, T, dtype=torch.bool))
    chosen = []
    for l in range(L):
        p = f"model.layers.{l}."
        h = rms(x, W[p + "input_layernorm.weight"])
        if "kv_lora_rank" in c:
            x = x + mla(h, p + "self_attn.")
        else:
            x = x + gqa(h, p)
        h = rms(x, W[p + "post_attention_layernorm.weight"]).reshape(B * T, C)
        m = p + moe_blk
        if m + router + ".weight" not in W:
            x = x + mlp(h, p + "mlp.").view(B, T, C)
            continue
        x = x + moe(h, m).view(B, T, C)
    x = rms(x, W["model.norm.weight"])
    head = W["lm_head.weight"] if "lm_head.weight" in W else W["model.embed_tokens.weight"]
    return x @ head.T, chosen


def stacked(grads, name, shape):
    """mxn keeps each MoE layer's experts stacked: <block>experts.<leaf> (E, rows, cols); and MLA's
    kv_b_proj (H (dn + dv), R) as k_b_proj (H, dn, R) and v_b_proj (H, dv, R)."""
    for leaf, first in (("k_b_proj.weight", True), ("v_b_proj.weight", False)):
        if name.endswith(leaf):
            kv = grads[name[:-len(leaf)] + "kv_b_proj.weight"]
            H, w, R = shape
            kv = kv.view(H, kv.shape[0] // H, R)
            return kv[:, :w] if first else kv[:, kv.shape[1] - w:]
    if ".experts." not in name:
        return grads[name]
    pre, leaf = name.rsplit("experts.", 1)
    out, e = [], 0
    while f"{pre}experts.{e}.{leaf}" in grads:
        out.append(grads[f"{pre}experts.{e}.{leaf}"])
        e += 1
    return torch.stack(out)


class MoeModels(unittest.TestCase):
    def check_family(self, family):
        warnings.filterwarnings("ignore", message="nn.functional.sigmoid is deprecated")  # (unittest resets them)
        for odd in (False, True):
            with self.subTest(family=family, odd=odd), tempfile.TemporaryDirectory() as tmp:
                folder = os.path.join(tmp, "model")
                if family in ("mixtral", "qwen2_moe"):
                    torch.manual_seed(1)
                    model = perturb(make_hf(family, odd), seed=11 + odd).eval()
                    model.float().save_pretrained(folder)
                    model = model.double()
                    cfg = model.config.to_dict()
                    W = {k: v.detach() for k, v in model.state_dict().items()}
                    V = cfg["vocab_size"]
                    ids = torch.randint(0, V, (3, 23) if odd else (2, 32), generator=torch.Generator().manual_seed(5))
                    with torch.no_grad():
                        own, _ = reference(W, cfg, ids, family)
                        hf = model(ids).logits
                    self.assertLess(rel(own, hf), 1e-6, "reference() against transformers' " + family)
                    out = model(ids, output_router_logits=True)
                    logits, params = out.logits, dict(model.named_parameters())
                    k = cfg["num_experts_per_tok"]
                    chosen = [F.softmax(r.detach(), -1).topk(k, -1)[1] for r in out.router_logits]
                    fn = lambda x: model(x).logits
                else:
                    cfg = own_config(family, odd)
                    W = random_weights(cfg, seed=21 + odd)
                    write_folder(folder, cfg, W)
                    V = cfg["vocab_size"]
                    ids = torch.randint(0, V, (3, 23) if odd else (2, 32), generator=torch.Generator().manual_seed(5))
                    params = {k: v.clone().requires_grad_(True) for k, v in W.items()}
                    logits, chosen = reference(params, cfg, ids, family)
                    fn = lambda x: reference(W, cfg, x, family)[0]
                B, T = ids.shape
                loss = F.cross_entropy(logits[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1))
                loss.backward()
                got = run_dump(DUMP, folder, ids, tmp)
                e = rel(got["logits"].reshape(B, T, V), logits.detach())
                print(f"{family:9s} {'odd' if odd else 'even':4s} logits {e:.2e}", end="")
                self.assertLess(e, LOGITS_TOL, "logits")
                self.assertLess(abs(float(got["loss"][0]) - float(loss)) / float(loss), LOGITS_TOL, "loss")
                self.assertEqual(len(chosen), len([n for n in got if n.startswith("router.")]), "MoE layers")
                for i, want in enumerate(chosen):  # as sets: transformers' topk(sorted=False) has no order
                    np.testing.assert_array_equal(np.sort(got[f"router.{i}"], -1), np.sort(want.numpy(), -1),
                                                  f"MoE layer {i}'s experts")
                grads = {n: p.grad for n, p in params.items() if p.grad is not None}
                worst = 0.0
                for name in got:
                    if not name.startswith("grad."):
                        continue
                    if name.endswith("e_score_correction_bias"):  # picks experts, has no gradient
                        self.assertEqual(float(np.abs(got[name]).max()), 0.0, name)
                        continue
                    ge = rel(got[name], stacked(grads, name[5:], got[name].shape))
                    worst = max(worst, ge)
                    self.assertLess(ge, GRAD_TOL, "gradient of " + name[5:])
                print(f"  grads {worst:.2e}  experts of {len(chosen)} layers identical", end="")
                prompt = ids[0, :7].tolist()
                with torch.no_grad():
                    want = greedy_ref(fn, prompt, 64)
                self.assertEqual(greedy_mxn(MXN, folder, prompt, 64), want, "64 greedy tokens")
                print("  greedy 64 identical", end="")
                if family in ("deepseek", "glm4_moe"):
                    self.check_gguf(family, folder, cfg, prompt, want)
                print()

    def check_gguf(self, family, folder, cfg, prompt, want):
        """GGUF as llama.cpp's deepseek2 or glm4moe: tensor names from the gguf package's tables
        (deepseek2's own; any architecture's for glm4moe, which this gguf lacks), the MLA and router
        keys, and the same 64 greedy tokens read back from it. (llama.cpp itself gives the same
        tokens on these shapes: bench/llama_greedy.sh, docs/models.md.)"""
        import gguf
        path = os.path.join(os.path.dirname(folder), "model.gguf")
        subprocess.run([MXN, "convert", folder, path, "--type", "f32"], check=True, stdout=subprocess.DEVNULL)
        r = gguf.GGUFReader(path)
        arch = "deepseek2" if family == "deepseek" else "glm4moe"
        kinds = gguf.MODEL_TENSORS[gguf.MODEL_ARCH.DEEPSEEK2] if family == "deepseek" else gguf.TENSOR_NAMES
        allowed = {gguf.TENSOR_NAMES[t].format(bid=b) + s for t in kinds
                   for b in range(cfg["num_hidden_layers"]) for s in (".weight", ".bias")}
        self.assertEqual([t.name for t in r.tensors if t.name not in allowed], [], "names llama.cpp lacks")
        field = lambda k: r.fields[k].parts[-1][0]  # noqa: E731
        self.assertEqual(bytes(r.fields["general.architecture"].parts[-1]).decode(), arch)
        keys = [("expert_count", cfg["n_routed_experts"]), ("expert_shared_count", cfg["n_shared_experts"]),
                ("expert_gating_func", 2), ("leading_dense_block_count", cfg["first_k_dense_replace"])]
        if cfg["n_group"] > 1:
            keys += [("expert_group_count", cfg["n_group"]), ("expert_group_used_count", cfg["topk_group"])]
        if family == "deepseek":
            keys += [("attention.kv_lora_rank", cfg["kv_lora_rank"]), ("attention.head_count_kv", 1),
                     ("attention.key_length", cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"]),
                     ("attention.key_length_mla", cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"]),
                     ("attention.value_length_mla", cfg["v_head_dim"])]
            kb = [t for t in r.tensors if t.name == "blk.0.attn_k_b.weight"][0]  # (H, R, dn), transposed
            self.assertEqual(list(map(int, kb.shape)), [cfg["qk_nope_head_dim"], cfg["kv_lora_rank"],
                                                        cfg["num_attention_heads"]])
        else:
            keys += [("rope.dimension_count", int(cfg["head_dim"] * cfg["partial_rotary_factor"]))]
        for key, value in keys:
            self.assertEqual(int(field(arch + "." + key)), value, key)
        self.assertEqual(greedy_mxn(MXN, path, prompt, 64), want, "64 greedy tokens from the GGUF")
        print(f"  GGUF {arch}: names, keys, greedy 64 identical", end="")

    def test_mixtral(self):
        self.check_family("mixtral")

    def test_qwen2_moe(self):
        self.check_family("qwen2_moe")

    def test_qwen3(self):
        self.check_family("qwen3")

    def test_qwen3_moe(self):
        self.check_family("qwen3_moe")

    def test_glm4_moe(self):
        self.check_family("glm4_moe")

    def test_deepseek_v3(self):
        self.check_family("deepseek")


if __name__ == "__main__":
    unittest.main(argv=sys.argv[:1], verbosity=2)
