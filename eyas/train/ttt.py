"""Training-time test (TTT): the EAGLE-3 drafter unrolled over whole sequences, dense.

Notation for one sequence of n tokens x_0..x_{n-1}: f_s = fc(aux_s) (target features of
position s), e_t = embed(x_t) (the target's embedding, frozen).

There is one draft *chain* per position s: what the engine drafts right after an extend that
ended at position s (spec/proposer.py, with s = L-2 for a sequence of length L):

    step 0: position s,     hidden f_s,         embed e_{s+1}    -> o_0[s], predicts x_{s+2}
    step i: position s + i, hidden o_{i-1}[s],  embed e_{s+1+i}  -> o_i[s], predicts x_{s+2+i}

At inference the embed of step i is the previous draft token; training feeds the true token
(teacher forcing), so all chains of a step run at once as one [B, n] batch.

Keys. Step 0 writes K/V for every position from target features (the extend). Step i of chain s
writes one key at position s + i. At inference the query of chain s at step i sees

    step-0 keys of positions 0..s      (the drafter's KV computed from target features)
    step-j keys of chain s, j = 1..i   (its own earlier draft steps, positions s+1..s+i)

Laid out as keys [step, index], query (i, s) may see key (0, t) iff t <= s, and key (j, t) with
1 <= j <= i iff t == s: the causal block plus one diagonal per earlier step (its own included).
Worked example, n = 4, step 2 (x: visible; kj[s]: the diagonal key of step j at index s):

              step-0 keys t=0..3   step-1   step-2
    s = 0:    x  .  .  .           k1[0]    k2[0]     query at position 2
    s = 1:    x  x  .  .           k1[1]    k2[1]     query at position 3
    s = 2:    x  x  x  .           k1[2]    k2[2]     query at position 4
    s = 3:    x  x  x  x           k1[3]    k2[3]     query at position 5

Read by query position p = s + i: the query at p sees target-feature keys of positions <= p - i,
then its own chain's keys at positions p-i+1..p. This equals the paged drafter exactly (tested
against Eagle3Drafter.forward through the KV cache). The EAGLE-3 reference trainer and SpecForge
hide i more step-0 keys (t <= s - i) while keeping the hidden state of chain s; we keep the
mask that matches what the engine computes.

`explicit_ttt_mask` builds the full [n, (i+1) n] mask for illustration and tests; the forward
uses the equivalent compact form (scores against step-0 keys, plus i diagonal scores).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from eyas.layers.rotary import apply_rotary


def explicit_ttt_mask(n: int, step: int) -> torch.Tensor:
    """[n, (step + 1) * n] bool: which keys (step-major, then index) query (step, s) may see."""
    mask = torch.zeros(n, (step + 1) * n, dtype=torch.bool)
    mask[:, :n] = torch.ones(n, n, dtype=torch.bool).tril()
    for j in range(1, step + 1):
        mask[:, j * n:(j + 1) * n] = torch.eye(n, dtype=torch.bool)
    return mask


def shift_left(x: torch.Tensor, k: int) -> torch.Tensor:
    """x [B, n, ...] -> y with y[:, s] = x[:, s + k], zero (False) past the end."""
    if k == 0:
        return x
    pad = x.new_zeros((x.shape[0], min(k, x.shape[1]), *x.shape[2:]))
    return torch.cat([x[:, k:], pad], dim=1)


def _ttt_attention(q: torch.Tensor, k0: torch.Tensor, v0: torch.Tensor,
                   diag_k: list[torch.Tensor], diag_v: list[torch.Tensor],
                   scale: float, chain_start: int = 0) -> torch.Tensor:
    """q [B, m, Hq, D] for chains s = chain_start .. n-1 (m = n - chain_start); step-0 k0/v0
    [B, n, Hkv, D] for every position; diag_k/diag_v: one [B, m, Hkv, D] per step 1..i (this
    step's own last). Returns [B, m, Hq, D]."""
    bsz, m, num_heads, dim = q.shape
    n, num_kv = k0.shape[1], k0.shape[2]
    rep = num_heads // num_kv
    qh = q.view(bsz, m, num_kv, rep, dim).permute(0, 2, 3, 1, 4)  # [B, Hkv, rep, m, D]
    kh = k0.permute(0, 2, 1, 3).unsqueeze(2)  # [B, Hkv, 1, n, D]
    vh = v0.permute(0, 2, 1, 3).unsqueeze(2)
    scores = torch.matmul(qh, kh.transpose(-1, -2)) * scale  # [B, Hkv, rep, m, n]
    chains = torch.arange(chain_start, n, device=q.device)
    causal = torch.arange(n, device=q.device)[None, :] <= chains[:, None]  # [m, n]: t <= s
    scores = scores.masked_fill(~causal, float("-inf"))
    if diag_k:
        dk = torch.stack(diag_k, dim=-2).permute(0, 2, 1, 3, 4).unsqueeze(2)  # [B,Hkv,1,m,i,D]
        dv = torch.stack(diag_v, dim=-2).permute(0, 2, 1, 3, 4).unsqueeze(2)
        diag = (qh.unsqueeze(-2) * dk).sum(-1) * scale  # [B, Hkv, rep, m, i]
        probs = torch.cat([scores, diag], dim=-1).float().softmax(dim=-1).to(q.dtype)
        out = torch.matmul(probs[..., :n], vh)  # [B, Hkv, rep, m, D]
        out = out + (probs[..., n:].unsqueeze(-1) * dv).sum(-2)
    else:
        out = torch.matmul(scores.float().softmax(dim=-1).to(q.dtype), vh)
    return out.permute(0, 3, 1, 2, 4).reshape(bsz, m, num_heads, dim)


def ttt_forward(drafter, next_embeds: torch.Tensor, aux: torch.Tensor,
                num_steps: int, chain_start: int = 0) -> list[torch.Tensor]:
    """Unroll the drafter num_steps times over whole sequences.

    next_embeds [B, n, H]: embed(x_{s+1}) at index s (what step 0 reads; step i reads it shifted
    left by i). aux [B, n, 3 Ht]: concatenated target aux hidden states.
    chain_start c: only chains s >= c are followed (e.g. c = p - 1 - num_steps for prompts of
    at least p tokens: earlier chains predict no response token at any step); every position
    still gives its step-0 key and value.
    Returns per step the pre-norm output o_i [B, n - c, H] of chain s at row s - c (position
    s + i). Uses the drafter's own parameters (fc, midlayer, rotary); no KV cache, no paging.
    """
    mid = drafter.midlayer
    attn = mid.self_attn
    bsz, n, _ = next_embeds.shape
    heads, dim = attn.num_heads, attn.head_dim
    c = chain_start
    k0 = v0 = None
    diag_k: list[torch.Tensor] = []
    diag_v: list[torch.Tensor] = []
    outs = []
    hidden = drafter.fc(aux)  # [B, n, H]; step 0 needs every position for its keys
    embeds = next_embeds
    for i in range(num_steps):
        rows = hidden.shape[1]  # n at step 0, n - c after
        pos = torch.arange(n - rows, n, device=next_embeds.device) + i  # position s + i
        normed = mid.hidden_norm(hidden)
        residual = normed if mid.norm_before_residual else hidden
        x = torch.cat([mid.input_layernorm(embeds), normed], dim=-1)  # [B, rows, 2H]
        qkv = attn.qkv_proj(x)  # [B, rows, (Hq + 2 Hkv) D]
        cos, sin = drafter.rotary_emb(pos)  # [rows, 1, D]
        qk = apply_rotary(qkv[..., :attn.qk_size].reshape(bsz, rows, -1, dim), cos, sin)
        q, k = qk[:, :, :heads], qk[:, :, heads:]  # [B, rows, Hq, D], [B, rows, Hkv, D]
        v = qkv[..., attn.qk_size:].reshape(bsz, rows, -1, dim)
        if i == 0:
            k0, v0 = k, v
            q, residual = q[:, c:], residual[:, c:]  # queries only for followed chains
        else:
            diag_k.append(k)
            diag_v.append(v)
        o = _ttt_attention(q, k0, v0, diag_k, diag_v, attn.scale, c)  # [B, n - c, Hq, D]
        h = residual + attn.o_proj(o.reshape(bsz, n - c, heads * dim))
        out = h + mid.mlp(mid.post_attention_layernorm(h))
        outs.append(out)
        hidden = out
        embeds = shift_left(next_embeds, i + 1)[:, c:]  # e_{s+2+i} for the next step
    return outs


def target_to_draft_index(drafter) -> torch.Tensor:
    """[V] int64: draft id of each target id, -1 where the target id is not drafted."""
    vd = drafter.draft_vocab_size
    draft_ids = torch.arange(vd, device=drafter.d2t.device)
    index = torch.full((drafter.vocab_size,), -1, dtype=torch.long, device=drafter.d2t.device)
    index[drafter.map_to_target(draft_ids)] = draft_ids
    return index


@dataclass
class TTTLoss:
    loss: torch.Tensor  # scalar: sum_i w^i loss_i / sum_i w^i (what is optimised)
    step_loss: list[float]  # per step: mean soft CE over its rows (0 when none)
    step_rows: list[int]  # per step: rows counted in the loss (response, top-1 in draft vocab)
    step_correct: list[int]  # per step: draft argmax == target argmax, over all response rows
    step_total: list[int]  # per step: response rows (accuracy denominator)


def ttt_loss(drafter, outs: list[torch.Tensor], topk_ids: torch.Tensor,
             topk_logprobs: torch.Tensor, response_mask: torch.Tensor,
             t2d_index: torch.Tensor, step_weight: float = 0.8,
             with_grad: bool = True, chain_start: int = 0) -> TTTLoss:
    """Soft cross-entropy of each unroll step against the target, restricted to the draft vocab.

    topk_ids/topk_logprobs [B, n, k]: the target's top-k next-token distribution at index t
    (about x_{t+1}), sorted (column 0 = argmax); response_mask [B, n] bool: x_t is a response
    token. Step i at index s predicts x_{s+2+i}, so it reads the target at s+1+i and counts when
    x_{s+2+i} is a response token. The target's top-k, restricted to draft-vocab ids, is
    renormalised; rows whose target argmax is outside the draft vocab are left out of the loss
    (they still count, as misses, in the accuracy). outs cover chains chain_start .. n-1.
    """
    c = chain_start
    weights, terms = [], []
    step_loss, step_rows, step_correct, step_total = [], [], [], []
    for i, out in enumerate(outs):
        valid = shift_left(response_mask, 2 + i)[:, c:]  # [B, n - c]
        ids = shift_left(topk_ids, 1 + i)[:, c:][valid]  # [N, k]
        logprobs = shift_left(topk_logprobs, 1 + i)[:, c:][valid].float()  # [N, k]
        logits = drafter.compute_logits(out[valid])  # [N, Vd] fp32
        draft = t2d_index[ids]  # [N, k]
        in_vocab = draft >= 0
        keep = in_vocab[:, 0]
        with torch.no_grad():
            pred = drafter.map_to_target(logits.argmax(dim=-1))
            step_correct.append(int((pred == ids[:, 0]).sum()))
            step_total.append(int(ids.shape[0]))
        rows = int(keep.sum())
        step_rows.append(rows)
        w = step_weight ** i
        weights.append(w)
        if rows == 0:
            step_loss.append(0.0)
            continue
        p = logprobs[keep].exp() * in_vocab[keep]  # [R, k]
        p = p / p.sum(dim=-1, keepdim=True)
        logp = logits[keep].log_softmax(dim=-1).gather(1, draft[keep].clamp(min=0))  # [R, k]
        ce = -(p * logp).sum(dim=-1).mean()
        step_loss.append(float(ce.detach()))
        terms.append(w * ce)
    total = sum(terms) / sum(weights) if terms else outs[0].sum() * 0.0
    if not with_grad:
        total = total.detach()
    return TTTLoss(total, step_loss, step_rows, step_correct, step_total)


def estimate_accept_length(step_acc: list[float], chain: int = 5) -> float:
    """Greedy chain of `chain` drafts: E[tokens per target step] ~ sum_{k=0}^{chain}
    prod_{i<k} acc_i (k = 0 is the bonus token). Steps past the measured ones reuse the last
    accuracy. An estimate: teacher-forced accuracies stand in for conditional acceptance."""
    if not step_acc:
        return 1.0
    accs = [step_acc[min(i, len(step_acc) - 1)] for i in range(chain)]
    total, prod = 1.0, 1.0
    for a in accs:
        prod *= a
        total += prod
    return total
