#!/usr/bin/python3
"""mxn convert: models out as Hugging Face folders and GGUF files, and back in.

For every family (a tiny random transformers model, odd and even sizes, as in hf_models_test):
  - HF out: transformers' from_pretrained loads mxn's folder; its logits equal the original's
    (f32, bit-exact weights); f16/bf16 folders hold exactly torch's rounding of each weight.
  - GGUF out (f32, f16, bf16, Q8_0): the `gguf` package reads every tensor back bit-exact against
    the same transform done here in numpy with gguf's own quantizer, under the name gguf's tensor
    map gives the Hugging Face name (GPT-2 transposed, LLaMA's q/k permuted, GLM's q/k/v fused),
    and every name is one llama.cpp lists for the architecture.
  - GGUF in: the f32 file converts back to the same weights, and transformers' logits match.
  - An mxn run folder converts to an HF folder whose weights are the checkpoint's.
  - The GPT-2 tokenizer goes into GGUF as llama.cpp's tokens and merges.
usage: convert_test.py MXN
"""
import json, math, os, re, shutil, subprocess, sys, tempfile, unittest

sys.path[:0] = [os.path.dirname(os.path.abspath(__file__)),
                os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "common")]
from hf_common import make, np, perturb, rel, to_chatglm, torch  # noqa: E402  (may re-exec in the venv)
import gguf  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

MXN = sys.argv[1]
SHARED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "shared", "data", "gpt2-bpe")
ARCH = {"gpt2": gguf.MODEL_ARCH.GPT2, "llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2,
        "glm": gguf.MODEL_ARCH.CHATGLM, "chatglm": gguf.MODEL_ARCH.CHATGLM}
QT = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
      "bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0,
      "q4_0": gguf.GGMLQuantizationType.Q4_0}


