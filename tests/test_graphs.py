"""Compiled decode/verify steps (and the drafter's chain steps) on padded buckets give the eager
engine's output (greedy)."""
import pytest
import torch

from eyas import SamplingParams
from eyas.workers.graphs import batch_buckets, pad_inputs, pad_rows, round_up
from eyas.workers.input_batch import SeqSpan, build_forward_inputs
from test_engine import PROMPTS, run_all

PARAMS = SamplingParams(max_tokens=12, ignore_eos=True)
DRAFT = dict(spec_steps=3, spec_policy="fixed")
COMPILED = dict(eager=False, compile_backend="aot_eager", compile_warmup=False, max_num_seqs=4)


def test_buckets():
    assert batch_buckets(1) == [1]
    assert batch_buckets(5) == [1, 2, 4, 8]
    assert batch_buckets(64) == [1, 2, 4, 8, 16, 32, 64]
    assert round_up(1, 256) == 256 and round_up(257, 256) == 512


def test_pad_inputs_keeps_real_rows_and_isolates_padding():
    spans = [SeqSpan([5, 6], 3, [0, 1]), SeqSpan([7, 8], 9, [2, 3, 4])]
    inputs = build_forward_inputs(spans, 4)
    pad_slot = 99
    p = pad_inputs(inputs, q=2, batch=4, kv_len=16, pad_slot=pad_slot)
    assert p.input_ids.tolist() == [5, 6, 7, 8, 0, 0, 0, 0]
    assert p.attn.slot_mapping.tolist()[:4] == inputs.attn.slot_mapping.tolist()
    assert p.attn.slot_mapping.tolist()[4:] == [pad_slot] * 4  # padded tokens write the pad slot
    k_max = inputs.attn.kv_slots.shape[1]  # 11 keys for the longer sequence
    assert torch.equal(p.attn.mask[:2, :, :, :k_max], inputs.attn.mask)
    assert not p.attn.mask[:2, :, :, k_max:].any()  # added keys are masked for real sequences
    assert (p.attn.kv_slots[:, k_max:] == pad_slot).all()
    assert p.attn.mask[2:, :, :, 0].all() and not p.attn.mask[2:, :, :, 1:].any()
    assert (p.attn.kv_slots[2:] == pad_slot).all()


def test_pad_rows():
    x = torch.arange(6.0).view(3, 2)  # [3, 2]
    assert torch.equal(pad_rows(x, 5), torch.cat([x, torch.zeros(2, 2)]))
    assert pad_rows(x, 3) is x
    assert pad_rows(torch.tensor([4, 5]), 4, value=9).tolist() == [4, 5, 9, 9]


@pytest.fixture(scope="module")
def eager_out(tiny_engine_factory):
    return run_all(tiny_engine_factory(), PROMPTS[:3], PARAMS, stagger=1)


def test_compiled_steps_equal_eager(tiny_engine_factory, eager_out):
    # aot_eager traces and replays the same graphs without C++ codegen: fast on a 2-core CPU
    engine = tiny_engine_factory(eager=False, compile_backend="aot_eager", compile_warmup=False,
                                 max_num_seqs=4)
    assert engine.compiled and engine.runner.graphs is not None
    assert run_all(engine, PROMPTS[:3], PARAMS, stagger=1) == eager_out
    seen = engine.runner.graphs.seen
    assert {b for b, _, _ in seen} >= {1, 2, 4}  # batches 1, 2 and 3 (padded to 4) ran compiled
    assert all(q == 1 and k % 256 == 0 for _, q, k in seen)
    engine.allocator.check_invariants([])


def test_compiled_verify_equals_eager(tiny_engine_factory, tiny_drafter_path, eager_out):
    engine = tiny_engine_factory(draft=str(tiny_drafter_path), **DRAFT, **COMPILED)
    assert run_all(engine, PROMPTS[:3], PARAMS, stagger=1) == eager_out
    assert any(q == 4 for _, q, _ in engine.runner.graphs.seen)  # verify steps: 3 drafts + 1


