"""Accepting draft tokens: greedy matching and lossless rejection sampling, for chains and (at the
end of this file) trees.

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


# ---------------------------------------------------------------------------------- trees
# Tree verification (topk > 1). At a tree node u the target's distribution is p (processed
# target probs at u) and the node's children c_1..c_m were drawn from the drafter's q_u in that
# order WITHOUT replacement: c_1 ~ q_1 = q_u, c_{i+1} ~ q_{i+1} = q_i with c_i removed,
# renormalised. Recursive rejection sampling (SpecTr, Sun et al. 2023; Recursive Speculative
# Decoding, Jeon et al. 2024):
#     p_1 = p
#     for i = 1..m:  accept c_i with prob min(1, p_i(c_i) / q_i(c_i)); if accepted, descend
#                    into c_i (the same procedure with c_i's own p and children)
#                    else p_{i+1} = max(p_i - q_i, 0) / sum(max(p_i - q_i, 0))
#     none accepted: emit x ~ p_{m+1} and stop (at a leaf, m = 0: the bonus x ~ p)
# Lossless: claim "stage i emits x with probability p_i(x)", whatever happened before (the
# rejected c_1..c_{i-1} and the other draws of the tree). It holds at the last stage (a draw
# from p_{m+1}). At stage i, c_i ~ q_i afresh, so
#     P(emit x) = q_i(x) min(1, p_i(x)/q_i(x)) + P(reject) p_{i+1}(x)
#               = min(p_i, q_i)(x) + (1 - sum min(p_i, q_i)) p_{i+1}(x)
#               = min(p_i, q_i)(x) + max(p_i - q_i, 0)(x) = p_i(x),
# using sum max(p_i - q_i, 0) = 1 - sum min(p_i, q_i) and, by induction, stage i+1 emits
# p_{i+1} for every value of the rejected c_i. Removing c_i from q_{i+1} is what makes c_{i+1}'s
# law right; it costs nothing because p_{i+1}(c_i) = 0 (c_i is only rejected where p_i < q_i).
# Whether a child c_i exists at all may depend on anything drawn before it but not on c_i
# itself: spec/tree.py ranks sampled candidates by a key that does not look at the candidate.
# Descending into an accepted c_i continues with the target's distribution after c_i, so the
# emitted sequence is distributed as plain sampling from the target.
# Greedy requests: descend into the child equal to argmax p; emit argmax p where none is.


def _residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """p_{i+1} = max(p_i - q_i, 0), normalised: [V], [V] -> [V]."""
    r = (p - q).clamp_min(0.0)
    total = r.sum()
    if total <= 0:  # p == q numerically: the rejection had probability 0; p is exact
        return p
    return r / total


def _without(q: torch.Tensor, token: int) -> torch.Tensor:
    """q_{i+1} = q_i with `token` removed, renormalised (sampling without replacement)."""
    q = q.clone()
    q[token] = 0.0
    total = q.sum()
    return q / total if total > 0 else q


def accept_tree(target_logits: torch.Tensor, draft, params: SamplingParams,
                generator: Optional[torch.Generator]) -> tuple[list[int], list[int]]:
    """target_logits [n+1, V] at the tree positions (0 = root) of a `TreeDraft` with n nodes.

    Returns (path, tokens): the accepted node indices from the root down (a of them) and the
    a + 1 tokens to append (the path's tokens, then the correction or bonus token).
    """
    children = draft.children()
    path: list[int] = []
    if params.greedy:
        best = target_logits.argmax(dim=-1).tolist()  # [n+1]
        pos = 0
        while True:
            nxt = next((c for c in children[pos] if draft.tokens[c] == best[pos]), None)
            if nxt is None:
                return path, [draft.tokens[i] for i in path] + [best[pos]]
            path.append(nxt)
            pos = nxt + 1
    if draft.q is None and len(draft.tokens):
        raise ValueError("sampled tree verification needs the drafter's probabilities q")
    vocab = target_logits.shape[1]
    p_all = processed_probs(target_logits, [params] * target_logits.shape[0])  # [n+1, V]
    pos = 0
    while True:
        p = p_all[pos]
        accepted = None
        if children[pos]:
            q = draft.target_q(pos, vocab)  # [V]
            for c in children[pos]:
                t = draft.tokens[c]
                pt, qt = p[t].item(), q[t].item()
                if qt > 0 and _uniform(generator) < min(1.0, pt / qt):
                    accepted = c
                    break
                p = _residual(p, q)
                q = _without(q, t)
        if accepted is None:
            token = int(sample_from_probs(p[None], [generator])[0])
            return path, [draft.tokens[i] for i in path] + [token]
        path.append(accepted)
        pos = accepted + 1
