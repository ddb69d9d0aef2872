"""Turn a step's per-sequence spans into the flat tensors a forward pass needs.

build_forward_inputs runs once per step, before every layer: it builds everything on the CPU
with a fixed handful of whole-batch tensor ops (per-sequence tensor work only for speculative
tree spans), then moves each result to the device once.
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate, chain
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


@dataclass
class QueryGrid:
    """The [B, Qmax] grid of padded queries: query i of sequence b is grid cell (b, i), flat
    token rows are the valid cells in row-major order."""

    q_index: torch.Tensor  # [B, Qmax] flat row of query i of seq b; T for padding
    out_index: torch.Tensor  # [T] grid cell b * Qmax + i of each flat token
    valid: Optional[torch.Tensor]  # [B, Qmax] bool: cell holds a real token; None: all do

    def flat(self, x: torch.Tensor) -> torch.Tensor:
        """[B, Qmax] per cell -> [T] per flat token."""
        return x.reshape(-1) if self.valid is None else x[self.valid]


def query_grid(lens: Seq[int]) -> QueryGrid:
    """Flat tokens in sequence order, lens[b] of them for sequence b."""
    num_seqs, q_max, total = len(lens), max(lens), sum(lens)
    if total == num_seqs * q_max:  # uniform: flat rows are the grid cells
        rows = torch.arange(total)  # [T]
        return QueryGrid(rows.view(num_seqs, q_max), rows, None)
    lens_t = torch.tensor(lens, dtype=torch.long)  # [B]
    valid = torch.arange(q_max)[None, :] < lens_t[:, None]  # [B, Qmax]
    q_index = torch.full((num_seqs, q_max), total, dtype=torch.long)
    q_index[valid] = torch.arange(total)
    out_index = torch.arange(num_seqs * q_max).view(num_seqs, q_max)[valid]  # [T]
    return QueryGrid(q_index, out_index, valid)


def block_grid(tables: Seq[Seq[int]], num_blocks: Seq[int], width: int) -> torch.Tensor:
    """The first num_blocks[b] entries of each block table, zero-padded to [B, width]."""
    rows = []
    for table, n in zip(tables, num_blocks):
        head = table[:n].tolist() if isinstance(table, torch.Tensor) else list(table[:n])
        if len(head) < n:
            raise ValueError(f"block table has {len(table)} blocks, the span needs {n}")
        rows.append(head + [0] * (width - n))
    return torch.tensor(rows, dtype=torch.long)


def kv_slot_grid(tables: Seq[Seq[int]], kv_lens: Seq[int], block_size: int) -> torch.Tensor:
    """[B, Kmax] cache slot of key j of seq b (slots_for over [0, kv_len)); padding keys: 0."""
    num_seqs, k_max = len(kv_lens), max(kv_lens)
    width = -(-k_max // block_size)
    table = block_grid(tables, [-(-n // block_size) for n in kv_lens], width)  # [B, width]
    offsets = torch.arange(block_size)  # [Bs]
    slots = (table[:, :, None] * block_size + offsets).view(num_seqs, width * block_size)
    slots = slots[:, :k_max]  # [B, Kmax]
    if min(kv_lens) < k_max:
        past_end = offsets.new_tensor(kv_lens)[:, None] <= torch.arange(k_max)  # [B, Kmax]
        slots = slots.masked_fill(past_end, 0)
    return slots


def apply_trees(spans: Seq[SeqSpan], lens: Seq[int], positions: torch.Tensor,
                mask: torch.Tensor) -> None:
    """Tree spans, in place on the [B, Qmax] positions and [B, Qmax, Kmax] mask: tree tokens see
    their ancestors only and sit at position tree_start + depth, where depth = (number of
    ancestors in tree_mask) - 1."""
    for b, span in enumerate(spans):
        if span.tree_mask is None:
            continue
        n, n_tree = lens[b], span.tree_mask.shape[0]
        tree_start = span.start + n - n_tree  # key (and chain position) of the tree's root
        positions[b, n - n_tree:n] = tree_start + span.tree_mask.sum(dim=1) - 1
        mask[b, n - n_tree:n, tree_start:tree_start + n_tree] = span.tree_mask


SHORT_QUERIES = 8  # spans of at most this many queries (decode, verify) attend as one part


def attention_groups(lens: Seq[int]) -> Optional[list[list[int]]]:
    """Sequences grouped for attention when one padded [B, Qmax] grid would be mostly padding
    (more than twice the real queries): the short spans together, each longer span alone.
    None: attend as one batch. Example: 15 decodes and a 128-token prefill chunk pad to 2048
    query cells for 143 queries -> [[the 15 decodes], [the chunk]]."""
    if len(lens) < 2 or len(lens) * max(lens) <= 2 * sum(lens):
        return None
    short = [b for b, n in enumerate(lens) if n <= SHORT_QUERIES]
    groups = ([short] if short else []) + [[b] for b, n in enumerate(lens) if n > SHORT_QUERIES]
    return groups if len(groups) > 1 else None


def attention_part(group: list[int], lens: Seq[int], query_start: Seq[int], kv_lens: Seq[int],
                   kv_slots: torch.Tensor, mask: torch.Tensor, device: torch.device | str) -> AttentionBatch:
    """The AttentionBatch of some sequences of a step: their rows of the step's
    key slots and [B, Qmax, Kmax] mask, cut to the group's own Qmax and Kmax; q_index points at
    the step's flat rows (T, the step's padding row, for padding)."""
    total = query_start[-1]
    grid = query_grid([lens[b] for b in group])
    rows = torch.cat([torch.arange(query_start[b], query_start[b + 1]) for b in group])  # [T_g]
    q_max, k_max = grid.q_index.shape[1], max(kv_lens[b] for b in group)
    index = torch.tensor(group)
    return AttentionBatch(
        slot_mapping=torch.empty(0, dtype=torch.long, device=device),  # the step writes every token
        q_index=torch.cat([rows, torch.tensor([total])])[grid.q_index].to(device),  # -> step rows
        out_index=grid.out_index.to(device),
        kv_slots=kv_slots[index, :k_max].to(device),
        mask=mask[index, :q_max, :k_max].unsqueeze(1).to(device),  # [B_g, 1, Qmax_g, Kmax_g]
        rows=rows.to(device),
    )


def build_forward_inputs(spans: Seq[SeqSpan], block_size: int,
                         device: torch.device | str = "cpu") -> ForwardInputs:
    """Flatten spans into input_ids/positions and an AttentionBatch.

    Positions: for a chain, position = start + i. For a tree span, tree tokens take
    position = start_of_tree + depth, where depth = (number of ancestors in tree_mask) - 1.
    The KV slot of tree token i is still start + i (tree tokens occupy consecutive slots).

    Everything is computed over the [B, Qmax] grid of padded queries, then the valid cells are
    taken in order (a reshape when every sequence has Qmax tokens, e.g. decode and verify).
    """
    lens = [len(s.token_ids) for s in spans]
    kv_lens = [s.start + n for s, n in zip(spans, lens)]
    query_start = list(accumulate(lens, initial=0))
    has_tree = any(s.tree_mask is not None for s in spans)

    grid = query_grid(lens)
    q_max, k_max = grid.q_index.shape[1], max(kv_lens)
    kv_slots = kv_slot_grid([s.block_table for s in spans], kv_lens, block_size)  # [B, Kmax]
    starts = torch.tensor([s.start for s in spans], dtype=torch.long)  # [B]
    chain_pos = starts[:, None] + torch.arange(q_max)  # [B, Qmax]: key (= slot) index per cell
    slots = kv_slots.gather(1, chain_pos.clamp(max=k_max - 1))  # [B, Qmax]; padding cells: junk
    key = torch.arange(k_max)  # [Kmax]
    mask = key <= chain_pos[:, :, None]  # [B, Qmax, Kmax] causal
    if grid.valid is not None:  # padding queries see key 0 only, so their softmax stays finite
        mask = torch.where(grid.valid[:, :, None], mask, key == 0)
    positions = chain_pos
    if has_tree:
        positions = chain_pos.clone()
        apply_trees(spans, lens, positions, mask)
    # one query per sequence, all sequences equally long, no tree: every key is visible
    mask_is_full = q_max == 1 and grid.valid is None and min(kv_lens) == k_max and not has_tree

    input_ids = torch.tensor(list(chain.from_iterable(s.token_ids for s in spans)), dtype=torch.long)
    groups = attention_groups(lens)
    parts = None
    if groups is not None:
        parts = [attention_part(g, lens, query_start, kv_lens, kv_slots, mask, device) for g in groups]
    attn = AttentionBatch(
        slot_mapping=grid.flat(slots).to(device),
        q_index=grid.q_index.to(device),
        out_index=grid.out_index.to(device),
        kv_slots=kv_slots.to(device),
        mask=mask.unsqueeze(1).to(device),  # [B, 1, Qmax, Kmax]
        mask_is_full=mask_is_full,
        parts=parts,
    )
    return ForwardInputs(
        input_ids=input_ids.to(device),
        positions=grid.flat(positions).to(device),
        attn=attn,
        last_index=torch.tensor([q - 1 for q in query_start[1:]], dtype=torch.long).to(device),
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
    grid = query_grid(lens)
    q_max = grid.q_index.shape[1]
    k_max = max(int(p.shape[0]) + int(t.shape[0]) for p, t in zip(prefix_slots, tail_slots))
    kv_slots = torch.zeros(num_seqs, k_max, dtype=torch.long)  # [B, Kmax]
    mask = torch.zeros(num_seqs, q_max, k_max, dtype=torch.bool)  # [B, Qmax, Kmax]
    if grid.valid is not None:  # padding queries see one key so softmax stays finite
        mask[:, :, 0] = ~grid.valid
    for b, n in enumerate(lens):
        p_len, t_len = int(prefix_slots[b].shape[0]), int(tail_slots[b].shape[0])
        kv_slots[b, :p_len] = prefix_slots[b]
        kv_slots[b, p_len:p_len + t_len] = tail_slots[b]
        mask[b, :n, :p_len] = True
        mask[b, :n, p_len:p_len + t_len] = tail_masks[b]
    return AttentionBatch(
        slot_mapping=torch.cat(list(write_slots)).to(device),
        q_index=grid.q_index.to(device),
        out_index=grid.out_index.to(device),
        kv_slots=kv_slots.to(device),
        mask=mask.unsqueeze(1).to(device),  # [B, 1, Qmax, Kmax]
    )
