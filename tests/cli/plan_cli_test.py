#!/usr/bin/python3
"""`mxn plan --cluster`: a cluster file's chips summed up exactly (examples/cluster-1024.toml: 1,024
chips of 6 types), and each kind of bad cluster file refused with one clear line naming the file,
the group and what was expected, and a non-zero exit. With --model: the 1,024-chip cluster planned
for a 70B LLaMA (a plan file whose stages cover every layer once, whose micro-batches add up to
the global batch, whose memory fits every chip; a timeline with a lane per chip type used), this
machine's CPU + PoCL planned for the default model (PoCL left out: it computes on the CPU's
cores), a model no chip can hold refused with the constraint that failed, and tensor-parallel
stages searched, asked for and refused.
usage: plan_cli_test.py MXN SOURCE_DIR
"""
import json, os, re, subprocess, sys, tempfile, unittest

MXN, SRC = sys.argv[1], sys.argv[2]

GOOD = """[[group]]
chip = "{chip}"
count = {count}
per_node = 8
intra_gbs = 450
inter_gbs = 50
"""


class Plan(unittest.TestCase):
    def run_plan(self, text, extra=()):
        with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
            f.write(text)
        return subprocess.run([MXN, "plan", "--cluster", f.name, *extra], capture_output=True, text=True), f.name

    def test_example_cluster_sums(self):
        r = subprocess.run([MXN, "plan", "--cluster", os.path.join(SRC, "examples/cluster-1024.toml")],
                           capture_output=True, text=True)
        self.assertEqual(r.returncode, 0, r.stderr)
        # 256 H100 + 256 A100 + 192 H20 + 128 MI300X + 128 Ascend 910B + 64 L40S, 8 a node:
        # 587,932.8 TFLOPS of bf16 peak, 95,232 GiB.
        self.assertIn("1024 chips in 6 groups, 128 nodes; 587.9 PFLOPS bf16 peak, 93 TiB", r.stdout)
        self.assertEqual(r.stdout.count("\n| "), 7)  # the header and a row per group
        r = subprocess.run([MXN, "plan", "--cluster", os.path.join(SRC, "examples/cluster-small.toml")],
                           capture_output=True, text=True)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("2 chips in 2 groups, 2 nodes; 0.000723 PFLOPS bf16 peak, 0.04395 TiB", r.stdout)

    def test_bad_cluster_files(self):
        cases = [
            ("unknown chip", GOOD.format(chip="H900", count=8), "group 1: unknown chip type 'H900' (known: H100-SXM"),
            ("zero count", GOOD.format(chip="H100-SXM", count=0), "group 1 (H100-SXM): count must be a positive integer"),
            ("missing bandwidth", GOOD.format(chip="A100-SXM-80GB", count=8).replace("intra_gbs = 450\n", ""),
             "group 1: intra_gbs (GB/s between chips of a node) is missing"),
            ("missing inter-node bandwidth", GOOD.format(chip="H20", count=16) + GOOD.format(chip="L40S", count=8)
             .replace("inter_gbs = 50\n", ""), "group 2: inter_gbs (GB/s a chip sends across nodes) is missing"),
            ("a fractional count", GOOD.format(chip="MI300X", count=2.5), "group 1 (MI300X): count must be a positive integer"),
            ("a negative bandwidth", GOOD.format(chip="MI300X", count=8).replace("450", "-1"),
             "group 1: intra_gbs (GB/s between chips of a node) must be a positive number"),
            ("an unknown key", GOOD.format(chip="H100-SXM", count=8) + "cont = 3\n", "group 1: unknown key 'cont'"),
            ("no groups", "title = 'x'\n", "unknown table or key 'title'"),
            ("empty", "", "no [[group]] tables"),
            ("not TOML", "[[group]\nchip=", "not a valid TOML file"),
            ("an mfu above 1", GOOD.format(chip="H20", count=8) + "mfu = 1.5\n", "group 1: mfu must be at most 1"),
            ("sharing an unknown chip", GOOD.format(chip="H20", count=8) + "shares_cores_with = 'cpu:9'\n",
             "group 1: shares_cores_with must name another group's chip (got 'cpu:9')"),
            ("an own chip without memory", GOOD.format(chip="MyCard", count=4) + "bf16_tflops = 100\nhbm_gbs = 900\n",
             "group 1: memory_gib (its memory, GiB) is missing"),
        ]
        for name, text, want in cases:
            r, path = self.run_plan(text)
            os.unlink(path)
            lines = r.stderr.strip().splitlines()
            self.assertNotEqual(r.returncode, 0, name)
            self.assertEqual(len(lines), 1, f"{name}: {r.stderr}")
            self.assertIn(want, lines[0], name)
            self.assertIn(path, lines[0], name)
        r = subprocess.run([MXN, "plan", "--cluster", "/nonexistent/cluster.toml"], capture_output=True, text=True)
        self.assertNotEqual(r.returncode, 0)
        self.assertIn("/nonexistent/cluster.toml", r.stderr)
        print(f"plan: the 1,024-chip example sums exactly; {len(cases) + 1} kinds of bad cluster file, one line each")

    def test_plans_a_70b_model_on_1024_chips(self):
        d = tempfile.mkdtemp()
        svg, out = os.path.join(d, "step.svg"), os.path.join(d, "plan.json")
        r = subprocess.run([MXN, "plan", "--cluster", os.path.join(SRC, "examples/cluster-1024.toml"),
                            "--model", os.path.join(SRC, "examples/llama-70b"), "--global-batch", "2048",
                            "--dtype", "bf16", "--svg", svg, "--out", out], capture_output=True, text=True)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("model " + os.path.join(SRC, "examples/llama-70b") + ": llama, 80 layers, width 8192, 68.98 B", r.stdout)
        with open(out) as f:
            plan = json.load(f)
        chips = {"H100-SXM": 80, "A100-SXM-80GB": 80, "H20": 96, "MI300X": 192, "Ascend-910B": 64, "L40S": 48}
        used, micro = {}, 0
        for kind in plan["kinds"]:
            layers = [s["layers"] for s in kind["stages"]]
            self.assertEqual(layers[0][0], 0)
            self.assertEqual(layers[-1][1], 80)
            for a, b in zip(layers, layers[1:]):
                self.assertEqual(a[1], b[0])
            for s in kind["stages"]:
                self.assertLessEqual(s["predicted_bytes"], 0.9 * chips[s["chip"]] * 2**30, s)
                used[s["chip"]] = used.get(s["chip"], 0) + kind["replicas"]
            self.assertEqual(len(kind["micro_batches"]), kind["replicas"])
            micro += sum(kind["micro_batches"])
        self.assertEqual(micro * plan["micro_batch"], 2048)
        for name, n in used.items():
            self.assertLessEqual(n, {"H100-SXM": 256, "A100-SXM-80GB": 256, "H20": 192, "MI300X": 128,
                                     "Ascend-910B": 128, "L40S": 64}[name])
        with open(svg) as f:
            text = f.read()
        self.assertTrue(text.startswith("<svg"))
        self.assertEqual(text.count("<text x='10' y=") - 1, 2 * len(used))  # title, then 2 lines a lane
        eff = float(re.search(r"heterogeneous efficiency ([0-9.]+)%", r.stdout).group(1))
        self.assertTrue(0 < eff <= 100, r.stdout)
        print(f"plan: 70B on 1,024 chips: {sum(used.values())} chips of {len(used)} types used, "
              f"{plan['predicted_tokens_per_s']:.4g} tokens/s predicted, efficiency {eff}%")

    def test_local_cluster_leaves_out_pocl(self):
        r = subprocess.run([MXN, "plan", "--cluster", os.path.join(SRC, "examples/cluster-small.toml"),
                            "--model", "default"], capture_output=True, text=True)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("chosen: 1 x cpu:0 (4)", r.stdout)
        self.assertIn("opencl:0 left out: with it the step would take", r.stdout)
        self.assertIn("(it computes on cores another chip uses, so both slow down); it would not help "
                      "at any global batch up to 16384 sequences", r.stdout)

    def test_this_machine_measured(self):
        """--cluster here: each device timed on the model; PoCL found to run on the CPU's cores; the
        cluster saved (--save-cluster) reads back with the same rows."""
        tmp = tempfile.TemporaryDirectory()
        saved = os.path.join(tmp.name, "here.toml")
        r = subprocess.run([MXN, "plan", "--cluster", "here", "--model", "default", "--data",
                            os.path.join(SRC, "data/kjv.bin"), "--save-cluster", saved],
                           capture_output=True, text=True)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertRegex(r.stdout, r"\| cpu:0 \| 1 \| 1 \| [0-9.]+ \| [0-9]+ \| 50 \| 10 \| 10 \| 0.00 \| "
                                   r"measured here: [0-9.]+ s a step of 16 x 128 tokens in bf16, [0-9.]+ s in f32 \|")
        self.assertIn("chosen: 1 x cpu:0 (4)", r.stdout)
        # --dtype auto (the default): both dtypes priced on the rates measured in each, the faster
        # kept and named in the job's line.
        m = re.search(r"dtype auto: (f32|bf16) \(bf16 mixed precision ([0-9.e+]+) tokens/s; f32 ([0-9.e+]+) tokens/s\)",
                      r.stdout)
        self.assertIsNotNone(m, r.stdout)
        self.assertEqual(m.group(1), "bf16" if float(m.group(2)) >= float(m.group(3)) else "f32")
        self.assertIn(f"tokens, {m.group(1)}, ZeRO-1 on", r.stdout)
        first = r.stdout
        if "| opencl:0 |" in r.stdout:
            self.assertIn("opencl:0 left out: with it the step would take", r.stdout)
            self.assertIn("(it computes on cores another chip uses, so both slow down)", r.stdout)
        r = subprocess.run([MXN, "plan", "--cluster", "here"], capture_output=True, text=True)
        self.assertNotEqual(r.returncode, 0)
        self.assertEqual(r.stderr.strip(), "mxn: error: --cluster here times the devices on a model: give --model")
        # Saved, it reads back as a cluster file with the same rows; links are measured between
        # two ranks only (mpirun -np 2), said in one line otherwise.
        with tmp:
            rows = [l for l in first.splitlines() if l.startswith("| cpu:0 |") or l.startswith("| opencl:")]
            back = subprocess.run([MXN, "plan", "--cluster", saved], capture_output=True, text=True)
            self.assertEqual(back.returncode, 0, back.stderr)
            self.assertEqual([l for l in back.stdout.splitlines() if l in rows], rows)
            r = subprocess.run([MXN, "plan", "--cluster", saved, "--measure-links"], capture_output=True, text=True)
            self.assertEqual(r.returncode, 1)
            self.assertEqual(len(r.stderr.strip().splitlines()), 1, r.stderr)
            self.assertIn("--measure-links times the link between two ranks", r.stderr)

    def test_nothing_fits_names_the_constraint(self):
        r, path = self.run_plan(GOOD.format(chip="MyCard", count=4) + "bf16_tflops = 100\nmemory_gib = 8\nhbm_gbs = 900\n",
                                ["--model", os.path.join(SRC, "examples/llama-70b"), "--dtype", "bf16"])
        os.unlink(path)
        self.assertNotEqual(r.returncode, 0)
        lines = r.stderr.strip().splitlines()
        self.assertEqual(len(lines), 1, r.stderr)
        self.assertIn("no layout fits: MyCard: layer 0 with the embeddings needs ", lines[0])
        self.assertIn("as stage 1 of 4; MyCard holds 7.2 GiB (90% of its 8 GiB)", lines[0])
        r = subprocess.run([MXN, "plan", "--cluster", os.path.join(SRC, "examples/cluster-small.toml"),
                            "--model", "/nonexistent/model"], capture_output=True, text=True)
        self.assertNotEqual(r.returncode, 0)
        self.assertEqual(len(r.stderr.strip().splitlines()), 1, r.stderr)
        self.assertIn("/nonexistent/model", r.stderr)

    def test_tensor_parallel(self):
        """The search splits stages over tensor-parallel groups inside a node (the 70B plan on 1,024
        chips uses them and every plan file stage says its degree); --tp that does not divide the
        heads is refused in one line; a --tp group wider than a node is priced with a warning naming
        the slower link; --layout CHIP*T prices a tensor-parallel stage and refuses a bad degree."""
        cluster = os.path.join(SRC, "examples", "cluster-1024.toml")
        model = os.path.join(SRC, "examples", "llama-70b")
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "plan.json")
            r = subprocess.run([MXN, "plan", "--cluster", cluster, "--model", model, "--global-batch", "2048",
                                "--seq", "4096", "--dtype", "bf16", "--out", out], capture_output=True, text=True)
            self.assertEqual(r.returncode, 0, r.stderr)
            self.assertRegex(r.stdout, r"chosen: .*TP[248] ")
            plan = json.load(open(out))
            degrees = {s["tensor_parallel"] for k in plan["kinds"] for s in k["stages"]}
            self.assertTrue(degrees <= {1, 2, 4, 8} and max(degrees) > 1, degrees)
            eff = float(re.search(r"heterogeneous efficiency ([0-9.]+)%", r.stdout).group(1))
            self.assertGreater(eff, 85)  # 75.4% without tensor parallelism
        r = subprocess.run([MXN, "plan", "--cluster", cluster, "--model", model, "--tp", "3"],
                           capture_output=True, text=True)
        self.assertEqual(r.returncode, 1)
        self.assertEqual(r.stderr.strip(), "mxn: error: --tp 3 does not divide the model's 64 heads and 8 kv heads "
                                           "(expected a divisor of both: the planner splits a type's chips evenly)")
        with tempfile.TemporaryDirectory() as tmp:
            cfg = os.path.join(tmp, "config.json")
            json.dump({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_layer": 8, "n_embd": 2048,
                       "n_head": 32, "vocab_size": 50257, "n_positions": 1024}, open(cfg, "w"))
            r, path = self.run_plan(GOOD.format(chip="H100-SXM", count=32),
                                    ["--model", cfg, "--tp", "16", "--global-batch", "64", "--dtype", "bf16"])
            os.unlink(path)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertRegex(r.stdout, r"warning: a tensor-parallel group of 16 H100-SXM spans 2 nodes \(8 a node\): its "
                                   r"all-reduces go over 50 GB/s instead of 450, [0-9.e-]+ s a sequence instead of ")
        self.assertIn(" TP16 ", r.stdout)
        small = os.path.join(SRC, "examples", "cluster-small.toml")
        r = subprocess.run([MXN, "plan", "--cluster", small, "--model", "default", "--layout", "cpu:0*2@2+cpu:0*2@2",
                            "--micro-batch", "4", "--recompute", "all"], capture_output=True, text=True)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("cpu:0 x 2 TP2 PP2 (2r,2r)", r.stdout)
        r = subprocess.run([MXN, "plan", "--cluster", small, "--model", "default", "--layout", "cpu:0*0"],
                           capture_output=True, text=True)
        self.assertEqual(r.returncode, 1)
        self.assertEqual(r.stderr.strip(), "mxn: error: --layout 'cpu:0*0': 'cpu:0*0' (expected CHIP*TP with a "
                                           "positive count of tensor-parallel chips)")

    def test_deepseek_v3_expert_parallel(self):
        """DeepSeek-V3 (examples/deepseek-v3: 671B, 256 experts, top-8) over EP groups of 64 of the
        1,024 chips: every type's chips hold experts in proportion to their speed (the 16 groups
        each hold all 256), the step prices its all-to-all, and the dense 17B replicated on every
        chip does not fit: said so; with --pp 16 (DeepSeek-V3's own layout) it fits."""
        r = subprocess.run([MXN, "plan", "--cluster", os.path.join(SRC, "examples", "cluster-1024.toml"),
                            "--model", os.path.join(SRC, "examples", "deepseek-v3", "config.json"), "--ep", "64",
                            "--global-batch", "15360", "--seq", "4096", "--dtype", "bf16"],
                           capture_output=True, text=True)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("16 EP groups of 64 chips; 256 experts a layer, 8 a token", r.stdout)
        ep_table = r.stdout[r.stdout.index("expert parallel:"):]
        rows = re.findall(r"^\| ([\w-]+) \| (\d+) \| (\d+)(?: \(\+1 on (\d+)\))? \|", ep_table, re.M)
        per_group = sum(int(n) * int(e) + int(x or 0) for _, n, e, x in rows)
        self.assertEqual((len(rows), per_group), (6, 256), r.stdout)
        speeds = {name: int(e) for name, _, e, _ in rows}
        self.assertGreater(speeds["MI300X"], speeds["H100-SXM"])  # 1307 against 989 TFLOPS
        self.assertGreater(speeds["H100-SXM"], speeds["H20"])
        m = re.search(r"all-to-all [0-9.e+]+ = ([0-9.]+)%", r.stdout)
        self.assertTrue(m and 0 < float(m.group(1)) < 100, r.stdout)
        self.assertIn("does not fit", r.stdout)
        # As DeepSeek-V3 trained: 16 pipeline stages, EP groups of 64 inside each; every chip's
        # weights and state now fit, and the step adds the bubble and the stages' sends.
        r = subprocess.run([MXN, "plan", "--cluster", os.path.join(SRC, "examples", "cluster-1024.toml"),
                            "--model", os.path.join(SRC, "examples", "deepseek-v3", "config.json"), "--ep", "64",
                            "--pp", "16", "--global-batch", "15360", "--seq", "4096", "--dtype", "bf16"],
                           capture_output=True, text=True)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("16 pipeline stages (1F1B, 240 micro-batches a replica), in each 1 EP groups of 64", r.stdout)
        self.assertNotIn("does not fit", r.stdout)
        self.assertRegex(r.stdout, r"pipeline bubble [0-9.]+, stage sends [0-9.]+\)")
        bad = subprocess.run([MXN, "plan", "--cluster", os.path.join(SRC, "examples", "cluster-1024.toml"),
                              "--model", os.path.join(SRC, "examples", "deepseek-v3", "config.json"), "--ep", "64",
                              "--pp", "7"], capture_output=True, text=True)
        self.assertEqual(bad.returncode, 1)
        self.assertIn("--pp 7: expected 1 to the model's 61 layers, dividing the cluster's 1024 chips", bad.stderr)
        bad = subprocess.run([MXN, "plan", "--cluster", os.path.join(SRC, "examples", "cluster-1024.toml"),
                              "--model", os.path.join(SRC, "examples", "deepseek-v3", "config.json"), "--ep", "3"],
                             capture_output=True, text=True)
        self.assertEqual(bad.returncode, 1)
        self.assertIn("the cluster's 1024 chips do not divide into groups of that many", bad.stderr)


if __name__ == "__main__":
    unittest.main(argv=sys.argv[:1], verbosity=2)
