#!/usr/bin/python3
"""Training a mixture of experts with `mxn train`: the per-expert load in metrics.jsonl, DeepSeek-V3's
aux-loss-free balancing (--router_bias_update) to the exact bias the loads call for, a run stopped
and resumed equal to one straight through, and bad MoE settings refused in one line.
  - every step's expert_load sums to batch x seq x top_k tokens in each MoE layer;
  - the routers' selection biases in the final checkpoint equal sum over steps of
    rate * sign(mean load - load_e), worked out here from the logged loads (float32, exact);
  - 12 steps straight = 6 steps, then --resume for 6 (losses bit for bit);
  - the load-balancing loss's weight (--router_aux_coef) changes the loss by that weight times the
    aux loss E * sum_e f_e P_e, whose minimum is top_k (an even router: f_e = K/E, P_e = 1/E).
usage: moe_train_test.py MXN DATA
"""
import json, os, struct, subprocess, sys, tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "common"))
from train_common import check, finish, losses, read_f32_safetensors  # noqa: E402
import numpy as np  # noqa: E402

MXN, DATA = sys.argv[1], sys.argv[2]
E, K, B, T, RATE = 6, 2, 4, 32, 0.01
BASE = ["--data", DATA, "--arch", "qwen3_moe", "--experts", str(E), "--top_k", str(K), "--moe_ffn", "40",
        "--n_layer", "2", "--n_head", "4", "--n_kv_head", "2", "--n_embd", "48", "--n_ctx", str(T),
        "--batch", str(B), "--eval_every", "0", "--eval_batches", "1", "--seed", "3", "--threads", "1",
        "--warmup", "2", "--dtype", "f32"]


def train(out, *extra):
    r = subprocess.run([MXN, "train", *BASE, "--out", out, *extra], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(l) for l in f if '"step"' in l and '"loss"' in l]


