#!/usr/bin/python3
"""Backends that cannot load are listed by `mxn devices` with the reason, one line each, and
mxn keeps working on the devices that did load; a plugin of the last ABI loads.
usage: plugin_test.py PATH/TO/mxn DIR_WITH_BAD_PLUGINS
"""
import os, re, subprocess, sys, tempfile, unittest

MXN = BAD = None
HEADER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "include", "mxn", "backend_abi.h")


class PluginTest(unittest.TestCase):
    def devices(self, *dirs):
        env = dict(os.environ, MXN_PLUGIN_PATH=":".join(dirs))
        r = subprocess.run([MXN, "devices"], capture_output=True, text=True, env=env, timeout=60)
        self.assertEqual(r.returncode, 0, r.stderr)
        return r.stdout.splitlines()

    def test_refused_plugins_are_named_with_reasons(self):
        with tempfile.TemporaryDirectory() as tmp:
            with open(os.path.join(tmp, "libmxn_backend_garbage.so"), "w") as f:
                f.write("not an ELF file\n")
            lines = self.devices(BAD, tmp, "/nonexistent/dir")
        self.assertTrue(lines[0].startswith("cpu:0 "), lines)
        refused = [l for l in lines if " not loaded: " in l]
        by_name = {l.split()[0]: l for l in refused}
        # (a real backend may be refused too on a machine without its runtime: not checked here)
        self.assertLessEqual({"noentry", "oldabi", "garbage"}, set(by_name), lines)
        self.assertIn("does not export mxn_backend_get_api", by_name["noentry"])
        abi = int(re.search(r"#define MXN_ABI_VERSION (\d+)", open(HEADER).read()).group(1))
        self.assertIn(f"ABI version {abi + 41}, this mxn needs {abi}", by_name["oldabi"])
        self.assertIn("not loaded:", by_name["garbage"])
        # A plugin built against ABI 6 (a shorter table) loads and lists its device.
        self.assertNotIn("abi6", by_name)
        self.assertTrue(any(l.startswith("abi6:0 ") and "a plugin of ABI 6" in l for l in lines), lines)
        # It has no supports_call (ABI 8): mxn asks its supports() instead, which refuses every op.
        r = subprocess.run([MXN, "conformance", "--backend", "abi6"], capture_output=True,
                           text=True, env=dict(os.environ, MXN_PLUGIN_PATH=BAD), timeout=60)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertRegex(r.stdout, r"\n0 passed, 0 failed, \d+ unsupported")

    def test_unknown_device_after_refused_plugin(self):
        env = dict(os.environ, MXN_PLUGIN_PATH=BAD)
        r = subprocess.run([MXN, "conformance", "--backend", "oldabi"], capture_output=True,
                           text=True, env=env, timeout=60)
        self.assertEqual(r.returncode, 1)
        self.assertTrue(r.stderr.startswith("mxn: error: unknown device 'oldabi' (devices here: cpu:0"),
                        r.stderr)
        self.assertEqual(len(r.stderr.strip().splitlines()), 1)


if __name__ == "__main__":
    MXN, BAD = sys.argv[1], sys.argv[2]
    unittest.main(argv=[sys.argv[0], "-v"])
