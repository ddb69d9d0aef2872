"""Sampled speculative decoding keeps the target's distribution exactly.

1. Exact check on a Markov-chain "model" (next-token logits depend on the previous token):
   generate 3 tokens by speculative rounds with a deliberately bad drafter and compare the
   empirical joint distribution of (x1, x2, x3) with the exact one by a chi-square test. A
   deliberately broken acceptance rule must fail the same test.
2. End to end through the engine: tiny Llama + random EAGLE-3 drafter at temperature 1, top-k 3,
   the first two generated tokens with and without speculation agree (two-sample chi-square).
"""
import itertools
import math

import pytest
import torch

from eyas import SamplingParams
from eyas.spec import verify
from eyas.spec.verify import accept_chain

V = 4
# Chi-square critical values at p = 0.001 (df -> value), from the standard table.
CHI2_001 = {3: 16.27, 8: 26.12, 15: 37.70, 63: 103.4}


def chi2_crit(df):
    if df in CHI2_001:
        return CHI2_001[df]
    # Wilson-Hilferty approximation for other df at p = 0.001 (z = 3.09)
    z = 3.090
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def markov():
    g = torch.Generator().manual_seed(0)
    target = torch.randn(V, V, generator=g) * 1.5  # logits of next token given previous
    drafter = torch.randn(V, V, generator=g) * 1.5  # a different, bad drafter
    return target, drafter


def spec_generate(target, drafter, x0, n, k, params, gen):
    """Generate n tokens after x0 by speculative rounds of k drafts."""
    out = [x0]
    while len(out) - 1 < n:
        draft, qs, prev = [], [], out[-1]
        for _ in range(k):
            q = drafter[prev].div(params.temperature).softmax(-1)
            d = int(torch.multinomial(q, 1, generator=gen))
            draft.append(d)
            qs.append(q)
            prev = d
        ctx = [out[-1]] + draft
        logits = torch.stack([target[t] for t in ctx])  # [k+1, V]
        out.extend(accept_chain(logits, draft, torch.stack(qs), params, gen))
    return tuple(out[1:n + 1])


def exact_joint(target, x0, n, temperature):
    probs = {}
    p = target.div(temperature).softmax(-1)
    for seq in itertools.product(range(V), repeat=n):
        prob, prev = 1.0, x0
        for t in seq:
            prob *= p[prev, t].item()
            prev = t
        probs[seq] = prob
    return probs


def chi2_vs_exact(counts, probs, draws):
    return sum((counts.get(c, 0) - draws * p) ** 2 / (draws * p) for c, p in probs.items())


def run_markov(monkeypatch_rule=None, draws=6000, k=3):
    target, drafter = markov()
    params = SamplingParams(temperature=1.0)
    gen = torch.Generator().manual_seed(1)
    counts = {}
    for _ in range(draws):
        s = spec_generate(target, drafter, 0, 3, k, params, gen)
        counts[s] = counts.get(s, 0) + 1
    return chi2_vs_exact(counts, exact_joint(target, 0, 3, 1.0), draws)


def test_rejection_sampling_matches_target_distribution():
    stat = run_markov()
    assert stat < chi2_crit(V ** 3 - 1), f"chi-square {stat:.1f} over the 0.1% critical value"


def test_broken_acceptance_rule_is_detected(monkeypatch):
    """Accepting every draft (ignoring p/q) must be caught by the same test."""
    def accept_all(target_logits, draft, q, params, generator):
        best = int(torch.multinomial(verify.processed_probs(target_logits[-1:], [params])[0], 1,
                                     generator=generator))
        return list(draft) + [best]

    monkeypatch.setattr(verify, "accept_sampled", accept_all)
    monkeypatch.setattr("test_spec_sampling.accept_chain",
                        lambda lg, d, q, p, g: accept_all(lg, d, q, p, g))
    stat = run_markov(draws=3000)
    assert stat > chi2_crit(V ** 3 - 1)


def test_greedy_rows_accept_by_argmax():
    logits = torch.tensor([[0.0, 5.0, 1.0], [3.0, 0.0, 0.0], [0.0, 0.0, 9.0]])
    greedy = SamplingParams()
    assert accept_chain(logits, [1, 0], None, greedy, None) == [1, 0, 2]
    assert accept_chain(logits, [1, 2], None, greedy, None) == [1, 0]
    assert accept_chain(logits, [2, 0], None, greedy, None) == [1]


def first_tokens(engine, n_requests, params, prompt, seed0):
    counts = {}
    for start in range(0, n_requests, 64):
        for i in range(start, min(start + 64, n_requests)):
            engine.add_request(str(i), prompt, SamplingParams(**{**params, "seed": seed0 + i}))
        while engine.has_unfinished():
            for o in engine.step():
                if o.finished:
                    key = tuple(o.token_ids[:2])
                    counts[key] = counts.get(key, 0) + 1
    return counts


def two_sample_chi2(a, b):
    na, nb = sum(a.values()), sum(b.values())
    stat, cells = 0.0, 0
    for key in set(a) | set(b):
        x, y = a.get(key, 0), b.get(key, 0)
        if x + y == 0:
            continue
        cells += 1
        ea, eb = (x + y) * na / (na + nb), (x + y) * nb / (na + nb)
        stat += (x - ea) ** 2 / ea + (y - eb) ** 2 / eb
    return stat, cells - 1


def test_engine_sampling_with_speculation_matches_plain(tiny_engine_factory, tiny_drafter_path):
    params = dict(temperature=1.0, top_k=3, max_tokens=3, ignore_eos=True)
    prompt = "The weather today is"
    n = 1200
    plain = first_tokens(tiny_engine_factory(), n, params, prompt, seed0=0)
    spec = first_tokens(tiny_engine_factory(draft=str(tiny_drafter_path), spec_steps=2), n, params,
                        prompt, seed0=10**6)
    stat, df = two_sample_chi2(plain, spec)
    assert df >= 3, "the test needs several outcomes to mean anything"
    assert stat < chi2_crit(df), f"chi-square {stat:.1f} with {df} df"
