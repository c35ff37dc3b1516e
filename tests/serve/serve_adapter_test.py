#!/usr/bin/python3
"""mxn serve with adapters on a shared base (`--adapter BASE:NAME=DIR`, asked for as
"BASE:NAME"): two PEFT LoRA adapters of different ranks and target modules and a P-Tuning v2
prefix of 21 rows (not a whole number of 16-row KV blocks) on a tiny Qwen2, served in the same
batches as the base's own requests. 16 concurrent greedy requests, four of each, answer what
`mxn generate --adapter` gives alone (the LoRA update merged into the weights there; stacked
beside them here), /v1/models lists the adapters with their parent, and an unknown adapter is 404.
A mixture of experts likewise: a tiny Mixtral with one adapter on attention and every expert's
w1/w2/w3 (each expert its own pair, stacked beside the experts' grouped GEMMs, each row under
its adapter's mask in the experts' row order) and one on attention alone, 8 concurrent requests
= `mxn generate --adapter` alone.
usage: serve_adapter_test.py MXN KJV_TXT GPT2_BPE_DIR
"""
import json, os, subprocess, sys, tempfile, threading, unittest, urllib.request

sys.path[:0] = [os.path.dirname(os.path.abspath(__file__)),
                os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "common")]
from hf_common import torch  # noqa: E402  (may re-exec in the venv)
import openai  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

MXN = sys.argv[1]
from serve_common import free_port, make_models, start_serve  # noqa: E402


def lora(base, folder, r, alpha, targets, seed):
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base)
    pm = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, init_lora_weights=False, target_modules=targets,
                                          task_type="CAUSAL_LM"))
    with torch.no_grad():  # large enough to change greedy answers
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.mul_(3.0)
    pm.save_pretrained(folder)


def prefix(base, folder, P, seed):
    c = json.load(open(os.path.join(base, "config.json")))
    W = c["num_key_value_heads"] * (c["hidden_size"] // c["num_attention_heads"])
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(P, c["num_hidden_layers"] * 2 * W, generator=g) * 2.0
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": P,
                   "num_layers": c["num_hidden_layers"], "token_dim": W,
                   "num_attention_heads": c["num_key_value_heads"], "prefix_projection": False}, f)
    save_file({"prompt_embeddings": emb.contiguous()}, os.path.join(folder, "adapter_model.safetensors"))


def alone(base, folders, prompts, which, tokens):
    """What `mxn generate` answers each prompt alone (with its adapter, if any)."""
    out = []
    for p, w in zip(prompts, which):
        extra = ["--adapter", folders[w]] if w else []
        r = subprocess.run([MXN, "generate", "--model", base, "--prompt", p, "--max-tokens", str(tokens),
                            "--temperature", "0", *extra], capture_output=True, text=True, check=True)
        out.append(r.stdout[len(p):].rstrip("\n"))
    return out


def serve_adapters(name, base, folders, slots):
    """mxn serve with the base as `name` and each adapter as name:key, its steps slowed so that
    requests share passes."""
    args = ["--model", f"{name}={base}", "--slots", str(slots)]
    for k, f in folders.items():
        args += ["--adapter", f"{name}:{k}={f}"]
    return start_serve(*args, env={"MXN_FAULTS": "*:sleep=5:serve_step*:*:*"})


def ask_all(client, name, prompts, which, tokens):
    """Every prompt at once, each from its own thread, to model `name` or its adapter."""
    got = {}

    def one(i):
        model = name + (":" + which[i] if which[i] else "")
        got[i] = client.completions.create(model=model, prompt=prompts[i], max_tokens=tokens,
                                           temperature=0).choices[0].text
    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return [got.get(i) for i in range(len(prompts))]


