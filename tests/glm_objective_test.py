#!/usr/bin/python3
"""GLM's blank-infilling sampler (src/data/glm.cpp) against a reference written here from the
GLM paper and ../shared/GLM.md, drawing from the same counter-based RNG (splitmix64):
identical Part A / Part B layout, targets, both position rows and the prefix length that sets the
attention mask, for every row; the masked share of the text over 10^4 rows is 15% +- 2%; spans
never cross the text's end and never touch each other.
usage: glm_objective_test.py GLM_DUMP
"""
import json, math, subprocess, sys, unittest

DUMP = None
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


if __name__ == "__main__":
    DUMP = sys.argv[1]
    unittest.main(argv=sys.argv[:1], verbosity=2)
