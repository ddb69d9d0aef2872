"""Accepting draft tokens: greedy matching and lossless rejection sampling (chains).

Notation for one sequence with K draft tokens d_1..d_K:
  p_j = the target's distribution for the token after d_{j-1} (p_1 follows the last real
        token); it is `processed_probs` of the target logits, i.e. exactly what plain sampling
        would draw from (temperature, top-k, top-p, min-p applied).
  q_j = the drafter's distribution that d_j was sampled from.

Rejection sampling (Leviathan et al. 2023; Chen et al. 2023): for j = 1..K, accept d_j with
probability min(1, p_j(d_j) / q_j(d_j)). At the first rejection, emit a token drawn from the
residual r_j(x) = max(p_j(x) - q_j(x), 0) / sum_y max(p_j(y) - q_j(y), 0) and stop. If all K are
accepted, emit a bonus token drawn from p_{K+1}. The emitted tokens are distributed exactly as
K+1 (or fewer) steps of plain sampling from the target: P(d_j accepted and = x) = min(q, p)(x),
and P(rejected, then x) = (1 - sum min(p, q)) * r_j(x) = max(p - q, 0)(x); they add up to p_j(x).

Greedy requests are the temperature -> 0 limit: d_j = argmax of the drafter, accepted iff it
equals argmax p_j, and the emitted correction/bonus is argmax p_j.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from eyas.core import SamplingParams
from eyas.layers.sampler import processed_probs, sample_from_probs


def _uniform(generator: Optional[torch.Generator]) -> float:
    return torch.rand((), generator=generator).item()


def accept_greedy(target_logits: torch.Tensor, draft: list[int]) -> list[int]:
    """target_logits [K+1, V] -> the accepted prefix of draft plus the target's next token."""
    best = target_logits.argmax(dim=-1).tolist()  # [K+1]
    out = []
    for j, d in enumerate(draft):
        if d != best[j]:
            out.append(best[j])
            return out
        out.append(d)
    out.append(best[len(draft)])
    return out


def accept_sampled(target_logits: torch.Tensor, draft: list[int], q: torch.Tensor,
                   params: SamplingParams, generator: Optional[torch.Generator]) -> list[int]:
    """Rejection sampling. target_logits [K+1, V], q [K, V] (drafter probs over target ids)."""
    k = len(draft)
    p = processed_probs(target_logits, [params] * (k + 1))  # [K+1, V]
    for j, d in enumerate(draft):
        pj, qj = p[j, d].item(), q[j, d].item()
        if qj > 0 and _uniform(generator) < min(1.0, pj / qj):
            continue
        residual = (p[j] - q[j]).clamp_min(0.0)  # [V]
        if residual.sum() <= 0:  # p == q numerically: any draw from p is exact
            residual = p[j]
        token = int(sample_from_probs(residual[None], [generator])[0])
        return list(draft[:j]) + [token]
    bonus = int(sample_from_probs(p[k:k + 1], [generator])[0])
    return list(draft) + [bonus]


def accept_chain(target_logits: torch.Tensor, draft: list[int], q: Optional[torch.Tensor],
                 params: SamplingParams, generator: Optional[torch.Generator]) -> list[int]:
    """Dispatch on the request's sampling mode. Returns 1..K+1 tokens to append."""
    if params.greedy:
        return accept_greedy(target_logits, draft)
    if draft and q is None:
        raise ValueError("sampled verification needs the drafter's probabilities q")
    return accept_sampled(target_logits, draft, q, params, generator)


def draft_probs(draft_logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """The drafter's sampling distribution q over its own vocab: [S, Vd] -> [S, Vd]."""
    return processed_probs(draft_logits, list(params))
