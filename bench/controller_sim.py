"""The adaptive controller offline: injected step times with a noisy machine, sampled acceptance.

    python bench/controller_sim.py [--batch 4] [--steps 3000] [--seeds 8] [--noise 0.1]
                                   [--spell 1.3] [--trace FILE] [--set key=value ...]

Drives `SpecController` (chains and trees in one candidate set, as with `--spec-topk 4
--spec-draft-tokens 8`) the way the decoder does, with no model: each step's time is a shape's
base time (relative to a plain step, from this project's CPU measurements below) times
multiplicative noise (lognormal, sigma `--noise`) times a slow-spell factor (`--spell`, on for
runs of about 150 steps a quarter of the time), or with `--trace` a real machine's plain-step
times replayed in order (each seed from its own offset); a step's time also grows with the
context of its wave of requests (`ELASTICITY` per batch), which the controller's context line
sees. Acceptance is sampled per sequence, with per-request difficulty (a request of 64 steps
scales the rates by 0.7-1.2).

`bench/noise/cpu-plain-c4-2026-12-06.json` is such a trace: 2,032 plain decode steps at batch 4
on this project's 2-core CPU (median 23.3 ms), taken in one closed loop. Its slowdowns come in
runs (autocorrelation of log time 0.83 at lag 1, 0.52 at 10, 0.25 at 50 steps; 15% of the steps
above 1.25x the median, 5% above 1.47x), unlike the independent noise of --noise. Replayed, the
simulated controller (windows of its last 5 samples, before `span`) ran 17% plain steps at batch 1 and 40% at batch 4, as the real bench did
(19% and 31%), against 6% and 23% under --noise 0.1 --spell 1.3. Prints the realised
tokens per unit time against plain decoding and against the best fixed shape (the oracle), and
which keys were chosen. Decisions on noisy samples are what this measures; what it leaves out:
the drafter's catch-up after plain steps and the closed loop's prefills. A probe the controller
runs for a few sequences (`draft_seqs`) drafts for that many only, keeps one token per sequence
and gives no time sample, as the decoder's do. `--chains-only` runs the CPU default's candidates
(chains of 0..5 tokens) instead of chains and trees.

Base step times relative to a plain step (fixed shapes on the bench prompts, 2026-12-06):
batch 1: chain k 1.10 + 0.08 k (K=2 1.26, K=3 1.34 measured 1.36, K=5 1.50), tree m 1.24 + 0.03 m
(4 nodes 1.29 measured); batch 4: chains 1.19, 1.29, 1.53, 2.05, 2.04 (k = 1..5), trees of 2, 4, 6,
8 nodes 1.48, 2.09, 2.5, 3.07. Acceptance: chains alpha_j = 0.55, 0.5, 0.5, 0.45, 0.4; trees of
2, 4, 6, 8 nodes give on average 1.77, 2.10, 2.20, 2.30 tokens.
"""
from __future__ import annotations

import argparse
import math
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eyas.bench.controller_fields import controller_fields  # noqa: E402
from eyas.spec.controller import ControllerConfig, SpecController  # noqa: E402

ALPHAS = [0.55, 0.5, 0.5, 0.45, 0.4]
TREE_TOKENS = {2: 1.77, 4: 2.10, 6: 2.20, 8: 2.30}
COST = {  # batch -> key -> step time relative to a plain step (chains -k, trees +m)
    1: {0: 1.0, **{-k: 1.10 + 0.08 * k for k in range(1, 6)}, **{m: 1.24 + 0.03 * m for m in TREE_TOKENS}},
    4: {0: 1.0, -1: 1.19, -2: 1.29, -3: 1.53, -4: 2.05, -5: 2.04, 2: 1.48, 4: 2.09, 6: 2.5, 8: 3.07},
    # traced: one-token chains at batch 16 69.6 ms against 47.6 plain, at batch 64 206.8 against
    # 129.0 (both about break-even); the rest grows by about a row's worth per draft token
    16: {0: 1.0, -1: 1.46, -2: 1.9, -3: 2.35, -4: 2.8, -5: 3.25, 2: 2.0, 4: 3.0, 6: 4.0, 8: 5.0},
    64: {0: 1.0, -1: 1.6, -2: 2.2, -3: 2.8, -4: 3.4, -5: 4.0, 2: 2.4, 4: 3.8, 6: 5.2, 8: 6.6},
}
# how a step's time grows with the context its sequences attend over (elasticity: the share of the
# time that doubles when the context doubles): small at batch 1 on CPU (weight reads dominate),
# about all of it at batch 64 (plain steps went from 110 to 220 ms over a wave of 128 -> 256 tokens)
ELASTICITY = {1: 0.03, 4: 0.08, 16: 0.3, 64: 0.9}
PROMPT, WAVE = 128, 64  # prompt tokens; steps per wave of requests (all in flight start together)


def sample_accept(rng: random.Random, key: int, ease: float) -> tuple[int, list[int] | None]:
    """(accepted drafts, the accepted path's search ranks for a tree) for one sequence: chains
    position by position; trees around their mean, one uniform draw for every size, so a smaller
    tree never accepts more than a larger one and the ranks say what each smaller size would have
    accepted (node j of the path ranks below size m exactly when size m accepts more than j)."""
    if key < 0:
        a = 0
        while a < -key and rng.random() < min(0.95, ALPHAS[a] * ease):
            a += 1
        return a, None
    u = rng.random()
    got = {}
    for m in sorted(TREE_TOKENS):
        mean = min(m, (TREE_TOKENS[m] - 1.0) * ease)  # accepted nodes on average: floor or ceiling
        got[m] = min(m, int(mean) + (u < mean - int(mean)))
    ranks = [next(m for m in sorted(got) if got[m] > j) - 1 for j in range(got[key])]
    return got[key], ranks


