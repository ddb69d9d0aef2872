"""Compiled decode/verify steps on padded buckets give the eager engine's output (greedy)."""
import pytest
import torch

from eyas import SamplingParams
from eyas.workers.graphs import batch_buckets, pad_inputs, round_up
from eyas.workers.input_batch import SeqSpan, build_forward_inputs
from test_engine import PROMPTS, run_all

PARAMS = SamplingParams(max_tokens=12, ignore_eos=True)


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
    engine = tiny_engine_factory(draft=str(tiny_drafter_path), spec_steps=3, spec_policy="fixed",
                                 eager=False, compile_backend="aot_eager", compile_warmup=False,
                                 max_num_seqs=4)
    assert run_all(engine, PROMPTS[:3], PARAMS, stagger=1) == eager_out
    assert any(q == 4 for _, q, _ in engine.runner.graphs.seen)  # verify steps: 3 drafts + 1


def test_eager_env_turns_compiling_off(tiny_engine_factory, monkeypatch):
    monkeypatch.setenv("EYAS_EAGER", "1")
    engine = tiny_engine_factory(eager=False, compile_backend="aot_eager")
    assert not engine.compiled and engine.runner.graphs is None


@pytest.mark.slow
def test_inductor_steps_equal_eager(tiny_engine_factory, eager_out):
    engine = tiny_engine_factory(eager=False, compile_warmup=False, max_num_seqs=4)
    assert run_all(engine, PROMPTS[:3], PARAMS, stagger=1) == eager_out