def mxn(*args):
    r = subprocess.run([MXN, *args], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return r.stdout


def llama_permute(w, heads):  # as llama.cpp's convert_hf_to_gguf.py
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def expected_gguf(family, cfg, sd):
    """{gguf name: f32 array in GGUF's (numpy) layout}, from the Hugging Face state dict."""
    arch = ARCH[family]
    names = gguf.get_tensor_name_map(arch, cfg["layers"])
    out = {}
    for k, v in sd.items():
        v = v.float().numpy()
        stem, kind = k.rsplit(".", 1)
        if family == "gpt2" and k.endswith((".attn.bias", ".attn.masked_bias")):
            continue
        if family == "glm" and stem.endswith(("k_proj", "v_proj")):
            continue
        if family == "glm" and stem.endswith("q_proj"):  # fused, as the ChatGLM layout stores it
            v = np.concatenate([sd[k.replace("q_proj", p)].float().numpy() for p in ("q_proj", "k_proj", "v_proj")])
            stem = stem.replace("q_proj", "query_key_value")
            name = names.get_name(stem.replace("model.layers", "encoder.layers").replace("self_attn", "self_attention"))
        else:
            name = names.get_name(stem.removeprefix("transformer.") if family == "chatglm" else stem)
        assert name, f"gguf has no name for {stem}"
        if family == "gpt2" and v.ndim == 2 and name.startswith("blk."):
            v = v.T
        if family == "llama" and name.endswith("attn_q"):
            v = llama_permute(v, cfg["heads"])
        if family == "llama" and name.endswith("attn_k"):
            v = llama_permute(v, cfg["kv_heads"] or cfg["heads"])
        out[f"{name}.{kind}"] = np.ascontiguousarray(v)
    if cfg["rope_scaling"] == 2:  # Llama 3's factors, as llama.cpp's converter computes them
        dim = cfg["head_dim"] or cfg["hidden"] // cfg["heads"]
        freqs = 1.0 / (cfg["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        lo, hi, f, old = cfg["rope_low_freq"], cfg["rope_high_freq"], cfg["rope_factor"], cfg["rope_orig_max_pos"]
        r = []
        for fr in freqs:
            wave = 2 * math.pi / fr
            s = (old / wave - lo) / (hi - lo)
            r.append(1 if wave < old / hi else f if wave > old / lo else 1 / ((1 - s) / f + s))
        out["rope_freqs.weight"] = torch.tensor(r, dtype=torch.float32).numpy()
    return out


def encode(arr, qt):
    """GGUF's bytes for `arr` in type `qt` (1-D stays f32; Q8_0 and Q4_0 rows not a multiple of
    32: f16)."""
    if arr.ndim < 2:
        return gguf.GGMLQuantizationType.F32, arr.astype(np.float32).tobytes()
    if qt in ("q8_0", "q4_0") and arr.shape[-1] % 32:
        qt = "f16"
    if qt == "f32":
        return QT[qt], arr.tobytes()
    if qt == "f16":
        return QT[qt], arr.astype(np.float16).tobytes()
    return QT[qt], gguf.quants.quantize(arr, QT[qt]).tobytes()


class Convert(unittest.TestCase):
    def check_family(self, family):
        for odd in (False, True):
            with self.subTest(family=family, odd=odd), tempfile.TemporaryDirectory() as tmp:
                torch.manual_seed(1)
                model = perturb(make(family, odd), seed=11 + odd).eval()
                src = os.path.join(tmp, "src")
                if family == "chatglm":
                    W, _ = to_chatglm(model, src)
                    sd = {k: v.float() for k, v in W.items()}
                else:
                    model.save_pretrained(src)
                    sd = load_file(os.path.join(src, "model.safetensors"))
                ids = torch.randint(0, model.config.vocab_size, (2, 19), generator=torch.Generator().manual_seed(3))
                with torch.no_grad():
                    want = model(ids).logits.numpy()
                # Hugging Face folders out.
                if family != "chatglm":
                    for dt, tdt in (("f32", torch.float32), ("f16", torch.float16), ("bf16", torch.bfloat16)):
                        out = os.path.join(tmp, "hf-" + dt)
                        mxn("convert", src, out, "--type", dt)
                        got = load_file(os.path.join(out, "model.safetensors"))
                        for k, v in got.items():
                            self.assertTrue(torch.equal(v, sd[k].to(tdt)), f"{dt} {k}")
                        if dt == "f32":
                            back = AutoModelForCausalLM.from_pretrained(out).eval()
                            with torch.no_grad():
                                self.assertEqual(rel(back(ids).logits.numpy(), want), 0.0, "HF round trip logits")
                # GGUF out, every type.
                cfg = None
                for qt in ("f32", "f16", "bf16", "q8_0", "q4_0"):
                    path = os.path.join(tmp, f"m-{qt}.gguf")
                    mxn("convert", src, path, "--type", qt)
                    r = gguf.GGUFReader(path)
                    f = {k: v for k, v in r.fields.items()}
                    arch = bytes(f["general.architecture"].parts[-1]).decode()
                    self.assertEqual(arch, gguf.MODEL_ARCH_NAMES[ARCH[family]])
                    cfg = json.loads(bytes(f["mxn.config"].parts[-1]).decode())
                    exp = expected_gguf(family, cfg, sd)
                    allowed = {gguf.TENSOR_NAMES[t].format(bid=b) for t in gguf.MODEL_TENSORS[ARCH[family]]
                               for b in range(cfg["layers"])}
                    got = {t.name: t for t in r.tensors}
                    self.assertEqual(sorted(got), sorted(exp), "tensor names")
                    for name, arr in exp.items():
                        t = got[name]
                        self.assertIn(name.rsplit(".", 1)[0], allowed)
                        ttype, data = encode(arr, qt)
                        self.assertEqual(t.tensor_type, ttype, name)
                        self.assertEqual(list(int(d) for d in t.shape), list(reversed(arr.shape)), name)
                        if name == "rope_freqs.weight":  # computed in float32 by llama.cpp's converter
                            self.assertLess(rel(np.asarray(t.data), arr), 1e-6)
                            continue
                        self.assertEqual(np.asarray(t.data).tobytes(), data, f"{qt} {name} bytes")
                    if qt == "q4_0":  # GGUF in: every Q4_0 block decodes as the gguf package's
                        back = os.path.join(tmp, "back-" + qt)
                        mxn("convert", path, back)
                        dec = expected_gguf(family, cfg, load_file(os.path.join(back, "model.safetensors")))
                        n = 0
                        for name, t in got.items():
                            if t.tensor_type == QT[qt] and name in dec:
                                want = gguf.quants.dequantize(t.data, t.tensor_type).reshape(dec[name].shape)
                                self.assertTrue(np.array_equal(dec[name], want), f"q4_0 {name} decoded")
                                n += 1
                        self.assertTrue(n > 0 or odd)  # odd widths: no row of 32, every matrix f16
                    if qt in ("f32", "bf16", "q8_0"):  # GGUF in: back to a Hugging Face folder
                        back = os.path.join(tmp, "back-" + qt)
                        mxn("convert", path, back)
                        bw = load_file(os.path.join(back, "model.safetensors"))
                        for k, v in bw.items():
                            if qt == "f32":
                                self.assertTrue(torch.equal(v, sd[k]), k)
                            elif qt == "bf16":  # matrices as the file rounded them, 1-D kept f32
                                w = sd[k].to(torch.bfloat16).float() if sd[k].dim() >= 2 else sd[k]
                                self.assertTrue(torch.equal(v.float(), w), k)
                            else:
                                self.assertLess(rel(v.numpy(), sd[k].numpy()), 1e-2, k)
                        if qt == "f32" and family != "chatglm":
                            m2 = AutoModelForCausalLM.from_pretrained(back).eval()
                            with torch.no_grad():
                                self.assertEqual(rel(m2(ids).logits.numpy(), want), 0.0, "GGUF round trip")
                if family != "chatglm":  # bf16 weights: as transformers on the rounded weights
                    self.bf16_weights(model, os.path.join(tmp, "m-bf16.gguf"), ids[0, :5].tolist())
                if not odd and family != "glm":  # a GGUF written by gguf's own writer, no mxn.config
                    self.foreign_gguf(family, cfg, sd, tmp)
                print(f"{family:8s} {'odd' if odd else 'even':4s} HF f32/f16/bf16 and GGUF f32/f16/bf16/q8_0/q4_0 bit-exact")

    def bf16_weights(self, model, path, prompt):
        """mxn generate keeps a bf16 file's weights in bf16 (decoding in f32 arithmetic, the prompt's
        GEMMs in bf16 with f32 accumulation): its greedy tokens equal transformers' in float64 on
        the same bf16-rounded weights."""
        ref = type(model)(model.config)
        ref.load_state_dict({k: v.to(torch.bfloat16).double() if v.dim() >= 2 else v.double()
                             for k, v in model.state_dict().items()})  # GGUF keeps 1-D in f32
        ref = ref.double().eval()
        ids = list(prompt)
        with torch.no_grad():
            for _ in range(32):
                ids.append(int(ref(torch.tensor([ids])).logits[0, -1].argmax()))
        # bf16 on the device straight from the file's bf16 (the tensors mxn does not rearrange are
        # held as stored), and widened to f32 on the device.
        for weights in ("bf16", "f32"):
            out = mxn("generate", "--model", path, "--weights", weights, "--prompt-ids", ",".join(map(str, prompt)),
                      "--max-tokens", "32", "--temperature", "0", "--ignore-eos", "--print-ids")
            self.assertEqual([int(t) for t in out.split()], ids[len(prompt):], f"greedy with {weights} weights")

    def foreign_gguf(self, family, cfg, sd, tmp):
        path = os.path.join(tmp, "foreign.gguf")
        arch = gguf.MODEL_ARCH_NAMES[ARCH[family]]
        w = gguf.GGUFWriter(path, arch)
        w.add_context_length(cfg["max_pos"])
        w.add_embedding_length(cfg["hidden"])
        w.add_block_count(cfg["layers"])
        w.add_feed_forward_length(cfg["ffn"])
        w.add_head_count(cfg["heads"])
        if family == "gpt2":
            w.add_layer_norm_eps(cfg["norm_eps"])
        else:
            w.add_head_count_kv(cfg["kv_heads"] or cfg["heads"])
            w.add_layer_norm_rms_eps(cfg["norm_eps"])
            w.add_rope_freq_base(cfg["rope_theta"])
            hd = cfg["head_dim"] or cfg["hidden"] // cfg["heads"]
            w.add_rope_dimension_count(int(hd * cfg["rope_fraction"]))
            if cfg["head_dim"]:
                w.add_key_length(hd)
                w.add_value_length(hd)
        for name, arr in expected_gguf(family, cfg, sd).items():
            w.add_tensor(name, arr)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        back = os.path.join(tmp, "foreign-back")
        mxn("convert", path, back)
        bw = load_file(os.path.join(back, "model.safetensors"))
        self.assertEqual(sorted(bw), sorted(k for k in sd if not k.endswith((".attn.bias", "masked_bias"))
                                            and not (k == "lm_head.weight" and cfg["tie_embeddings"])))
        for k, v in bw.items():
            self.assertTrue(torch.equal(v, sd[k]), "foreign GGUF " + k)

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

    def test_checkpoint_and_tokenizer(self):
        with tempfile.TemporaryDirectory() as tmp:
            src = os.path.join(tmp, "gpt2")
            model = perturb(make("gpt2", False), seed=3)
            model.config.vocab_size = 50257
            model.resize_token_embeddings(50257)
            model.save_pretrained(src)
            for f in ("vocab.json", "merges.txt"):
                shutil.copy(os.path.join(SHARED, "encoder.json" if f == "vocab.json" else "vocab.bpe"),
                            os.path.join(src, f))
            run = os.path.join(tmp, "run")
            text = os.path.join(tmp, "t.txt")
            with open(text, "w") as fh:
                fh.write("In the beginning God created the heaven and the earth. " * 200)
            shard = os.path.join(tmp, "t.bin")
            mxn("prepare", text, "--out", shard, "--tokenizer", src)
            mxn("train", "--model", src, "--data", shard, "--steps", "2", "--batch", "2",
                "--n_ctx", "32", "--eval_every", "0", "--ckpt_every", "2", "--out", run, "--log_every", "100", "--dtype", "f32")
            out = os.path.join(tmp, "exported")
            mxn("convert", run, out)
            ck = open(os.path.join(run, "latest")).read().strip()
            want = load_file(os.path.join(run, ck, "model.safetensors"))
            got = load_file(os.path.join(out, "model.safetensors"))
            self.assertEqual(sorted(got), sorted(want))
            for k in want:
                self.assertTrue(torch.equal(got[k], want[k]), k)
            self.assertFalse(torch.equal(got["transformer.wte.weight"], model.transformer.wte.weight.detach()),
                             "the run trained")
            m = AutoModelForCausalLM.from_pretrained(out)
            self.assertTrue(torch.equal(m.transformer.wte.weight.detach(), want["transformer.wte.weight"]))
            self.assertTrue(os.path.exists(os.path.join(out, "merges.txt")), "tokenizer files go along")
            # The tokenizer as llama.cpp reads it.
            path = os.path.join(tmp, "g.gguf")
            mxn("convert", out, path)
            r = gguf.GGUFReader(path)
            fld = r.fields
            tokens = [bytes(fld["tokenizer.ggml.tokens"].parts[i]).decode() for i in fld["tokenizer.ggml.tokens"].data]
            vocab = json.load(open(os.path.join(SHARED, "encoder.json")))
            self.assertEqual(tokens, sorted(vocab, key=vocab.get))
            merges = [bytes(fld["tokenizer.ggml.merges"].parts[i]).decode() for i in fld["tokenizer.ggml.merges"].data]
            lines = [l for l in open(os.path.join(SHARED, "vocab.bpe"), encoding="utf-8").read().split("\n")
                     if l and not l.startswith("#version")]
            self.assertEqual(merges, lines)
            self.assertEqual(bytes(fld["tokenizer.ggml.model"].parts[-1]).decode(), "gpt2")
            # The end of text is always written, and marked a control token as llama.cpp's converter does.
            eos = int(fld["tokenizer.ggml.eos_token_id"].parts[-1][0])
            self.assertEqual(eos, vocab["<|endoftext|>"])
            types = fld["tokenizer.ggml.token_type"]
            self.assertEqual(int(types.parts[types.data[eos]][0]), 3)
            # The GGUF alone generates from text, as the folder it came from does.
            gen = [subprocess.run([MXN, "generate", "--model", m, "--prompt", "In the beginning God",
                                   "--max-tokens", "8", "--temperature", "0"], capture_output=True, text=True)
                   for m in (out, path)]
            self.assertEqual(gen[1].returncode, 0, gen[1].stderr)
            self.assertEqual(gen[1].stdout, gen[0].stdout)
            self.assertTrue(gen[1].stdout.startswith("In the beginning God"), gen[1].stdout)
            # A tokenizer mxn cannot read (another pre-tokenizer) leaves the model usable from ids,
            # and a text prompt is refused in one line naming why.
            odd = os.path.join(tmp, "odd-pre.gguf")
            data = open(path, "rb").read()
            key = b"\x05\x00\x00\x00\x00\x00\x00\x00gpt-2"
            self.assertEqual(data.count(key), 1)
            open(odd, "wb").write(data.replace(key, key[:-5] + b"gpt-9"))
            ok = subprocess.run([MXN, "generate", "--model", odd, "--prompt-ids", "464,3726", "--max-tokens", "2"],
                                capture_output=True, text=True)
            self.assertEqual(ok.returncode, 0, ok.stderr)
            bad = subprocess.run([MXN, "generate", "--model", odd, "--prompt", "In the beginning"],
                                 capture_output=True, text=True)
            self.assertEqual(bad.returncode, 1)
            self.assertEqual(bad.stderr.strip(), f"mxn: error: {odd}: pre-tokenizer 'gpt-9' is not one mxn reads "
                             "(gpt-2, llama-bpe, qwen2, chatglm-bpe): give the prompt as --prompt-ids")
            # Perplexity of the GGUF on a text, as llama-perplexity computes it (chunks of 16 tokens,
            # the second half of each scored), against transformers on the folder's tokens.
            from transformers import GPT2TokenizerFast
            story = os.path.join(tmp, "story.txt")
            with open(story, "w") as fh:
                fh.write("And God said, Let there be light: and there was light. And God saw the light, "
                         "that it was good: and God divided the light from the darkness. " * 6)
            r = subprocess.run([MXN, "eval", "--model", path, "--data", story, "--perplexity", "--ctx", "16"],
                               capture_output=True, text=True)
            self.assertEqual(r.returncode, 0, r.stderr)
            got = float(re.search(r"perplexity: ([0-9.]+)", r.stdout).group(1))
            ids = GPT2TokenizerFast.from_pretrained(out).encode(open(story).read())
            nll, n = 0.0, 0
            with torch.no_grad():
                for c in range(len(ids) // 16):
                    chunk = torch.tensor([ids[c * 16:(c + 1) * 16]])
                    logp = torch.log_softmax(m(chunk).logits[0].double(), -1)
                    for t in range(8, 15):
                        nll -= logp[t, chunk[0, t + 1]].item()
                        n += 1
            self.assertIn(f"over {len(ids)} tokens: {len(ids) // 16} chunks of 16", r.stdout)
            self.assertAlmostEqual(got / math.exp(nll / n), 1.0, delta=1e-4)

    def test_chat_tokenizer_in_gguf(self):
        """A Qwen2-style folder (tokenizer.json with <|im_start|>/<|im_end|>, tokenizer_config.json
        with its eos, pad and chat template) converts to a GGUF that carries its special ids (eos,
        eot, pad, each a control token) and template, and chats from the GGUF alone as from the
        folder: the same prompt length and the same greedy answer."""
        from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
        from transformers import Qwen2Config, Qwen2ForCausalLM
        with tempfile.TemporaryDirectory() as tmp:
            src = os.path.join(tmp, "qwen")
            torch.manual_seed(5)
            Qwen2ForCausalLM(Qwen2Config(num_hidden_layers=1, vocab_size=300, hidden_size=32, intermediate_size=64,
                                         num_attention_heads=2, num_key_value_heads=1,
                                         max_position_embeddings=64)).save_pretrained(src)
            tk = Tokenizer(models.BPE())
            tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            tk.decoder = decoders.ByteLevel()
            specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
            tk.train_from_iterator(["In the beginning God created the heaven and the earth."] * 20,
                                   trainers.BpeTrainer(vocab_size=280, special_tokens=specials, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
            tk.save(os.path.join(src, "tokenizer.json"))
            template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                        "{% endfor %}<|im_start|>assistant\n")
            json.dump({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "chat_template": template},
                      open(os.path.join(src, "tokenizer_config.json"), "w"))
            path = os.path.join(tmp, "q.gguf")
            mxn("convert", src, path)
            fld = gguf.GGUFReader(path).fields
            ids = {t: tk.token_to_id(t) for t in specials}
            types = fld["tokenizer.ggml.token_type"]
            for key, tok in (("eot", "<|im_end|>"), ("padding", "<|endoftext|>")):
                self.assertEqual(int(fld[f"tokenizer.ggml.{key}_token_id"].parts[-1][0]), ids[tok], key)
                self.assertEqual(int(types.parts[types.data[ids[tok]]][0]), 3, tok)
            self.assertIn("tokenizer.ggml.eos_token_id", fld)
            self.assertEqual(bytes(fld["tokenizer.chat_template"].parts[-1]).decode(), template)
            chat = [subprocess.run([MXN, "generate", "--model", m, "--chat", "--prompt", "In the beginning",
                                    "--max-tokens", "6", "--temperature", "0", "--timings"],
                                   capture_output=True, text=True) for m in (src, path)]
            self.assertEqual(chat[1].returncode, 0, chat[1].stderr)
            self.assertEqual(chat[1].stdout, chat[0].stdout)
            n = [int(re.search(r"prompt (\d+) tokens", c.stderr).group(1)) for c in chat]
            self.assertEqual(n[1], n[0])  # the chat format's prompt, not the bare text's
            self.assertGreater(n[1], len(tk.encode("In the beginning").ids) + 4)

    def test_unsupported_quantization(self):
        """A GGUF holding a type mxn does not compute (Q4_K, as llama-quantize writes it) is one line
        naming the tensor, the type and the types mxn reads."""
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "q4.gguf")
            w = gguf.GGUFWriter(path, "llama")
            w.add_tensor("token_embd.weight", np.zeros((64, 144), dtype=np.uint8),
                         raw_dtype=gguf.GGMLQuantizationType.Q4_K)  # 64 rows of 256 weights
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_tensors_to_file()
            w.close()
            r = subprocess.run([MXN, "generate", "--model", path, "--prompt-ids", "1"], capture_output=True, text=True)
            self.assertEqual(r.returncode, 1, r.stderr)
            self.assertEqual(len(r.stderr.strip().splitlines()), 1, r.stderr)
            self.assertIn("tensor 'token_embd.weight' has ggml type 12 (Q4_K), which mxn does not compute "
                          "(it reads f32, f16, bf16, Q8_0 and Q4_0)", r.stderr)

    def test_fresh_run_on_gpt2_tokens(self):
        """A LLaMA-shaped model trained from scratch on GPT-2 tokens: its folder loads with
        AutoTokenizer (a tokenizer_config.json names GPT-2's class), and its GGUF names
        <|endoftext|> as the end of text though the run's config has no eos id."""
        from transformers import AutoTokenizer
        with tempfile.TemporaryDirectory() as tmp:
            tokdir = os.path.join(tmp, "tok")
            os.makedirs(tokdir)
            for f in ("vocab.json", "merges.txt"):
                shutil.copy(os.path.join(SHARED, "encoder.json" if f == "vocab.json" else "vocab.bpe"),
                            os.path.join(tokdir, f))
            text, shard, run = (os.path.join(tmp, n) for n in ("t.txt", "t.bin", "run"))
            with open(text, "w") as fh:
                fh.write("In the beginning God created the heaven and the earth. " * 100)
            mxn("prepare", text, "--out", shard, "--tokenizer", tokdir)
            mxn("train", "--arch", "llama", "--vocab_size", "50257", "--n_layer", "1", "--n_embd", "32",
                "--n_head", "2", "--n_ctx", "32", "--data", shard, "--steps", "1", "--batch", "2",
                "--eval_every", "0", "--ckpt_every", "1", "--out", run, "--log_every", "100", "--dtype", "f32")
            out = os.path.join(tmp, "hf")
            mxn("convert", run, out, "--tokenizer", tokdir)
            tok = AutoTokenizer.from_pretrained(out)
            self.assertEqual(tok.encode("Hello world"), [15496, 995])
            self.assertEqual(tok.eos_token_id, 50256)
            path = os.path.join(tmp, "m.gguf")
            mxn("convert", run, path, "--tokenizer", tokdir)
            fld = gguf.GGUFReader(path).fields
            self.assertEqual(int(fld["tokenizer.ggml.eos_token_id"].parts[-1][0]), 50256)


if __name__ == "__main__":
    unittest.main(argv=sys.argv[:1], verbosity=2)