class Fixed(SpecController):
    """Always the same key (the sampled tokens and times of a fixed shape, for the oracle)."""

    def __init__(self, cfg: ControllerConfig, key: int):
        super().__init__(cfg)
        self.key = key

    def choose(self, batch: int) -> int:
        self.choices[self.key] = self.choices.get(self.key, 0) + 1
        return self.key


def simulate(cfg: ControllerConfig, batch: int, steps: int, noise: float, spell: float, seed: int,
             fixed: int | None = None, trace: list[float] | None = None) -> dict:
    """Tokens per sequence per unit time of one run; chains only (keys 1..k chain k) when cfg
    has no trees, else keys -k chains and +m trees."""
    # the machine and the requests (slow spells, noise, difficulty) depend on the step only, so
    # every policy meets the same ones; acceptance draws have their own generator
    env, rng = random.Random(seed), random.Random(seed + 10_000)
    ctrl = SpecController(cfg) if fixed is None else Fixed(cfg, fixed)
    cost = COST[batch]
    tokens = elapsed = 0.0
    slow, ease = False, 1.0
    offset = random.Random(seed + 20_000).randrange(len(trace)) if trace else 0  # each seed: its own start
    for n in range(steps):
        if n % WAVE == 0:
            ease = env.uniform(0.7, 1.2)  # the requests in flight: easier or harder to draft for
        if env.random() < 1 / 150:
            slow = env.random() < 0.33  # on about a quarter of the time, in runs of ~150 steps
        factor = math.exp(env.gauss(0.0, noise)) * (spell if slow else 1.0)  # drawn either way: same streams
        if trace:
            factor = trace[(offset + n) % len(trace)]
        key = ctrl.choose(batch)
        shape = key if cfg.tree else -key  # COST and sample_accept name chains -k
        few = ctrl.draft_seqs if fixed is None else None
        position = PROMPT + 2 * (n % WAVE)  # tokens each sequence has computed, about 2 a step
        # a few-sequence probe: a plain step plus those sequences' drafts (about their share of
        # the shape's extra cost); each keeps only its first token and the step is no time sample
        base = cost[shape] if few is None else 1.0 + (cost[shape] - 1.0) * min(few, batch) / batch
        t = base * factor * (1 + ELASTICITY[batch] * (position / PROMPT - 1))
        got = 0
        for i in range(batch):
            drafts = key and (few is None or i < few)
            a, ranks = sample_accept(rng, shape, ease) if drafts else (0, None)
            got += 1 + (a if few is None else 0)
            if drafts:
                ctrl.record_accept(abs(key), a, ranks, tree=ctrl.is_tree(key))
        if few is None:
            ctrl.record_time(batch, key, t, batch * position)
        ctrl.record_step(t)
        tokens += got
        elapsed += t
    return {"rate": tokens / elapsed / batch, "choices": ctrl.choices}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=4, choices=sorted(COST))
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--noise", type=float, default=0.1)
    ap.add_argument("--spell", type=float, default=1.3)
    ap.add_argument("--trace", help="a JSON list of a real machine's step times (plain steps, in order) "
                                    "to replay as the step-time factor instead of --noise and --spell")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a ControllerConfig field (int, float or bool), e.g. time_window=9")
    ap.add_argument("--chains-only", action="store_true",
                    help="chains of 0..5 tokens only (the CPU default, `--spec-topk 1`), no trees")
    args = ap.parse_args(argv)
    fields = controller_fields(args.set, "--set")
    cfg = (ControllerConfig(max_tokens=5, **fields) if args.chains_only
           else ControllerConfig(max_tokens=8, tree=True, chains=5, **fields))
    trace = None
    if args.trace:
        import json
        import statistics

        times = [float(t) for t in json.loads(Path(args.trace).read_text())]
        trace = [t / statistics.median(times) for t in times]

    def mean_rate(fixed=None):
        runs = [simulate(cfg, args.batch, args.steps, args.noise, args.spell, s, fixed, trace)
                for s in range(args.seeds)]
        return sum(r["rate"] for r in runs) / len(runs), runs

    plain = mean_rate(0)[0]
    shapes = range(cfg.max_tokens + 1) if args.chains_only else list(COST[args.batch])
    oracle = {k: mean_rate(k)[0] / plain for k in shapes}  # each fixed shape, same samples
    best = max(oracle, key=oracle.get)
    runs = mean_rate()[1]
    rates = sorted(r["rate"] / plain for r in runs)
    choices: dict[int, int] = {}
    for r in runs:
        for k, v in r["choices"].items():
            choices[k] = choices.get(k, 0) + v
    print(f"batch {args.batch}: oracle best {best} at {oracle[best]:.3f} x plain; "
          f"adaptive {sum(rates) / len(rates):.3f} x plain (seeds {rates[0]:.3f}..{rates[-1]:.3f}), "
          f"{sum(rates) / len(rates) / oracle[best]:.3f} of the oracle")
    total = sum(choices.values())
    print("choices:", ", ".join(f"{k}: {100 * v / total:.1f}%" for k, v in sorted(choices.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
