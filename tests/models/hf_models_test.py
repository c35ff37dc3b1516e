#!/usr/bin/python3
"""mxn's decoder against Hugging Face transformers, family by family.

For GPT-2, LLaMA, Qwen2 and GLM (GlmForCausalLM) a tiny random model is made by transformers and
saved with save_pretrained; for the ChatGLM2/3 checkpoint layout, which transformers has no class
for, the GLM model's weights are renamed into it and checked by chatglm_reference() below, our own
PyTorch reading of ../shared/GLM.md, which must itself match GlmForCausalLM first.
Asserted, in f32, max|mxn - ref| / max|ref| per tensor:
  logits <= 1e-4 on two shapes per family (odd sizes, GQA/MQA); the loss; every parameter's
  gradient of one training step <= 1e-4; 64 greedy tokens with the KV cache identical.
The reference runs in float64.  usage: hf_models_test.py MXN DECODER_DUMP
"""
import os, sys, tempfile, unittest

sys.path[:0] = [os.path.dirname(os.path.abspath(__file__)),
                os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "common")]
from hf_common import (greedy_mxn, greedy_ref, make, perturb, rel, run_dump, to_chatglm,  # noqa: E402
                       torch)  # (may re-exec in the venv)

MXN, DUMP = sys.argv[1], sys.argv[2]
TOL = 1e-4


def chatglm_reference(W, cfg, ids):
    """ChatGLM2/3's forward from GLM.md: fused [Q|K|V] with multi-query groups, RoPE on the first
    half of each head in interleaved pairs, SwiGLU with the gate first, pre-RMSNorm."""
    B, T = ids.shape
    nh, g, hd = cfg["num_attention_heads"], cfg["multi_query_group_num"], cfg["kv_channels"]
    eps, F = cfg["layernorm_epsilon"], cfg["ffn_hidden_size"]

    def rms(x, w):
        return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + eps) * w

    rot = hd // 2
    inv = 1.0 / (10000.0 * cfg["rope_ratio"]) ** (torch.arange(0, rot, 2, dtype=torch.float64) / rot)
    ang = torch.arange(T, dtype=torch.float64)[:, None] * inv[None]  # (T, rot/2)
    cos, sin = ang.cos(), ang.sin()

    def rope(x):  # (B, T, heads, hd)
        r, p = x[..., :rot], x[..., rot:]
        a, b = r[..., 0::2], r[..., 1::2]
        c, s = cos[None, :, None], sin[None, :, None]
        r = torch.stack([a * c - b * s, b * c + a * s], -1).flatten(-2)
        return torch.cat([r, p], -1)

    x = W["transformer.embedding.word_embeddings.weight"][ids]
    mask = torch.tril(torch.ones(T, T, dtype=torch.bool))
    for l in range(cfg["num_layers"]):
        p = f"transformer.encoder.layers.{l}."
        h = rms(x, W[p + "input_layernorm.weight"])
        qkv = h @ W[p + "self_attention.query_key_value.weight"].T + W[p + "self_attention.query_key_value.bias"]
        q, k, v = qkv.split([nh * hd, g * hd, g * hd], -1)
        q, k = rope(q.view(B, T, nh, hd)), rope(k.view(B, T, g, hd))
        v = v.view(B, T, g, hd)
        k = k.repeat_interleave(nh // g, 2)  # group j serves query heads j*(nh/g) .. (j+1)*(nh/g)-1
        v = v.repeat_interleave(nh // g, 2)
        s = torch.einsum("bthd,bshd->bhts", q, k) / hd ** 0.5
        a = s.masked_fill(~mask, float("-inf")).softmax(-1)
        y = torch.einsum("bhts,bshd->bthd", a, v).reshape(B, T, nh * hd)
        x = x + y @ W[p + "self_attention.dense.weight"].T
        h = rms(x, W[p + "post_attention_layernorm.weight"])
        gu = h @ W[p + "mlp.dense_h_to_4h.weight"].T
        x = x + (torch.nn.functional.silu(gu[..., :F]) * gu[..., F:]) @ W[p + "mlp.dense_4h_to_h.weight"].T
    x = rms(x, W["transformer.encoder.final_layernorm.weight"])
    return x @ W["transformer.output_layer.weight"].T


# --- the checks --------------------------------------------------------------------------------
class HfModels(unittest.TestCase):
    def check_family(self, family):
        for odd in (False, True):
            with self.subTest(family=family, odd=odd), tempfile.TemporaryDirectory() as tmp:
                torch.manual_seed(1)
                model = perturb(make(family, odd), seed=11 + odd).eval()
                V = model.config.vocab_size
                B, T = (3, 23) if odd else (2, 32)
                ids = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(5))
                folder = os.path.join(tmp, "model")
                ref = model.double()
                if family == "chatglm":
                    W, cfg = to_chatglm(model, folder)
                    with torch.no_grad():
                        own = chatglm_reference(W, cfg, ids)
                        hf = ref(ids).logits
                    # 1e-6: transformers computes RoPE's frequencies in float32 even in a double model
                    self.assertLess(rel(own, hf), 1e-6, "chatglm_reference against GlmForCausalLM")
                    Wg = {k: v.clone().requires_grad_(True) for k, v in W.items()}
                    logits = chatglm_reference(Wg, cfg, ids)
                    params = Wg
                    fn = lambda x: chatglm_reference(W, cfg, x)
                else:
                    model.float().save_pretrained(folder)
                    ref = model.double()
                    logits = ref(ids).logits
                    params = dict(ref.named_parameters())
                    fn = lambda x: ref(x).logits
                loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1))
                loss.backward()
                got = run_dump(DUMP, folder, ids, tmp)
                e = rel(got["logits"].reshape(B, T, V), logits.detach())
                print(f"{family:8s} {'odd' if odd else 'even':4s} logits {e:.2e}", end="")
                self.assertLess(e, TOL, "logits")
                self.assertLess(abs(float(got["loss"][0]) - float(loss)) / float(loss), TOL, "loss")
                worst = 0.0
                for name, p in params.items():
                    if name == "lm_head.weight" and model.config.tie_word_embeddings:
                        continue
                    ge = rel(got["grad." + name], p.grad)
                    worst = max(worst, ge)
                    self.assertLess(ge, TOL, "gradient of " + name)
                print(f"  grads {worst:.2e}", end="")
                prompt = ids[0, :7].tolist()
                with torch.no_grad():
                    want = greedy_ref(fn, prompt, 64)
                self.assertEqual(greedy_mxn(MXN, folder, prompt, 64), want, "64 greedy tokens")
                print("  greedy 64 identical")

    def test_gpt2(self):
        self.check_family("gpt2")

    def test_llama(self):
        self.check_family("llama")

    def test_qwen2(self):
        self.check_family("qwen2")

    def test_glm(self):
        self.check_family("glm")

    def test_chatglm_layout(self):
        self.check_family("chatglm")


if __name__ == "__main__":
    unittest.main(argv=sys.argv[:1], verbosity=2)