class Adapters(unittest.TestCase):
    def test_adapters_batched_with_the_base(self):
        with tempfile.TemporaryDirectory() as tmp:
            _, base, _ = make_models(tmp)
            folders = {"a": os.path.join(tmp, "lora-a"), "b": os.path.join(tmp, "lora-b"),
                       "p": os.path.join(tmp, "prefix")}
            lora(base, folders["a"], 4, 8, ["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"], 3)
            lora(base, folders["b"], 2, 4, ["k_proj", "up_proj"], 4)
            prefix(base, folders["p"], 21, 5)
            prompts = [f"And God said, Let there be {w}" for w in
                       ("light", "a firmament", "lights", "water", "fish", "birds", "cattle", "man",
                        "grass", "trees", "seas", "stars", "night", "day", "evening", "morning")]
            which = ["", "a", "b", "p"] * 4

            want = alone(base, folders, prompts, which, 16)
            self.assertGreater(len({want[i] for i in range(4)}), 1, "the adapters change the answer")
            proc, url = serve_adapters("chat", base, folders, 16)
            try:
                client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
                got = ask_all(client, "chat", prompts, which, 16)
                models = {m.id: m for m in client.models.list().data}
                with self.assertRaises(openai.NotFoundError):
                    client.completions.create(model="chat:nope", prompt="x", max_tokens=2)
                with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
                    steps = [float(l.split()[-1]) for l in r.read().decode().splitlines()
                             if l.startswith("mxn_engine_steps_total")]
            finally:
                proc.terminate()
                proc.communicate(timeout=30)
            self.assertEqual(got, want)
            self.assertEqual(sorted(models), ["chat", "chat:a", "chat:b", "chat:p"])
            self.assertEqual(models["chat:a"].model_extra.get("parent"), "chat")
            # One engine for all four: 16 requests of 16 tokens took far fewer passes than 16 x 16.
            self.assertLess(steps[0], 16 * 16 / 2)
            print(f"serve adapters: 16 concurrent greedy requests (base, LoRA r=4, LoRA r=2, P-Tuning P=21; 4 each) "
                  f"= mxn generate --adapter alone, in {steps[0]:.0f} engine passes; chat:nope is 404")

    def test_expert_adapters_batched(self):
        import shutil
        from hf_common import perturb
        from serve_common import BPE
        from transformers import MixtralConfig, MixtralForCausalLM
        with tempfile.TemporaryDirectory() as tmp:
            base = os.path.join(tmp, "mixtral")
            torch.manual_seed(1)
            perturb(MixtralForCausalLM(MixtralConfig(
                vocab_size=50257, hidden_size=48, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=29, num_local_experts=5, num_experts_per_tok=2, num_hidden_layers=2,
                max_position_embeddings=128, sliding_window=None)), 1).save_pretrained(base)
            shutil.copy(os.path.join(BPE, "encoder.json"), os.path.join(base, "vocab.json"))
            shutil.copy(os.path.join(BPE, "vocab.bpe"), os.path.join(base, "merges.txt"))
            folders = {"e": os.path.join(tmp, "lora-e"), "q": os.path.join(tmp, "lora-q")}
            lora(base, folders["e"], 4, 8, ["q_proj", "w1", "w2", "w3"], 3)
            lora(base, folders["q"], 2, 4, ["v_proj"], 4)
            prompts = [f"In the beginning {w}" for w in ("God", "was", "the", "and", "light", "dark", "deep", "face")]
            which = ["", "e", "q", "e"] * 2

            want = alone(base, folders, prompts, which, 12)
            self.assertNotEqual(want[0], want[1], "the experts' adapter changes the answer")
            proc, url = serve_adapters("moe", base, folders, 8)
            try:
                client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
                got = ask_all(client, "moe", prompts, which, 12)
            finally:
                proc.terminate()
                proc.communicate(timeout=30)
            self.assertEqual(got, want)
            print("serve adapters on a mixture of experts: 8 concurrent greedy requests (base, LoRA on "
                  "attention and every expert, LoRA on attention) = mxn generate --adapter alone")

    def test_adapter_for_another_model_refused(self):
        """A LoRA tensor that adapts no linear of the model (here q_proj renamed) stops the server
        at load with one line naming it, instead of serving the base's answers as the adapter's."""
        from safetensors.torch import load_file
        with tempfile.TemporaryDirectory() as tmp:
            _, base, _ = make_models(tmp)
            bad = os.path.join(tmp, "lora-bad")
            lora(base, bad, 2, 4, ["q_proj"], 3)
            t = load_file(os.path.join(bad, "adapter_model.safetensors"))
            t = {k.replace("layers.0.self_attn.q_proj", "layers.0.self_attn.qq_proj"): v for k, v in t.items()}
            save_file(t, os.path.join(bad, "adapter_model.safetensors"))
            r = subprocess.run([MXN, "serve", "--port", str(free_port()), "--model", f"chat={base}", "--adapter", f"chat:x={bad}"],
                               capture_output=True, text=True, timeout=120)
            self.assertEqual(r.returncode, 1, r.stderr)
            self.assertIn("tensor 'model.layers.0.self_attn.qq_proj.lora_A.weight' adapts no linear layer of "
                          "the model", r.stderr)


if __name__ == "__main__":
    unittest.main(argv=sys.argv[:1], verbosity=2)