def edit_header(path, change):
    """A safetensors file with its JSON header changed in place by change(header)."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header, data = json.loads(f.read(n)), f.read()
    change(header)
    blob = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob + data)


def refused(args, want):
    r = subprocess.run([MXN, "train", *args], capture_output=True, text=True, timeout=120)
    lines = r.stderr.strip().splitlines()
    check(f"refused: {want}", r.returncode == 1 and len(lines) == 1 and want in lines[0], r.stderr.strip()[:200])


with tempfile.TemporaryDirectory() as tmp:
    rows = train(os.path.join(tmp, "bias"), "--steps", "12", "--router_bias_update", str(RATE))
    loads = [np.array(r["expert_load"], np.float64) for r in rows]
    check("expert_load: 12 steps, 2 MoE layers of 6 experts each",
          len(loads) == 12 and all(l.shape == (2, E) for l in loads), str([l.shape for l in loads][:2]))
    check("each layer's load is batch x seq x top_k tokens", all((l.sum(1) == B * T * K).all() for l in loads))
    want = np.zeros((2, E), np.float32)
    for l in loads:
        want += np.float32(RATE) * np.sign(l.mean(1, keepdims=True) - l).astype(np.float32)
    w = read_f32_safetensors(os.path.join(tmp, "bias", "ckpt-00000012", "model.safetensors"))
    got = np.stack([w[f"model.layers.{i}.mlp.gate.e_score_correction_bias"] for i in range(2)])
    check("router biases = sum of rate * sign(mean load - load) over the steps",
          float(np.abs(got - want).max()) < 1e-6, f"max gap {float(np.abs(got - want).max()):.2e}, "
          f"bias range [{got.min():.2f}, {got.max():.2f}]")
    half = os.path.join(tmp, "half")
    first = train(half, "--steps", "12", "--stop-at", "6", "--router_bias_update", str(RATE))
    second = train(half, "--steps", "12", "--resume", half, "--router_bias_update", str(RATE))
    a, b = [r["loss"] for r in rows], [r["loss"] for r in second]
    check("6 steps + resume 6 = 12 straight (losses bit for bit, biases restored)",
          len(first) == 6 and a == b, f"{a[-3:]} vs {b[-3:]}")
    plain = train(os.path.join(tmp, "noaux"), "--steps", "1", "--router_aux_coef", "0")
    aux = train(os.path.join(tmp, "aux"), "--steps", "1", "--router_aux_coef", "0.5")
    gap = aux[0]["loss"] - plain[0]["loss"]
    check("--router_aux_coef 0.5 adds half the mean aux loss (>= top_k, near it at the start)",
          0.5 * K <= gap < 0.6 * K, f"loss {plain[0]['loss']:.5f} -> {aux[0]['loss']:.5f}")

    refused(["--arch", "qwen3_moe", "--data", DATA, "--steps", "1", "--out", os.path.join(tmp, "x")],
            "arch qwen3_moe needs experts >= 1")
    refused(["--arch", "llama", "--experts", "4", "--data", DATA, "--steps", "1", "--out", os.path.join(tmp, "x")],
            "experts = 4 needs arch mixtral, qwen2_moe, qwen3_moe or glm4_moe")
    refused([*BASE, "--top_k", "9", "--steps", "1", "--out", os.path.join(tmp, "x")],
            "num_experts_per_tok = 9, expected 1..min(64, num_experts = 6)")
    # A Hugging Face folder with a bad config or a missing expert tensor.
    folder = os.path.join(tmp, "hf")
    subprocess.run([MXN, "convert", os.path.join(tmp, "bias"), folder], check=True, stdout=subprocess.DEVNULL)
    with open(os.path.join(folder, "config.json")) as f:
        cfg = json.load(f)
    check("convert writes Qwen3MoeForCausalLM's config", cfg["architectures"] == ["Qwen3MoeForCausalLM"] and
          cfg["num_experts"] == E and cfg["num_experts_per_tok"] == K, str(cfg.get("architectures")))
    gen = lambda: subprocess.run([MXN, "generate", "--model", folder, "--prompt-ids", "1,2,3", "--max-tokens", "2"],
                                 capture_output=True, text=True, timeout=120)  # reads `folder` when called
    bad = dict(cfg, num_experts_per_tok=7)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(bad, f)
    r = gen()
    check("top_k larger than the expert count: one line, exit 1",
          r.returncode == 1 and "num_experts_per_tok" in r.stderr and "at most the number of experts (6)" in r.stderr
          and len(r.stderr.strip().splitlines()) == 1, r.stderr.strip())
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f)
    gone = "model.layers.1.mlp.experts.5.down_proj.weight"
    edit_header(os.path.join(folder, "model.safetensors"), lambda h: h.pop(gone))
    r = gen()
    check("a missing expert tensor: one line naming it, exit 1",
          r.returncode == 1 and gone in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr.strip())

    # GLM-4.5's layout (sigmoid router with a selection bias, shared experts): a fresh model, its
    # Hugging Face folder, and two bad ones.
    glm = os.path.join(tmp, "glm")
    r = subprocess.run([MXN, "train", *[a if a != "qwen3_moe" else "glm4_moe" for a in BASE], "--shared_ffn", "24",
                        "--steps", "2", "--out", glm], capture_output=True, text=True, timeout=600)
    check("a fresh glm4_moe trains", r.returncode == 0, r.stderr.strip()[-200:])
    folder = os.path.join(tmp, "glm_hf")
    subprocess.run([MXN, "convert", glm, folder], check=True, stdout=subprocess.DEVNULL)
    with open(os.path.join(folder, "config.json")) as f:
        cfg = json.load(f)
    r = gen()
    check("its folder generates", r.returncode == 0 and cfg["architectures"] == ["Glm4MoeForCausalLM"], r.stderr.strip())
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(dict(cfg, scoring_func="relu"), f)
    r = gen()
    check("an unknown scoring_func: one line, exit 1",
          r.returncode == 1 and "field 'scoring_func' is \"relu\", expected sigmoid or softmax" in r.stderr
          and len(r.stderr.strip().splitlines()) == 1, r.stderr.strip())
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f)
    name = "model.layers.1.mlp.gate.e_score_correction_bias"

    def shorter(h):
        h[name]["shape"] = [E - 1]
        h[name]["data_offsets"][1] -= 4
    edit_header(os.path.join(folder, "model.safetensors"), shorter)
    r = gen()
    check("a router bias of the wrong shape: one line naming it and both shapes, exit 1",
          r.returncode == 1 and name in r.stderr and f"[{E - 1}]" in r.stderr and f"expected [{E}]" in r.stderr
          and len(r.stderr.strip().splitlines()) == 1, r.stderr.strip())

    # bf16 experts (the CPU's grouped GEMM streams them as stored) = the same bf16 values widened.
    b16 = os.path.join(tmp, "bf16")
    subprocess.run([MXN, "convert", os.path.join(tmp, "bias"), b16, "--type", "bf16"], check=True,
                   stdout=subprocess.DEVNULL)
    a, b = (subprocess.run([MXN, "generate", "--model", b16, "--prompt-ids", "5,6,7,8", "--max-tokens", "24",
                            "--temperature", "0", "--ignore-eos", "--print-ids", "--weights", w],
                           capture_output=True, text=True).stdout.split() for w in ("bf16", "f32"))
    check("bf16 expert weights: 24 greedy tokens = the same weights widened to f32", a == b and len(a) == 24,
          f"{a[:6]} vs {b[:6]}")

    # GGUF with llama.cpp's architectures and tensor names (gguf's own tables), read back by mxn.
    venv_py = os.path.join(os.path.dirname(os.path.abspath(MXN)), "test-venv", "bin", "python")
    for arch, extra, ga in (("qwen3_moe", [], "qwen3moe"), ("qwen2_moe", ["--shared_ffn", "24"], "qwen2moe"),
                            ("mixtral", [], "llama")):
        run = os.path.join(tmp, "gg_" + arch)
        r = subprocess.run([MXN, "train", *[a if a != "qwen3_moe" else arch for a in BASE], *extra, "--steps", "2",
                            "--out", run], capture_output=True, text=True, timeout=600)
        path = run + ".gguf"
        c = subprocess.run([MXN, "convert", run, path, "--type", "f32"], capture_output=True, text=True)
        check(f"{arch}: trained and converted to GGUF", r.returncode == 0 and c.returncode == 0,
              (r.stderr + c.stderr).strip()[-300:])
        probe = subprocess.run([venv_py, "-c", f"""
