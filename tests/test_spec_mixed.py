"""Chains and trees in one adaptive candidate set (spec_topk > 1 with the adaptive policy): the
controller keys chains as -k and trees as +m, learns each family's acceptance on its own, picks
the shape that pays at each batch size, and the engine stays lossless switching between them."""
import random

import pytest

from eyas.config import SpecConfig
from eyas.errors import ConfigError
from eyas.spec.controller import ControllerConfig, SpecController
from eyas.spec.tree import TreeDraft
from test_engine import PROMPTS, run_all
from test_spec_adaptive import PARAMS, Recording, plain  # noqa: F401 (fixture)


def test_mixed_candidate_keys():
    ctrl = SpecController(ControllerConfig(max_tokens=8, tree=True, chains=3))
    assert ctrl.candidates == [0, 2, 4, 6, 8, -1, -2, -3]
    assert [ctrl.is_tree(k) for k in (0, -2, 4)] == [False, False, True]
    with pytest.raises(ConfigError, match="only with tree"):
        ControllerConfig(max_tokens=5, chains=2)
    # the engine's lookahead covers the longest of either shape
    spec = SpecConfig(draft="d", steps=5, topk=4, draft_tokens=3)
    assert spec.mixed and spec.num_draft_tokens == 5
    assert not SpecConfig(draft="d", steps=5, topk=4, policy="fixed").mixed


def test_each_family_learns_its_own_acceptance():
    ctrl = SpecController(ControllerConfig(max_tokens=4, tree=True, chains=3))
    for _ in range(200):
        ctrl.record_accept(3, 0, tree=False)  # chains: never accepted
        ctrl.record_accept(4, 3, [0, 1, 2], tree=True)  # trees: three of four nodes (their ranks)
    assert ctrl.expected_tokens(-3) == pytest.approx(1.0, abs=0.05)
    assert ctrl.expected_tokens(4) == pytest.approx(4.0, abs=0.01)
    assert ctrl.expected_tokens(2) == pytest.approx(3.0, abs=0.01)  # the path's ranks < 2


def test_an_unmeasured_key_lies_on_its_own_familys_line():
    ctrl = SpecController(ControllerConfig(max_tokens=8, tree=True, chains=3, by_context=False))
    for _ in range(3):
        for key, t in ((0, 0.020), (-1, 0.022), (-3, 0.026), (4, 0.040)):
            ctrl.record_time(1, key, t)
    # chains: 20 ms + 2 ms a token; -2 sits on that line, not pulled toward the dear tree
    assert ctrl.step_time(1, -2) == pytest.approx(0.024)
    # trees: the line through plain (0 rows) and the 4-node tree: 5 ms a node
    assert ctrl.step_time(1, 2) == pytest.approx(0.030)


def simulate_mixed(ctrl: SpecController, step_time, batch: int, steps: int, alpha: float = 0.6,
                   seed: int = 0) -> list[int]:
    """Injected times; chains accept position j at rate alpha, trees of m >= 4 nodes three
    tokens, smaller ones two (at most m)."""
    rng = random.Random(seed)
    chosen = []
    for _ in range(steps):
        key = ctrl.choose(batch)
        chosen.append(key)
        t = step_time(key)
        ctrl.record_time(batch, key, t)
        ctrl.record_step(t)
        for _ in range(batch if key else 0):
            if ctrl.is_tree(key):
                got = min(key, 3 if key >= 4 else 2)
                ctrl.record_accept(key, got, list(range(got)), tree=True)
            else:
                a = 0
                while a < -key and rng.random() < alpha:
                    a += 1
                ctrl.record_accept(-key, a, tree=False)
    return chosen


