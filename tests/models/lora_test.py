#!/usr/bin/python3
"""LoRA and P-Tuning v2 in mxn against Hugging Face peft 0.13 and transformers 4.49, on tiny
random models.

Asserted, max|mxn - ref| / max|ref| per tensor, the reference in float64:
  - logits, loss and the gradients of every lora_A/lora_B of one forward+backward <= 1e-4, for
    GPT-2 (Conv1D, fused c_attn), LLaMA (GQA), Qwen2 and GLM, with a random adapter from peft;
  - one optimizer step of `mxn train --finetune lora` started from that adapter (--adapter) equals
    torch.optim.AdamW on peft's model over the same rows, <= 1e-4;
  - the checkpoint mxn writes is a PEFT folder: PeftModel.from_pretrained loads it and its logits
    equal mxn's <= 1e-4;
  - `mxn generate --adapter` gives peft's greedy tokens; `mxn merge` gives a folder whose logits
    equal peft's merge_and_unload() <= 1e-5.
  - the routed experts (Mixtral's w1/w2/w3, Qwen2-MoE's experts and shared expert): each expert's
    own pair, trained as one stack: logits, loss and every gradient <= 1e-4 against peft, the
    checkpoint's per-expert pairs load in peft (logits <= 1e-4), and `mxn merge` equals
    merge_and_unload() <= 1e-5;
  - P-Tuning v2 against our own PyTorch module: the prefix rows as every layer's past keys and
    values (transformers' DynamicCache), the text's positions from 0: logits, loss and the prefix
    gradients <= 1e-4 (LLaMA, Qwen2), one AdamW step <= 1e-4 with the optimizer state of the
    prefix alone, and `mxn generate --adapter` gives the module's greedy tokens.
usage: lora_test.py MXN DECODER_DUMP
"""
import json, os, subprocess, sys, tempfile, unittest

