#!/usr/bin/python3
"""mxn serve against the official `openai` Python client (1.55, in the test venv), on a real
loopback port: completions and chat, streaming and not; the text equals `mxn generate` greedy for
the same model and prompt; `usage` counts equal the tokenizer's (`mxn tokenize`) and the generated
ids; bad requests get OpenAI-shaped 4xx errors and the server answers the next good one.
Models: a tiny GPT-2 with GPT-2's BPE files (a base model) and a tiny Qwen2 with a ChatML
tokenizer trained here (its chat template in tokenizer_config.json).
usage: serve_http_test.py MXN KJV_TXT GPT2_BPE_DIR
"""
import json, os, shutil, socket, subprocess, sys, tempfile, time, unittest, urllib.error, urllib.request

sys.path[:0] = [os.path.dirname(os.path.abspath(__file__)),
                os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "common")]
from hf_common import torch  # noqa: E402  (may re-exec in the venv)
import openai  # noqa: E402

from serve_common import (BPE, KJV, MXN, QWEN2_CHAT, free_port, make_models,  # noqa: E402,F401
                          start_serve, tiny_gpt2, tiny_qwen2_chat)


class Serve(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        cls.base, cls.chat, wide = make_models(cls.tmp.name)
        cls.proc, url = start_serve("--model", f"tiny={cls.base}", "--model", f"chat={cls.chat}",
                                    "--model", f"wide={wide}", "--slots", "32", "--api-key", "sekrit",
                                    env={"MXN_FAULTS": "*:sleep=5:serve_step*:*:*"})
        cls.port = int(url.rsplit(":", 1)[1])
        cls.client = openai.OpenAI(base_url=url + "/v1", api_key="sekrit", max_retries=0)
        cls.url = url

    @classmethod
    def tearDownClass(cls):
        cls.proc.terminate()
        cls.proc.wait(timeout=30)
        cls.tmp.cleanup()

    def generate(self, folder, *args):
        r = subprocess.run([MXN, "generate", "--model", folder, "--temperature", "0", *args],
                           capture_output=True, text=True, check=True)
        return r.stdout

    def count(self, folder, text):
        r = subprocess.run([MXN, "tokenize", "--tokenizer", folder, "--text", text], capture_output=True,
                           text=True, check=True)
        return len(r.stdout.replace(",", " ").split())

    def test_completions(self):
        prompt = "In the beginning God created"
        want = self.generate(self.base, "--prompt", prompt, "--max-tokens", "12")[len(prompt):].rstrip("\n")
        ids = self.generate(self.base, "--prompt", prompt, "--max-tokens", "12", "--print-ids").split()
        before = {k: self.metric(f"mxn_time_{k}_count") for k in ("to_first_token_seconds", "per_output_token_seconds")}
        r = self.client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0)
        self.assertEqual(r.choices[0].text, want)
        for k, n in before.items():  # one request: one observation in each latency histogram
            self.assertEqual(self.metric(f"mxn_time_{k}_count"), n + 1, k)
        self.assertEqual(r.usage.prompt_tokens, self.count(self.base, prompt))
        self.assertEqual(r.usage.completion_tokens, len(ids))
        self.assertEqual(r.choices[0].finish_reason, "length")
        chunks = list(self.client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0,
                                                     stream=True))
        self.assertEqual("".join(c.choices[0].text for c in chunks), want)
        self.assertEqual(chunks[-1].usage.completion_tokens, len(ids))
        print(f"serve completions: {len(ids)} tokens equal mxn generate, streamed in {len(chunks)} chunks; "
              f"usage {r.usage.prompt_tokens}+{r.usage.completion_tokens}")

    def test_chat(self):
        q = "Who created the heaven?"
        want = self.generate(self.chat, "--chat", "--prompt", q, "--max-tokens", "20")[len(q):].rstrip("\n")
        r = self.client.chat.completions.create(model="chat", messages=[{"role": "user", "content": q}],
                                                max_tokens=20, temperature=0)
        self.assertEqual(r.choices[0].message.content, want)
        self.assertEqual(r.choices[0].message.role, "assistant")
        parts = list(self.client.chat.completions.create(model="chat", messages=[{"role": "user", "content": q}],
                                                         max_tokens=20, temperature=0, stream=True))
        self.assertEqual("".join(p.choices[0].delta.content or "" for p in parts), want)
        print(f"serve chat: {r.usage.completion_tokens} tokens equal mxn generate --chat, streamed and not")

    def test_chat_stops_at_end_of_turn(self):
        """The chat format's end-of-turn token (<|im_end|>; this model has no eos of its own) ends an
        answer: a copy of the chat model whose lm_head row for <|im_end|> is 1.5 times that of its
        4th greedy token stops early with finish_reason "stop", as `mxn generate --chat` does."""
        from safetensors.torch import load_file, save_file
        q = "Who created the heaven?"
        ids = [int(t) for t in self.generate(self.chat, "--chat", "--prompt", q, "--max-tokens", "8",
                                             "--print-ids").split()]
        folder = os.path.join(self.tmp.name, "qwen2-eot")
        shutil.copytree(self.chat, folder, dirs_exist_ok=True)
        w = load_file(os.path.join(folder, "model.safetensors"))
        end = self.ids_of(self.chat, "<|im_end|>")[0]
        w["lm_head.weight"][end] = 1.5 * w["lm_head.weight"][ids[3]]
        save_file(w, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
        want = self.generate(folder, "--chat", "--prompt", q, "--max-tokens", "8")[len(q):].rstrip("\n")
        proc, url = start_serve("--model", f"eot={folder}")
        try:
            client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
            r = client.chat.completions.create(model="eot", messages=[{"role": "user", "content": q}], max_tokens=8,
                                               temperature=0)
        finally:
            proc.terminate()
            proc.communicate(timeout=30)
        self.assertEqual(r.choices[0].message.content, want)
        self.assertEqual(r.choices[0].finish_reason, "stop")
        self.assertLess(r.usage.completion_tokens, 8)
        print(f"serve chat: <|im_end|> ends the answer after {r.usage.completion_tokens} of 8 tokens, "
              f"finish_reason stop, as mxn generate --chat")

    def post(self, path, body, key="sekrit", raw=None):
        data = raw if raw is not None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method="POST",
                                     headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def test_bad_requests(self):
        good = {"model": "tiny", "prompt": "In the", "max_tokens": 3, "temperature": 0}
        cases = [("invalid JSON", 400, None, b"{not json", "JSON"),
                 ("missing model", 400, {"prompt": "x"}, None, "'model'"),
                 ("unknown model", 404, {**good, "model": "nope"}, None, "'nope'"),
                 ("negative max_tokens", 400, {**good, "max_tokens": -5}, None, "max_tokens"),
                 ("prompt over the context", 400, {**good, "prompt": "the " * 3000}, None, "context"),
                 ("chat on a base model", 400, None, None, "chat format"),
                 ("wrong API key", 401, good, None, "API key"),
                 ("a 10 MB body", 413, None, b"x" * (10 << 20), "too large")]
        for name, status, body, raw, needle in cases:
            with self.subTest(name):
                if name == "chat on a base model":
                    got, err = self.post("/v1/chat/completions", {"model": "tiny", "messages": [
                        {"role": "user", "content": "hi"}]})
                else:
                    got, err = self.post("/v1/completions", body, key="wrong" if "key" in name else "sekrit", raw=raw)
                self.assertEqual(got, status, err)
                self.assertIn(needle, err["error"]["message"])
                ok, r = self.post("/v1/completions", good)
                self.assertEqual(ok, 200, r)
        print(f"serve bad input: {len(cases)} kinds, each its 4xx JSON error, and the next request answered")

    def metric(self, name, model="tiny"):
        req = urllib.request.Request(self.url + "/metrics", headers={"Authorization": "Bearer sekrit"})
        with urllib.request.urlopen(req, timeout=10) as r:  # /metrics needs the key too
            for line in r.read().decode().splitlines():
                if line.startswith(name + "{") and f'model="{model}"' in line:
                    return float(line.split()[-1])
        raise AssertionError(f"{name} not in /metrics")

    def test_disconnect_frees_slots(self):
        """32 streaming clients read a chunk each and hang up: their requests leave the batch, and the
        KV blocks and batch slots in use return to the idle figures (read from /metrics) within two
        engine steps of the last hang-up: the next token's write finds the socket gone and cancels,
        and the pass after it frees the blocks before it runs. A new request is then answered."""
        import http.client
        idle_blocks = self.metric("mxn_kv_blocks_used", "wide")
        cancelled0 = self.metric("mxn_requests_cancelled_total", "wide")
        conns = []
        for i in range(32):
            c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
            c.request("POST", "/v1/completions", json.dumps({"model": "wide", "prompt": f"Verse {i} of the psalm",
                                                             "max_tokens": 400, "stream": True}),
                      {"Authorization": "Bearer sekrit", "Content-Type": "application/json"})
            r = c.getresponse()
            self.assertEqual(r.status, 200)
            r.fp.readline(), r.fp.readline(), r.fp.readline()  # a chunk has arrived
            conns.append((c, r))
        busy_slots = self.metric("mxn_batch_slots_used", "wide")
        busy_blocks = self.metric("mxn_kv_blocks_used", "wide")
        for c, r in conns:
            c.sock.shutdown(socket.SHUT_RDWR)
            c.close()
        steps0, t0 = self.metric("mxn_engine_steps_total", "wide"), time.time()
        while self.metric("mxn_kv_blocks_used", "wide") > idle_blocks and time.time() - t0 < 10:
            time.sleep(0.002)
        freed, steps = time.time() - t0, self.metric("mxn_engine_steps_total", "wide") - steps0
        self.assertEqual(idle_blocks, 0)
        self.assertEqual(busy_slots, 32, "every slot was busy when the clients hung up")
        self.assertGreaterEqual(busy_blocks, 32 * 26, "each request holds its prompt's and max_tokens' blocks")
        self.assertEqual(self.metric("mxn_kv_blocks_used", "wide"), idle_blocks)
        self.assertLessEqual(steps, 2)
        self.assertEqual(self.metric("mxn_batch_slots_used", "wide"), 0)
        self.assertEqual(self.metric("mxn_requests_waiting", "wide"), 0)
        cancelled = self.metric("mxn_requests_cancelled_total", "wide") - cancelled0
        made = self.metric("mxn_generated_tokens_total", "wide")
        self.assertEqual(cancelled, 32, "each request left mid-answer")
        self.assertLess(made, 32 * 400)
        ok, r = self.post("/v1/completions", {"model": "tiny", "prompt": "In the", "max_tokens": 3})
        self.assertEqual(ok, 200, r)
        print(f"serve disconnect: 32 streams hung up with 32 of 32 slots and {busy_blocks:.0f} KV blocks busy; "
              f"blocks back to {idle_blocks:.0f} after {steps:.0f} engine steps ({freed * 1e3:.0f} ms), 32 cancelled "
              f"after {made:.0f} of {32 * 400} tokens")

    def test_many_streams_over_two_models(self):
        """64 concurrent streaming clients over two models (32 slots each, one KV block table per
        request): no request fails, every stream ends with its finish chunk and [DONE], and each one's
        text equals what the same greedy request gives alone."""
        import threading
        prompts = [f"Chapter {i} verse" for i in range(64)]
        alone = {}
        for i in (0, 1, 2, 3):  # a few references, one at a time
            model = "tiny" if i % 2 == 0 else "chat"
            if model == "tiny":
                alone[i] = self.client.completions.create(model=model, prompt=prompts[i], max_tokens=16,
                                                          temperature=0).choices[0].text
            else:
                alone[i] = self.client.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": prompts[i]}], max_tokens=16,
                    temperature=0).choices[0].message.content
        results, errors = {}, []

        def one(i):
            try:
                if i % 2 == 0:
                    parts = list(self.client.completions.create(model="tiny", prompt=prompts[i], max_tokens=16,
                                                                temperature=0, stream=True))
                    text = "".join(p.choices[0].text for p in parts)
                else:
                    parts = list(self.client.chat.completions.create(
                        model="chat", messages=[{"role": "user", "content": prompts[i]}], max_tokens=16,
                        temperature=0, stream=True))
                    text = "".join(p.choices[0].delta.content or "" for p in parts)
                assert parts[-1].choices[0].finish_reason in ("length", "stop"), parts[-1]
                results[i] = text
            except Exception as e:  # noqa: BLE001  (counted, then asserted)
                errors.append(f"{i}: {e!r}")
        t0 = time.time()
        threads = [threading.Thread(target=one, args=(i,)) for i in range(64)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        took = time.time() - t0
        self.assertEqual(errors, [])
        self.assertEqual(len(results), 64)
        for i, want in alone.items():
            self.assertEqual(results[i], want, f"request {i}")
        print(f"serve load: 64 concurrent streams over 2 models in {took:.1f} s, 0 failed, all complete")

    def ids_of(self, folder, text):
        r = subprocess.run([MXN, "tokenize", "--tokenizer", folder, "--text", text], capture_output=True,
                           text=True, check=True)
        return [int(t) for t in r.stdout.replace(",", " ").split()]

    def test_logprobs_and_penalties(self):
        """Log-probabilities equal transformers' log-softmax at each generated position (top 3 too);
        frequency and presence penalties steer greedy decoding exactly as OpenAI defines them
        (logit - presence * [count > 0] - frequency * count), checked against a loop over
        transformers' logits."""
        from transformers import GPT2LMHeadModel
        ref = GPT2LMHeadModel.from_pretrained(self.base).double().eval()
        prompt = "And God said"
        ids = self.ids_of(self.base, prompt)
        r = self.client.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0, logprobs=3)
        lp = r.choices[0].logprobs
        seq = list(ids)
        worst = 0.0
        gen = []
        with torch.no_grad():
            for k in range(8):
                logp = torch.log_softmax(ref(torch.tensor([seq])).logits[0, -1], -1)
                tok = int(logp.argmax())
                gen.append(tok)
                worst = max(worst, abs(lp.token_logprobs[k] - float(logp[tok])))
                top = sorted(lp.top_logprobs[k].values(), reverse=True)
                want = logp.topk(3).values.tolist()
                worst = max(worst, max(abs(a - b) for a, b in zip(top, want)))
                seq.append(tok)
        self.assertLess(worst, 1e-4)
        for name, pres, freq in (("frequency", 0.0, 1.5), ("presence", 1.0, 0.0)):
            r = self.client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0,
                                               frequency_penalty=freq, presence_penalty=pres, logprobs=0)
            got = [self.ids_of(self.base, t)[0] if len(self.ids_of(self.base, t)) == 1 else None
                   for t in r.choices[0].logprobs.tokens]
            seq, want, counts = list(ids), [], {}
            with torch.no_grad():
                for _ in range(12):
                    logits = ref(torch.tensor([seq])).logits[0, -1].clone()
                    for t, n in counts.items():
                        logits[t] -= pres + freq * n
                    tok = int(logits.argmax())
                    want.append(tok)
                    counts[tok] = counts.get(tok, 0) + 1
                    seq.append(tok)
            want_text = "".join(r.choices[0].logprobs.tokens)
            self.assertEqual([g for g in got if g is not None], [w for w, g in zip(want, got) if g is not None])
            plain = self.client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0)
            self.assertEqual(r.choices[0].text, want_text)
            self.assertNotEqual(r.choices[0].text, plain.choices[0].text, f"the {name} penalty changes the answer")
        print(f"serve logprobs: 8 tokens and their top 3 within {worst:.1e} of transformers; frequency and "
              f"presence penalties steer greedy decoding as the reference loop does")

    def test_memory_budget_evicts_and_reloads(self):
        """A budget that holds one of two models (two names for the tiny GPT-2, ~7 MB each):
        alternating requests evict the idle one and load the other, every request is answered
        with the same text, and /metrics counts the loads."""
        proc, url = start_serve("--model", f"a={self.base}", "--model", f"b={self.base}", "--memory-budget-mb", "10")
        try:
            client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
            texts = [client.completions.create(model=m, prompt="In the beginning", max_tokens=6,
                                               temperature=0).choices[0].text for m in "ababab"]
            self.assertEqual(len(set(texts)), 1)
            with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
                m = r.read().decode()
            loads = {n: float(next(l.split()[-1] for l in m.splitlines()
                                   if l.startswith(f'mxn_model_loads_total{{model="{n}"}}'))) for n in "ab"}
            loaded = [n for n in "ab" if f'mxn_model_loaded{{model="{n}"}} 1' in m]
            self.assertEqual(loads, {"a": 3, "b": 3})
            self.assertEqual(loaded, ["b"])
            print(f"serve budget: 6 alternating requests over 2 models with room for 1: all answered alike, "
                  f"loads {loads}")
        finally:
            proc.terminate()
            proc.wait(timeout=30)

    def test_health_while_loading_and_a_bad_folder(self):
        """/health answers 503 {"status": "loading"} while the models load (a test hook slows the
        load by 1.5 s), then 200; a request sent meanwhile waits and is answered. A folder whose
        config.json is not JSON stops the server with a non-zero exit and a line naming it."""
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc = subprocess.Popen([MXN, "serve", "--port", str(port), "--model", f"tiny={self.base}"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=dict(os.environ, MXN_FAULTS="*:sleep=1500:serve_load:*:*"))
        try:
            seen, body = [], None
            for _ in range(600):
                try:
                    with urllib.request.urlopen(url + "/health", timeout=1) as r:
                        seen.append(r.status)
                        break
                except urllib.error.HTTPError as e:
                    seen.append(e.code)
                    body = json.loads(e.read())
                    if len(seen) == 1:  # a request while loading: it waits, then is answered
                        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
                        text = client.completions.create(model="tiny", prompt="In the", max_tokens=4,
                                                         temperature=0).choices[0].text
                except OSError:
                    time.sleep(0.05)
                    continue
                time.sleep(0.05)
            self.assertEqual(seen[0], 503)
            self.assertEqual(body, {"status": "loading"})
            self.assertEqual(seen[-1], 200)
            want = self.client.completions.create(model="tiny", prompt="In the", max_tokens=4, temperature=0)
            self.assertEqual(text, want.choices[0].text)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        bad = os.path.join(self.tmp.name, "bad")
        os.makedirs(bad, exist_ok=True)
        with open(os.path.join(bad, "config.json"), "w") as f:
            f.write("{not json")
        r = subprocess.run([MXN, "serve", "--port", str(free_port()), "--model", f"bad={bad}"],
                           capture_output=True, text=True, timeout=60)
        self.assertNotEqual(r.returncode, 0)
        self.assertIn("config.json", r.stderr)
        print(f"serve health: {seen.count(503)} x 503 loading, then 200; the request sent while loading answered; "
              f"a bad folder: exit {r.returncode}, '{r.stderr.strip().splitlines()[-1]}'")

    def test_queue_full_is_429(self):
        """One slot and --max-queue 1: with one request running and one waiting, a third gets 429
        in OpenAI's shape (rate_limit_error, queue_full); the first two are still answered whole."""
        import http.client, threading
        proc, url = start_serve("--model", f"tiny={self.base}", "--slots", "1", "--max-queue", "1",
                               env={"MXN_FAULTS": "*:sleep=10:serve_step*:*:*"})
        port = int(url.rsplit(":", 1)[1])
        try:
            def metric(name):
                with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
                    return float(next(l.split()[-1] for l in r.read().decode().splitlines() if l.startswith(name + "{")))
            body = {"model": "tiny", "prompt": "In the beginning", "max_tokens": 30, "temperature": 0}
            answers = []

            def run():
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                c.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
                r = c.getresponse()
                answers.append((r.status, json.loads(r.read())))
            first = threading.Thread(target=run)
            first.start()
            while metric("mxn_requests_running") < 1:
                time.sleep(0.005)
            second = threading.Thread(target=run)
            second.start()
            while metric("mxn_requests_waiting") < 1:
                time.sleep(0.005)
            req = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(), method="POST",
                                         headers={"Content-Type": "application/json"})
            with self.assertRaises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(req, timeout=30)
            err = json.loads(e.exception.read())["error"]
            first.join(60)
            second.join(60)
            self.assertEqual(e.exception.code, 429)
            self.assertEqual((err["type"], err["code"]), ("rate_limit_error", "queue_full"))
            self.assertEqual([a[0] for a in answers], [200, 200])
            self.assertEqual(answers[0][1]["choices"][0]["text"], answers[1][1]["choices"][0]["text"])
            self.assertEqual(answers[0][1]["usage"]["completion_tokens"], 30)
            print(f"serve queue: 1 running + 1 waiting, the third request 429 ({err['message']}); both others whole")
        finally:
            proc.terminate()
            proc.wait(timeout=30)


if __name__ == "__main__":
    unittest.main(argv=sys.argv[:1], verbosity=2)
