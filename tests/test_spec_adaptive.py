"""The adaptive speculation controller: picks 0 when drafting does not pay, the most drafts when it
pays, the analytic optimum in between; in the engine it stays lossless."""
import random
import time

import pytest

from eyas import SamplingParams
from eyas.errors import ConfigError
from eyas.spec.controller import ControllerConfig, SpecController, bucket_of
from eyas.spec.decoder import SpecDecoder
from eyas.spec.proposer import ReplayProposer
from test_engine import PROMPTS, run_all

PARAMS = SamplingParams(max_tokens=20, ignore_eos=True)


def simulate(ctrl: SpecController, step_time, alpha: float, batch: int = 1, steps: int = 400,
             seed: int = 0) -> list[int]:
    """Drive the controller with injected step times and acceptance at rate alpha per position."""
    rng = random.Random(seed)
    chosen = []
    for _ in range(steps):
        k = ctrl.choose(batch)
        chosen.append(k)
        ctrl.record_time(batch, k, step_time(k))
        for _ in range(batch):
            a = 0
            while a < k and rng.random() < alpha:
                a += 1
            ctrl.record_accept(k, a)
    return chosen


def mostly(chosen: list[int], k: int, share: float = 0.9) -> bool:
    tail = chosen[len(chosen) // 2:]
    return sum(c == k for c in tail) >= share * len(tail)


def test_bucket_of():
    assert [bucket_of(b) for b in (1, 2, 3, 4, 5, 16, 17, 64)] == [1, 2, 4, 4, 8, 16, 32, 64]


def test_expensive_drafting_chooses_zero():
    ctrl = SpecController(ControllerConfig(max_tokens=5))
    chosen = simulate(ctrl, lambda k: 0.020 + 0.030 * k, alpha=0.9)
    assert mostly(chosen, 0)


def test_inaccurate_drafter_chooses_zero():
    ctrl = SpecController(ControllerConfig(max_tokens=5))
    chosen = simulate(ctrl, lambda k: 0.020 + 0.002 * k, alpha=0.02)
    assert mostly(chosen, 0)


def test_cheap_accurate_drafting_chooses_the_most():
    ctrl = SpecController(ControllerConfig(max_tokens=5))
    chosen = simulate(ctrl, lambda k: 0.020 + 0.001 * k, alpha=0.9)
    assert mostly(chosen, 5)


def test_converges_to_the_analytic_optimum():
    alpha, cost = 0.6, (lambda k: 1.0 + 0.35 * k)

    def rate(k):  # expected tokens per second for a chain of k
        return sum(alpha ** i for i in range(k + 1)) / cost(k)

    best = max(range(6), key=rate)
    assert 0 < best < 5  # the setting really has an interior optimum
    ctrl = SpecController(ControllerConfig(max_tokens=5))
    chosen = simulate(ctrl, cost, alpha=alpha, steps=1500)
    assert mostly(chosen, best, share=0.85)
    assert ctrl.alpha(0) == pytest.approx(alpha, abs=0.08)


def test_batch_buckets_decide_separately():
    # drafting pays at batch 1 and not at batch 32 (verify cost grows with batch x k)
    ctrl = SpecController(ControllerConfig(max_tokens=4))
    small = simulate(ctrl, lambda k: 0.020 + 0.0005 * k, alpha=0.8, batch=1)
    large = simulate(ctrl, lambda k: 0.100 + 0.150 * k, alpha=0.8, batch=32)
    assert mostly(small, 4) and mostly(large, 0)


def test_tree_candidates_are_zero_or_the_tree():
    ctrl = SpecController(ControllerConfig(max_tokens=8, tree=True))
    chosen = simulate(ctrl, lambda k: 0.02 + 0.001 * k, alpha=0.9)
    assert set(chosen) <= {0, 8} and mostly(chosen, 8)
    ctrl = SpecController(ControllerConfig(max_tokens=8, tree=True))
    assert mostly(simulate(ctrl, lambda k: 0.02 + 0.02 * k, alpha=0.9), 0)


def test_probes_other_candidates():
    ctrl = SpecController(ControllerConfig(max_tokens=3, probe_every=8, max_probe_every=8))
    chosen = simulate(ctrl, lambda k: 0.020 + 0.030 * k, alpha=0.9, steps=200)
    assert set(chosen[100:]) == {0, 1, 2, 3}  # probes keep every depth's time fresh
    assert sum(c != 0 for c in chosen[100:]) <= 100 / 8 + 1


def test_probes_back_off_while_the_best_holds():
    ctrl = SpecController(ControllerConfig(max_tokens=3, probe_every=8, max_probe_every=64))
    chosen = simulate(ctrl, lambda k: 0.020 + 0.030 * k, alpha=0.9, steps=600)
    # probes at steps 8, 16, 32, 64, then every 64: far fewer than one in 8
    assert sum(c != 0 for c in chosen[200:]) <= 400 / 64 + 1


def test_bad_controller_config():
    with pytest.raises(ConfigError):
        ControllerConfig(max_tokens=0)
    with pytest.raises(ConfigError):
        ControllerConfig(max_tokens=3, probe_every=1)
    with pytest.raises(ConfigError):
        ControllerConfig(max_tokens=3, probe_every=64, max_probe_every=32)


@pytest.fixture(scope="module")
def plain(tiny_engine_factory):
    engine = tiny_engine_factory(enable_prefix_caching=False)
    return {str(i): run_all(engine, [p], PARAMS)["0"] for i, p in enumerate(PROMPTS)}


class Recording(SpecController):
    def __init__(self, config):
        super().__init__(config)
        self.chosen, self.batches = [], []

    def choose(self, batch):
        k = super().choose(batch)
        self.chosen.append(k)
        self.batches.append(batch)
        return k


def test_adaptive_random_drafter_is_lossless_and_backs_off(tiny_engine_factory, tiny_drafter_path, plain):
    engine = tiny_engine_factory(draft=str(tiny_drafter_path), spec_steps=4, spec_policy="adaptive")
    ctrl = engine.spec.controller = Recording(ControllerConfig(4, probe_every=8, max_probe_every=8))
    propose = engine.spec.proposer.propose

    def slow_propose(*args):  # drafting costs at least 30 ms a step, so timing noise can't hide it
        time.sleep(0.03)
        return propose(*args)

    engine.spec.proposer.propose = slow_propose
    for _ in range(2):
        assert run_all(engine, PROMPTS, PARAMS, stagger=2) == plain
    # a random drafter is (almost) never accepted, so plain steps win once measured; the rest
    # are each bucket's first measurements and the probes (1 in 8)
    assert ctrl.alpha(0) < 0.3
    assert sum(k == 0 for k in ctrl.chosen[-40:]) >= 24
    engine.allocator.check_invariants([])


def test_adaptive_replay_drafter_drafts_the_most(tiny_engine_factory, plain):
    engine = tiny_engine_factory()
    ctrl = Recording(ControllerConfig(4, probe_every=8, max_probe_every=8))
    engine.spec = SpecDecoder(engine, ReplayProposer(plain, engine.model.vocab_size), 4, controller=ctrl)
    for _ in range(3):
        outs = run_all(engine, PROMPTS, PARAMS)
        assert outs == plain
    assert ctrl.alpha(0) > 0.9
    decided = [k for k, b in zip(ctrl.chosen, ctrl.batches) if b > 0][3:]  # after exploring
    # 5 tokens per step against 1: drafting wins unless a step is swamped by noise
    assert sum(k == 4 for k in decided) >= 0.5 * len(decided)


def test_adaptive_tree_is_lossless(tiny_engine_factory, tiny_drafter_path, plain):
    engine = tiny_engine_factory(draft=str(tiny_drafter_path), spec_steps=3, spec_topk=2,
                                 spec_draft_tokens=4, spec_policy="adaptive")
    ctrl = engine.spec.controller = Recording(ControllerConfig(4, tree=True, probe_every=4, max_probe_every=4))
    assert run_all(engine, PROMPTS, PARAMS, stagger=2) == plain
    assert set(ctrl.chosen) == {0, 4}
