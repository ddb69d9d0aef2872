"""The vectorised step-input builders and grouped-query paged attention against plain references."""
import random

import pytest
import torch

from eyas.layers.attention import AttentionBatch, paged_attention
from eyas.workers.input_batch import (SeqSpan, build_forward_inputs, build_scratch_tree_batch,
                                      slots_for)


# ----------------------------------------------------------------------------- references
def reference_forward_inputs(spans, block_size):
    """The original per-sequence loop: (input_ids, positions, last_index, query_start, fields)."""
    num_seqs = len(spans)
    lens = [len(s.token_ids) for s in spans]
    q_max, total = max(lens), sum(lens)
    kv_lens = [s.start + n for s, n in zip(spans, lens)]
    k_max = max(kv_lens)
    input_ids, positions, slot_mapping = [], [], []
    q_index = torch.full((num_seqs, q_max), total, dtype=torch.long)
    out_index = torch.empty(total, dtype=torch.long)
    kv_slots = torch.zeros(num_seqs, k_max, dtype=torch.long)
    mask = torch.zeros(num_seqs, 1, q_max, k_max, dtype=torch.bool)
    query_start, offset = [0], 0
    for b, (span, n) in enumerate(zip(spans, lens)):
        kv_len = span.start + n
        slots = slots_for(span.block_table, 0, kv_len, block_size)
        kv_slots[b, :kv_len] = slots
        slot_mapping.append(slots[span.start:])
        input_ids.append(torch.as_tensor(span.token_ids, dtype=torch.long))
        pos = torch.arange(span.start, kv_len)
        seq_mask = torch.arange(kv_len)[None, :] <= pos[:, None]
        if span.tree_mask is not None:
            n_tree = span.tree_mask.shape[0]
            tree_start = kv_len - n_tree
            pos = pos.clone()
            pos[n - n_tree:] = tree_start + span.tree_mask.sum(dim=1) - 1
            seq_mask[n - n_tree:, tree_start:] = span.tree_mask
        positions.append(pos)
        mask[b, 0, :n, :kv_len] = seq_mask
        mask[b, 0, n:, 0] = True
        q_index[b, :n] = torch.arange(offset, offset + n)
        out_index[offset:offset + n] = b * q_max + torch.arange(n)
        offset += n
        query_start.append(offset)
    fields = dict(slot_mapping=torch.cat(slot_mapping), q_index=q_index, out_index=out_index,
                  kv_slots=kv_slots, mask=mask)
    return (torch.cat(input_ids), torch.cat(positions),
            torch.as_tensor(query_start[1:]) - 1, query_start, fields)


