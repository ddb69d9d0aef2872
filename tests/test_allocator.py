"""Block allocator: refcounts, prefix caching, rollback and invariants under random workloads."""
import random

import pytest

from eyas.core import SamplingParams, Sequence
from eyas.kv.allocator import BlockAllocator
from eyas.scheduler import Scheduler

P = SamplingParams(max_tokens=8)


def make_seq(tokens, rid="r"):
    return Sequence(rid, list(tokens), P)


def test_reserve_all_or_nothing_and_free():
    a = BlockAllocator(4, 4)
    s = make_seq(range(10))
    assert a.reserve(s, 10) and len(s.block_table) == 3
    t = make_seq(range(9), "t")
    assert not a.reserve(t, 9) and t.block_table == []
    assert a.num_free_blocks == 1
    a.free(s)
    assert a.num_free_blocks == 4
    a.check_invariants([])


def test_prefix_cache_hit_shares_blocks_and_leaves_one_token():
    a = BlockAllocator(16, 4)
    s = make_seq(range(12))
    assert a.match_prefix(s) == 0
    a.reserve(s, 12)
    s.num_computed_tokens = 12
    a.commit(s)
    assert s.num_hashed_blocks == 3
    t = make_seq(range(12), "t")
    # 12 tokens = 3 full blocks, but one token must stay uncomputed -> 2 blocks reused.
    assert a.match_prefix(t) == 8
    assert t.block_table == s.block_table[:2]
    assert a.ref_counts[s.block_table[0]] == 2
    a.check_invariants([s, t])
    u = make_seq([0, 1, 2, 3, 9, 9, 9, 9, 9], "u")  # diverges in block 1
    assert a.match_prefix(u) == 4
    a.check_invariants([s, t, u])


def test_freed_hashed_blocks_survive_until_reused_lru():
    a = BlockAllocator(4, 2)
    s = make_seq(range(5))
    a.reserve(s, 5)
    s.num_computed_tokens = 5
    a.commit(s)
    a.free(s)
    assert a.num_free_blocks == 4
    r = make_seq(range(5), "r")
    assert a.match_prefix(r) == 4  # both full blocks found again after free
    a.free(r)
    # Take every block: cached contents get evicted, no stale hash remains.
    x = make_seq(range(100, 108), "x")
    assert a.reserve(x, 8)
    assert a.hash_to_block == {}
    a.check_invariants([x])


def test_truncate_rolls_back_lookahead():
    a = BlockAllocator(8, 4)
    s = make_seq(range(5))
    a.reserve(s, 5 + 6)  # tokens + lookahead -> 3 blocks
    assert len(s.block_table) == 3
    a.truncate(s, 6)
    assert len(s.block_table) == 2 and a.num_free_blocks == 6
    a.check_invariants([s])


def test_double_free_detected():
    a = BlockAllocator(2, 2)
    s = make_seq(range(3))
    a.reserve(s, 3)
    blocks = list(s.block_table)
    a.free(s)
    s.block_table = blocks
    with pytest.raises(RuntimeError):
        a.free(s)


@pytest.mark.parametrize("seed", range(5))
def test_random_workload_through_scheduler_keeps_invariants(seed):
    """Add/abort/finish at random, with lookahead and preemption; simulate model steps."""
    rng = random.Random(seed)
    a = BlockAllocator(24, 4)
    sched = Scheduler(a, max_num_seqs=6, max_num_batched_tokens=20, max_model_len=40)
    live = {}
    shared_prefix = [7] * 8
    for step in range(300):
        if rng.random() < 0.3 and len(live) < 10:
            rid = f"q{step}"
            prompt = (shared_prefix if rng.random() < 0.5 else []) + [rng.randrange(50) for _ in range(rng.randrange(1, 12))]
            seq = Sequence(rid, prompt, SamplingParams(max_tokens=rng.randrange(1, 15)))
            live[rid] = seq
            sched.add(seq)
        if live and rng.random() < 0.05:
            rid = rng.choice(list(live))
            sched.abort(live.pop(rid))
        plan = sched.schedule(lookahead=rng.choice([0, 0, 3]))
        for it in plan.items:
            seq = it.seq
            seq.num_computed_tokens += it.num_new_tokens
            if it.sample:
                accepted = rng.randrange(0, it.num_draft_tokens + 1)
                seq.num_computed_tokens += accepted
                seq.token_ids.extend(rng.randrange(50) for _ in range(accepted + 1))
                a.truncate(seq, len(seq))
                if seq.num_output_tokens >= seq.params.max_tokens or len(seq) >= 40:
                    sched.finish(seq)
                    live.pop(seq.request_id)
                    continue
            a.commit(seq)
        a.check_invariants(sched.running + list(sched.waiting))
    for seq in list(live.values()):
        sched.abort(seq)
    a.check_invariants([])
    assert a.num_free_blocks == a.num_blocks
