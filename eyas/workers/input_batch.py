"""Turn a step's per-sequence spans into the flat tensors a forward pass needs."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence as Seq

import torch

from eyas.layers.attention import AttentionBatch


@dataclass
class SeqSpan:
    """Compute tokens at positions [start, start + len(token_ids)) of one sequence.

    tree_mask: optional [n_tree, n_tree] bool for the last n_tree tokens of the span (a
    speculative tree: True where row token may see column token). Without it, attention is causal.
    """

    token_ids: list[int]
    start: int
    block_table: list[int]
    tree_mask: Optional[torch.Tensor] = None


@dataclass
class ForwardInputs:
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    attn: AttentionBatch
    last_index: torch.Tensor  # [B] int64: flat row of each sequence's last token
    query_start: list[int]  # len B + 1: flat offsets of each sequence's tokens


def slots_for(block_table: Seq[int], start: int, end: int, block_size: int) -> torch.Tensor:
    """Flat cache slots of positions [start, end): block_table[p // Bs] * Bs + p % Bs."""
    pos = torch.arange(start, end)
    table = torch.as_tensor(block_table, dtype=torch.long)
    return table[pos // block_size] * block_size + pos % block_size


def build_forward_inputs(spans: Seq[SeqSpan], block_size: int,
                         device: torch.device | str = "cpu") -> ForwardInputs:
    """Flatten spans into input_ids/positions and an AttentionBatch.

    Positions: for a chain, position = start + i. For a tree span, tree tokens take
    position = start_of_tree + depth, where depth = (number of ancestors in tree_mask) - 1.
    The KV slot of tree token i is still start + i (tree tokens occupy consecutive slots).
    """
    num_seqs = len(spans)
    lens = [len(s.token_ids) for s in spans]
    q_max = max(lens)
    kv_lens = [s.start + n for s, n in zip(spans, lens)]
    k_max = max(kv_lens)
    total = sum(lens)

    input_ids, positions, slot_mapping = [], [], []
    q_index = torch.full((num_seqs, q_max), total, dtype=torch.long)
    out_index = torch.empty(total, dtype=torch.long)
    kv_slots = torch.zeros(num_seqs, k_max, dtype=torch.long)
    mask = torch.zeros(num_seqs, 1, q_max, k_max, dtype=torch.bool)
    query_start = [0]
    offset = 0
    for b, (span, n) in enumerate(zip(spans, lens)):
        kv_len = span.start + n
        slots = slots_for(span.block_table, 0, kv_len, block_size)  # [kv_len]
        kv_slots[b, :kv_len] = slots
        slot_mapping.append(slots[span.start:])
        input_ids.append(torch.as_tensor(span.token_ids, dtype=torch.long))
        pos = torch.arange(span.start, kv_len)
        key_pos = torch.arange(kv_len)
        seq_mask = key_pos[None, :] <= pos[:, None]  # [n, kv_len] causal
        if span.tree_mask is not None:
            n_tree = span.tree_mask.shape[0]
            tree_start = kv_len - n_tree
            depth = span.tree_mask.sum(dim=1) - 1  # [n_tree]
            pos = pos.clone()
            pos[n - n_tree:] = tree_start + depth
            seq_mask[n - n_tree:, tree_start:] = span.tree_mask
        positions.append(pos)
        mask[b, 0, :n, :kv_len] = seq_mask
        mask[b, 0, n:, 0] = True  # padding queries see one key so softmax stays finite
        q_index[b, :n] = torch.arange(offset, offset + n)
        out_index[offset:offset + n] = b * q_max + torch.arange(n)
        offset += n
        query_start.append(offset)

    last_index = torch.as_tensor(query_start[1:], dtype=torch.long) - 1
    attn = AttentionBatch(
        slot_mapping=torch.cat(slot_mapping).to(device),
        q_index=q_index.to(device),
        out_index=out_index.to(device),
        kv_slots=kv_slots.to(device),
        mask=mask.to(device),
    )
    return ForwardInputs(
        input_ids=torch.cat(input_ids).to(device),
        positions=torch.cat(positions).to(device),
        attn=attn,
        last_index=last_index.to(device),
        query_start=query_start,
    )


def build_scratch_tree_batch(prefix_slots: Seq[torch.Tensor], tail_slots: Seq[torch.Tensor],
                             tail_masks: Seq[torch.Tensor], write_slots: Seq[torch.Tensor],
                             device: torch.device | str = "cpu") -> AttentionBatch:
    """Attention for tree draft steps whose K/V live outside the sequence's own slots.

    Per sequence b with n_b query rows (flat rows in sequence order):
      prefix_slots[b] [P_b]        cached slots every query sees (final KV, positions < L-1)
      tail_slots[b]   [M_b]        further slots (e.g. drafter scratch rows of tree nodes)
      tail_masks[b]   [n_b, M_b]   bool: which tail slots each query sees
      write_slots[b]  [n_b]        where each query's own K/V is written (must be in the tail,
                                   and visible to itself through tail_masks)
    Keys of b are prefix ++ tail, padded to Kmax = max(P_b + M_b) with slot 0 (masked).
    """
    num_seqs = len(prefix_slots)
    lens = [int(m.shape[0]) for m in tail_masks]
    q_max, total = max(lens), sum(lens)
    k_max = max(int(p.shape[0]) + int(t.shape[0]) for p, t in zip(prefix_slots, tail_slots))
    q_index = torch.full((num_seqs, q_max), total, dtype=torch.long)
    out_index = torch.empty(total, dtype=torch.long)
    kv_slots = torch.zeros(num_seqs, k_max, dtype=torch.long)
    mask = torch.zeros(num_seqs, 1, q_max, k_max, dtype=torch.bool)
    offset = 0
    for b, n in enumerate(lens):
        p_len, t_len = int(prefix_slots[b].shape[0]), int(tail_slots[b].shape[0])
        kv_slots[b, :p_len] = prefix_slots[b]
        kv_slots[b, p_len:p_len + t_len] = tail_slots[b]
        mask[b, 0, :n, :p_len] = True
        mask[b, 0, :n, p_len:p_len + t_len] = tail_masks[b]
        mask[b, 0, n:, 0] = True  # padding queries see one key so softmax stays finite
        q_index[b, :n] = torch.arange(offset, offset + n)
        out_index[offset:offset + n] = b * q_max + torch.arange(n)
        offset += n
    return AttentionBatch(
        slot_mapping=torch.cat(list(write_slots)).to(device),
        q_index=q_index.to(device),
        out_index=out_index.to(device),
        kv_slots=kv_slots.to(device),
        mask=mask.to(device),
    )
