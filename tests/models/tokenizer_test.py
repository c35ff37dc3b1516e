#!/usr/bin/python3
"""mxn's tokenizers against the references, on the whole KJV and on Chinese (fortunes-zh):
  - GPT-2 byte-level BPE (vocab.json + merges.txt, ../shared/data/gpt2-bpe) against
    transformers' GPT2TokenizerFast; "Hello world" -> [15496, 995];
  - tokenizer.json byte-level BPE with Qwen2's and Llama 3's split regexes (Llama 3's with
    ignore_merges) and added tokens, trained here by `tokenizers`, against `tokenizers`;
  - a SentencePiece tokenizer.model (BPE with byte fallback, as Llama 2's), made by spm_train,
    against transformers' LlamaTokenizer; ChatGLM's special tokens after its vocabulary;
  - GLM-4's tiktoken-format tokenizer.model against `tiktoken`, special tokens included;
  - the tokenizer a GGUF file carries (gpt2 BPE with the gpt-2, qwen2 and llama-bpe splits,
    Llama 2's SentencePiece) against the files it was made from.
For each: identical ids, and decode(encode(x)) == x.
usage: tokenizer_test.py MXN KJV.txt
"""
import base64, json, os, shutil, subprocess, sys, tempfile, unittest

HERE = os.path.dirname(os.path.abspath(__file__))
try:
    import tokenizers  # noqa: F401
except ImportError:
    py = os.path.join(os.environ.get("MXN_TEST_VENV", "build/test-venv"), "bin", "python")
    if not os.path.exists(py):
        sys.exit(f"tokenizers is missing: run scripts/test-venv (looked for {py})")
    os.execv(py, [py] + sys.argv)

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

MXN, KJV = sys.argv[1], sys.argv[2]
GPT2 = os.path.join(HERE, "..", "..", "..", "shared", "data", "gpt2-bpe")
ZH_DIR = "/usr/share/games/fortunes"
QWEN2 = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
LLAMA3 = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def texts():
    with open(KJV, encoding="utf-8") as f:
        kjv = f.read()
    zh = ""
    for name in ("chinese.u8", "tang300.u8", "song100.u8"):
        with open(os.path.join(ZH_DIR, name), encoding="utf-8", errors="strict") as f:
            zh += f.read()
    return {"kjv": kjv, "zh": zh, "kjv_head": kjv[:400000], "zh_head": zh[:200000],
            "mixed": "<|im_start|>user\nIn the beginning 起初神创造天地。<|im_end|>\n  x's 12345 \t\n"}


M = (1 << 64) - 1


def mix64(x):
    """splitmix64's mix, as src/core/rng.h: the trainer picks rows with it."""
    x = (x + 0x9e3779b97f4a7c15) & M
    x = ((x ^ (x >> 30)) * 0xbf58476d1ce4e5b9) & M
    x = ((x ^ (x >> 27)) * 0x94d049bb133111eb) & M
    return x ^ (x >> 31)


