#!/usr/bin/python3
"""`mxn plan --cluster`: a cluster file's chips summed up exactly (examples/cluster-1024.toml: 1,024
chips of 6 types), and each kind of bad cluster file refused with one clear line naming the file,
the group and what was expected, and a non-zero exit.
usage: plan_cli_test.py MXN SOURCE_DIR
"""
import os, subprocess, sys, tempfile, unittest

MXN, SRC = sys.argv[1], sys.argv[2]

GOOD = """[[group]]
chip = "{chip}"
count = {count}
per_node = 8
intra_gbs = 450
inter_gbs = 50
"""


class Plan(unittest.TestCase):
    def run_plan(self, text):
        with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
            f.write(text)
        return subprocess.run([MXN, "plan", "--cluster", f.name], capture_output=True, text=True), f.name

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


if __name__ == "__main__":
    unittest.main(argv=sys.argv[:1], verbosity=2)
