"""Starting a drafter from another drafter (`eyas train-drafter --init-drafter`).

The new drafter may be wider or draft another vocabulary than the one it starts from; the
start stays as close to the old drafter's function as the shapes allow:

  same shape          copied.
  MLP, wider          the old I units go to units [0, I); the new units keep their random
                      gate/up rows and get zero down_proj columns, so they add nothing until
                      training moves them (down_proj's gradient there is act(x) * grad, not 0).
  lm_head, new vocab  the row of every target token drafted by both is copied; a row of a
                      token new to the vocabulary is its fresh initialisation (the target's head
                      row with --lm-head-init target) through the linear map that best turns
                      the shared tokens' fresh rows into their trained ones.

A narrower MLP or any other shape change (hidden size, heads) is refused.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from eyas.errors import InvalidRequestError

_MLP = ("midlayer.mlp.gate_up_proj.weight", "midlayer.mlp.gate_up_proj.bias",
        "midlayer.mlp.down_proj.weight")


@dataclass(frozen=True)
class CarryOver:
    new_mlp_units: int  # units added to the MLP (0: same width)
    vocab_rows_kept: int  # lm_head rows copied from the old drafter
    vocab_rows_new: int  # lm_head rows of tokens the old drafter did not draft


@torch.no_grad()
def carry_over(dst, src) -> CarryOver:
    """Copy src's weights into dst (both Eagle3Drafter; dst freshly initialised)."""
    own = dict(dst.named_parameters())
    old_inter, new_inter = src.arch.intermediate_size, dst.arch.intermediate_size
    if new_inter < old_inter:
        raise InvalidRequestError("intermediate_size", f"{new_inter} is narrower than the "
                                  f"--init-drafter's MLP ({old_inter}); a drafter can only widen")
    rows_kept, rows_new = dst.draft_vocab_size, 0  # same vocabulary: every row carries over
    for name, p in src.named_parameters():
        q = own.get(name)
        if q is None:
            raise InvalidRequestError("init_drafter", f"its weight {name} has no place in this "
                                      "run's drafter")
        if name == "lm_head.weight" and not torch.equal(dst.t2d, src.t2d):
            rows_kept, rows_new = _copy_vocab_rows(dst, src, q, p)
        elif name in _MLP and new_inter != old_inter:
            _copy_widened(name, q, p, old_inter, new_inter)
        elif q.shape != p.shape:
            raise InvalidRequestError(
                "init_drafter", f"its {name} {tuple(p.shape)} does not fit this run's drafter "
                f"({tuple(q.shape)}); check --intermediate-size")
        else:
            q.copy_(p.float())
    return CarryOver(new_inter - old_inter, rows_kept, rows_new)


def _copy_widened(name: str, q: torch.Tensor, p: torch.Tensor, old: int, new: int) -> None:
    p = p.float()
    if name.startswith("midlayer.mlp.gate_up_proj."):  # [2I(, H)]: gate rows, then up rows
        q[:old].copy_(p[:old])
        q[new:new + old].copy_(p[old:])
        if name.endswith(".bias"):
            q[old:new].zero_()
            q[new + old:].zero_()
    else:  # down_proj.weight [H, I]
        q[:, :old].copy_(p)
        q[:, old:].zero_()


def _copy_vocab_rows(dst, src, q: torch.Tensor, p: torch.Tensor) -> tuple[int, int]:
    """q [Vd_new, H], p [Vd_old, H]: copy rows by target id; returns (kept, new) row counts."""
    if q.shape[1:] != p.shape[1:]:
        raise InvalidRequestError("init_drafter", f"its lm_head {tuple(p.shape)} does not fit "
                                  f"this run's {tuple(q.shape)}")
    old_ids = src.map_to_target(torch.arange(src.draft_vocab_size, device=src.d2t.device)).cpu()
    new_ids = dst.map_to_target(torch.arange(dst.draft_vocab_size, device=dst.d2t.device)).cpu()
    old_row = torch.full((dst.vocab_size,), -1, dtype=torch.long)
    old_row[old_ids] = torch.arange(old_ids.numel())  # target id -> old draft id, or -1
    src_rows = old_row[new_ids]  # [Vd_new]
    shared = (src_rows >= 0).nonzero().flatten().to(q.device)
    fresh = (src_rows < 0).nonzero().flatten().to(q.device)
    trained = p[src_rows[shared.cpu()].to(p.device)].float().to(q.device)  # [n, H]
    if fresh.numel() and shared.numel() >= 2 * q.shape[1]:
        # rows the old drafter never trained: map their initial rows (the target's head rows)
        # by the least-squares linear map A [H, H] that takes the shared tokens' initial rows
        # to their trained ones (on SmolLM2 it predicts held-out trained rows at cosine 0.97,
        # the target's rows alone at 0.64; unmapped rows took 0.55 -> 0.23 top-1)
        fit = torch.linalg.lstsq(q[shared].float().cpu(), trained.cpu()).solution  # [H, H]
        q[fresh] = (q[fresh].float().cpu() @ fit).to(q)
    q[shared] = trained.to(q)
    return int(shared.numel()), int(fresh.numel())