def mxn_encode(tok, text, tmp):
    path = os.path.join(tmp, "in.txt")
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    r = subprocess.run([MXN, "tokenize", "--tokenizer", tok, "--file", path], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return [int(x) for x in r.stdout.split()]


def mxn_decode(tok, ids, tmp):
    path = os.path.join(tmp, "ids.txt")
    with open(path, "w") as f:
        f.write("\n".join(map(str, ids)))
    r = subprocess.run([MXN, "tokenize", "--tokenizer", tok, "--decode-file", path], capture_output=True)
    assert r.returncode == 0, r.stderr
    return r.stdout.decode("utf-8")


class Tokenizers(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.texts = texts()
        cls.tmp = tempfile.TemporaryDirectory()

    def same(self, kind, tok, ref_encode, names=("kjv", "zh", "mixed"), roundtrip=True):
        for name in names:
            text = self.texts[name]
            got = mxn_encode(tok, text, self.tmp.name)
            want = ref_encode(text)
            self.assertEqual(len(got), len(want), f"{kind} on {name}: token counts differ")
            first = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), None)
            self.assertIsNone(first, f"{kind} on {name}: first difference at token {first}")
            if roundtrip:
                self.assertEqual(mxn_decode(tok, got, self.tmp.name), text, f"{kind}: decode(encode(x)) on {name}")
            print(f"{kind:22s} {name:5s} {len(got):8d} tokens identical")

    def test_gpt2_bpe(self):
        from transformers import GPT2TokenizerFast
        ref = GPT2TokenizerFast(vocab_file=os.path.join(GPT2, "encoder.json"),
                                merges_file=os.path.join(GPT2, "vocab.bpe"))
        tok = os.path.join(GPT2, "encoder.json")
        self.assertEqual(mxn_encode(tok, "Hello world", self.tmp.name), [15496, 995])
        self.same("gpt2 vocab+merges", tok, lambda t: ref.encode(t))
        # Long words (BPE's worst case, merged through a heap): random letters, a repeated
        # letter, a repeated syllable, each 20,000 bytes, token for token.
        import random
        rng = random.Random(0)
        for name, word in (("random", "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(20000))),
                           ("a" * 5, "a" * 20000), ("syllable", "tha" * 6667)):
            self.assertEqual(mxn_encode(tok, word, self.tmp.name), ref.encode(word), f"a long word: {name}")
        print("gpt2 vocab+merges      3 words of 20,000 bytes identical")

    def train_json(self, pattern, ignore_merges, vocab=4000):
        key = (pattern, ignore_merges, vocab)  # trained once a run, for each test that needs it
        cache = self.__class__.__dict__.get("_trained")
        if cache is None:
            cache = self.__class__._trained = {}
        if key not in cache:
            cache[key] = self._train_json(pattern, ignore_merges, vocab)
        return cache[key]

    def _train_json(self, pattern, ignore_merges, vocab):
        tk = Tokenizer(models.BPE(ignore_merges=ignore_merges))
        tk.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tk.decoder = decoders.ByteLevel()
        tr = trainers.BpeTrainer(vocab_size=vocab, special_tokens=SPECIALS, show_progress=False,
                                 initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tk.train_from_iterator([self.texts["kjv"][:1500000], self.texts["zh"]], tr)
        return tk

    def test_tokenizer_json(self):
        for name, pattern, ignore in (("qwen2-style", QWEN2, False), ("llama3-style", LLAMA3, True)):
            tk = self.train_json(pattern, ignore)
            path = os.path.join(self.tmp.name, name + ".json")
            tk.save(path)
            folder = os.path.join(self.tmp.name, name)
            os.makedirs(folder, exist_ok=True)
            tk.save(os.path.join(folder, "tokenizer.json"))
            self.same("tokenizer.json " + name, folder, lambda t: tk.encode(t, add_special_tokens=False).ids)

    def test_gguf_vocabularies(self):
        """A GGUF's own tokenizer (tokenizer.ggml.*, written here with the gguf package as
        llama.cpp's converter writes it) encodes and decodes as the files it came from: GPT-2's
        BPE, the Qwen2 and Llama 3 splits (pre "qwen2", "llama-bpe"), Llama 2's SentencePiece. On
        the first 400 KB of the KJV and 200 KB of the Chinese text (the whole of both is checked
        against the files above)."""
        def write(path, model, tokens, types, merges=None, scores=None, pre=None, eos=None, bos=None):
            w = gguf.GGUFWriter(path, "llama" if model == "llama" else "gpt2")
            w.add_tokenizer_model(model)
            if pre:
                w.add_tokenizer_pre(pre)
            w.add_token_list(tokens)
            w.add_token_types(types)
            if merges:
                w.add_token_merges(merges)
            if scores is not None:
                w.add_token_scores(scores)
            if eos is not None:
                w.add_eos_token_id(eos)
            if bos is not None:
                w.add_bos_token_id(bos)
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_tensors_to_file()
            w.close()
        import gguf
        from transformers import GPT2TokenizerFast, LlamaTokenizer
        vocab = json.load(open(os.path.join(GPT2, "encoder.json")))
        tokens = sorted(vocab, key=vocab.get)
        merges = [l for l in open(os.path.join(GPT2, "vocab.bpe"), encoding="utf-8").read().split("\n")
                  if l and not l.startswith("#version")]
        path = os.path.join(self.tmp.name, "gpt2.gguf")
        write(path, "gpt2", tokens, [3 if t == "<|endoftext|>" else 1 for t in tokens], merges, pre="gpt-2",
              eos=vocab["<|endoftext|>"])
        ref = GPT2TokenizerFast(vocab_file=os.path.join(GPT2, "encoder.json"),
                                merges_file=os.path.join(GPT2, "vocab.bpe"))
        self.same("gguf gpt2", path, lambda t: ref.encode(t), names=("kjv_head", "zh_head", "mixed"))
        for name, pattern, ignore, pre in (("qwen2-style", QWEN2, False, "qwen2"),
                                           ("llama3-style", LLAMA3, True, "llama-bpe")):
            tk = self.train_json(pattern, ignore)
            j = json.loads(tk.to_str())
            v = j["model"]["vocab"]
            toks = sorted(v, key=v.get)
            special = {a["content"] for a in j["added_tokens"]}
            ms = [m if isinstance(m, str) else " ".join(m) for m in j["model"]["merges"]]
            path = os.path.join(self.tmp.name, name + ".gguf")
            write(path, "gpt2", toks, [3 if t in special else 1 for t in toks], ms, pre=pre)
            self.same("gguf " + name, path, lambda t: tk.encode(t, add_special_tokens=False).ids,
                      names=("kjv_head", "zh_head", "mixed"))
        folder = self.spm_folder()
        sp = LlamaTokenizer(os.path.join(folder, "tokenizer.model"), legacy=True, add_bos_token=False)
        m = sp.sp_model
        n = m.get_piece_size()
        types = [2 if m.is_unknown(i) else 3 if m.is_control(i) else 5 if m.is_unused(i) else 6 if m.is_byte(i)
                 else 1 for i in range(n)]
        path = os.path.join(self.tmp.name, "spm.gguf")
        write(path, "llama", [m.id_to_piece(i) for i in range(n)], types, scores=[m.get_score(i) for i in range(n)],
              bos=m.bos_id(), eos=m.eos_id())
        self.same("gguf sentencepiece", path, lambda t: sp.encode(t, add_special_tokens=False), names=("kjv_head", "zh_head"))
        # What mxn does not read: one line naming the file and what it expected.
        for model, pre, want in (("gpt2", "falcon", "pre-tokenizer 'falcon' is not one mxn reads"),
                                 ("t5", None, "tokenizer model 't5' is not one mxn reads")):
            path = os.path.join(self.tmp.name, "bad.gguf")
            write(path, model, tokens[:300], [1] * 300, merges[:10], pre=pre)
            r = subprocess.run([MXN, "tokenize", "--tokenizer", path, "--text", "x"], capture_output=True, text=True)
            self.assertEqual(r.returncode, 1, r.stderr)
            self.assertEqual(len(r.stderr.strip().splitlines()), 1, r.stderr)
            self.assertIn(path + ": " + want, r.stderr)

    def spm_folder(self):
        """A Llama 2-style SentencePiece model trained here (once per run)."""
        folder = os.path.join(self.tmp.name, "llama2-style")
        if os.path.exists(os.path.join(folder, "tokenizer.model")):
            return folder
        src = os.path.join(self.tmp.name, "spm_input.txt")
        with open(src, "w", encoding="utf-8") as f:
            f.write(self.texts["kjv"][:1000000] + self.texts["zh"])
        prefix = os.path.join(self.tmp.name, "spm")
        r = subprocess.run(["spm_train", f"--input={src}", f"--model_prefix={prefix}", "--vocab_size=6000",
                            "--model_type=bpe", "--byte_fallback=true", "--character_coverage=0.995",
                            # as Llama 2's model: no normalisation, spaces kept, digits split
                            "--normalization_rule_name=identity", "--remove_extra_whitespaces=false",
                            "--split_digits=true", "--allow_whitespace_only_pieces=true",
                            "--input_sentence_size=100000", "--shuffle_input_sentence=true",
                            "--num_threads=2", "--minloglevel=2"], capture_output=True, text=True)
        self.assertEqual(r.returncode, 0, r.stderr)
        folder = os.path.join(self.tmp.name, "llama2-style")
        os.makedirs(folder, exist_ok=True)
        os.replace(prefix + ".model", os.path.join(folder, "tokenizer.model"))
        return folder

    def test_sentencepiece(self):
        from transformers import LlamaTokenizer
        folder = self.spm_folder()
        ref = LlamaTokenizer(os.path.join(folder, "tokenizer.model"), legacy=True, add_bos_token=False)
        # SentencePiece drops the leading space of its dummy prefix when decoding, so a text that
        # starts with a space would not round-trip (nor does it in transformers): these do not.
        self.same("sentencepiece", folder, lambda t: ref.encode(t, add_special_tokens=False),
                  names=("kjv", "zh"))
        # ChatGLM2/3: nine special tokens follow the SentencePiece vocabulary, in GLM.md's order.
        with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
            json.dump({"tokenizer_class": "ChatGLMTokenizer"}, f)
        n = ref.sp_model.get_piece_size()
        got = mxn_encode(folder, "[gMASK]sop<|user|>", self.tmp.name)
        self.assertEqual(got, [n + 1, n + 3, n + 6])

    def glm4_folder(self):
        import tiktoken
        tk = self.train_json(QWEN2, False)
        vocab = tk.get_vocab()
        inv = {v: k for k, v in vocab.items()}
        byte_of = {c: b for b, c in zip(range(256), _bytes_to_unicode())}
        ranks, r = {}, 0
        for i in range(len(inv)):
            if inv[i] in SPECIALS:
                continue
            ranks[bytes(byte_of[c] for c in inv[i])] = r
            r += 1
        folder = os.path.join(self.tmp.name, "glm4-style")
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "tokenizer.model"), "w") as f:
            for b, rank in ranks.items():
                f.write(base64.b64encode(b).decode() + " " + str(rank) + "\n")
        specials = ["<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>",
                    "<|user|>", "<|assistant|>", "<|observation|>"]
        enc = tiktoken.Encoding("glm4-test", pat_str=LLAMA3, mergeable_ranks=ranks,
                                special_tokens={s: len(ranks) + i for i, s in enumerate(specials)})
        return folder, enc

    def test_tiktoken_glm4(self):
        folder, enc = self.glm4_folder()
        self.texts["glm"] = "[gMASK]<sop><|user|>\n你好，世界 Hello<|assistant|>"
        self.same("tiktoken (GLM-4)", folder, lambda t: enc.encode(t, allowed_special="all"),
                  names=("kjv", "zh", "glm"))