import gguf, sys
r = gguf.GGUFReader({path!r})
arch = bytes(r.fields['general.architecture'].parts[-1]).decode()
a = [k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch][0]
allowed = {{gguf.TENSOR_NAMES[t].format(bid=b) + s for t in gguf.MODEL_TENSORS[a] for b in range(2)
           for s in ('.weight', '.bias')}}
bad = [t.name for t in r.tensors if t.name not in allowed]
exps = [t for t in r.tensors if t.name == 'blk.1.ffn_down_exps.weight'][0]
print(arch, int(r.fields[arch + '.expert_count'].parts[-1][0]), int(r.fields[arch + '.expert_used_count'].parts[-1][0]),
      list(map(int, exps.shape)), bad)
"""], capture_output=True, text=True)
        want = f"{ga} {E} {K} [40, 48, {E}] []"
        check(f"{arch}: GGUF arch {ga}, expert_count {E}, expert_used_count {K}, ffn_down_exps (40, 48, {E}), "
              "every tensor named as llama.cpp names it", probe.stdout.strip() == want,
              (probe.stdout + probe.stderr).strip()[-300:])
        a, b = (subprocess.run([MXN, "generate", "--model", m, "--prompt-ids", "5,6,7", "--max-tokens", "8",
                                "--temperature", "0", "--ignore-eos", "--print-ids"], capture_output=True,
                               text=True).stdout.split() for m in (path, run))
        check(f"{arch}: 8 greedy tokens from the GGUF = from the run", a == b and len(a) == 8, f"{a} vs {b}")
finish()
