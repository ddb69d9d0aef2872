"""Sampler: the processed distribution, seeded draws and logprobs."""
import math

import pytest
import torch

from eyas.core import SamplingParams
from eyas.layers.sampler import Sampler, draw_from_cdf, processed_probs, sample, sample_from_probs

V = 50


def _logits(s=4, v=V, seed=0):
    return torch.randn(s, v, generator=torch.Generator().manual_seed(seed)) * 3  # [S, V]


def test_greedy_is_argmax_and_consumes_no_rng():
    logits = _logits(6)
    params = [SamplingParams()] * 6
    state = torch.get_rng_state()
    out = sample(logits, params)
    assert torch.equal(out.token_ids, logits.argmax(-1))
    assert out.token_ids.dtype == torch.int64
    assert out.logprobs is None
    assert torch.equal(torch.get_rng_state(), state)
    probs = processed_probs(logits, params)
    assert torch.equal(probs.argmax(-1), logits.argmax(-1))
    assert torch.equal(probs.sum(-1), torch.ones(6))


def test_mixed_batch_greedy_rows_stay_argmax():
    logits = _logits(4)
    gen = torch.Generator().manual_seed(3)
    params = [SamplingParams(), SamplingParams(temperature=1.0), SamplingParams(seed=1),
              SamplingParams(temperature=2.0, top_k=5)]
    before = gen.get_state()
    out = sample(logits, params, [None, None, gen, None])
    assert out.token_ids[0] == logits[0].argmax() and out.token_ids[2] == logits[2].argmax()
    assert torch.equal(gen.get_state(), before)  # greedy row: its generator is untouched


def test_top_k_1_is_greedy():
    logits = _logits(8)
    params = [SamplingParams(temperature=1.3, top_k=1)] * 8
    probs = processed_probs(logits, params)
    assert torch.equal(probs, torch.nn.functional.one_hot(logits.argmax(-1), V).float())
    for _ in range(5):
        assert torch.equal(sample(logits, params).token_ids, logits.argmax(-1))


def test_top_k_keeps_k_largest():
    logits = _logits(3)
    params = [SamplingParams(temperature=1.0, top_k=k) for k in (3, 0, -1)]
    probs = processed_probs(logits, params)
    top3 = logits[0].topk(3).indices
    assert set(probs[0].nonzero().flatten().tolist()) == set(top3.tolist())
    ref = torch.zeros(V).index_put_((top3,), logits[0, top3].softmax(-1))
    torch.testing.assert_close(probs[0], ref)
    torch.testing.assert_close(probs[1:], logits[1:].softmax(-1))  # 0 and -1: off


def test_tiny_top_p_keeps_only_top_token():
    logits = _logits(5)
    probs = processed_probs(logits, [SamplingParams(temperature=1.0, top_p=1e-6)] * 5)
    assert torch.equal(probs, torch.nn.functional.one_hot(logits.argmax(-1), V).float())


def test_top_p_keeps_smallest_head_reaching_p():
    logits = torch.tensor([[math.log(x) for x in (0.5, 0.3, 0.15, 0.05)]])
    for top_p, kept in [(0.49, 1), (0.6, 2), (0.79, 2), (0.81, 3), (0.94, 3), (0.96, 4), (1.0, 4)]:
        probs = processed_probs(logits, [SamplingParams(temperature=1.0, top_p=top_p)])[0]
        assert (probs > 0).sum().item() == kept, top_p
        base = torch.tensor([0.5, 0.3, 0.15, 0.05])[:kept]
        torch.testing.assert_close(probs[:kept], base / base.sum())


def test_top_k_then_top_p():
    logits = torch.tensor([[math.log(x) for x in (0.4, 0.3, 0.2, 0.1)]])
    # top-k 2 renormalises to (4/7, 3/7); top-p 0.5 then keeps only the first
    probs = processed_probs(logits, [SamplingParams(temperature=1.0, top_k=2, top_p=0.5)])[0]
    assert probs.tolist() == [1.0, 0.0, 0.0, 0.0]
    probs = processed_probs(logits, [SamplingParams(temperature=1.0, top_k=3, top_p=0.7)])[0]
    torch.testing.assert_close(probs, torch.tensor([4 / 7, 3 / 7, 0.0, 0.0]))