def record_drafts(engine) -> list[list[list[int]]]:
    """Record the draft tokens of every propose call of the engine's proposer: [call][seq][K]."""
    proposer, calls = engine.spec.proposer, []
    propose = proposer.propose

    def recording(seqs, num_tokens, tree=None):
        drafts = propose(seqs, num_tokens, tree=tree)
        calls.append([d.tokens for d in drafts])
        return drafts

    proposer.propose = recording
    return calls


def run_with_drafts(engine) -> tuple[dict, list]:
    calls = record_drafts(engine)
    return run_all(engine, PROMPTS[:3], PARAMS, stagger=1), calls


@pytest.fixture(scope="module")
def eager_draft_out(tiny_engine_factory, tiny_drafter_path):
    engine = tiny_engine_factory(draft=str(tiny_drafter_path), **DRAFT)
    assert engine.spec.proposer.graphs is None
    return run_with_drafts(engine)


def test_compiled_draft_steps_equal_eager(tiny_engine_factory, tiny_drafter_path, eager_draft_out):
    engine = tiny_engine_factory(draft=str(tiny_drafter_path), **DRAFT, **COMPILED)
    graphs = engine.spec.proposer.graphs
    assert graphs is not None
    assert run_with_drafts(engine) == eager_draft_out  # same tokens, and the same drafts
    assert {b for b, _, _ in graphs.seen} >= {1, 2, 4}  # 1, 2 and 3 (padded to 4) drafting sequences
    assert all(q == 1 and k % 256 == 0 for _, q, k in graphs.seen)


def test_draft_warm_up_writes_only_the_pad_slot(tiny_engine_factory, tiny_drafter_path):
    engine = tiny_engine_factory(draft=str(tiny_drafter_path), **DRAFT, **{**COMPILED, "max_num_seqs": 2})
    proposer, blocks, bs = engine.spec.proposer, engine.num_blocks, engine.config.block_size
    k_cache, v_cache = proposer.kv_cache  # [blocks + 1 pad block, Bs, Hkv, D] each
    assert k_cache.shape[0] == blocks + 1 and proposer.graphs.pad_slot == blocks * bs
    assert proposer.warm_up() == 2 and proposer.graphs.seen == {(1, 1, 256), (2, 1, 256)}
    for cache in (k_cache, v_cache):
        flat = cache.view(-1, *cache.shape[2:])  # [slots, Hkv, D]
        assert not flat[:blocks * bs].any() and flat[blocks * bs].any()  # pad slot only


def test_tree_drafts_stay_eager(tiny_engine_factory, tiny_drafter_path):
    engine = tiny_engine_factory(draft=str(tiny_drafter_path), spec_steps=3, spec_topk=2, spec_policy="fixed",
                                 **COMPILED)
    assert engine.spec.proposer.graphs is None and engine.runner.graphs is not None


def test_adaptive_trees_compile_the_chain_steps_they_also_pick(tiny_engine_factory, tiny_drafter_path):
    engine = tiny_engine_factory(draft=str(tiny_drafter_path), spec_steps=3, spec_topk=2, **COMPILED)
    proposer = engine.spec.proposer
    assert proposer.graphs is not None and engine.spec.controller.config.chains == 3
    # the pad slot lies past the tree scratch rows, which still hold every sequence's in-flight nodes
    assert proposer.graphs.pad_slot >= proposer.scratch_start + engine.config.max_num_seqs * (3 - 1) * 2


def test_eager_env_turns_compiling_off(tiny_engine_factory, monkeypatch):
    monkeypatch.setenv("EYAS_EAGER", "1")
    engine = tiny_engine_factory(eager=False, compile_backend="aot_eager")
    assert not engine.compiled and engine.runner.graphs is None


@pytest.mark.slow
def test_inductor_steps_equal_eager(tiny_engine_factory, eager_out):
    engine = tiny_engine_factory(eager=False, compile_warmup=False, max_num_seqs=4)
    assert run_all(engine, PROMPTS[:3], PARAMS, stagger=1) == eager_out
