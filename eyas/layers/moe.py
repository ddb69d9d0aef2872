"""Mixture of experts: routing, stacked expert weights, grouped expert compute.

A token's hidden state x [H] is scored against E experts by the router; the top-k experts each
run a gated MLP (silu(x W_gate) * (x W_up)) W_down and the outputs are summed with the routing
weights. Routing per family (`RoutingConfig`):

    Mixtral       softmax over E, top-k, renormalize the k weights to sum 1
    Qwen3-MoE     softmax over E, top-k, renormalize only when norm_topk_prob
    DeepSeek-V3   sigmoid scores; choice = score + e_score_correction_bias; experts form n_group
                  groups, a group scores the sum of its top-2 choices, the topk_group best groups
                  stay eligible; top-k by choice among them; weights are the *uncorrected* scores,
                  renormalized when norm_topk_prob, times routed_scaling_factor

Experts are stacked: gate_up_proj [E_local, 2 I_local, H] (gate rows, then up rows) and
down_proj [E_local, H, I_local], loaded from per-expert checkpoint tensors with shard id
(expert, part). The compute sorts the T*k (token, expert) pairs by expert and runs one matmul
pair per expert over its contiguous rows: a Python loop over experts, never over tokens.

Parallelism seams (only tp_size = ep_size = 1 runs today):
  tensor parallel   each expert's intermediate dim is split: rank r holds gate/up rows and down
                    columns [r I/tp, (r+1) I/tp); the output is a partial sum (all-reduce after)
  expert parallel   rank r holds experts [r E/ep, (r+1) E/ep); pairs routed elsewhere are
                    skipped here and the ranks' outputs sum (all-reduce or all-to-all after)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from eyas.errors import ConfigError
from eyas.layers.linear import ShardId, default_weight_loader

SCORING_FUNCS = ("softmax", "sigmoid")


@dataclass(frozen=True)
class RoutingConfig:
    num_experts: int
    top_k: int
    scoring: str = "softmax"  # softmax | sigmoid
    renormalize: bool = True  # divide the k weights by their sum
    num_groups: int = 1  # group-limited routing (DeepSeek n_group); 1 = off
    topk_groups: int = 1  # groups kept per token (DeepSeek topk_group)
    scaling_factor: float = 1.0  # routed_scaling_factor, applied to the final weights
    correction_bias: bool = False  # e_score_correction_bias added for choosing only

    def __post_init__(self):
        if self.scoring not in SCORING_FUNCS:
            raise ConfigError(f"MoE scoring function {self.scoring!r} is not supported; "
                              f"supported: {', '.join(SCORING_FUNCS)}")
        if not 0 < self.top_k <= self.num_experts:
            raise ConfigError(f"num_experts_per_tok={self.top_k} must be in [1, "
                              f"num_experts={self.num_experts}]")
        if self.num_groups < 1 or self.num_experts % self.num_groups:
            raise ConfigError(f"n_group={self.num_groups} must divide num_experts="
                              f"{self.num_experts}")
        if self.num_groups > 1 and self.num_experts // self.num_groups < 2:
            raise ConfigError("group-limited routing scores a group by its top 2 experts: "
                              "each group needs at least 2 experts")
        if not 0 < self.topk_groups <= self.num_groups:
            raise ConfigError(f"topk_group={self.topk_groups} must be in [1, n_group="
                              f"{self.num_groups}]")
        if self.topk_groups * (self.num_experts // self.num_groups) < self.top_k:
            raise ConfigError(f"topk_group={self.topk_groups} groups hold fewer than "
                              f"num_experts_per_tok={self.top_k} experts")


def select_experts(logits: torch.Tensor, routing: RoutingConfig,
                   correction_bias: Optional[torch.Tensor] = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits [T, E] -> (weights [T, k] fp32, expert ids [T, k] int64)."""
    logits = logits.float()
    if routing.scoring == "softmax":
        scores = logits.softmax(dim=-1)  # [T, E]
    else:
        scores = logits.sigmoid()
    choice = scores if correction_bias is None else scores + correction_bias.float()  # [T, E]
    if routing.num_groups > 1:
        grouped = choice.view(choice.shape[0], routing.num_groups, -1)  # [T, G, E/G]
        group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # [T, G]
        keep = group_scores.topk(routing.topk_groups, dim=-1).indices  # [T, topk_groups]
        group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
        expert_mask = group_mask.unsqueeze(-1).expand_as(grouped).reshape_as(choice)  # [T, E]
        choice = choice.masked_fill(~expert_mask, float("-inf"))
    ids = choice.topk(routing.top_k, dim=-1).indices  # [T, k]
    weights = scores.gather(1, ids)  # [T, k]
    if routing.renormalize:
        # DeepSeek adds 1e-20 (sigmoid weights are not a distribution); softmax ones never sum to 0
        eps = 1e-20 if routing.scoring == "sigmoid" else 0.0
        weights = weights / (weights.sum(dim=-1, keepdim=True) + eps)
    if routing.scaling_factor != 1.0:
        weights = weights * routing.scaling_factor
    return weights, ids


