#!/usr/bin/python3
"""The serving engine (src/serve/engine.h) against one request at a time: continuous batching is
exact. For LLaMA, Qwen2, GLM and GPT-2 tiny random models (transformers), 16 greedy requests with
prompts of 1 to 75 tokens go through 5 KV-cache slots at once (`mxn generate --prompts-file`):
requests join as slots free up, long prompts are prefilled in chunks of 64 rows beside the others'
decoding, and every request's 20 tokens equal `mxn generate --prompt-ids` run alone, on the CPU
and on OpenCL (PoCL) when present. The KV cache is paged (blocks of 16 rows): 16 LLaMA prompts that
share a 40-token prefix read its two whole blocks from the first request's cache once it has
written them (11 requests x 32 tokens, as the engine reports), and still equal each run alone.
The mixtures of experts (Mixtral, Qwen3-MoE, GLM-4.5, DeepSeek-V3 with its latent cache) go the
same way: every pass's rows, whichever requests they belong to, are routed together, so each
expert's GEMM sees all of its rows at once; the engine reports the KV cache's bytes per token
(DeepSeek's: its latent and RoPE key, kv_lora_rank + qk_rope_head_dim floats a layer; `mxn serve`
exports it as mxn_kv_cache_bytes_per_token).
usage: serve_test.py MXN
"""
import os, random, subprocess, sys, tempfile, unittest

sys.path[:0] = [os.path.dirname(os.path.abspath(__file__)),
                os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "common")]
from hf_common import make, perturb, torch  # noqa: E402  (may re-exec in the venv)
from moe_common import make_hf, own_config, random_weights, write_folder  # noqa: E402

MXN = sys.argv[1]
DEVICES = ["cpu"] + (["opencl:0"] if "opencl:0" in subprocess.run([MXN, "devices"], capture_output=True,
                                                                 text=True).stdout else [])


def prompts_file(tmp, name, prompts):
    path = os.path.join(tmp, name + ".txt")
    with open(path, "w") as f:
        f.write("\n".join(",".join(map(str, p)) for p in prompts) + "\n")
    return path


def each_alone(folder, prompts, gen):
    """Every prompt's greedy tokens from `mxn generate --prompt-ids`, one request at a time."""
    return [subprocess.run([MXN, "generate", "--model", folder, "--prompt-ids", ",".join(map(str, p)), *gen,
                            "--print-ids"], capture_output=True, text=True, check=True).stdout.split()
            for p in prompts]


class Engine(unittest.TestCase):
    def test_batched_equals_alone(self):
        devices = DEVICES
        with tempfile.TemporaryDirectory() as tmp:
            for family in ("llama", "qwen2", "glm", "gpt2"):
                torch.manual_seed(0)
                folder = os.path.join(tmp, family)
                perturb(make(family, False), 3).eval().save_pretrained(folder)
                rng = random.Random(family)
                prompts = [[rng.randrange(0, 128) for _ in range(rng.randrange(1, 76))] for _ in range(16)]
                path = prompts_file(tmp, family, prompts)
                gen = ["--max-tokens", "20", "--temperature", "0", "--ignore-eos"]
                alone = each_alone(folder, prompts, gen)
                for dev in devices:
                    r = subprocess.run([MXN, "generate", "--model", folder, "--prompts-file", path, "--slots", "5",
                                        "--device", dev, *gen], capture_output=True, text=True)
                    self.assertEqual(r.returncode, 0, r.stderr)
                    batched = [l.split() for l in r.stdout.splitlines()]
                    same = sum(a == b for a, b in zip(alone, batched))
                    self.assertEqual(same, 16, f"{family} on {dev}")
                    print(f"engine {family:6s} {dev:9s}: 16 requests (prompts {min(map(len, prompts))}-"
                          f"{max(map(len, prompts))} tokens) through 5 slots = each alone, 20 greedy tokens each")

    def test_shared_prefix_blocks(self):
        devices = DEVICES
        with tempfile.TemporaryDirectory() as tmp:
            torch.manual_seed(1)
            folder = os.path.join(tmp, "llama")
            perturb(make("llama", False), 3).eval().save_pretrained(folder)
            rng = random.Random(7)
            system = [rng.randrange(0, 128) for _ in range(40)]
            prompts = [system + [rng.randrange(0, 128) for _ in range(rng.randrange(1, 21))] for _ in range(16)]
            path = prompts_file(tmp, "prompts", prompts)
            gen = ["--max-tokens", "12", "--temperature", "0", "--ignore-eos"]
            alone = each_alone(folder, prompts, gen)
            for dev in devices:
                r = subprocess.run([MXN, "generate", "--model", folder, "--prompts-file", path, "--slots", "5",
                                    "--device", dev, *gen], capture_output=True, text=True)
                self.assertEqual(r.returncode, 0, r.stderr)
                self.assertEqual([l.split() for l in r.stdout.splitlines()], alone, dev)
                # The first 5 start together, before any block is written; the other 11 share 2 blocks.
                total = sum(map(len, prompts))
                self.assertIn(f"{total} prompt tokens, {11 * 32} of them from shared prefix blocks", r.stderr)
                print(f"engine llama  {dev:9s}: 16 prompts with a common 40-token prefix = each alone; "
                      f"{11 * 32} of {total} prompt tokens read from shared KV blocks")

    def test_moe_batched_equals_alone(self):
        with tempfile.TemporaryDirectory() as tmp:
            for family in ("mixtral", "qwen3_moe", "glm4_moe", "deepseek"):
                folder = os.path.join(tmp, family)
                if family == "mixtral":
                    torch.manual_seed(0)
                    perturb(make_hf(family, False), 3).eval().save_pretrained(folder)
                else:
                    cfg = own_config(family, True)
                    write_folder(folder, cfg, random_weights(cfg, seed=4))
                rng = random.Random(family)
                prompts = [[rng.randrange(0, 100) for _ in range(rng.randrange(1, 40))] for _ in range(10)]
                path = prompts_file(tmp, family, prompts)
                gen = ["--max-tokens", "16", "--temperature", "0", "--ignore-eos"]
                alone = each_alone(folder, prompts, gen)
                for dev in DEVICES:
                    r = subprocess.run([MXN, "generate", "--model", folder, "--prompts-file", path, "--slots", "4",
                                        "--device", dev, *gen], capture_output=True, text=True)
                    self.assertEqual(r.returncode, 0, r.stderr)
                    self.assertEqual([l.split() for l in r.stdout.splitlines()], alone, f"{family} on {dev}")
                    print(f"engine {family:9s} {dev:9s}: 10 requests through 4 slots = each alone, 16 greedy tokens")
                    if family == "deepseek":  # the latent cache against full keys and values
                        c = own_config("deepseek", True)
                        latent = c["num_hidden_layers"] * (c["kv_lora_rank"] + c["qk_rope_head_dim"]) * 4
                        full = c["num_hidden_layers"] * c["num_attention_heads"] * (
                            c["qk_nope_head_dim"] + c["qk_rope_head_dim"] + c["v_head_dim"]) * 4
                        self.assertIn(f"the KV cache holds {latent} bytes a token", r.stderr)
                        print(f"deepseek KV cache: {latent} bytes a token (latent + RoPE key) against {full} "
                              f"for full keys and values ({full / latent:.1f}x)")

if __name__ == "__main__":
    unittest.main(argv=sys.argv[:1], verbosity=2)
