"""Greedy speculative decoding is lossless: output equals plain decoding, token for token, with a
random drafter (almost nothing accepted), with a replay drafter (everything accepted), across
staggered batches, block boundaries, preemption, prefix-cache hits and aborts."""
import pytest

from eyas import SamplingParams
from eyas.spec.decoder import SpecDecoder
from eyas.spec.proposer import ReplayProposer
from test_engine import PROMPTS, run_all

PARAMS = SamplingParams(max_tokens=20, ignore_eos=True)


@pytest.fixture(scope="module")
def plain(tiny_engine_factory):
    engine = tiny_engine_factory(enable_prefix_caching=False)
    return {str(i): run_all(engine, [p], PARAMS)["0"] for i, p in enumerate(PROMPTS)}


@pytest.mark.parametrize("steps", [1, 3, 5])
def test_eagle3_random_drafter_equals_plain(tiny_engine_factory, tiny_drafter_path, plain, steps):
    engine = tiny_engine_factory(draft=str(tiny_drafter_path), spec_steps=steps)
    assert run_all(engine, PROMPTS, PARAMS, stagger=2) == plain
    assert engine.drafter is not None


def test_eagle3_with_preemption_and_prefix_cache(tiny_engine_factory, tiny_drafter_path, plain):
    engine = tiny_engine_factory(draft=str(tiny_drafter_path), spec_steps=4, num_kv_blocks=16,
                                 max_model_len=48)
    assert run_all(engine, PROMPTS, PARAMS) == plain
    assert engine.scheduler.num_preemptions > 0
    hits = engine.allocator.prefix_hits
    assert run_all(engine, PROMPTS, PARAMS) == plain
    assert engine.allocator.prefix_hits > hits


def replay_engine(factory, plain, steps, **kw):
    engine = factory(**kw)
    engine.spec = SpecDecoder(engine, ReplayProposer(plain, engine.model.vocab_size), steps)
    return engine


def test_replay_drafter_accepts_everything(tiny_engine_factory, plain):
    engine = replay_engine(tiny_engine_factory, plain, steps=4)
    outs = {}
    for i, p in enumerate(PROMPTS):
        engine.add_request(str(i), p, PARAMS)
    while engine.has_unfinished():
        for o in engine.step():
            if o.finished:
                outs[o.id] = o
    for rid, out in outs.items():
        assert out.token_ids == plain[rid]
        # 1 prefill step, then 5 tokens per verify step: 20 tokens in 1 + ceil(19 / 5) steps
        assert out.spec.target_steps == 5
        # 4 verify steps x 4 drafts, all accepted (the last step's bonus falls past max_tokens)
        assert out.spec.drafted == out.spec.accepted == 16
        assert out.spec.accept_len == pytest.approx(20 / 5)
    engine.allocator.check_invariants([])
    assert engine.allocator.num_free_blocks == engine.allocator.num_blocks


def test_replay_wrong_drafts_rejected(tiny_engine_factory, plain):
    wrong = {k: [(t + 1) % 1000 for t in v] for k, v in plain.items()}
    engine = replay_engine(tiny_engine_factory, wrong, steps=3)
    assert run_all(engine, PROMPTS, PARAMS, stagger=1) == plain


def test_abort_mid_speculation_frees_blocks(tiny_engine_factory, tiny_drafter_path):
    engine = tiny_engine_factory(draft=str(tiny_drafter_path), spec_steps=3)
    for i, p in enumerate(PROMPTS):
        engine.add_request(str(i), p, SamplingParams(max_tokens=60, ignore_eos=True))
    for _ in range(4):
        engine.step()
    for i in range(len(PROMPTS)):
        engine.abort(str(i))
    engine.allocator.check_invariants([])
    assert engine.allocator.num_free_blocks == engine.allocator.num_blocks
    assert not engine.spec.proposer.states


def test_spec_stats_reported(tiny_engine_factory, tiny_drafter_path):
    engine = tiny_engine_factory(draft=str(tiny_drafter_path), spec_steps=2, spec_policy="fixed")
    engine.add_request("x", PROMPTS[0], PARAMS)
    final = None
    while engine.has_unfinished():
        for o in engine.step():
            final = o
    d = final.to_dict()["spec"]
    assert d["drafted"] >= 2 * (d["target_steps"] - 1)
    assert d["accept_len"] == pytest.approx(20 / d["target_steps"], abs=1e-3)
