"""Continuous batching under one token budget (no separate prefill and decode phases).

Each step: running sequences first, oldest first; each gets its remaining tokens (1 when
decoding, a chunk when prefilling) plus, when decoding with speculation, `lookahead` draft
slots. When blocks run out, the newest running sequence is preempted (its blocks freed, to be
recomputed later; the prefix cache usually makes that cheap). Then waiting sequences are
admitted while budget, free blocks and max_num_seqs allow.
"""
from __future__ import annotations

from collections import deque
from typing import Optional

from eyas.core import ScheduledSeq, Sequence, SeqStatus, StepPlan
from eyas.kv.allocator import BlockAllocator


class Scheduler:
    def __init__(self, allocator: BlockAllocator, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int, enable_chunked_prefill: bool = True):
        self.allocator = allocator
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.enable_chunked_prefill = enable_chunked_prefill
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = SeqStatus.WAITING
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def abort(self, seq: Sequence) -> None:
        """Remove a sequence wherever it is and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.allocator.free(seq)

    def finish(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.allocator.free(seq)

    def _preempt(self, seq: Sequence) -> None:
        self.allocator.free(seq)
        seq.status = SeqStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def _chunk(self, remaining: int, budget: int) -> int:
        if remaining <= budget:
            return remaining
        return budget if self.enable_chunked_prefill else 0

    def schedule(self, lookahead: int = 0) -> StepPlan:
        """Pick this step's work. `lookahead`: draft tokens to verify per decoding sequence."""
        plan = StepPlan()
        budget = self.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            remaining = len(seq) - seq.num_computed_tokens
            n = self._chunk(remaining, budget)
            if n == 0:
                break
            drafts = 0
            if remaining == 1 and lookahead:
                drafts = max(0, min(lookahead, budget - 1, self.max_model_len - len(seq)))
            scheduled = self._reserve_or_preempt(seq, seq.num_computed_tokens + n + drafts, plan)
            if not scheduled:
                break
            plan.items.append(ScheduledSeq(seq, n, sample=(n == remaining), num_draft_tokens=drafts))
            budget -= n + drafts
            i += 1

        if plan.preempted:
            return plan
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not seq.block_table:
                self.allocator.match_prefix(seq)
            remaining = len(seq) - seq.num_computed_tokens
            n = self._chunk(remaining, budget)
            if n == 0 or not self.allocator.reserve(seq, seq.num_computed_tokens + n):
                self.allocator.free(seq)  # give back prefix-cache hits; retry next step
                break
            self.waiting.popleft()
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            plan.items.append(ScheduledSeq(seq, n, sample=(n == remaining)))
            budget -= n
        return plan

    def _reserve_or_preempt(self, seq: Sequence, num_slots: int, plan: StepPlan) -> bool:
        """Reserve slots for seq, preempting the newest running sequences as needed.

        Returns False if seq itself had to be preempted.
        """
        while not self.allocator.reserve(seq, num_slots):
            victim: Optional[Sequence] = self.running.pop()
            self._preempt(victim)
            plan.preempted.append(victim)
            if victim is seq:
                return False
        return True
