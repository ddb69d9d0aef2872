"""Draft proposers. `Eagle3Proposer` runs the EAGLE-3 head on its own KV cache layer, which
shares block ids and block size with the target (one allocator, one block table per sequence).

Per sequence the proposer keeps `DraftState`:
  dstart  - the drafter's KV is valid (computed from target features) for positions < dstart;
  pending - the target's aux rows [m, n_aux * Ht] for positions [dstart, dstart + m), fused
            (fc) only when the drafter extends over them: at large batches the controller runs
            plain steps for long stretches, and a sequence that never drafts never pays the fc.
            The price is memory: n_aux rows in the target's dtype per pending position instead of
            one in the drafter's, for the positions since the sequence's last extend.
Invariant: dstart + m == seq.num_computed_tokens (the target's computed length).

Drafter position p takes (feature of target position p, embedding of token p+1) and predicts
token p+2. One round for a sequence of length L (token L-1 has no KV yet):
  extend  positions [dstart, L-1) with pending features and tokens[dstart+1 : L] -> d_1
  step j  position L-2+j with the drafter's own previous output and d_{j-1}     -> d_j
Draft steps write speculative KV at positions >= L-1; the next extend overwrites it.

With topk > 1 the same extend is followed by a best-first tree search (spec/tree.py): each
tree step expands up to topk nodes per sequence at one depth, and their drafter K/V goes to
scratch rows of the drafter's cache instead of paged slots.

With `enable_graphs` the chain steps (j >= 1: one query per sequence) run through a compiled
forward + logits on bucketed shapes (workers/graphs.py `DraftGraphRunner`); padded rows write
only the drafter cache's pad slot. The extend pass (variable lengths) and tree steps (their
batches are per-node tree attention over scratch rows) stay eager.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from eyas.core import Sequence
from eyas.layers.attention import AttentionBatch
from eyas.layers.sampler import processed_probs, sample_from_probs
from eyas.spec.tree import TreeDraft, TreeSearch
from eyas.workers.graphs import DraftGraphRunner
from eyas.workers.input_batch import (ForwardInputs, SeqSpan, build_forward_inputs, build_scratch_tree_batch,
                                      slots_for)


@dataclass
class Draft:
    tokens: list[int]  # target-vocab ids d_1..d_K
    q: Optional[torch.Tensor] = None  # [K, V] drafter probs over target ids (sampled rows only)


@dataclass
class DraftState:
    dstart: int
    pending: list[torch.Tensor] = field(default_factory=list)  # chunks of [m_i, n_aux * Ht] aux rows
    num_pending: int = 0  # rows in pending, sum(m_i) (kept: the controller asks every step)


class Proposer:
    """Interface: observe target features after each step; propose drafts before verify."""

    # (seconds, rows) of the drafter's catch-up pass in the last propose when time_extend is
    # set (the adaptive controller separates catch-up from the step's typical time); None when
    # not measured (e.g. a drafter worker in another process)
    last_extend: Optional[tuple[float, int]] = None
    time_extend = False

    def observe(self, seq: Sequence, start: int, features: Optional[torch.Tensor],
                num_rows: Optional[int] = None) -> None:
        """The target computed positions [start, start + n) of seq; features: their aux rows
        [n, n_aux * Ht] (the aux hidden states side by side), or None (then num_rows = n: the
        features went straight to a drafter worker)."""

    def propose(self, seqs: list[Sequence], num_tokens: list[int], tree: Optional[bool] = None) -> list[Draft]:
        """Drafts of num_tokens[i] tokens per sequence; `tree`: False drafts chains even where the
        proposer drafts trees (topk > 1), None its own shape."""
        raise NotImplementedError

    def valid_prefix(self, seq: Sequence) -> int:
        """Positions whose drafter KV is final (blocks before it may enter the prefix cache)."""
        return seq.num_computed_tokens

    def backlog(self, seq: Sequence) -> int:
        """Target positions the drafter must catch up on before its next draft."""
        return 0

    def drop(self, seq: Sequence) -> None:
        pass

    def catch_up(self, seqs: list[Sequence]) -> None:
        """Extend the drafter over the sequences' backlog now, without drafting."""


