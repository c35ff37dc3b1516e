"""What the serve tests share: a server on a free loopback port, and tiny models (a GPT-2 with
GPT-2's BPE files, a Qwen2 with a ChatML tokenizer trained here). The tests are run as
`TEST.py MXN KJV_TXT GPT2_BPE_DIR`; those arguments are read here.
"""
import json, os, shutil, socket, subprocess, sys, time, urllib.request

from hf_common import torch  # (may re-exec in the venv)

MXN, KJV, BPE = sys.argv[1], sys.argv[2], sys.argv[3]
QWEN2_CHAT = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
              "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
              "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
              "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_serve(*args, env=None):
    """`mxn serve ARGS` on a free loopback port; returns (process, url) once /health answers 200."""
    port = free_port()
    proc = subprocess.Popen([MXN, "serve", "--port", str(port), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, **(env or {})))
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            urllib.request.urlopen(url + "/health", timeout=1).close()
            break
        except OSError:  # not listening yet, or 503 while loading
            time.sleep(0.1)
    return proc, url


def tiny_gpt2(folder, positions=256):
    """A tiny GPT-2 (2 x 32, weights perturbed so that greedy text varies) with GPT-2's BPE files."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=50257, n_embd=32, n_layer=2, n_head=4, n_positions=positions))
    with torch.no_grad():
        for p in gpt2.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    gpt2.save_pretrained(folder)
    shutil.copy(os.path.join(BPE, "encoder.json"), os.path.join(folder, "vocab.json"))
    shutil.copy(os.path.join(BPE, "vocab.bpe"), os.path.join(folder, "merges.txt"))
    return folder


def tiny_qwen2_chat(folder, text_chars=400000, vocab=600):
    """A tiny Qwen2 (2 x 32, perturbed) with a ChatML byte-level BPE tokenizer trained here on the
    KJV's first `text_chars` characters; returns (folder, the `tokenizers` Tokenizer)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    with open(KJV, encoding="utf-8") as f:
        text = f.read()[:text_chars]
    tk.train_from_iterator([text], trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    qwen = Qwen2ForCausalLM(Qwen2Config(vocab_size=tk.get_vocab_size(), hidden_size=32, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                                        max_position_embeddings=512, pad_token_id=None))
    with torch.no_grad():
        for p in qwen.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    qwen.save_pretrained(folder)
    tk.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"chat_template": QWEN2_CHAT, "eos_token": "<|im_end|>"}, f)
    return folder, tk


def make_models(tmp):
    from transformers import GPT2Config, GPT2LMHeadModel
    base = tiny_gpt2(os.path.join(tmp, "gpt2"))
    # A wider one, slow enough (a few ms a token here) that clients can hang up mid-answer.
    wide = os.path.join(tmp, "gpt2-wide")
    GPT2LMHeadModel(GPT2Config(vocab_size=50257, n_embd=256, n_layer=4, n_head=4, n_positions=512)).save_pretrained(wide)
    shutil.copy(os.path.join(BPE, "encoder.json"), os.path.join(wide, "vocab.json"))
    shutil.copy(os.path.join(BPE, "vocab.bpe"), os.path.join(wide, "merges.txt"))
    chat, _ = tiny_qwen2_chat(os.path.join(tmp, "qwen2"))
    return base, chat, wide
