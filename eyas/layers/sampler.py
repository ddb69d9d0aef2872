"""Next-token sampling: temperature, top-k, top-p, min-p, seeded draws and logprobs.

`processed_probs` is *the* distribution a request samples from; speculative rejection sampling
reuses it, so `sample` must draw from exactly what it returns.

    logits [S, V] --/T--> top-k --> top-p --> min-p --softmax--> probs [S, V]
    greedy rows (T == 0): one-hot at argmax(logits), no RNG consumed.

Seeded rows draw from their own `torch.Generator`, so a seeded request's tokens do not depend
on which other requests share its batch or where it sits in it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from eyas.core import SamplingParams

_TOP_P_WINDOW = 1024  # logits sorted for a top-p-only row before falling back to a full sort


@dataclass
class SampleOutput:
    token_ids: torch.Tensor  # [S] int64
    # per row: None, or {"token_id", "logprob", "top": [[id, logprob], ...]}; None if no row asked
    logprobs: Optional[list[Optional[dict]]] = None


def _column(values: list[float], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=like.device).unsqueeze(1)  # [S, 1]


def _keep_count(sorted_x: torch.Tensor, k: torch.Tensor, p: Optional[torch.Tensor],
                lse: Optional[torch.Tensor]) -> torch.Tensor:
    """How many of the largest logits top-k then top-p keep. sorted_x [R, W] descending.

    k [R]: top-k, or a value >= the vocab size when off (then W must cover all of the row's
    top-p head). p [R]: top-p (1: off). lse [R]: the log-sum-exp of each full row, the
    softmax denominator of rows without top-k; rows with top-k renormalise over their top k.
    """
    width = sorted_x.shape[1]
    keep = k.clamp(max=width)  # [R]
    if p is None:
        return keep
    rank = torch.arange(width, device=sorted_x.device)  # [W]
    head = sorted_x.masked_fill(rank >= keep[:, None], -math.inf)  # [R, W]: the top-k set
    denom = head.logsumexp(dim=-1)  # [R]
    if lse is not None:
        denom = torch.where(k <= width, denom, lse)
    probs = (head - denom[:, None]).exp()  # [R, W]
    # Keep the smallest head whose mass reaches p: a token stays while the mass *before* it is
    # below p. The top token has 0 before it, so at least one token stays.
    mass_before = probs.cumsum(dim=-1) - probs  # [R, W]
    return torch.minimum(keep, (mass_before < p[:, None]).sum(dim=-1))


def _apply_top_k_top_p(x: torch.Tensor, ks: list[int], ps: list[float]) -> torch.Tensor:
    """Mask (to -inf) the logits that top-k and then top-p drop. x [S, V].

    The cut is a value: every logit equal to the last one kept stays too, so ties never make
    the kept set depend on sort order. Only a window of the W largest logits is sorted; a row
    with top-p alone whose window holds less than p of the mass falls back to a full sort.
    """
    num_vocab = x.shape[1]
    k = torch.tensor(ks, device=x.device)  # [S]; num_vocab = off
    p = torch.tensor(ps, dtype=torch.float32, device=x.device) if any(v < 1.0 for v in ps) else None
    p_only = [kk >= num_vocab and pp < 1.0 for kk, pp in zip(ks, ps)]
    width = max([kk for kk in ks if kk < num_vocab] + [_TOP_P_WINDOW if any(p_only) else 1])
    width = min(width, num_vocab)
    window = x.topk(width, dim=-1).values  # [S, W] descending
    lse = x.logsumexp(dim=-1) if any(p_only) else None  # [S]
    keep = _keep_count(window, k, p, lse)  # [S]
    cut = window.gather(1, (keep - 1).clamp(min=0)[:, None])  # [S, 1]
    if any(p_only) and width < num_vocab:  # rows whose top-p reaches past the window
        short = (keep >= width) & torch.tensor(p_only, device=x.device)  # [S]
        rows = short.nonzero().flatten()
        if rows.numel() > 0:
            full = x.index_select(0, rows).sort(dim=-1, descending=True).values  # [R, V]
            keep_full = _keep_count(full, k[rows], p[rows], lse[rows])
            cut[rows] = full.gather(1, (keep_full - 1)[:, None])
    unfiltered = torch.tensor([kk >= num_vocab and pp >= 1.0 for kk, pp in zip(ks, ps)], device=x.device)
    cut = cut.masked_fill(unfiltered[:, None], -math.inf)
    return x.masked_fill(x < cut, -math.inf)


def processed_probs(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """logits [S, V] -> probs [S, V] float32: the exact distribution each row samples from."""
    if logits.dim() != 2 or logits.shape[0] != len(params):
        raise ValueError(f"logits {tuple(logits.shape)} do not match {len(params)} sampling params")
    logits = logits.float()
    greedy = [p.greedy for p in params]
    num_vocab = logits.shape[1]
    if all(greedy):
        return _one_hot_argmax(logits)

    temps = _column([1.0 if g else p.temperature for g, p in zip(greedy, params)], logits)
    x = logits / temps  # [S, V]; a new tensor: the caller's logits stay untouched

    # Greedy rows are overwritten below; give them neutral filter values.
    ks = [p.top_k if (not g and 0 < p.top_k < num_vocab) else num_vocab for g, p in zip(greedy, params)]
    ps = [1.0 if g else p.top_p for g, p in zip(greedy, params)]
    use_k, use_p = any(k < num_vocab for k in ks), any(p < 1.0 for p in ps)
    if use_k or use_p:
        x = _apply_top_k_top_p(x, ks, ps)

    min_ps = [0.0 if g else p.min_p for g, p in zip(greedy, params)]
    if any(m > 0.0 for m in min_ps):
        # p_i < min_p * p_max  <=>  x_i < x_max + log(min_p); log(0) = -inf keeps everything.
        floor = x.amax(dim=-1, keepdim=True) + _column(min_ps, x).log()  # [S, 1]
        x = x.masked_fill(x < floor, -math.inf)

    probs = x.softmax(dim=-1)  # [S, V]
    if any(greedy):
        is_greedy = torch.tensor(greedy, device=logits.device).unsqueeze(1)  # [S, 1]
        probs = torch.where(is_greedy, _one_hot_argmax(logits), probs)
    return probs


def _one_hot_argmax(logits: torch.Tensor) -> torch.Tensor:
    probs = torch.zeros_like(logits, dtype=torch.float32)  # [S, V]
    return probs.scatter_(1, logits.argmax(dim=-1, keepdim=True), 1.0)


def sample_from_probs(probs: torch.Tensor,
                      generators: Sequence[Optional[torch.Generator]]) -> torch.Tensor:
    """Draw one token per row of probs [S, V] (need not sum to 1) -> [S] int64.

    Inverse CDF: one uniform u per row picks the first token whose cumulative mass exceeds
    u * total. Row r takes u from generators[r] when given (so its draw depends on nothing
    else in the batch), else from the global RNG. One number per row keeps seeded draws cheap
    even when the generator lives on the CPU and probs on an accelerator.
    """
    if probs.dim() != 2 or probs.shape[0] != len(generators):
        raise ValueError(f"probs {tuple(probs.shape)} do not match {len(generators)} generators")
    u = torch.rand(len(generators), dtype=torch.float64, device=probs.device)  # [S]
    seeded = [r for r, g in enumerate(generators) if g is not None]
    if seeded:
        draws = [torch.rand(1, dtype=torch.float64, generator=generators[r],
                            device=generators[r].device).item() for r in seeded]
        u[torch.tensor(seeded, device=probs.device)] = torch.tensor(draws, dtype=torch.float64,
                                                                    device=probs.device)
    return draw_from_cdf(probs, u)


def draw_from_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """probs [S, V] >= 0, u [S] in [0, 1) -> [S] int64: the token whose CDF interval holds u.

    float64 cumsum: with float32, rounding over a 150k vocab would bias tiny probabilities.
    """
    cdf = probs.double().cumsum(dim=-1)  # [S, V]
    total = cdf[:, -1:]  # [S, 1]
    # strictly below the total, so the pick is never past the last token with mass
    target = torch.minimum(u[:, None].double() * total, torch.nextafter(total, torch.zeros_like(total)))
    # first i with cdf[i] > target: a zero-mass token has cdf[i] == cdf[i-1], so it never wins
    picked = torch.searchsorted(cdf, target, right=True).squeeze(1)  # [S]
    return picked.clamp_(max=probs.shape[1] - 1)  # only an all-zero row would overflow


def compute_logprobs(logits: torch.Tensor, token_ids: torch.Tensor,
                     params: Sequence[SamplingParams]) -> Optional[list[Optional[dict]]]:
    """Logprobs of the raw logits [S, V] (before temperature/filters) for rows that ask."""
    rows = [r for r, p in enumerate(params) if p.logprobs is not None]
    if not rows:
        return None
    index = torch.tensor(rows, device=logits.device)
    logp = logits.index_select(0, index).float().log_softmax(dim=-1)  # [R, V]
    chosen = token_ids.index_select(0, index)  # [R]
    chosen_logp = logp.gather(1, chosen.unsqueeze(1)).squeeze(1).tolist()  # [R]
    max_k = min(max(params[r].logprobs for r in rows), logp.shape[1])
    top_vals, top_ids = [[]] * len(rows), [[]] * len(rows)
    if max_k > 0:
        vals, ids = logp.topk(max_k, dim=-1)  # [R, k]
        top_vals, top_ids = vals.tolist(), ids.tolist()
    out: list[Optional[dict]] = [None] * len(params)
    for j, (r, tok) in enumerate(zip(rows, chosen.tolist())):
        k = params[r].logprobs
        out[r] = {"token_id": tok, "logprob": chosen_logp[j],
                  "top": [[i, v] for i, v in zip(top_ids[j][:k], top_vals[j][:k])]}
    return out


def sample(logits: torch.Tensor, params: Sequence[SamplingParams],
           generators: Optional[Sequence[Optional[torch.Generator]]] = None) -> SampleOutput:
    """Pick the next token of each row of logits [S, V]; greedy rows take argmax."""
    if generators is None:
        generators = [None] * len(params)
    if logits.dim() != 2 or not logits.shape[0] == len(params) == len(generators):
        raise ValueError(f"logits {tuple(logits.shape)}, {len(params)} params and "
                         f"{len(generators)} generators disagree")
    greedy = [p.greedy for p in params]
    argmax = logits.argmax(dim=-1)  # [S]
    if all(greedy):  # fast path: no probabilities, no RNG
        token_ids = argmax
    else:
        probs = processed_probs(logits, params)
        # Greedy rows keep their generator untouched; their one-hot row needs no randomness.
        gens = [None if g else gen for g, gen in zip(greedy, generators)]
        drawn = sample_from_probs(probs, gens)  # [S]
        if any(greedy):
            is_greedy = torch.tensor(greedy, device=logits.device)
            drawn = torch.where(is_greedy, argmax, drawn)
        token_ids = drawn
    return SampleOutput(token_ids=token_ids, logprobs=compute_logprobs(logits, token_ids, params))


class Sampler:
    """Callable wrapper around `sample`, for code that holds a sampler object."""

    def __call__(self, logits: torch.Tensor, params: Sequence[SamplingParams],
                 generators: Optional[Sequence[Optional[torch.Generator]]] = None) -> SampleOutput:
        return sample(logits, params, generators)
