#!/usr/bin/python3
"""GLM's blank-infilling sampler (src/data/glm.cpp) against a reference written here from the
GLM paper and ../shared/GLM.md, drawing from the same counter-based RNG (splitmix64):
identical Part A / Part B layout, targets, both position rows and the prefix length that sets the
attention mask, for every row; the masked share of the text over 10^4 rows is 15% +- 2%; spans
never cross the text's end and never touch each other.
Then training with --objective glm: a small GLM-shaped model on the KJV starts at the loss of
a uniform guess over 261 tokens and its Part B loss falls well below it; `mxn generate --infill`
fills one blanked word in each of 60 held-out verses, and the share filled exactly is printed
and checked against a floor (the figure is in the issue's note).
usage: glm_objective_test.py GLM_DUMP MXN KJV_BIN KJV_TXT
"""
import json, math, os, random, subprocess, sys, tempfile, unittest

DUMP = MXN = KJV_BIN = KJV_TXT = None
M64 = (1 << 64) - 1
CLS, MASK, GMASK, SOP, EOP = 1, 2, 3, 4, 5


def mix64(x):
    x = (x + 0x9e3779b97f4a7c15) & M64
    x = ((x ^ (x >> 30)) * 0xbf58476d1ce4e5b9) & M64
    x = ((x ^ (x >> 27)) * 0x94d049bb133111eb) & M64
    return x ^ (x >> 31)


class Rng:
    def __init__(self, seed):
        self.state = mix64(seed)

    def next(self):
        v = mix64(self.state)
        self.state = (self.state + 1) & M64
        return v

    def uniform(self):
        return (self.next() >> 11) * (1.0 / 9007199254740992.0)


def span_length(rng, lam=3.0, max_span=39):
    """Poisson(lam) over 1..max_span, renormalised; inverse CDF."""
    p, total, cdf = math.exp(-lam), 0.0, []
    for k in range(1, max_span + 1):
        p = p * lam / k
        total += p
        cdf.append(total)
    u = rng.uniform() * total
    return next((k for k in range(1, max_span + 1) if u < cdf[k - 1]), max_span)


def reference(text, ctx, seed, row, gmask_share, ratio=0.15):
    rng = Rng(mix64(seed ^ mix64((row + 0x61a7) & M64)))
    generation = gmask_share > 0 and rng.uniform() < gmask_share
    if generation:  # one span from the second half to the end
        m = ctx - 3
        lo, hi = (m + 1) // 2, m - 1
        n = lo + rng.next() % (hi - lo + 1)
        spans = [(m - n, n)]
    else:
        lens = []
        while True:  # k spans leave m = ctx - 1 - 2k text tokens; cover ratio of them
            m = ctx - 1 - 2 * len(lens)
            if lens and sum(lens) >= max(1, int(ratio * m)):
                break
            lens.append(span_length(rng))
        while lens and sum(lens) + len(lens) - 1 > m:
            lens.pop()
            m = ctx - 1 - 2 * len(lens)
        slack = m - sum(lens) - (len(lens) - 1)
        places = sorted(rng.next() % (slack + 1) for _ in lens)
        spans, offset = [], 0
        for place, n in zip(places, lens):  # blocklm's sample_spans: at least one token apart
            spans.append((offset + place, n))
            offset += n + 1
    # Part A
    tokens, mask_pos, i = [CLS], [], 0
    for start, n in spans:
        tokens += text[i:start]
        mask_pos.append(len(tokens))
        tokens.append(GMASK if generation else MASK)
        i = start + n
    tokens += text[i:m]
    sep = len(tokens)
    pos, block, targets = list(range(sep)), [0] * sep, [-1] * sep
    order = list(range(len(spans)))
    for j in range(len(order), 1, -1):
        r = rng.next() % j
        order[j - 1], order[r] = order[r], order[j - 1]
    for j in order:  # Part B: [sop] + span -> span + [eop], row 0 = its mask, row 1 = 1..L+1
        start, n = spans[j]
        span = text[start:start + n]
        tokens += [SOP] + span
        targets += span + [EOP]
        pos += [mask_pos[j]] * (n + 1)
        block += list(range(1, n + 2))
    return dict(tokens=tokens, targets=targets, pos=pos, block_pos=block, sep=sep,
                masked=sum(n for _, n in spans), text_len=m, generation=generation), spans


def attention_mask(sep, T):
    """GLM.md: lower-triangular ones, then columns [0, sep) set to 1."""
    return [[1 if (c <= r or c < sep) else 0 for c in range(T)] for r in range(T)]