def test_min_p():
    p = torch.tensor([0.5, 0.3, 0.12, 0.08])
    logits = p.log().unsqueeze(0)
    probs = processed_probs(logits, [SamplingParams(temperature=1.0, min_p=0.2)])[0]  # floor 0.1
    torch.testing.assert_close(probs, torch.cat([p[:3] / p[:3].sum(), torch.zeros(1)]))
    probs = processed_probs(logits, [SamplingParams(temperature=1.0, min_p=0.7)])[0]  # floor .35
    assert probs.tolist() == [1.0, 0.0, 0.0, 0.0]


def test_temperature_matches_manual_softmax():
    logits = _logits(3)
    original = logits.clone()
    temps = [0.3, 1.0, 2.5]
    probs = processed_probs(logits, [SamplingParams(temperature=t) for t in temps])
    for r, t in enumerate(temps):
        torch.testing.assert_close(probs[r], torch.softmax(logits[r] / t, -1))
    assert torch.equal(logits, original)  # the caller's logits are not modified


def test_filters_only_touch_their_rows():
    logits = _logits(4)
    params = [SamplingParams(temperature=0.7), SamplingParams(temperature=1.0, top_k=2),
              SamplingParams(temperature=1.0, top_p=0.3), SamplingParams(temperature=0.9, min_p=0.5)]
    probs = processed_probs(logits, params)
    for r, p in enumerate(params):
        alone = processed_probs(logits[r:r + 1], [p])[0]
        torch.testing.assert_close(probs[r], alone)
    torch.testing.assert_close(probs[0], torch.softmax(logits[0] / 0.7, -1))


def test_seeded_rows_reproducible_across_batch_position_and_size():
    params = SamplingParams(temperature=1.0, seed=42)
    row = _logits(1, seed=7)[0]

    def draws(batch_size, position, steps=20):
        gen = torch.Generator().manual_seed(42)
        out = []
        for step in range(steps):
            logits = _logits(batch_size, seed=100 + step)
            logits[position] = row
            ps = [SamplingParams(temperature=1.0)] * batch_size
            ps[position] = params
            gens = [None] * batch_size
            gens[position] = gen
            out.append(sample(logits, ps, gens).token_ids[position].item())
        return out

    ref = draws(1, 0)
    assert len(set(ref)) > 1  # really random
    assert draws(4, 2) == ref
    assert draws(9, 8) == ref
    assert draws(3, 0) == ref


def test_sample_from_probs_matches_distribution():
    p = torch.tensor([0.4, 0.25, 0.2, 0.1, 0.05])
    n = 20000
    gen = torch.Generator().manual_seed(0)
    probs = p.expand(n, -1).contiguous()  # [N, 5]: one draw per row, global RNG
    torch.manual_seed(1234)
    counts = torch.bincount(sample_from_probs(probs, [None] * n), minlength=5).float()
    chi2 = ((counts - n * p) ** 2 / (n * p)).sum().item()
    assert chi2 < 18.5  # chi-square, 4 dof, p = 0.001
    assert (counts / n - p).abs().sum().item() / 2 < 0.01  # total variation
    # the seeded path, one row drawn repeatedly with its generator
    seeded = [sample_from_probs(p[None], [gen]).item() for _ in range(4000)]
    counts = torch.bincount(torch.tensor(seeded), minlength=5).float()
    assert ((counts - 4000 * p) ** 2 / (4000 * p)).sum().item() < 18.5


def test_sample_never_picks_filtered_tokens():
    logits = _logits(64)
    params = [SamplingParams(temperature=1.5, top_k=3, top_p=0.9, min_p=0.05)] * 64
    probs = processed_probs(logits, params)
    torch.manual_seed(0)
    for _ in range(10):
        ids = sample(logits, params).token_ids
        assert (probs.gather(1, ids[:, None]) > 0).all()