QWEN2_CHAT = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
              "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
              "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
              "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA3_CHAT = ("{% set loop_messages = messages %}{% for message in loop_messages %}"
               "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
               "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
               "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
               "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
LLAMA2_CHAT = ("{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
               "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
               "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
               "{% if loop.index0 == 0 and system_message != false %}"
               "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
               "{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}"
               "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
               "{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}")


class Chat(unittest.TestCase):
    """--chat prompts against transformers' apply_chat_template with each family's template
    (Qwen2, Llama 3, Llama 2), and against GLM.md's formats (ChatGLM3, GLM-4)."""
    SYSTEM = "You are terse."
    USER = "In the beginning 起初神创造天地。 What came first?"

    @classmethod
    def setUpClass(cls):
        cls.t = Tokenizers()
        Tokenizers.setUpClass()
        cls.tmp = Tokenizers.tmp

    def mxn_chat(self, folder, system):
        args = [MXN, "tokenize", "--tokenizer", folder, "--chat", "--text", self.USER]
        r = subprocess.run(args + (["--system", system] if system else []), capture_output=True, text=True)
        self.assertEqual(r.returncode, 0, r.stderr)
        return [int(x) for x in r.stdout.split()]

    def check(self, name, folder, ref):
        for system in (self.SYSTEM, None):
            msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": self.USER}]
            want = ref(msgs)
            self.assertEqual(self.mxn_chat(folder, system), want, f"{name} chat prompt, system={system!r}")
        print(f"chat {name:9s} identical ({len(want)} tokens)")

    def json_folder(self, name, pattern, ignore, template, specials=(), **kw):
        from transformers import PreTrainedTokenizerFast
        tk = self.t.train_json(pattern, ignore, vocab=1500)
        tk.add_special_tokens(list(specials))
        folder = os.path.join(self.tmp.name, name)
        os.makedirs(folder, exist_ok=True)
        tk.save(os.path.join(folder, "tokenizer.json"))
        with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
            json.dump({"chat_template": template, **kw}, f)
        ref = PreTrainedTokenizerFast(tokenizer_file=os.path.join(folder, "tokenizer.json"), chat_template=template, **kw)
        return folder, lambda m: ref.apply_chat_template(m, add_generation_prompt=True)

    CONV = [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": "In the beginning?"},
            {"role": "assistant", "content": "God created the heaven and the earth."},
            {"role": "user", "content": "起初神创造天地。 And then?"},
            {"role": "assistant", "content": "And the earth was without form, and void."}]

    def mxn_sft(self, folder, convs):
        path = os.path.join(self.tmp.name, "sft.jsonl")
        with open(path, "w", encoding="utf-8") as f:
            for c in convs:
                f.write(json.dumps({"messages": c}, ensure_ascii=False) + "\n")
        r = subprocess.run([MXN, "tokenize", "--tokenizer", folder, "--sft", path], capture_output=True, text=True)
        self.assertEqual(r.returncode, 0, r.stderr)
        return [json.loads(l) for l in r.stdout.splitlines()]

    def check_sft_hf(self, name, folder, ref, sep_tokens):
        """ids equal apply_chat_template(conversation); the loss covers exactly each assistant
        message's tokens and its end-of-turn token: the tokens between the generation prompt of
        turn i and the rendering up to turn i, less `sep_tokens` trailing separators."""
        for conv in (self.CONV, self.CONV[1:]):
            got = self.mxn_sft(folder, [conv])[0]
            self.assertEqual(got["ids"], ref.apply_chat_template(conv), f"{name} SFT ids")
            want = [0] * len(got["ids"])
            for i, m in enumerate(conv):
                if m["role"] != "assistant":
                    continue
                a = len(ref.apply_chat_template(conv[:i], add_generation_prompt=True))
                b = len(ref.apply_chat_template(conv[:i + 1])) - sep_tokens
                want[a:b] = [1] * (b - a)
            self.assertEqual(got["loss"], want, f"{name} SFT loss mask")
        print(f"sft  {name:9s} ids and assistant-token mask identical ({sum(want)} of {len(want)} tokens)")

    def test_sft_masks(self):
        from transformers import PreTrainedTokenizerFast
        folder, _ = self.json_folder("qwen2-sft", QWEN2, False, QWEN2_CHAT)
        ref = PreTrainedTokenizerFast(tokenizer_file=os.path.join(folder, "tokenizer.json"), chat_template=QWEN2_CHAT)
        self.check_sft_hf("qwen2", folder, ref, 1)  # the "\n" after <|im_end|>
        folder, _ = self.json_folder("llama3-sft", LLAMA3, True, LLAMA3_CHAT,
                                     specials=("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
                                     bos_token="<|begin_of_text|>")
        ref = PreTrainedTokenizerFast(tokenizer_file=os.path.join(folder, "tokenizer.json"), chat_template=LLAMA3_CHAT,
                                      bos_token="<|begin_of_text|>")
        self.check_sft_hf("llama3", folder, ref, 0)
        # GLM-4 (tiktoken): [gMASK]<sop>, <|role|>\n content per message, <|endoftext|>; the loss on
        # each assistant message after its role token, and on the final <|endoftext|>.
        folder, enc = self.t.glm4_folder()
        got = self.mxn_sft(folder, [self.CONV])[0]
        text = "[gMASK]<sop>" + "".join(f"<|{m['role']}|>\n{m['content']}" for m in self.CONV) + "<|endoftext|>"
        ids = enc.encode(text, allowed_special="all")
        self.assertEqual(got["ids"], ids, "glm4 SFT ids")
        want, pos = [], 0
        spans, at = [], len("[gMASK]<sop>".encode())
        for m in self.CONV:
            at += len(f"<|{m['role']}|>".encode())
            n = len(("\n" + m["content"]).encode())
            if m["role"] == "assistant":
                spans.append((at, at + n))
            at += n
        spans.append((at, at + len("<|endoftext|>")))
        for t in ids:
            want.append(int(any(a <= pos < b for a, b in spans)))
            pos += len(enc.decode_single_token_bytes(t))
        self.assertEqual(got["loss"], want, "glm4 SFT loss mask")
        print(f"sft  glm4      ids and assistant-token mask identical ({sum(want)} of {len(want)} tokens)")
        # ChatGLM3 (SentencePiece + its specials): each part encoded on its own, as its tokenizer
        # builds messages; the loss on the assistant's "\n" + content and on the final </s>.
        folder, sp, n, role = self.chatglm3_folder("chatglm3-sft")
        ids, want = [n + 1, n + 3], [0, 0]
        for m in self.CONV:
            part = sp.encode("\n") + sp.encode(m["content"])
            ids += [role[m["role"]]] + part
            want += [0] + [int(m["role"] == "assistant")] * len(part)
        ids.append(sp.eos_id())
        want.append(1)
        got = self.mxn_sft(folder, [self.CONV])[0]
        self.assertEqual(got["ids"], ids, "chatglm3 SFT ids")
        self.assertEqual(got["loss"], want, "chatglm3 SFT loss mask")
        print(f"sft  chatglm3  ids and assistant-token mask identical ({sum(want)} of {len(want)} tokens)")

    def test_sft_training_loss(self):
        """mxn train --model DIR --sft: the first step's loss equals transformers' cross-entropy
        over the assistant tokens of the same rows (picked by splitmix64 from (seed, step, row),
        padded to the context)."""
        from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM
        import torch
        folder, _ = self.json_folder("qwen2-train", QWEN2, False, QWEN2_CHAT)
        ref_tok = PreTrainedTokenizerFast(tokenizer_file=os.path.join(folder, "tokenizer.json"))
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(ref_tok), hidden_size=32, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                                             max_position_embeddings=128, pad_token_id=None)).eval()
        model.save_pretrained(folder)
        convs = [[{"role": "user", "content": f"Verse {i}?"},
                  {"role": "assistant", "content": self.t.texts["kjv"][i * 97:i * 97 + 40 + 7 * i]}] for i in range(6)]
        rendered = self.mxn_sft(folder, convs)
        path = os.path.join(self.tmp.name, "sft.jsonl")  # mxn_sft wrote it
        run = os.path.join(self.tmp.name, "sft-run")
        T, B, seed = 48, 4, 7
        r = subprocess.run([MXN, "train", "--model", folder, "--sft", path, "--steps", "1", "--batch", str(B),
                            "--n_ctx", str(T), "--seed", str(seed), "--eval_every", "0", "--ckpt_every", "0",
                            "--out", run, "--dtype", "f32"], capture_output=True, text=True)
        self.assertEqual(r.returncode, 0, r.stderr)
        with open(os.path.join(run, "metrics.jsonl")) as f:
            got = json.loads(f.readline())["loss"]
        train = rendered[:5]  # the last 10% (one row) validates
        key = mix64(seed ^ mix64(1))
        ids = torch.zeros(B, T, dtype=torch.long)
        tgt = torch.full((B, T), -100, dtype=torch.long)
        for b in range(B):
            c = train[mix64((key + b) & M) % len(train)]
            n = min(T, len(c["ids"]))
            ids[b, :n] = torch.tensor(c["ids"][:n])
            for t in range(n):
                if t + 1 < len(c["ids"]) and c["loss"][t + 1]:
                    tgt[b, t] = c["ids"][t + 1]
        with torch.no_grad():
            logits = model.double()(ids).logits
        want = float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1)))
        print(f"sft  training step 1 loss: mxn {got:.6f}, transformers {want:.6f}")
        self.assertLess(abs(got - want) / want, 1e-4)

    def test_sft_packed_loss(self):
        """mxn train --sft --pack 1: conversations packed into rows (positions restarting, attention
        kept within each) give the loss of each conversation run alone through transformers,
        weighted by their assistant tokens."""
        from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM
        import torch
        folder, _ = self.json_folder("qwen2-pack", QWEN2, False, QWEN2_CHAT)
        ref_tok = PreTrainedTokenizerFast(tokenizer_file=os.path.join(folder, "tokenizer.json"))
        torch.manual_seed(1)
        model = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(ref_tok), hidden_size=32, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                                             max_position_embeddings=256, pad_token_id=None)).eval()
        model.save_pretrained(folder)
        convs = [[{"role": "user", "content": f"Verse {i}?"},
                  {"role": "assistant", "content": self.t.texts["kjv"][i * 61:i * 61 + 10 + 9 * (i % 4)]}] for i in range(11)]
        rendered = self.mxn_sft(folder, convs)
        path = os.path.join(self.tmp.name, "sft.jsonl")
        run = os.path.join(self.tmp.name, "pack-run")
        T, B, seed, K = 96, 3, 11, 64
        r = subprocess.run([MXN, "train", "--model", folder, "--sft", path, "--pack", "1", "--steps", "1",
                            "--batch", str(B), "--n_ctx", str(T), "--seed", str(seed), "--eval_every", "0",
                            "--ckpt_every", "0", "--out", run, "--dtype", "f32"], capture_output=True, text=True)
        self.assertEqual(r.returncode, 0, r.stderr)
        with open(os.path.join(run, "metrics.jsonl")) as f:
            got = json.loads(f.readline())["loss"]
        train = rendered[:10]  # the last 10% (one row) validates
        key = mix64(seed ^ mix64(1))
        total, count, per_row = 0.0, 0, []
        model = model.double()
        for b in range(B):
            at, packed = 0, 0
            for i in range(K):
                c = train[mix64((key + b * K + i) & M) % len(train)]
                if at > 0 and at + len(c["ids"]) > T:
                    break
                n = min(T - at, len(c["ids"]))
                ids = torch.tensor([c["ids"][:n]])
                tgt = torch.tensor([[c["ids"][t + 1] if t + 1 < len(c["ids"]) and c["loss"][t + 1] else -100
                                     for t in range(n)]])
                with torch.no_grad():
                    logits = model(ids).logits
                total += float(torch.nn.functional.cross_entropy(logits[0], tgt[0], reduction="sum"))
                count += int((tgt >= 0).sum())
                at, packed = at + n, packed + 1
                if at >= T:
                    break
            per_row.append(packed)
        want = total / count
        print(f"sft  packed rows ({per_row} conversations per row of {T}) step 1 loss: mxn {got:.6f}, "
              f"each conversation alone in transformers {want:.6f}")
        self.assertGreater(max(per_row), 1, "rows hold several conversations")
        self.assertLess(abs(got - want) / want, 1e-4)

    def test_sft_bad_rows(self):
        folder, _ = self.json_folder("qwen2-bad", QWEN2, False, QWEN2_CHAT)
        for row, needle in (('{"text": "hi"}', "no 'messages' list"),
                            ('{"messages": [{"role": "robot", "content": "x"}]}', "role 'robot'"),
                            ('{"messages": [{"role": "user"}]}', "needs a 'role' and a 'content'"),
                            ('{"messages": [', "not valid JSON")):
            path = os.path.join(self.tmp.name, "bad.jsonl")
            with open(path, "w") as f:
                f.write('{"messages": [{"role": "user", "content": "ok"}]}\n' + row + "\n")
            r = subprocess.run([MXN, "tokenize", "--tokenizer", folder, "--sft", path], capture_output=True, text=True)
            self.assertEqual(r.returncode, 1, r.stderr)
            lines = r.stderr.strip().splitlines()
            self.assertEqual(len(lines), 1, r.stderr)
            self.assertIn("bad.jsonl:2", lines[0])
            self.assertIn(needle, lines[0])
        # A tokenizer without any chat format's tokens (a base model's): one line saying so.
        from tokenizers import Tokenizer, models, pre_tokenizers, trainers
        tk = Tokenizer(models.BPE())
        tk.pre_tokenizer = pre_tokenizers.ByteLevel()
        tk.train_from_iterator([self.t.texts["kjv"][:20000]], trainers.BpeTrainer(
            vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
        plain = os.path.join(self.tmp.name, "plain-tok")
        os.makedirs(plain, exist_ok=True)
        tk.save(os.path.join(plain, "tokenizer.json"))
        r = subprocess.run([MXN, "tokenize", "--tokenizer", plain, "--sft", path], capture_output=True, text=True)
        self.assertEqual(r.returncode, 1, r.stderr)
        self.assertEqual(len(r.stderr.strip().splitlines()), 1, r.stderr)
        self.assertIn("has no chat format", r.stderr)

    def test_qwen2_chatml(self):
        self.check("qwen2", *self.json_folder("qwen2-chat", QWEN2, False, QWEN2_CHAT))

    def test_llama3(self):
        self.check("llama3", *self.json_folder(
            "llama3-chat", LLAMA3, True, LLAMA3_CHAT,
            specials=("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
            bos_token="<|begin_of_text|>"))

    def test_llama2(self):
        from transformers import LlamaTokenizer
        folder = os.path.join(self.tmp.name, "llama2-chat")
        os.makedirs(folder, exist_ok=True)
        shutil.copy(os.path.join(self.t.spm_folder(), "tokenizer.model"), os.path.join(folder, "tokenizer.model"))
        with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
            json.dump({"chat_template": LLAMA2_CHAT}, f)
        ref = LlamaTokenizer(os.path.join(folder, "tokenizer.model"), legacy=True, add_bos_token=False,
                             chat_template=LLAMA2_CHAT)
        self.check("llama2", folder, lambda m: ref.apply_chat_template(m, add_generation_prompt=True))

    def chatglm3_folder(self, name):
        """A ChatGLM3-style folder: the trained SentencePiece model with ChatGLM's specials after
        it (GLM.md's order). Returns the folder, the sentencepiece processor, its piece count and
        the role token ids."""
        import sentencepiece as spm
        folder = os.path.join(self.tmp.name, name)
        os.makedirs(folder, exist_ok=True)
        shutil.copy(os.path.join(self.t.spm_folder(), "tokenizer.model"), os.path.join(folder, "tokenizer.model"))
        with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
            json.dump({"tokenizer_class": "ChatGLMTokenizer"}, f)
        sp = spm.SentencePieceProcessor(model_file=os.path.join(folder, "tokenizer.model"))
        n = sp.get_piece_size()
        return folder, sp, n, {"system": n + 5, "user": n + 6, "assistant": n + 7}

    def test_chatglm3(self):
        folder, sp, n, role = self.chatglm3_folder("chatglm3-chat")

        def ref(msgs):  # GLM.md: [gMASK]sop, then <|role|> + encode("\n") + encode(content), then <|assistant|>
            ids = [n + 1, n + 3]
            for m in msgs:
                ids += [role[m["role"]]] + sp.encode("\n") + sp.encode(m["content"])
            return ids + [role["assistant"]]
        self.check("chatglm3", folder, ref)

    def test_glm4(self):
        folder, enc = self.t.glm4_folder()
        self.check("glm4", folder, lambda msgs: enc.encode(
            "[gMASK]<sop>" + "".join(f"<|{m['role']}|>\n{m['content']}" for m in msgs) + "<|assistant|>",
            allowed_special="all"))


def _bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = dict(zip(bs, cs))
    return [chr(table[b]) for b in range(256)]


if __name__ == "__main__":
    unittest.main(argv=sys.argv[:1], verbosity=2)