sys.path[:0] = [os.path.dirname(os.path.abspath(__file__)),
                os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "common")]
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
        rng = np.random.default_rng(0)
        cls.n_train = 300
        cls.tokens = rng.integers(0, 101, 400)  # within every test model's vocabulary
        cls.shard = os.path.join(cls.tmp.name, "data.bin")
        write_shard(cls.shard, cls.tokens, cls.n_train, 101)

    def base(self, family, seed=1):
        folder = os.path.join(self.tmp.name, f"{family}-base-{seed}")
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

    def train(self, base, out, extra, steps=1, B=3, T=16, seed=5):
        r = subprocess.run([MXN, "train", "--model", base, "--finetune", "lora", "--data", self.shard,
                            "--steps", str(steps), "--batch", str(B), "--n_ctx", str(T), "--seed", str(seed),
                            "--lr", "1e-2", "--min_lr", "1e-2", "--warmup", "0", "--clip", "0",
                            "--weight_decay", "0.1", "--eval_every", "0", "--ckpt_every", "0",
                            "--out", out, "--dtype", "f32"] + extra, capture_output=True, text=True)
        self.assertEqual(r.returncode, 0, r.stderr + r.stdout)
        with open(os.path.join(out, "latest")) as f:
            return os.path.join(out, f.read().strip())

    def rows(self, B, T, seed, step=1):
        """The rows of a training step: offsets by splitmix64 of (seed, step, row), as the trainer."""
        key = mix64(seed ^ mix64(step))
        offs = [mix64((key + b) & M64) % (self.n_train - T - 1) for b in range(B)]
        x = torch.tensor(np.stack([self.tokens[o:o + T] for o in offs]).astype(np.int64))
        y = torch.tensor(np.stack([self.tokens[o + 1:o + T + 1] for o in offs]).astype(np.int64))
        return x, y

    def test_optimizer_step_against_torch(self):
        """`mxn train --finetune lora --adapter A --steps 1` equals one torch.optim.AdamW step on
        peft's model from the same adapter over the same rows; the checkpoint's optimizer state
        is the adapter's two moments and nothing else."""
        base, model = self.base("llama")
        afolder, pm = self.adapter("llama", model)
        ckpt = self.train(base, os.path.join(self.tmp.name, "step-run"), ["--adapter", afolder])
        x, y = self.rows(3, 16, 5)
        pm = pm.double()
        params = {n: p for n, p in pm.named_parameters() if p.requires_grad}
        before = {n: p.detach().clone() for n, p in params.items()}
        opt = torch.optim.AdamW(params.values(), lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
        logits = pm(x).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        loss.backward()
        opt.step()
        got = load_file(os.path.join(ckpt, "adapter_model.safetensors"))
        self.assertEqual(sorted(got), sorted(n.replace(".default", "") for n in params))
        worst = 0.0
        for n, p in params.items():
            key = n.replace(".default", "")
            want = (p.detach() - before[n]).numpy()
            e = rel(got[key] - before[n].numpy(), want)
            self.assertLess(e, TOL, key)
            worst = max(worst, e)
        with open(os.path.join(self.tmp.name, "step-run", "metrics.jsonl")) as f:
            mloss = json.loads(f.readline())["loss"]
        self.assertLess(abs(mloss - loss.item()) / loss.item(), TOL)
        opt_state = load_file(os.path.join(ckpt, "optimizer.safetensors"))
        n_adapter = sum(p.numel() for p in params.values())
        self.assertEqual(sorted(opt_state),  # mxn's names: the PEFT ones without base_model.model.
                         sorted(f"{m}.{k[len('base_model.model.'):]}" for m in "mv" for k in got))
        opt_bytes = sum(v.nbytes for v in opt_state.values())
        self.assertEqual(opt_bytes, 2 * 4 * n_adapter)
        print(f"lora optimizer step against torch AdamW: worst update error {worst:.2e}; loss "
              f"{mloss:.6f} vs {loss.item():.6f}; optimizer state {opt_bytes} bytes = 2 moments x "
              f"{n_adapter} adapter parameters (the base has {sum(p.numel() for p in model.parameters()) - n_adapter})")
        pm.float()

    def merge_gap(self, family, base, run, ref, ids):
        """`mxn merge` of a run's adapter: the folded folder's logits against peft's
        merge_and_unload() (<= 1e-5 asserted), the gap returned."""
        from transformers import AutoModelForCausalLM
        merged = os.path.join(self.tmp.name, f"{family}-merged")
        r = subprocess.run([MXN, "merge", "--model", base, "--adapter", run, merged],
                           capture_output=True, text=True)
        self.assertEqual(r.returncode, 0, r.stderr)
        folded = AutoModelForCausalLM.from_pretrained(merged).double().eval()
        with torch.no_grad():
            m_logits = folded(ids).logits.reshape(-1, ref.config.vocab_size).numpy()
            p_logits = ref.merge_and_unload()(ids).logits.reshape(-1, ref.config.vocab_size).numpy()
        e_merge = rel(m_logits, p_logits)
        self.assertLess(e_merge, 1e-5)
        return e_merge

    def test_peft_loads_mxn_adapter_and_merge(self):
        """A LoRA run's checkpoint is a PEFT folder: peft loads it onto the base with transformers
        and its logits equal mxn's; generate --adapter and mxn merge agree with peft."""
        for family in ("qwen2", "gpt2"):
            with self.subTest(family=family):
                base, _ = self.base(family, seed=4)
                run = os.path.join(self.tmp.name, f"{family}-run")
                ckpt = self.train(base, run, ["--lora_r", "4", "--lora_alpha", "16"], steps=5, B=4, T=24)
                with open(os.path.join(ckpt, "adapter_config.json")) as f:
                    acfg = json.load(f)
                self.assertEqual((acfg["peft_type"], acfg["r"], acfg["lora_alpha"]), ("LORA", 4, 16))
                from transformers import AutoModelForCausalLM
                ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), ckpt).double().eval()
                b_norm = max(float(p.abs().max()) for n, p in ref.named_parameters() if "lora_B" in n)
                self.assertGreater(b_norm, 1e-3, "the adapter trained (B left zero)")
                ids = torch.randint(0, 101, (2, 13), generator=torch.Generator().manual_seed(9))
                got = self.dump(base, ids, run)  # an mxn run folder reads as its latest adapter
                with torch.no_grad():
                    want = ref(ids).logits.reshape(-1, ref.config.vocab_size).numpy()
                e_logits = rel(got["logits"], want)
                self.assertLess(e_logits, TOL)
                # generate --adapter: peft's greedy tokens
                prompt = [5, 17, 33, 2]
                r = subprocess.run([MXN, "generate", "--model", base, "--adapter", ckpt, "--prompt-ids",
                                    ",".join(map(str, prompt)), "--max-tokens", "16", "--temperature", "0",
                                    "--ignore-eos", "--print-ids"], capture_output=True, text=True)
                self.assertEqual(r.returncode, 0, r.stderr)
                mine = [int(t) for t in r.stdout.split()]
                seq = torch.tensor([prompt])
                with torch.no_grad():
                    for _ in range(16):
                        seq = torch.cat([seq, ref(seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
                self.assertEqual(mine, seq[0, len(prompt):].tolist())
                # mxn merge: the folded folder's logits equal peft's merge_and_unload()
                e_merge = self.merge_gap(family, base, run, ref, ids)
                print(f"lora {family:6s} mxn's adapter in peft: logits {e_logits:.2e}; generate --adapter: "
                      f"16 greedy tokens equal peft's; mxn merge vs merge_and_unload: {e_merge:.2e}")

    # --- P-Tuning v2 --------------------------------------------------------------------------
    def test_moe_experts_against_peft(self):
        """LoRA on every expert's linears: peft wraps each expert's nn.Linear; mxn trains the
        layer's experts as one stack (grouped GEMMs) and writes PEFT's per-expert names."""
        from moe_common import make_hf
        from transformers import AutoModelForCausalLM
        targets = {"mixtral": ["q_proj", "v_proj", "w1", "w2", "w3"],
                   "qwen2_moe": ["k_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
        for family in ("mixtral", "qwen2_moe"):
            with self.subTest(family=family):
                torch.manual_seed(1)
                model = perturb(make_hf(family, False), 1).eval()
                base = os.path.join(self.tmp.name, f"{family}-base")
                model.save_pretrained(base)
                torch.manual_seed(2)
                pm = get_peft_model(model, LoraConfig(r=3, lora_alpha=6, init_lora_weights=False,
                                                      target_modules=targets[family], task_type="CAUSAL_LM"))
                afolder = os.path.join(self.tmp.name, f"{family}-adapter")
                pm.save_pretrained(afolder)
                ids = torch.randint(0, 101, (2, 11), generator=torch.Generator().manual_seed(3))
                got = self.dump(base, ids, afolder)
                pm = pm.double()
                out = pm(ids, labels=ids)
                out.loss.backward()
                worst = max(rel(got["logits"], out.logits.detach().reshape(-1, out.logits.shape[-1]).numpy()),
                            rel(got["loss"], [out.loss.item()]))
                self.assertLess(worst, TOL, "logits and loss")
                grads = {}  # peft's per-expert gradients stacked as mxn keeps them
                for name, p in pm.named_parameters():
                    if p.requires_grad:
                        key = "grad." + name.replace("base_model.model.", "", 1).replace(".default", "")
                        head, _, tail = key.partition(".experts.")
                        if tail and not head.endswith("shared"):
                            e, _, leaf = tail.partition(".")
                            grads.setdefault(f"{head}.experts.{leaf}", {})[int(e)] = p.grad.numpy()
                        else:
                            grads[key] = p.grad.numpy()
                stacked = sum(isinstance(v, dict) for v in grads.values())
                self.assertEqual(stacked, 2 * 3 * 2, "A and B of 3 expert linears in 2 MoE layers")
                for key, want in grads.items():
                    if isinstance(want, dict):
                        want = np.stack([want[e] for e in range(len(want))])
                    self.assertIn(key, got)
                    self.assertEqual(got[key].shape, want.shape, key)
                    e = rel(got[key], want)
                    self.assertLess(e, TOL, key)
                    worst = max(worst, e)
                self.assertEqual(len(grads), sum(1 for k in got if k.startswith("grad.")))
                pm.float()
                # Trained from a fresh adapter: peft reads the checkpoint's per-expert pairs, and
                # mxn merge folds each into its expert.
                run = os.path.join(self.tmp.name, f"{family}-run")
                ckpt = self.train(base, run, ["--lora_r", "3", "--lora_alpha", "6", "--lora_targets",
                                              ",".join(targets[family])], steps=4, B=4, T=16)
                ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), ckpt).double().eval()
                b_max = max(float(p.abs().max()) for n, p in ref.named_parameters()
                            if "lora_B" in n and ".experts." in n)
                self.assertGreater(b_max, 1e-3, "the experts' adapters trained")
                ids = torch.randint(0, 101, (2, 13), generator=torch.Generator().manual_seed(9))
                got = self.dump(base, ids, run)
                with torch.no_grad():
                    want = ref(ids).logits.reshape(-1, ref.config.vocab_size).numpy()
                e_logits = rel(got["logits"], want)
                self.assertLess(e_logits, TOL)
                e_merge = self.merge_gap(family, base, run, ref, ids)
                print(f"lora {family:9s} experts: logits, loss and {len(grads)} adapter gradients ({stacked} "
                      f"expert stacks) against peft: worst {worst:.2e}; trained adapter in peft: logits "
                      f"{e_logits:.2e}; mxn merge vs merge_and_unload: {e_merge:.2e}")

    def prefix_folder(self, name, model, P, seed):
        """A prefix adapter as PEFT's PREFIX_TUNING saves one (no projection): prompt_embeddings
        (P, layers * 2 * kv_dim), each layer's keys then values."""
        c = model.config
        W = c.num_key_value_heads * (c.hidden_size // c.num_attention_heads)
        g = torch.Generator().manual_seed(seed)
        emb = torch.randn(P, c.num_hidden_layers * 2 * W, generator=g) * 0.5
        folder = os.path.join(self.tmp.name, name)
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "adapter_config.json"), "w") as f:
            json.dump({"peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": P,
                       "num_layers": c.num_hidden_layers, "token_dim": W,
                       "num_attention_heads": c.num_key_value_heads, "prefix_projection": False}, f)
        save_file({"prompt_embeddings": emb.numpy()}, os.path.join(folder, "adapter_model.safetensors"))
        return folder, emb

    @staticmethod
    def prefix_forward(model, ids, emb):
        """Our reference P-Tuning v2: layer l's prefix keys and values (columns (2l)W.. and
        (2l+1)W.. of emb) stand before the sequence's own in every layer, unrotated, seen by every
        query; the text keeps positions 0..T-1."""
        from transformers import DynamicCache
        c = model.config
        B, T = ids.shape
        P, G = emb.shape[0], c.num_key_value_heads
        D = c.hidden_size // c.num_attention_heads
        W = G * D
        cache = DynamicCache()
        for l in range(c.num_hidden_layers):
            kv = [emb[:, (2 * l + i) * W:(2 * l + i + 1) * W].reshape(P, G, D).permute(1, 0, 2)[None].expand(B, G, P, D)
                  for i in (0, 1)]
            cache.update(kv[0], kv[1], l)
        return model(ids, past_key_values=cache, position_ids=torch.arange(T)[None].expand(B, T),
                     attention_mask=torch.ones(B, P + T, dtype=torch.long), use_cache=True).logits

    def test_ptuning_against_torch(self):
        for family in ("llama", "qwen2"):
            with self.subTest(family=family):
                base, model = self.base(family, seed=6)
                model = model.double()
                afolder, emb0 = self.prefix_folder(f"{family}-prefix", model, 3, 8)
                ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(4))
                got = self.dump(base, ids, afolder)
                emb = emb0.double().clone().requires_grad_(True)
                logits = self.prefix_forward(model, ids, emb)
                loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
                loss.backward()
                worst = rel(got["logits"], logits.detach().reshape(-1, logits.shape[-1]).numpy())
                self.assertLess(worst, TOL, "logits")
                self.assertLess(rel(got["loss"], [loss.item()]), TOL, "loss")
                L = model.config.num_hidden_layers
                W = emb.shape[1] // (2 * L)
                self.assertEqual(sorted(k for k in got if k.startswith("grad.")),
                                 sorted(f"grad.prefix.{l}.{n}" for l in range(L) for n in ("key", "value")))
                for l in range(L):
                    for i, n in enumerate(("key", "value")):
                        e = rel(got[f"grad.prefix.{l}.{n}"], emb.grad[:, (2 * l + i) * W:(2 * l + i + 1) * W].numpy())
                        self.assertLess(e, TOL, f"prefix.{l}.{n}")
                        worst = max(worst, e)
                print(f"ptuning {family:6s} logits, loss and {2 * L} prefix gradients against our PyTorch module: worst {worst:.2e}")
                model.float()

    def test_ptuning_step_generate_merge(self):
        base, model = self.base("llama", seed=7)
        afolder, emb0 = self.prefix_folder("llama-prefix-step", model, 4, 9)
        run = os.path.join(self.tmp.name, "ptuning-run")
        ckpt = self.train(base, run, ["--finetune", "ptuning", "--adapter", afolder])
        x, y = self.rows(3, 16, 5)
        model = model.double()
        emb = emb0.double().clone().requires_grad_(True)
        opt = torch.optim.AdamW([emb], lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
        logits = self.prefix_forward(model, x, emb)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        loss.backward()
        opt.step()
        got = load_file(os.path.join(ckpt, "adapter_model.safetensors"))
        self.assertEqual(sorted(got), ["prompt_embeddings"])
        e = rel(got["prompt_embeddings"] - emb0.numpy(), (emb.detach() - emb0.double()).numpy())
        self.assertLess(e, TOL)
        opt_state = load_file(os.path.join(ckpt, "optimizer.safetensors"))
        self.assertEqual(sum(v.nbytes for v in opt_state.values()), 2 * 4 * emb.numel())
        with open(os.path.join(run, "metrics.jsonl")) as f:
            mloss = json.loads(f.readline())["loss"]
        self.assertLess(abs(mloss - loss.item()) / loss.item(), TOL)
        # generate --adapter: the prefix rows sit in the KV cache's attention; greedy tokens equal
        # the reference module's (recomputed from scratch each token).
        prompt = [3, 14, 15, 92]
        r = subprocess.run([MXN, "generate", "--model", base, "--adapter", run, "--prompt-ids",
                            ",".join(map(str, prompt)), "--max-tokens", "12", "--temperature", "0",
                            "--ignore-eos", "--print-ids"], capture_output=True, text=True)
        self.assertEqual(r.returncode, 0, r.stderr)
        trained = torch.tensor(got["prompt_embeddings"], dtype=torch.float64)
        seq = torch.tensor([prompt])
        with torch.no_grad():
            for _ in range(12):
                seq = torch.cat([seq, self.prefix_forward(model, seq, trained)[:, -1].argmax(-1, keepdim=True)], 1)
        self.assertEqual([int(t) for t in r.stdout.split()], seq[0, len(prompt):].tolist())
        r = subprocess.run([MXN, "merge", "--model", base, "--adapter", run, os.path.join(self.tmp.name, "no")],
                           capture_output=True, text=True)
        self.assertEqual(r.returncode, 1)
        self.assertIn("cannot be folded", r.stderr)
        print(f"ptuning one AdamW step against torch: {e:.2e}; optimizer state {2 * 4 * emb.numel()} bytes "
              f"(the prefix's two moments); generate --adapter: 12 greedy tokens equal the module's")
        model.float()

    def test_ptuning_projection(self):
        """--prefix_projection: the rows come out of tanh(E W1^T + b1) W2^T + b2 while training.
        After one step at lr 1e-30 the checkpoint holds the MLP as it started, and the optimizer's
        first moment is (1 - beta1) x the gradient: both the loss and every MLP gradient equal
        our PyTorch module's; the adapter keeps the rows the MLP gives (and not the MLP)."""
        base, model = self.base("llama", seed=10)
        run = os.path.join(self.tmp.name, "projection-run")
        ckpt = self.train(base, run, ["--finetune", "ptuning", "--prefix_len", "3", "--prefix_projection", "8",
                                      "--lr", "1e-30", "--min_lr", "1e-30", "--weight_decay", "0"])
        w = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True)
             for k, v in load_file(os.path.join(ckpt, "model.safetensors")).items()}
        L = model.config.num_hidden_layers
        e = "prefix_encoder."
        h = torch.tanh(w[e + "embedding"] @ w[e + "dense.weight"].T + w[e + "dense.bias"])
        cols = []
        for l in range(L):
            for kind in ("key", "value"):
                cols.append(h @ w[f"{e}{l}.{kind}.weight"].T + w[f"{e}{l}.{kind}.bias"])
        emb = torch.cat(cols, 1)  # prompt_embeddings' layout: each layer's keys, then values
        x, y = self.rows(3, 16, 5)
        model = model.double()
        logits = self.prefix_forward(model, x, emb)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        loss.backward()
        with open(os.path.join(run, "metrics.jsonl")) as f:
            mloss = json.loads(f.readline())["loss"]
        self.assertLess(abs(mloss - loss.item()) / loss.item(), TOL)
        m = load_file(os.path.join(ckpt, "optimizer.safetensors"))
        self.assertEqual(sorted(k[2:] for k in m if k.startswith("m.")), sorted(w))
        worst = max(rel(m["m." + k] / 0.1, t.grad.numpy()) for k, t in w.items())
        self.assertLess(worst, TOL)
        rows = load_file(os.path.join(ckpt, "adapter_model.safetensors"))
        self.assertEqual(sorted(rows), ["prompt_embeddings"])
        e_rows = rel(rows["prompt_embeddings"], emb.detach().numpy())
        self.assertLess(e_rows, 1e-5)
        print(f"ptuning MLP reparameterisation: loss {mloss:.6f} vs {loss.item():.6f}; {len(w)} MLP gradients "
              f"(from the first moment) worst {worst:.2e}; the adapter's rows {e_rows:.2e}")
        model.float()


if __name__ == "__main__":
    unittest.main(argv=sys.argv[:1], verbosity=2)