def test_draw_from_cdf_edges():
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0]] * 4)
    u = torch.tensor([0.0, 0.4999, 0.5, 1.0 - 2 ** -53], dtype=torch.float64)
    assert draw_from_cdf(probs, u).tolist() == [1, 1, 3, 3]  # zero-mass tokens never picked
    unnormalised = torch.tensor([[2.0, 0.0, 6.0]] * 2)  # e.g. a residual max(p - q, 0)
    assert draw_from_cdf(unnormalised, torch.tensor([0.24, 0.26], dtype=torch.float64)).tolist() == [0, 2]


def _reference_probs(row, params):
    """One row, the plain way: full sorts, probabilities, no windows."""
    if params.greedy:
        return torch.nn.functional.one_hot(row.argmax(), row.numel()).float()
    x = row.float() / params.temperature
    if 0 < params.top_k < x.numel():
        x = x.masked_fill(x < x.sort(descending=True).values[params.top_k - 1], -math.inf)
    if params.top_p < 1.0:
        vals = x.sort(descending=True).values
        mass = vals.softmax(-1).cumsum(-1)
        n = int((mass - vals.softmax(-1) < params.top_p).sum())
        x = x.masked_fill(x < vals[n - 1], -math.inf)
    if params.min_p > 0.0:
        probs = x.softmax(-1)
        x = x.masked_fill(probs < params.min_p * probs.max(), -math.inf)
    return x.softmax(-1)


@pytest.mark.parametrize("window", [16, 1024])
def test_matches_reference_with_ties_and_windows(monkeypatch, window):
    import eyas.layers.sampler as sampler_mod
    monkeypatch.setattr(sampler_mod, "_TOP_P_WINDOW", window)
    rng = torch.Generator().manual_seed(5)
    logits = (torch.randn(24, 3000, generator=rng) * 2).to(torch.bfloat16).float()  # many ties
    logits[3, :] = 0.0  # a flat row: top-p must look past any window
    logits[7, 100:] = -math.inf
    params = []
    for r in range(24):
        choice = r % 6
        params.append([
            SamplingParams(),
            SamplingParams(temperature=0.8, top_p=0.9),
            SamplingParams(temperature=1.2, top_k=40),
            SamplingParams(temperature=1.0, top_k=200, top_p=0.5, min_p=0.01),
            SamplingParams(temperature=0.5, min_p=0.1),
            SamplingParams(temperature=2.0, top_p=0.999),
        ][choice])
    probs = processed_probs(logits, params)
    for r in range(24):
        torch.testing.assert_close(probs[r], _reference_probs(logits[r], params[r]), msg=f"row {r}")
    assert (probs[3] > 0).sum() == 3000  # ties at the cut all stay


def test_logprobs_match_log_softmax():
    logits = _logits(4)
    params = [SamplingParams(temperature=0.5, logprobs=3), SamplingParams(),
              SamplingParams(logprobs=0), SamplingParams(temperature=1.0, top_k=2, logprobs=1)]
    out = Sampler()(logits, params)
    ref = logits.log_softmax(-1)
    assert out.logprobs[1] is None
    for r in (0, 2, 3):
        entry = out.logprobs[r]
        tok = out.token_ids[r].item()
        assert entry["token_id"] == tok
        assert entry["logprob"] == pytest.approx(ref[r, tok].item(), abs=1e-6)
        k = params[r].logprobs
        assert len(entry["top"]) == k
        vals, ids = ref[r].topk(k) if k else (torch.empty(0), torch.empty(0, dtype=torch.long))
        assert [i for i, _ in entry["top"]] == ids.tolist()
        assert [v for _, v in entry["top"]] == pytest.approx(vals.tolist(), abs=1e-6)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError):
        sample(_logits(2), [SamplingParams()])
    with pytest.raises(ValueError):
        processed_probs(_logits(2), [SamplingParams()] * 3)