def test_picks_a_tree_at_batch_one_and_a_chain_where_trees_verify_dear():
    ctrl = SpecController(ControllerConfig(max_tokens=8, tree=True, chains=3))
    # batch 1: 20 ms + 1 ms a row for both shapes -> the 4-node tree (4 tokens in 24 ms)
    one = simulate_mixed(ctrl, lambda key: 0.020 + 0.001 * abs(key), batch=1, steps=600)
    # batch 4: a tree step costs 40 ms + 5 ms a node (masked attention, the search), a chain
    # 20 ms + 2 ms a token -> the 3-token chain (2.18 tokens in 26 ms against 4 in 60 ms)
    four = simulate_mixed(ctrl, lambda key: 0.040 + 0.005 * key if key > 0 else 0.020 + 0.002 * -key,
                          batch=4, steps=600)
    tail = lambda c: c[len(c) // 2:]  # noqa: E731
    assert tail(one).count(4) >= 0.8 * len(tail(one))
    assert tail(four).count(-3) >= 0.8 * len(tail(four))
    assert ctrl.best[1] == 4 and ctrl.best[4] == -3


class Cycling(Recording):
    """Runs every candidate in turn (plain, chains and trees), recording what it picked."""

    def choose(self, batch):
        key = self.candidates[len(self.chosen) % len(self.candidates)]
        self.chosen.append(key)
        self.batches.append(batch)
        self.draft_seqs = None
        return key


def test_switching_between_chains_and_trees_is_lossless(tiny_engine_factory, tiny_drafter_path, plain):  # noqa: F811
    engine = tiny_engine_factory(draft=str(tiny_drafter_path), spec_steps=3, spec_topk=2,
                                 spec_draft_tokens=4, spec_policy="adaptive")
    assert engine.spec.controller.config.chains == 3 and engine.spec.num_steps == 4
    ctrl = engine.spec.controller = Cycling(ControllerConfig(4, tree=True, chains=3))
    shapes = []
    propose = engine.spec.proposer.propose

    def recording(seqs, num_tokens, tree=None):
        drafts = propose(seqs, num_tokens, tree=tree)
        shapes.extend((isinstance(d, TreeDraft), len(d.tokens) if not isinstance(d, TreeDraft) else None)
                      for d in drafts)
        return drafts

    engine.spec.proposer.propose = recording
    assert run_all(engine, PROMPTS, PARAMS, stagger=2) == plain
    assert {k for k in ctrl.chosen if k < 0} == {-1, -2, -3} and {k for k in ctrl.chosen if k > 0} == {1, 2, 3, 4}
    assert any(tree for tree, _ in shapes) and {n for tree, n in shapes if not tree} == {1, 2, 3}
    # both families learnt from what they verified
    assert ctrl.tree_tokens and sum(ctrl.reached) > 0



def test_controller_sim_reaches_the_best_fixed_shape_on_a_quiet_machine():
    from util_scripts import load_script

    sim = load_script("bench/controller_sim.py")
    cfg = ControllerConfig(max_tokens=8, tree=True, chains=5, by_context=False)
    run = lambda **kw: sim.simulate(cfg, batch=4, steps=1500, noise=0.0, spell=1.0, seed=0, **kw)  # noqa: E731
    adaptive, best, plain_rate = run(), run(fixed=-2), run(fixed=0)["rate"]
    assert best["rate"] > 1.3 * plain_rate  # the 2-token chain is the shape that pays at batch 4
    assert adaptive["rate"] > 0.93 * best["rate"]
    steps = sum(adaptive["choices"].values())
    assert adaptive["choices"][-2] > 0.8 * steps and adaptive["choices"].get(0, 0) < 0.06 * steps
    # a replayed trace of a quiet machine is the quiet machine
    assert run(trace=[1.0] * 50) == adaptive


def test_controller_sim_runs_chains_only_with_few_sequence_probes():
    from util_scripts import load_script

    sim = load_script("bench/controller_sim.py")
    cfg = ControllerConfig(max_tokens=5)  # the CPU default: chains of 0..5

    def run(batch, **kw):
        return sim.simulate(cfg, batch=batch, steps=1500, noise=0.0, spell=1.0, seed=0, **kw)

    adaptive, best = run(4), run(4, fixed=2)  # keys are chain lengths here
    assert adaptive["rate"] > 0.93 * best["rate"] and adaptive["choices"][2] > 0.8 * 1500
    # batch 64: drafting loses (one token 1.6x a plain step for 1.55 tokens); probes draft for 4
    # sequences only and keep one token each, so the controller stays close to plain decoding
    plain, adaptive = run(64, fixed=0)["rate"], run(64)
    assert adaptive["choices"][0] > 0.95 * 1500 and adaptive["rate"] > 0.97 * plain


def test_noise_trace_replays_a_slow_spell():
    from util_scripts import load_script

    sim = load_script("bench/controller_sim.py")
    cfg = ControllerConfig(max_tokens=8, tree=True, chains=5)
    run = lambda trace: sim.simulate(cfg, batch=1, steps=200, noise=0.0, spell=1.0, seed=3, fixed=0,  # noqa: E731
                                     trace=trace)
    # plain steps only: the same tokens, so the rate falls by the trace's mean slowdown
    assert run([2.0] * 7)["rate"] == pytest.approx(run([1.0] * 7)["rate"] / 2)
