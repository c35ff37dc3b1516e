#!/usr/bin/python3
"""mxn serve over mixed chips (`--devices cpu,opencl:0`, OpenCL on PoCL): a replica of each model
on each device, each request routed to the replica predicted to finish it first. 32 concurrent
greedy requests are all answered with the text each gives alone, and both chips answer some (the
chunks' system_fingerprint and /metrics per device agree on which; PoCL decodes many times slower
than the CPU here, so it takes a request only once the CPU owes that much more). Then a fault injected into the
OpenCL replica's third pass (an injected fault, core/faults.h): it is taken out of rotation with a log line, its
in-flight streams end with an OpenAI-shaped error chunk, the CPU's streams finish; 2 s later it is
tried again, rejoins, and the next requests are answered by both chips, each as alone.
usage: serve_mixed_test.py MXN KJV_TXT GPT2_BPE_DIR
"""
import os, subprocess, sys, tempfile, threading, time, unittest, urllib.request

sys.path[:0] = [os.path.dirname(os.path.abspath(__file__)),
                os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "common")]
from hf_common import torch  # noqa: E402,F401  (may re-exec in the venv)
import openai  # noqa: E402

MXN = sys.argv[1]
from serve_common import make_models, start_serve  # noqa: E402

HAVE_OPENCL = "opencl:0" in subprocess.run([MXN, "devices"], capture_output=True, text=True).stdout


def start(model, env):
    proc, url = start_serve("--model", f"tiny={model}", "--devices", "cpu,opencl:0", "--slots", "8", env=env)
    return proc, url, openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)


def metrics(url):
    out = {}
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("mxn_") and 'device="' in line and "_bucket" not in line:
                name, dev = line.split("{")[0], line.split('device="')[1].split('"')[0]
                out[(name, dev)] = float(line.split()[-1])
    return out


@unittest.skipUnless(HAVE_OPENCL, "no OpenCL device here")
class Mixed(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        cls.base, _, _ = make_models(cls.tmp.name)

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    @staticmethod
    def streams(client, prompts, max_tokens):
        """Every prompt streamed at once; per prompt ("ok", text, fingerprint) or ("error", why, None)."""
        out = {}

        def one(i):
            try:
                parts = list(client.completions.create(model="tiny", prompt=prompts[i], max_tokens=max_tokens,
                                                       temperature=0, stream=True))
                out[i] = ("ok", "".join(p.choices[0].text for p in parts), parts[0].system_fingerprint)
            except openai.APIError as e:
                out[i] = ("error", str(e), None)
        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        return out

    def test_routes_over_both_chips_and_survives_a_failed_one(self):
        prompts = [f"And the {i} day was" for i in range(32)]
        alone = [subprocess.run([MXN, "generate", "--model", self.base, "--prompt", p, "--max-tokens", "40",
                                 "--temperature", "0"], capture_output=True, text=True, check=True).stdout[len(p):]
                 .rstrip("\n") for p in prompts]
        proc, url, client = start(self.base, {"MXN_FAULTS": "*:sleep=5:serve_step*:*:*"})
        try:
            out = self.streams(client, prompts, 40)
            m = metrics(url)
        finally:
            proc.terminate()
            proc.communicate(timeout=30)
        self.assertEqual([o[0] for o in out.values()], ["ok"] * 32)
        self.assertEqual([out[i][1] for i in range(32)], alone)
        by = {d: sum(1 for o in out.values() if o[2] == f"mxn:{d}") for d in ("cpu:0", "opencl:0")}
        self.assertEqual(sum(by.values()), 32)
        for d in by:
            self.assertGreater(by[d], 0, f"{d} answered none: {by}")
            self.assertEqual(m[("mxn_generated_tokens_total", d)], 40 * by[d])
        speed = {d: m[("mxn_decode_tokens_per_second", d)] for d in by}
        print(f"serve mixed: 32 greedy requests = each alone; cpu:0 answered {by['cpu:0']}, opencl:0 "
              f"{by['opencl:0']} (measured decode {speed['cpu:0']:.0f} and {speed['opencl:0']:.0f} tokens/s)")

        proc, url, client = start(self.base, {"MXN_FAULTS": "*:sleep=20:serve_step*:*:*;*:error:serve_step@opencl:0:3:*"})
        try:
            out = self.streams(client, prompts, 30)
            m = metrics(url)
            t0 = time.time()
            while metrics(url)[("mxn_replica_up", "opencl:0")] == 0 and time.time() - t0 < 15:
                time.sleep(0.1)
            back = time.time() - t0
            after = self.streams(client, prompts[:8], 40)
        finally:
            proc.terminate()
            _, err = proc.communicate(timeout=30)
        failed = [o for o in out.values() if o[0] == "error"]
        ok = [o for o in out.values() if o[0] == "ok"]
        self.assertEqual(len(failed) + len(ok), 32)
        self.assertGreater(len(failed), 0, "no request was on the OpenCL replica when it failed")
        self.assertGreater(len(ok), 0)
        for o in failed:
            self.assertIn("the replica on opencl:0 failed", o[1])
        for o in ok:
            self.assertEqual(o[2], "mxn:cpu:0")
        self.assertIn("mxn serve: model tiny on opencl:0 failed", err)
        self.assertIn("taken out of rotation", err)
        self.assertEqual(m[("mxn_replica_up", "cpu:0")], 1)
        # Retried 2 s after the failure, it rejoins and takes requests again.
        self.assertIn("mxn serve: model tiny on opencl:0 rejoined", err)
        self.assertEqual([after[i][0] for i in range(8)], ["ok"] * 8)
        self.assertEqual([after[i][1] for i in range(8)], alone[:8])
        self.assertIn("mxn:opencl:0", [after[i][2] for i in range(8)])
        print(f"serve mixed: opencl:0 failed at its third pass: {len(failed)} of its streams ended with an error "
              f"chunk, {len(ok)} on cpu:0 finished; it rejoined after {back:.1f} s more and the next 8 requests "
              f"were answered by both chips, each as alone")


if __name__ == "__main__":
    unittest.main(argv=sys.argv[:1], verbosity=2)
