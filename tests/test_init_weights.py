"""Starting a drafter from another (train/init_weights.py): a wider MLP computes what the old
one did, a re-chosen vocabulary keeps the old logits of the tokens both draft, and shapes that
cannot carry over are refused."""
from __future__ import annotations

import pytest
import torch

from eyas.errors import InvalidRequestError
from eyas.models.eagle3 import build_vocab_maps
from eyas.train.init_weights import carry_over
from eyas.train.ttt import ttt_forward
from test_eagle3 import make_drafter


def _unroll(drafter, seed=3):
    g = torch.Generator().manual_seed(seed)
    emb, aux = torch.randn(2, 9, 64, generator=g), torch.randn(2, 9, 192, generator=g)
    return ttt_forward(drafter, emb, aux, 3)  # 3 x [2, 9, 64]


@torch.no_grad()
def test_widened_mlp_computes_what_the_old_one_did():
    src = make_drafter(seed=1, intermediate_size=96)
    dst = make_drafter(seed=7, intermediate_size=160)
    dst.set_vocab_maps(src.d2t, src.t2d)
    got = carry_over(dst, src)
    assert (got.new_mlp_units, got.vocab_rows_kept, got.vocab_rows_new) == (64, 64, 0)
    for a, b in zip(_unroll(src), _unroll(dst)):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    down = dst.midlayer.mlp.down_proj.weight  # [H, 160]
    assert down[:, 96:].abs().max() == 0
    gate_up = dst.midlayer.mlp.gate_up_proj.weight  # [320, H]: gate rows 0..159, up rows 160..
    assert gate_up[96:160].abs().min() > 0 and gate_up[256:].abs().min() > 0  # random, trainable
    torch.testing.assert_close(gate_up[160:256], src.midlayer.mlp.gate_up_proj.weight[96:])


@torch.no_grad()
def test_reselected_vocab_keeps_the_logits_of_shared_tokens():
    src = make_drafter(draft_vocab=64, seed=1)
    dst = make_drafter(draft_vocab=80, seed=2)
    counts = torch.rand(256, generator=torch.Generator().manual_seed(11))
    dst.set_vocab_maps(*build_vocab_maps(counts, 80))
    before = dst.lm_head.weight.clone()
    got = carry_over(dst, src)
    shared = src.t2d & dst.t2d  # [V] target ids drafted by both
    assert got.vocab_rows_kept == int(shared.sum()) > 0
    assert got.vocab_rows_new == 80 - got.vocab_rows_kept > 0
    out = _unroll(src)[0][0]  # [9, H]: the bodies are equal, so compare the heads on one input
    full = {}
    for d in (src, dst):
        ids = d.map_to_target(torch.arange(d.draft_vocab_size))
        logits = torch.full((out.shape[0], 256), float("nan"))
        logits[:, ids] = d.compute_logits(out)
        full[d is dst] = logits
    torch.testing.assert_close(full[True][:, shared], full[False][:, shared])
    new_rows = ~src.t2d[dst.map_to_target(torch.arange(80))]  # [80] rows of new tokens
    assert torch.equal(dst.lm_head.weight[new_rows], before[new_rows])


@torch.no_grad()
def test_new_vocab_rows_go_through_the_map_learnt_on_shared_rows():
    """Trained rows = head rows @ A for the old vocabulary; the rows of new tokens, which start as
    head rows, come out as head rows @ A too (enough shared rows to fit A: >= 2H)."""
    g = torch.Generator().manual_seed(5)
    head = torch.randn(256, 64, generator=g)  # [V, H] a target head
    a = torch.randn(64, 64, generator=g) / 8  # [H, H]
    src = make_drafter(draft_vocab=200, seed=1)
    dst = make_drafter(draft_vocab=220, seed=2)
    dst.set_vocab_maps(*build_vocab_maps(torch.rand(256, generator=g), 220))
    ids = {d: d.map_to_target(torch.arange(d.draft_vocab_size)) for d in (src, dst)}
    src.lm_head.weight.copy_(head[ids[src]] @ a)
    dst.lm_head.weight.copy_(head[ids[dst]])
    got = carry_over(dst, src)
    assert got.vocab_rows_kept >= 128 and got.vocab_rows_new > 0
    torch.testing.assert_close(dst.lm_head.weight, head[ids[dst]] @ a, atol=1e-4, rtol=1e-4)


def test_shapes_that_cannot_carry_over_are_refused():
    src = make_drafter(seed=1, intermediate_size=96)
    with pytest.raises(InvalidRequestError, match="narrower"):
        carry_over(make_drafter(seed=1, intermediate_size=64), src)
    other = make_drafter(seed=1, intermediate_size=96)
    other.midlayer.input_layernorm.weight = torch.nn.Parameter(torch.ones(32))
    with pytest.raises(InvalidRequestError, match="does not fit"):
        carry_over(other, src)