def reference_attention(q, k_cache, v_cache, attn, scale):
    """Gather per-slot K/V, repeat KV heads for GQA, masked softmax in float64."""
    heads, kv_heads = q.shape[1], k_cache.shape[2]
    keys = k_cache.flatten(0, 1)[attn.kv_slots].double()  # [B, Kmax, Hkv, D]
    values = v_cache.flatten(0, 1)[attn.kv_slots].double()
    keys = keys.repeat_interleave(heads // kv_heads, dim=2).transpose(1, 2)  # [B, Hq, Kmax, D]
    values = values.repeat_interleave(heads // kv_heads, dim=2).transpose(1, 2)
    q_pad = torch.cat([q, q.new_zeros(1, *q.shape[1:])])[attn.q_index].double().transpose(1, 2)
    scores = q_pad @ keys.transpose(-1, -2) * scale  # [B, Hq, Qmax, Kmax]
    scores = scores.masked_fill(~attn.mask, float("-inf"))
    out = scores.softmax(-1) @ values  # [B, Hq, Qmax, D]
    return out.transpose(1, 2).reshape(-1, heads, out.shape[-1])[attn.out_index]


# ----------------------------------------------------------------------------- random spans
def random_tree_mask(rng, n):
    """[n, n] ancestor mask of a random tree rooted at node 0 (parents precede children)."""
    mask = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        mask[i, i] = True
        if i:
            mask[i] |= mask[rng.randrange(i)]
    return mask


def random_spans(rng, block_size, num_seqs, max_len=40, trees=True):
    spans, free = [], list(range(200))
    rng.shuffle(free)
    for _ in range(num_seqs):
        start = rng.choice([0, block_size - 1, block_size, rng.randrange(0, 3 * block_size)])
        n = rng.choice([1, 1, rng.randrange(1, max_len)])
        need = -(-(start + n) // block_size)
        table = [free.pop() for _ in range(need + rng.randrange(3))]  # spare blocks too
        tree = None
        if trees and rng.random() < 0.4:
            tree = random_tree_mask(rng, rng.randrange(1, n + 1))
        spans.append(SeqSpan([rng.randrange(1000) for _ in range(n)], start, table, tree))
    return spans


CASES = [(seed, bs, b) for seed in range(4) for bs in (1, 4, 16) for b in (1, 3, 8)]


@pytest.mark.parametrize("seed,block_size,num_seqs", CASES)
def test_build_forward_inputs_matches_reference(seed, block_size, num_seqs):
    rng = random.Random(seed * 1000 + block_size * 10 + num_seqs)
    spans = random_spans(rng, block_size, num_seqs)
    got = build_forward_inputs(spans, block_size)
    ids, positions, last_index, query_start, fields = reference_forward_inputs(spans, block_size)
    assert torch.equal(got.input_ids, ids)
    assert torch.equal(got.positions, positions)
    assert torch.equal(got.last_index, last_index)
    assert got.query_start == query_start
    for name, want in fields.items():
        assert torch.equal(getattr(got.attn, name), want), name
    if got.attn.mask_is_full:  # a promise attention relies on (it may be False when full)
        assert fields["mask"].all()


def test_decode_batches_mark_full_masks():
    same = [SeqSpan([1], 7, [3, 4]), SeqSpan([2], 7, [5, 6])]
    assert build_forward_inputs(same, 4).attn.mask_is_full
    ragged = [SeqSpan([1], 7, [3, 4]), SeqSpan([2], 5, [5, 6])]
    assert not build_forward_inputs(ragged, 4).attn.mask_is_full
    chunk = [SeqSpan([1, 2], 6, [3, 4])]
    assert not build_forward_inputs(chunk, 4).attn.mask_is_full


def test_block_boundaries_and_short_tables():
    spans = [SeqSpan([1] * 4, 0, [9]), SeqSpan([2], 4, [3, 7]), SeqSpan([3] * 5, 3, [1, 5])]
    got = build_forward_inputs(spans, 4)
    assert got.attn.slot_mapping.tolist() == [36, 37, 38, 39, 28, 7, 20, 21, 22, 23]
    with pytest.raises((ValueError, IndexError)):
        build_forward_inputs([SeqSpan([1] * 5, 0, [9])], 4)  # needs 2 blocks, has 1


def test_scratch_tree_batch_matches_reference():
    rng = random.Random(0)
    for _ in range(20):
        num_seqs = rng.randrange(1, 5)
        prefix = [torch.randint(0, 500, (rng.randrange(0, 9),)) for _ in range(num_seqs)]
        lens = [rng.randrange(1, 5) for _ in range(num_seqs)]
        tails = [torch.randint(500, 900, (n + rng.randrange(0, 4),)) for n in lens]
        masks = [torch.rand(n, t.shape[0]) < 0.5 for n, t in zip(lens, tails)]
        writes = [t[:n] for n, t in zip(lens, tails)]
        got = build_scratch_tree_batch(prefix, tails, masks, writes)
        # reference: the straightforward per-sequence fill
        q_max, total = max(lens), sum(lens)
        k_max = max(p.shape[0] + t.shape[0] for p, t in zip(prefix, tails))
        kv_slots = torch.zeros(num_seqs, k_max, dtype=torch.long)
        mask = torch.zeros(num_seqs, 1, q_max, k_max, dtype=torch.bool)
        q_index = torch.full((num_seqs, q_max), total, dtype=torch.long)
        out_index, offset = [], 0
        for b, n in enumerate(lens):
            p, t = prefix[b].shape[0], tails[b].shape[0]
            kv_slots[b, :p], kv_slots[b, p:p + t] = prefix[b], tails[b]
            mask[b, 0, :n, :p] = True
            mask[b, 0, :n, p:p + t] = masks[b]
            mask[b, 0, n:, 0] = True
            q_index[b, :n] = torch.arange(offset, offset + n)
            out_index += [b * q_max + i for i in range(n)]
            offset += n
        assert torch.equal(got.kv_slots, kv_slots)
        assert torch.equal(got.mask, mask)
        assert torch.equal(got.q_index, q_index)
        assert got.out_index.tolist() == out_index
        assert torch.equal(got.slot_mapping, torch.cat(writes))


def random_step(attn, heads: int, kv_heads: int, dim: int, block_size: int, num_blocks: int = 200):
    """Random q [T, Hq, D], new k/v [T, Hkv, D] and K/V caches for a step's AttentionBatch."""
    num_tokens = attn.slot_mapping.shape[0]
    k_cache = torch.randn(num_blocks, block_size, kv_heads, dim)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, dim)
    q = torch.randn(num_tokens, heads, dim)
    k, v = torch.randn(num_tokens, kv_heads, dim), torch.randn(num_tokens, kv_heads, dim)
    return q, k, v, k_cache, v_cache


def checked_attention(q, k, v, k_cache, v_cache, attn) -> torch.Tensor:
    """paged_attention, checked against the float64 reference over the step's fields."""
    dim = q.shape[-1]
    out = paged_attention(q, k, v, k_cache, v_cache, attn, dim ** -0.5)
    assert out.shape == q.shape[:2] + (v_cache.shape[-1],)
    want = reference_attention(q, k_cache, v_cache, attn, dim ** -0.5)  # cache now holds k/v
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    return out


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2), (8, 1)])
@pytest.mark.parametrize("max_len", [6, 30])  # short steps fold heads into rows, long ones don't
@pytest.mark.parametrize("seed", range(3))
def test_paged_attention_matches_reference(heads, kv_heads, max_len, seed):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    block_size, dim = 4, 16
    spans = random_spans(rng, block_size, rng.randrange(1, 6), max_len=max_len)
    if seed == 0:  # a uniform decode batch (dense queries, full mask)
        spans = [SeqSpan([1], 9, s.block_table + [199, 198]) for s in spans]
    attn = build_forward_inputs(spans, block_size).attn
    q, k, v, k_cache, v_cache = random_step(attn, heads, kv_heads, dim, block_size)
    out = checked_attention(q, k, v, k_cache, v_cache, attn)
    again = paged_attention(q, k, v, k_cache, v_cache, attn, dim ** -0.5)  # reuses derived tensors
    assert torch.equal(again, out)