class Eagle3Proposer(Proposer):
    def __init__(self, drafter, target, kv_cache: tuple[torch.Tensor, torch.Tensor], block_size: int,
                 device: torch.device, steps: int = 1, topk: int = 1,
                 num_paged_blocks: Optional[int] = None):
        """topk > 1 drafts trees of depth `steps` (spec/tree.py); their in-flight drafter K/V
        goes to the scratch rows of kv_cache past `num_paged_blocks` (the allocator's blocks)."""
        self.drafter = drafter
        self.target = target
        self.kv_cache = kv_cache
        self.block_size = block_size
        self.device = device
        self.steps, self.topk = steps, topk
        paged = kv_cache[0].shape[0] if num_paged_blocks is None else num_paged_blocks
        self.scratch_start = paged * block_size  # first scratch slot
        self.scratch_slots = kv_cache[0].shape[0] * block_size - self.scratch_start
        self.states: dict[str, DraftState] = {}
        d2t = drafter.map_to_target(torch.arange(drafter.draft_vocab_size, device=drafter.d2t.device))
        self.draft_to_target = d2t.to(device)  # [Vd] target id of each draft id
        self.graphs: Optional[DraftGraphRunner] = None  # compiled chain steps (see enable_graphs)

    # ------------------------------------------------------------ compiled chain steps
    def enable_graphs(self, pad_slot: int, max_batch: int, backend: Optional[str] = None) -> DraftGraphRunner:
        """Run chain steps (topk == 1, j >= 1) through compiled graphs on batch buckets up to
        max_batch. pad_slot: a slot of kv_cache past the paged and scratch rows that no sequence
        owns (the cache rows from it on are not scratch). Trees stay eager."""
        end = self.kv_cache[0].shape[0] * self.block_size
        if not self.scratch_start <= pad_slot < end:
            raise ValueError(f"drafter pad slot {pad_slot} must lie past the paged slots "
                             f"[0, {self.scratch_start}) and inside the cache of {end} slots")
        self.scratch_slots = min(self.scratch_slots, pad_slot - self.scratch_start)
        self.graphs = DraftGraphRunner(self._draft_step, self.kv_cache, self.device, pad_slot, max_batch,
                                       backend=backend)
        return self.graphs

    @torch.inference_mode()
    def warm_up(self, progress: bool = False, max_len: Optional[int] = None) -> int:
        """Compile (capture) every batch bucket x key bucket of the chain step now (the key
        buckets of BucketedGraphs.warm_key_lengths); returns graphs."""
        from tqdm import tqdm

        graphs = self.graphs
        bs, pad_block = self.block_size, graphs.pad_slot // self.block_size
        shapes = [(b, kv) for kv in graphs.warm_key_lengths(max_len) for b in graphs.buckets]
        for b, kv in tqdm(shapes, desc="compile draft", disable=not progress, leave=False):
            # the query writes the pad slot; every key slot lies in the pad block
            pad = SeqSpan([0], (kv - 1) // bs * bs + graphs.pad_slot % bs, [pad_block] * -(-kv // bs))
            inputs = build_forward_inputs([pad] * b, self.block_size, self.device)
            embeds = self.target.embed(inputs.input_ids)  # [b, H], the target's dtype
            hidden = embeds.new_zeros(embeds.shape, dtype=self.drafter.dtype)  # [b, H], ours
            graphs.run(embeds, hidden, inputs, self.kv_cache)
        return len(shapes)

    def _draft_step(self, embeds: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor,
                    attn: AttentionBatch, kv_cache) -> tuple[torch.Tensor, torch.Tensor]:
        """One drafter pass: embeds [T, H], hidden [T, H] -> (out [T, H], logits [T, Vd] fp32)."""
        out = self.drafter(embeds, hidden, positions, attn, kv_cache)
        return out, self.drafter.compute_logits(out)

    def _chain_step(self, embeds: torch.Tensor, hidden: torch.Tensor,
                    inputs: ForwardInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """A q = 1 step over S sequences: embeds [S, H], hidden [S, H] -> (out [S, H], logits
        [S, Vd]); compiled on a bucket when graphs are enabled."""
        if self.graphs is not None and self.graphs.can_run(embeds.shape[0]):
            return self.graphs.run(embeds, hidden, inputs, self.kv_cache)
        return self._draft_step(embeds, hidden, inputs.positions, inputs.attn, self.kv_cache)

    # ------------------------------------------------------------ bookkeeping
    def observe(self, seq: Sequence, start: int, features: Optional[torch.Tensor],
                num_rows: Optional[int] = None) -> None:
        st = self.states.get(seq.request_id)
        if st is None or st.dstart + st.num_pending != start:
            st = self.states[seq.request_id] = DraftState(dstart=start)  # new, or recomputed
        if features is not None and features.shape[0]:
            st.pending.append(features)
            st.num_pending += features.shape[0]

    def valid_prefix(self, seq: Sequence) -> int:
        st = self.states.get(seq.request_id)
        return st.dstart if st is not None else 0

    def backlog(self, seq: Sequence) -> int:
        st = self.states.get(seq.request_id)
        return st.num_pending if st is not None else 0

    def drop(self, seq: Sequence) -> None:
        self.states.pop(seq.request_id, None)

    @torch.inference_mode()
    def catch_up(self, seqs: list[Sequence]) -> None:
        """All but the last pending position: the next draft extends over that one, and the
        drafter's output there is where its chain starts."""
        seqs = [s for s in seqs if self.backlog(s) > 1]
        if seqs:
            self._extend(seqs, hold=1)

    # -------------------------------------------------------------- drafting
    def _pick(self, logits: torch.Tensor, seqs: list[Sequence]) -> tuple[torch.Tensor, list]:
        """logits [S, Vd] -> (target ids [S], per-row q over target vocab or None)."""
        greedy = [s.params.greedy for s in seqs]
        draft_ids = logits.argmax(dim=-1)  # [S]
        qs: list = [None] * len(seqs)
        sampled = [i for i, g in enumerate(greedy) if not g]
        if sampled:
            probs = processed_probs(logits[sampled], [seqs[i].params for i in sampled])  # [s, Vd]
            picks = sample_from_probs(probs, [seqs[i].generator for i in sampled])
            for row, i in enumerate(sampled):
                draft_ids[i] = picks[row]
                q = torch.zeros(self.target.vocab_size, dtype=torch.float32, device=logits.device)
                qs[i] = q.index_copy_(0, self.draft_to_target, probs[row])
        return self.draft_to_target[draft_ids], qs

    def _extend(self, seqs: list[Sequence], hold: int = 0) -> torch.Tensor:
        """Drafter pass over every sequence's pending positions [dstart, L-1-hold) -> last rows
        [S, H]. `hold` rows stay pending (a catch-up keeps the last one, whose output the next
        draft starts from)."""
        spans, feats = [], []
        for seq in seqs:
            st = self.states[seq.request_id]
            length = len(seq) - hold
            spans.append(SeqSpan(seq.token_ids[st.dstart + 1:length], st.dstart, seq.block_table))
            if hold:
                st.pending = [torch.cat(st.pending)]  # [n, H], split below
                feats.append(st.pending[0][:-hold])
            else:
                feats.extend(st.pending)
        start = time.perf_counter()
        inputs = build_forward_inputs(spans, self.block_size, self.device)
        hidden = self.drafter.fuse_aux([torch.cat(feats)])  # [T, n_aux * Ht] -> [T, H], ours
        out = self.drafter(self.target.embed(inputs.input_ids), hidden, inputs.positions, inputs.attn,
                           self.kv_cache)
        if self.time_extend:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.last_extend = (time.perf_counter() - start, hidden.shape[0])
        for seq in seqs:  # drafter KV now holds every computed position but the held ones
            st = self.states[seq.request_id]
            st.dstart = seq.num_computed_tokens - hold
            st.pending = [st.pending[0][-hold:].clone()] if hold else []  # not a view of the whole backlog
            st.num_pending = hold
        return out[inputs.last_index]  # [S, H]

    @torch.inference_mode()
    def propose(self, seqs: list[Sequence], num_tokens: list[int], tree: Optional[bool] = None) -> list:
        """Draft num_tokens[i] tokens for each sequence (all sequences are decoding): chains
        (list[Draft]) when topk == 1 or `tree` is False, else trees of at most num_tokens[i]
        nodes (list[TreeDraft])."""
        if self.topk > 1 and tree is not False:
            return self._propose_tree(seqs, num_tokens)
        drafter, bs = self.drafter, self.block_size
        last = self._extend(seqs)  # [S, H]
        tokens, qs = self._pick(drafter.compute_logits(last), seqs)
        drafts = [Draft([int(t)], [q] if q is not None else None) for t, q in zip(tokens.tolist(), qs)]
        active = list(range(len(seqs)))
        for j in range(1, max(num_tokens)):
            keep = [k for k, i in enumerate(active) if num_tokens[i] > j]
            active = [active[k] for k in keep]
            if not active:
                break
            last, tokens = last[keep], tokens[keep]
            spans = [SeqSpan([0], len(seqs[i]) - 2 + j, seqs[i].block_table) for i in active]
            inputs = build_forward_inputs(spans, bs, self.device)
            last, logits = self._chain_step(self.target.embed(tokens), last, inputs)  # [s, H], [s, Vd]
            tokens, qs = self._pick(logits, [seqs[i] for i in active])
            for i, t, q in zip(active, tokens.tolist(), qs):
                drafts[i].tokens.append(int(t))
                if q is not None:
                    drafts[i].q.append(q)
        for d in drafts:
            if d.q is not None:
                d.q = torch.stack(d.q)  # [K, V]
        return drafts

    def _propose_tree(self, seqs: list[Sequence], num_tokens: list[int]) -> list[TreeDraft]:
        """Best-first tree search (spec/tree.py); in-flight node K/V lives in scratch rows."""
        k, per_seq = self.topk, (self.steps - 1) * self.topk
        if len(seqs) * per_seq > self.scratch_slots:
            raise RuntimeError(f"tree drafting for {len(seqs)} sequences needs {len(seqs) * per_seq} "
                               f"drafter scratch slots, the cache has {self.scratch_slots}")
        search = TreeSearch(self.steps, k, num_tokens, [s.params for s in seqs],
                            [s.generator for s in seqs], self.draft_to_target)
        last = self._extend(seqs)  # [S, H]: the drafter's output at position L-2 per sequence
        search.expand([(b, -1) for b in range(len(seqs))], self.drafter.compute_logits(last))
        prefix = [slots_for(s.block_table, 0, len(s) - 1, self.block_size) for s in seqs]  # [L_b - 1]
        for depth in range(1, self.steps):
            front = search.frontier(depth)  # [(b, node)] grouped by b, rank order
            if not front:
                break
            by_seq: dict[int, list[int]] = {}
            for b, i in front:
                by_seq.setdefault(b, []).append(i)
            tail_len = depth * k  # scratch rows of depths 1..depth
            prefixes, tails, masks, writes, positions = [], [], [], [], []
            for b, idx in by_seq.items():
                base = self.scratch_start + b * per_seq
                mask = torch.zeros(len(idx), tail_len, dtype=torch.bool)
                for r, i in enumerate(idx):
                    mask[r, search.ancestor_slots(b, i)] = True
                prefixes.append(prefix[b])
                tails.append(torch.arange(base, base + tail_len))
                masks.append(mask)
                writes.append(torch.tensor([base + search.node(b, i).slot for i in idx]))
                positions += [len(seqs[b]) - 2 + depth] * len(idx)
            front = [(b, i) for b, idx in by_seq.items() for i in idx]
            attn = build_scratch_tree_batch(prefixes, tails, masks, writes, self.device)
            ids = torch.tensor([search.node(b, i).token for b, i in front], device=self.device)
            rows = torch.tensor([search.node(b, i).src_row for b, i in front], device=self.device)
            out = self.drafter(self.target.embed(ids), last.index_select(0, rows),
                               torch.tensor(positions, device=self.device), attn, self.kv_cache)
            search.expand(front, self.drafter.compute_logits(out))
            last = out  # [R, H]: row r is the hidden state of front[r]'s children
        return search.result()


class ReplayProposer(Proposer):
    """Test proposer: drafts from a fixed continuation per request id (e.g. the target's own
    greedy output, for full acceptance), or `wrong` tokens to force rejections."""

    def __init__(self, continuations: dict[str, list[int]], vocab_size: int):
        self.continuations = continuations
        self.vocab_size = vocab_size

    def propose(self, seqs: list[Sequence], num_tokens: list[int], tree: Optional[bool] = None) -> list[Draft]:
        drafts = []
        for seq, k in zip(seqs, num_tokens):
            cont = self.continuations.get(seq.request_id, [])
            done = seq.num_output_tokens
            toks = list(cont[done:done + k])
            toks += [(7 * (done + i) + 3) % self.vocab_size for i in range(k - len(toks))]
            q = None
            if not seq.params.greedy:  # a point-mass drafter: q = one-hot on the draft
                q = torch.zeros(k, self.vocab_size)
                q[torch.arange(k), torch.tensor(toks)] = 1.0
            drafts.append(Draft(toks, q))
        return drafts