def dump(ctx, rows, seed, share):
    r = subprocess.run([DUMP, str(ctx), str(rows), str(seed), str(share)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return [json.loads(l) for l in r.stdout.splitlines()]


class GlmSampler(unittest.TestCase):
    def test_identical_to_reference(self):
        for ctx, seed, share in ((64, 1, 0.0), (128, 7, 0.3), (37, 3, 0.5)):
            text = list(range(100, 100 + ctx))
            got = dump(ctx, 2000, seed, share)
            for row, g in enumerate(got):
                want, spans = reference(text, ctx, seed, row, share)
                self.assertEqual(g, want, f"ctx {ctx} seed {seed} row {row}")
                self.assertEqual(len(g["tokens"]), ctx)
                for (s0, n0), (s1, _) in zip(spans, spans[1:]):
                    self.assertGreater(s1, s0 + n0, "spans touch")
                self.assertLessEqual(spans[-1][0] + spans[-1][1], g["text_len"], "a span crosses the end")
            # Part A attends bidirectionally and never to Part B; Part B is causal over everything.
            g = got[0]
            mk = attention_mask(g["sep"], ctx)
            self.assertTrue(all(mk[r][c] == (1 if c < g["sep"] else 0) for r in range(g["sep"]) for c in range(ctx)))
            print(f"ctx {ctx:3d} seed {seed} gMASK share {share}: 2000 rows identical "
                  f"({sum(x['generation'] for x in got)} generation rows)")

    def test_masked_share(self):
        got = dump(256, 10000, 11, 0.0)
        share = sum(g["masked"] for g in got) / sum(g["text_len"] for g in got)
        print(f"masked share over 10^4 rows of 256: {share:.4f}")
        self.assertLess(abs(share - 0.15), 0.02)
        self.assertTrue(all(t == -1 for g in got for t in g["targets"][:g["sep"]]), "no loss on Part A")
        self.assertTrue(all(t != -1 for g in got for t in g["targets"][g["sep"]:]), "loss on all of Part B")


class GlmTraining(unittest.TestCase):
    def test_train_and_infill(self):
        with tempfile.TemporaryDirectory() as tmp:
            run = os.path.join(tmp, "run")
            r = subprocess.run([MXN, "train", "--objective", "glm", "--arch", "glm", "--n_layer", "3",
                                "--n_embd", "128", "--n_head", "4", "--n_kv_head", "2", "--n_ctx", "96",
                                "--batch", "16", "--steps", "500", "--lr", "3e-3", "--warmup", "20",
                                "--eval_every", "250", "--ckpt_every", "0", "--log_every", "100",
                                "--data", KJV_BIN, "--out", run, "--dtype", "f32"], capture_output=True, text=True)
            self.assertEqual(r.returncode, 0, r.stderr)
            with open(os.path.join(run, "metrics.jsonl")) as f:
                rows = [json.loads(l) for l in f]
            first, last = rows[0]["loss"], rows[-1]["val_loss"]
            print(f"Part B loss: step 1 {first:.3f} (ln 261 = {math.log(261):.3f}), val after 500 steps {last:.3f}")
            self.assertLess(abs(first - math.log(261)), 0.3)
            self.assertLess(last, 0.5 * first)
            share = infill_share(run, 60)
            print(f"--infill: {share:.2%} of 60 held-out blanked words filled exactly")
            self.assertGreaterEqual(share, INFILL_FLOOR)


# Measured here: 3.3% (2 of 60) for this 3x128 model after 500 steps, 5.2% (3 of 58, verses
# up to 90 characters) for 4x192 after 2500 steps of 32 x 128 tokens. Small byte-level models:
# the floor checks that infilling works at all, the loss checks the learning.
INFILL_FLOOR = 1 / 60


def infill_share(run, n):
    """One word blanked in each of n verses from the held-out end of the KJV; the share of
    verses that come back exactly (greedy)."""
    lines = open(KJV_TXT, encoding="utf-8").read().split("\n")
    verses = [l for l in lines[int(len(lines) * 0.92):] if 50 <= len(l) <= 90 and l.count(" ") >= 6][:n]
    rng, hit = random.Random(5), 0
    for v in verses:
        words = v.split(" ")
        i = rng.randrange(1, len(words) - 1)
        w = words[i].strip(",.;:?!")
        blanked = " ".join(words[:i] + [words[i].replace(w, "[MASK]", 1)] + words[i + 1:])
        r = subprocess.run([MXN, "generate", "--checkpoint", run, "--infill", blanked, "--temperature", "0",
                            "--max-tokens", "16"], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        out = r.stdout.rstrip("\n")
        assert out.startswith(blanked.split("[MASK]")[0]) and out.endswith(blanked.split("[MASK]")[1])
        hit += out == v
    return hit / len(verses)


if __name__ == "__main__":
    DUMP, MXN, KJV_BIN, KJV_TXT = sys.argv[1:5]
    unittest.main(argv=sys.argv[:1], verbosity=2)
