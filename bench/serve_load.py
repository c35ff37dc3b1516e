#!/usr/bin/env python3
"""A fixed request mix against an OpenAI-compatible server (mxn serve or llama.cpp's llama-server):
streaming /v1/completions, greedy, ignore_eos, at a given concurrency. Prints one JSON line with
output tokens/s and p50/p99 time to first token and time per output token (ms).
usage: serve_load.py URL MODEL CONCURRENCY REQUESTS MAX_TOKENS CORPUS
"""
import http.client, json, random, sys, threading, time
from urllib.parse import urlparse

url, model, conc, total, max_tokens, corpus = sys.argv[1:7]
conc, total, max_tokens = int(conc), int(total), int(max_tokens)
words = open(corpus, encoding="utf-8").read().split()
rng = random.Random(conc)
# The mix: prompts of 16 to 256 words from the KJV, the same list for every server at a given
# concurrency and new ones at each (a server's prompt cache must not answer from an earlier level).
prompts = []
for _ in range(total):
    n, at = rng.choice([16, 32, 64, 128, 256]), rng.randrange(0, len(words) - 300)
    prompts.append(" ".join(words[at:at + n]))
u = urlparse(url)


def one(prompt):
    c = http.client.HTTPConnection(u.hostname, u.port, timeout=600)
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    c.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    r = c.getresponse()
    if r.status != 200:
        raise RuntimeError(f"HTTP {r.status}: {r.read()[:200]!r}")
    first = last = None
    chunks, usage = 0, None
    for line in r:
        line = line.strip()
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        d = json.loads(line[6:])
        if d.get("usage"):
            usage = d["usage"].get("completion_tokens")
        ch = d.get("choices") or []
        if ch and ch[0].get("text"):
            now = time.perf_counter()
            first = first or now
            last = now
            chunks += 1
    c.close()
    n = usage or chunks
    return first - t0, (last - first) / max(n - 1, 1), n


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


one(" ".join(words[:8]))  # warm up
results, errors, lock = [], [], threading.Lock()
queue = list(range(total))


def worker():
    while True:
        with lock:
            if not queue:
                return
            i = queue.pop(0)
        try:
            res = one(prompts[i])
            with lock:
                results.append(res)
        except Exception as e:  # noqa: BLE001  (counted and printed)
            with lock:
                errors.append(repr(e))


t0 = time.perf_counter()
threads = [threading.Thread(target=worker) for _ in range(conc)]
for t in threads:
    t.start()
for t in threads:
    t.join()
wall = time.perf_counter() - t0
tokens = sum(r[2] for r in results)
print(json.dumps({"concurrency": conc, "requests": len(results), "errors": len(errors), "tokens": tokens,
                  "tokens_per_s": tokens / wall, "ttft_p50_ms": 1e3 * pct([r[0] for r in results], 50),
                  "ttft_p99_ms": 1e3 * pct([r[0] for r in results], 99),
                  "tpot_p50_ms": 1e3 * pct([r[1] for r in results], 50),
                  "tpot_p99_ms": 1e3 * pct([r[1] for r in results], 99)}))
if errors:
    print(errors[:3], file=sys.stderr)
