"""The one block allocator: refcounted blocks, an LRU free queue and hash-chained prefix caching.

Every worker's KV cache (each target layer, each shard, the drafter's layer) has the same
number of blocks of the same size, so a block id handed out here is valid everywhere.

Prefix caching: a *full* block whose KV is computed gets a hash chained over its tokens and
its predecessor's hash, hash_i = hash((hash_{i-1}, tokens of block i)). A freed hashed block
stays findable until it is handed out again (LRU among free blocks), so a later request with
the same prefix, or a preempted request being recomputed, reuses it.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Iterable, Optional

from eyas.core import Sequence


class BlockAllocator:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.hash_to_block: dict[int, int] = {}
        # Free blocks in eviction order (oldest first); value unused.
        self.free_queue: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self.prefix_hits = 0  # tokens served from the cache (stats)
        self.prefix_queries = 0

    # ----------------------------------------------------------------- queries
    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_reserve(self, seq: Sequence, num_tokens: int) -> bool:
        return self.blocks_needed(num_tokens) - len(seq.block_table) <= self.num_free_blocks

    # -------------------------------------------------------------- allocation
    def _take_free_block(self) -> int:
        block, _ = self.free_queue.popitem(last=False)
        old = self.block_hash[block]
        if old is not None:  # evict its cached contents
            self.block_hash[block] = None
            if self.hash_to_block.get(old) == block:
                del self.hash_to_block[old]
        self.ref_counts[block] = 1
        return block

    def _release(self, block: int) -> None:
        self.ref_counts[block] -= 1
        if self.ref_counts[block] < 0:
            raise RuntimeError(f"block {block} freed twice")
        if self.ref_counts[block] == 0:
            self.free_queue[block] = None

    def match_prefix(self, seq: Sequence) -> int:
        """For a sequence with no blocks yet: attach cached blocks of its prompt prefix.

        Returns the number of tokens whose KV is reused. At least one token is always left to
        compute, so the step still produces logits for the last token.
        """
        if seq.block_table:
            raise RuntimeError(f"sequence {seq.request_id} already holds blocks")
        seq.block_hashes = []
        seq.num_hashed_blocks = 0
        if not self.enable_prefix_caching:
            return 0
        bs = self.block_size
        max_blocks = (len(seq.token_ids) - 1) // bs
        prev = None
        self.prefix_queries += len(seq.token_ids)
        for i in range(max_blocks):
            h = hash((prev, tuple(seq.token_ids[i * bs:(i + 1) * bs])))
            block = self.hash_to_block.get(h)
            if block is None:
                break
            if self.ref_counts[block] == 0:
                del self.free_queue[block]
            self.ref_counts[block] += 1
            seq.block_table.append(block)
            seq.block_hashes.append(h)
            prev = h
        seq.num_hashed_blocks = len(seq.block_table)
        num_cached = len(seq.block_table) * bs
        seq.num_computed_tokens = num_cached
        seq.num_cached_tokens = num_cached
        self.prefix_hits += num_cached
        return num_cached

    def reserve(self, seq: Sequence, num_tokens: int) -> bool:
        """Make seq.block_table cover `num_tokens` slots (real tokens plus lookahead).

        All or nothing: returns False and changes nothing if there are not enough free blocks.
        """
        need = self.blocks_needed(num_tokens) - len(seq.block_table)
        if need <= 0:
            return True
        if need > self.num_free_blocks:
            return False
        seq.block_table.extend(self._take_free_block() for _ in range(need))
        return True

    def commit(self, seq: Sequence, limit: Optional[int] = None) -> None:
        """Register the hashes of full blocks whose KV is computed (call after each step).

        `limit`: only positions below it count as computed in every cache (with speculation,
        the drafter's KV lags the target's by the tokens it has not yet extended over).
        """
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        computed = seq.num_computed_tokens if limit is None else min(limit, seq.num_computed_tokens)
        full = min(computed, len(seq.token_ids)) // bs
        for i in range(seq.num_hashed_blocks, full):
            prev = seq.block_hashes[i - 1] if i else None
            h = hash((prev, tuple(seq.token_ids[i * bs:(i + 1) * bs])))
            seq.block_hashes.append(h)
            block = seq.block_table[i]
            if h not in self.hash_to_block:
                self.hash_to_block[h] = block
                self.block_hash[block] = h
        seq.num_hashed_blocks = max(seq.num_hashed_blocks, full)

    def truncate(self, seq: Sequence, num_tokens: int) -> None:
        """Roll back: keep only the blocks needed for `num_tokens` slots, free the rest."""
        keep = self.blocks_needed(num_tokens)
        if keep < seq.num_hashed_blocks:
            raise RuntimeError("cannot truncate into prefix-cached blocks")
        while len(seq.block_table) > keep:
            self._release(seq.block_table.pop())

    def free(self, seq: Sequence) -> None:
        """Drop all of a sequence's blocks (finish, abort or preemption)."""
        # Release in reverse so a sequence's tail is evicted before its (more shareable) head.
        for block in reversed(seq.block_table):
            self._release(block)
        seq.block_table = []
        seq.block_hashes = []
        seq.num_hashed_blocks = 0
        seq.num_computed_tokens = 0

    # -------------------------------------------------------------- invariants
    def check_invariants(self, live: Iterable[Sequence]) -> None:
        """Raise if any block is leaked, double-owned beyond its refcount, or miscounted."""
        counts = [0] * self.num_blocks
        for seq in live:
            if len(set(seq.block_table)) != len(seq.block_table):
                raise AssertionError(f"{seq.request_id} holds a block twice")
            for b in seq.block_table:
                counts[b] += 1
        for b in range(self.num_blocks):
            if counts[b] != self.ref_counts[b]:
                raise AssertionError(f"block {b}: refcount {self.ref_counts[b]} but {counts[b]} owners")
            if self.ref_counts[b] < 0:
                raise AssertionError(f"block {b}: negative refcount")
            if (self.ref_counts[b] == 0) != (b in self.free_queue):
                raise AssertionError(f"block {b}: refcount {self.ref_counts[b]} but free={b in self.free_queue}")
        for h, b in self.hash_to_block.items():
            if self.block_hash[b] != h:
                raise AssertionError(f"hash map points at block {b} which holds another hash")