class Router(nn.Module):
    """gate.weight [E, H] (+ e_score_correction_bias [E]) -> logits [T, E] fp32.

    Replicated on every rank. DeepSeek keeps the router in fp32 (router_dtype), as HF does.
    """

    def __init__(self, hidden_size: int, routing: RoutingConfig, dtype: torch.dtype,
                 router_dtype: Optional[torch.dtype] = None):
        super().__init__()
        self.routing = routing
        self.weight = nn.Parameter(torch.empty(routing.num_experts, hidden_size,
                                               dtype=router_dtype or dtype), requires_grad=False)
        self.weight.weight_loader = default_weight_loader
        if routing.correction_bias:
            self.e_score_correction_bias = nn.Parameter(
                torch.zeros(routing.num_experts, dtype=torch.float32), requires_grad=False)
            self.e_score_correction_bias.weight_loader = default_weight_loader
        else:
            self.register_parameter("e_score_correction_bias", None)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, H] -> (weights [T, k] fp32, expert ids [T, k])."""
        logits = F.linear(x.to(self.weight.dtype), self.weight)  # [T, E]
        return select_experts(logits, self.routing, self.e_score_correction_bias)


def _split(total: int, parts: int, what: str) -> int:
    if total % parts:
        raise ConfigError(f"{what}={total} is not divisible by {parts} ranks")
    return total // parts


class FusedExperts(nn.Module):
    """E gated-MLP experts as stacked weights; forward over routed (token, expert) pairs."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int,
                 dtype: torch.dtype = torch.float32, tp_size: int = 1, tp_rank: int = 0,
                 ep_size: int = 1, ep_rank: int = 0):
        super().__init__()
        if not (0 <= tp_rank < tp_size and 0 <= ep_rank < ep_size):
            raise ConfigError(f"bad MoE ranks: tp {tp_rank}/{tp_size}, ep {ep_rank}/{ep_size}")
        self.num_experts = num_experts
        self.tp_rank = tp_rank
        self.num_local = _split(num_experts, ep_size, "num_experts")
        self.first_expert = ep_rank * self.num_local
        self.inter = _split(intermediate_size, tp_size, "moe intermediate size")  # per rank
        self.gate_up_proj = nn.Parameter(
            torch.empty(self.num_local, 2 * self.inter, hidden_size, dtype=dtype), requires_grad=False)
        self.down_proj = nn.Parameter(
            torch.empty(self.num_local, hidden_size, self.inter, dtype=dtype), requires_grad=False)
        local = range(self.first_expert, self.first_expert + self.num_local)
        for param, parts in ((self.gate_up_proj, (0, 1)), (self.down_proj, (0,))):
            param.weight_loader = self.weight_loader
            param.expert_shards = tuple((e, p) for e in local for p in parts)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor,
                      shard_id: ShardId = None) -> None:
        """One expert's checkpoint tensor: gate/up [I, H] (part 0/1) or down [H, I] (part 0)."""
        if not (isinstance(shard_id, tuple) and len(shard_id) == 2):
            raise ConfigError(f"expert weights need shard id (expert, part), got {shard_id!r}")
        expert, part = shard_id
        if not 0 <= expert < self.num_experts:
            raise ConfigError(f"expert {expert} out of range [0, {self.num_experts})")
        local = expert - self.first_expert
        if not 0 <= local < self.num_local:
            return  # another expert-parallel rank holds it
        size = self.inter
        if param is self.gate_up_proj:
            dst = param.data[local].narrow(0, part * size, size)  # [I_local, H]
            src = loaded_weight.narrow(0, self.tp_rank * size, size)
        else:
            dst = param.data[local]  # [H, I_local]
            src = loaded_weight.narrow(1, self.tp_rank * size, size)
        if dst.shape != src.shape:
            raise ConfigError(f"expert {expert} shard {tuple(src.shape)} does not fit "
                              f"{tuple(dst.shape)}")
        dst.copy_(src)

    # Per-expert group sizes are data-dependent: compiled graphs run this part eagerly.
    @torch.compiler.disable
    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """x [T, H], routing weights [T, k], expert ids [T, k] -> [T, H] (this rank's share)."""
        num_tokens, top_k = ids.shape
        local_ids = ids.reshape(-1) - self.first_expert  # [T*k]
        off_rank = (local_ids < 0) | (local_ids >= self.num_local)
        local_ids = local_ids.masked_fill(off_rank, self.num_local)  # sentinel sorts last
        order = local_ids.argsort(stable=True)  # [T*k] pairs grouped by expert
        counts = torch.bincount(local_ids, minlength=self.num_local + 1)[:self.num_local].tolist()
        num_pairs = sum(counts)
        order = order[:num_pairs]  # pairs of this rank's experts
        token_of = order // top_k  # [P] token row of each sorted pair
        rows = x.index_select(0, token_of)  # [P, H]
        outs, start = [], 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            seg = rows[start:start + n]  # [n, H]
            gate, up = F.linear(seg, self.gate_up_proj[e]).chunk(2, dim=-1)  # [n, I] each
            outs.append(F.linear(F.silu(gate) * up, self.down_proj[e]))  # [n, H]
            start += n
        out = torch.zeros_like(x)  # [T, H]
        if outs:
            pair_weights = weights.reshape(-1)[order].unsqueeze(-1)  # [P, 1] fp32
            out.index_add_(0, token_of, (torch.cat(outs) * pair_weights).to(x.dtype))
        return out


class SparseMoE(nn.Module):
    """Router + routed experts (+ shared experts that see every token, DeepSeek)."""

    def __init__(self, hidden_size: int, intermediate_size: int, routing: RoutingConfig,
                 dtype: torch.dtype, shared_experts: Optional[nn.Module] = None,
                 router_dtype: Optional[torch.dtype] = None):
        super().__init__()
        self.gate = Router(hidden_size, routing, dtype, router_dtype)
        self.experts = FusedExperts(routing.num_experts, hidden_size, intermediate_size, dtype)
        self.shared_experts = shared_experts  # [T, H] -> [T, H] on every token, or None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, H] -> [T, H]
        weights, ids = self.gate(x)  # [T, k] each
        out = self.experts(x, weights, ids)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out