def test_attention_batch_without_mask_flag_still_masks():
    """Batches built elsewhere (graph padding) leave mask_is_full False: the mask applies."""
    attn = build_forward_inputs([SeqSpan([1], 5, [0, 1]), SeqSpan([2], 2, [2])], 4).attn
    plain = AttentionBatch(attn.slot_mapping, attn.q_index, attn.out_index, attn.kv_slots, attn.mask)
    assert not plain.mask_is_full
    k_cache, v_cache = torch.randn(4, 4, 1, 8), torch.randn(4, 4, 1, 8)
    q, k, v = torch.randn(2, 2, 8), torch.randn(2, 1, 8), torch.randn(2, 1, 8)
    out = paged_attention(q, k, v, k_cache, v_cache, plain, 0.3)
    torch.testing.assert_close(out.double(), reference_attention(q, k_cache, v_cache, attn, 0.3))


def test_attention_groups():
    from eyas.workers.input_batch import attention_groups

    assert attention_groups([1] * 16) is None  # uniform decode
    assert attention_groups([128] * 4) is None  # uniform prefill
    assert attention_groups([100, 120, 128]) is None  # little padding
    assert attention_groups([1, 1, 1, 128]) == [[0, 1, 2], [3]]
    assert attention_groups([6, 64, 1, 200]) == [[0, 2], [1], [3]]
    assert attention_groups([40, 1, 1, 1]) == [[1, 2, 3], [0]]


@pytest.mark.parametrize("heads,kv_heads", [(6, 2), (4, 4)])
def test_mixed_steps_attend_in_parts(heads, kv_heads):
    # decodes next to prefill chunks (one of them a tree): parts, each on its own small grid
    rng = random.Random(7)
    torch.manual_seed(7)
    block_size, dim = 4, 16
    spans = [SeqSpan([1], rng.randrange(3, 30), list(range(10 * b, 10 * b + 9))) for b in range(5)]
    spans.insert(2, SeqSpan(list(range(33)), 4, list(range(60, 70))))
    spans.append(SeqSpan(list(range(12)), 0, list(range(80, 84)), random_tree_mask(rng, 9)))
    attn = build_forward_inputs(spans, block_size).attn
    assert attn.parts is not None and [p.num_seqs for p in attn.parts] == [5, 1, 1]
    assert attn.parts[0].q_index.shape == (5, 1)  # not padded to the chunk's 33 queries
    checked_attention(*random_step(attn, heads, kv_heads, dim, block_size), attn)  # vs the whole step's fields
