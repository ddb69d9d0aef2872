"""Adaptive speculation: pick how many tokens to draft each step so that tokens/s is highest.

For a step with B decoding sequences drafting k tokens each the controller predicts

    tokens/s (k) = B * E[tokens per sequence | k] / time(B, k)

and picks the best k among the candidates (0 = plain decoding, no drafter work at all).

- E[tokens | k] for chains: 1 + sum_{i<=k} prod_{j<=i} alpha_j, where alpha_j is the running
  rate at which draft position j is accepted once positions < j were (decayed counts, so it
  follows drift). For trees k is the tree size: the candidates are 0 and about n/4, n/2, 3n/4
  and n nodes (`tree_sizes`), and E[tokens | m] is a running mean per size. A tree of m nodes is
  the best m nodes of a larger one (the search ranks parents before children), so one verified
  tree of n nodes also says what every m <= n would have accepted: the accepted path's nodes of
  rank < m (exact for greedy requests; for sampled ones an estimate, since a smaller budget
  draws its tree from the generator in another order). Sizes above the one drafted learn
  nothing from it, but they shift with it: acceptance varies a lot from prompt to prompt, and a
  traced c=1 run held 1.84 tokens for size 8 (learnt on hard prompts) against 2.36 for size 6
  (drafted later, on easy ones), so it kept away from 8-node trees. So a larger size's mean moves
  by as much as the largest drafted size's mean did, and a size never reads below a smaller one.
- time(B, k): the median of the last `time_window` measured step times (draft + verify) per
  batch bucket (powers of two) and k (the first sample, which pays one-time costs, is dropped
  once a second arrives). A median, because on a shared CPU a stalled step can take several
  times the usual: with a moving average, such outliers inflated t(16, 0) from 128 to 202 ms in a
  traced run, and drafting one token (226 ms a step, for 1.3 tokens) looked like a gain.
  A window holds a key's last `time_window` samples, and also every sample of the bucket's last
  `span` timed steps (160): the key in use is timed every step, the others every 32-64 steps, so
  with 5 samples each the key in use was judged on its last 5 steps and the others on the last
  few minutes. On this project's CPU slowdowns come in runs (step times correlate 0.83 from one
  step to the next, 0.52 ten steps apart), so a slow run of 5 steps made the key in use look
  dear against samples from quiet times, and the controller turned to plain decoding, whose
  samples then followed the machine back to quiet while the drafting keys' stayed from the slow
  run (in one round of a c=4 A/B run it chose plain steps 400 times in 440). Replaying a
  recorded trace of this machine's step times (bench/controller_sim.py --trace), the span
  raised the controller from 0.93 to 0.94 of the best fixed shape at batch 1 and from 0.88 to
  0.91 at batch 4 (no change at 16 and 64; under independent synthetic noise it cost 0.016 at
  batch 1 and gained 0.009 at batch 4).
- Samples are compared at the same machine speed (`level_steps`): every timed step's time over
  its key's estimate (at the step's context) is a reading of how fast the machine runs now,
  and the level is the median of the last 5 readings. Samples are stored divided by the level
  at their step, and step_time multiplies back by the level now (so its seconds, which the
  catch-up guard and the exploration debt compare with measured ones, are the machine's
  current ones). The key in use is timed every step, so the level follows the machine from
  step to step and a probe is judged against the steps just before it: a paired comparison,
  which window medians alone are not. Without it a traced c=4 run drafted 2 tokens through a
  slow spell (45-49 ms a step against 33 quiet), then compared those samples with fresh quiet
  plain steps (23 ms) and ran 240 plain steps. The median leaves one stalled step out; a
  reading is clamped to within 1.5x of the level, and only keys with >= 3 samples in their
  window (past the first) at the window's median batch give one. The level's scale is
  arbitrary (it is relative to the stored samples). Replaying the recorded CPU trace
  (bench/controller_sim.py --trace, 24 seeds) it took the controller from 0.919 to 0.959 of
  the best fixed shape at batch 4; under independent synthetic noise it cost 0.02 there
  (0.953 -> 0.931), which the acceptance ageing below wins back.
- Acceptance ages while plain steps run (`idle_decay`): a plain step of B sequences decays the
  chains' acceptance counts as B records would (accept_decay^B). A plain step observes no
  acceptance, so rates learnt on hard prompts made plain steps the choice and then stayed
  (only probes, a few records every 32-64 steps, could move them) after the prompts had
  changed: in the simulator, seeds whose early waves were hard ran 60% plain steps to the end.
  Aged, the evidence gives way to the prior (0.6): at batch 4, 20% acceptance learnt over 200
  records turns back to drafting after about 150 plain steps, and a drafter that is really
  poor is turned down again by its next steps' records. (A fixed 0.99 a step was tried first:
  at batch 1, where a drafting step brings one record, a near-useless drafter then came back
  every 15 steps.) Trees' running means do not age. With both (16 seeds, against neither):
  batch 4 0.968 of the best fixed shape on the trace (0.909) and 0.962 under synthetic noise
  (0.942); batch 1 0.949 (0.944) and 0.936 (0.944); batch 16 and 64 unchanged.
  A plain step ages the counts as at most `probe_seqs` records would (`idle_cap`:
  accept_decay^min(B, 4)): while plain decoding is best, a probe brings that many records every
  32-64 steps, and aged faster the evidence rests on the last probe alone. At batch 64 a plain
  step aged the counts by 0.995^64 = 0.73, so a few steps after a probe nothing but the prior was
  left, and a probe's 4 sequences that accepted 4 of 4 read as E[tokens | 1] = 1.77 (1.6 before
  it). In traced c=64 closed loops such probes switched all 64 sequences to one-token drafts (15%
  predicted gain); one run realised break-even for 14 such steps and lost the loop's lockstep
  (0.947 of plain decoding over the run). The cap alone did not stop such switches (0.969
  against 0.966 in a paired run); the probes' choice of sequences was biased too (see
  few-sequence probes below).
- Samples are compared at the same context (`by_context`): a step's time grows with the tokens
  its sequences attend over (at batch 64 on CPU, plain steps went from 110 to 220 ms over a wave
  of 128 -> 256-token sequences), so the medians of raw samples compared plain steps timed late in
  waves with drafts timed early, and a traced c=64 run drafted one token for 99 steps at a loss.
  Each bucket keeps a line of plain-step time against the context (`ContextLine`: binned, robust,
  at most proportional), each sample becomes its ratio to that line at the sample's context, and
  time(B, k) is the median ratio times the line at the bucket's latest context. A first attempt
  modelled t = W(B, k) + a * ctx with one slope for all buckets and was reverted: the slope, mostly
  from batch 64, made plain steps of smaller batches look dear.
  A bucket's own data come first: a measured k is used as is, and once >= 2 k are measured
  the others lie on the least-squares line through them (the bucket is then "modelled").
- A bucket with fewer than two measured k borrows from the modelled buckets, once there are at
  least two of them (one alone shows no trend in batch size). Only the time relative to other
  k matters for the choice, so borrowing is about the shape of t(k):
  * no data: each k's time is affine in the batch size (a fixed cost per step plus a cost per
    sequence). A modelled bucket's time for k sits at the mean batch size of the steps behind
    it (a bucket spans a factor of two), and the prediction is for the step's actual batch.
    Between two modelled buckets it is interpolated from the nearest one on each side. Beyond
    them it follows the line through the two nearest ones, with the plain-step time kept
    between "flat" and "proportional to batch", and the drafting cost ratio t(k)/t(0) kept
    physical: >= 1 and growing with batch up to about k+1 (toward smaller batches it lies
    between 1 and the nearest bucket's ratio, toward larger ones between that ratio and k+1).
  * one measured k0 (time t0): the borrowed shape at the bucket's own level,
    t(b, k) = t0 * borrowed(b, k) / borrowed(b, k0), so the level of one (maybe inflated first)
    sample does not change which k looks best.
  Such a bucket runs the predicted best k from its first step. Its first probe runs the
  candidate farthest from its measured k, which gives it a wide least-squares line of its own;
  it comes early (step `extrapolated_probe`) when the times were extrapolated, since a trend
  seen at other batch sizes can break (a GPU stops being latency bound), and after the usual
  `probe_every` steps when they were interpolated. Only while fewer than two buckets are
  modelled (or with `borrow` off) does a new bucket explore on its own: it first tries
  k_max, then 0, to get two points.
- Every `probe_every` steps in a bucket it runs a candidate other than the best (every other
  probe a neighbour of the best, the rest round robin), so stale times and acceptance for
  unused depths get refreshed. While the best choice holds, the interval doubles up to
  `max_probe_every` (a probe after a run of plain steps also pays the drafter's catch-up), and
  it resets when the best choice changes.
- Exploration has a budget: a repeat probe's extra time (its whole step, catch-up included,
  minus the predicted time of the best choice; a shape's first probe pays one-time costs and is
  exempt) is a debt that the following steps pay off at `explore_budget` of their time, and no
  probe runs while any debt is left. So probes cost at most about that share of the run,
  however expensive one turns out to be (example: with 0.02, a probe 150 ms slower than the
  best step defers the next one by 7.5 s of steps).
- While drafting is the best, every `probe_every`-th step of a bucket is plain: the machine's
  speed drifts (steps of one run were seen anywhere from 100 to 200 ms on a shared CPU), and
  t(B, 0), the reference drafting must beat, is only comparable when recent. Right after
  drafting overtakes plain decoding in a bucket, the next `confirm_steps` plain steps come
  every `confirm_every` steps: a traced c=4 run drafted one token for 80 steps at 66-68 ms a
  step against plain steps of 52 ms, because t(4, 0) held a 66 ms median from a slow spell.
  Only while drafting wins clearly (predicted tokens/s ahead of plain decoding's by twice the
  margin it needs) does the interval double, up to `max_plain_every`: there a fresher t(B, 0)
  would not change the choice, and each reference step costs its share of the gain. In a
  paired c=1 closed loop (16 requests, 2-token chains 1.85 tokens a step for 1.26 plain steps'
  time) plain steps went from 36 to 10 of 1,100, and the rate from 1.482 to 1.495 of plain
  decoding; the simulator over the recorded CPU trace puts it at 0.979 -> 0.985 of the best
  fixed shape at batch 1 and 0.972 -> 0.977 at batch 4 (16 and 64 unchanged).
- Time samples of drafting steps leave out the drafter's catch-up over positions of earlier plain
  steps (the decoder subtracts the proposer's measured extend time beyond the rows a step that
  drafts every time extends over), so a probe after plain steps measures a typical step.
  That catch-up is still paid, once, by the first drafting step after plain ones, and it grows
  with the plain stretch: at B=64 on CPU, 110 plain steps left 7,000 rows that took 0.78 s, four
  plain steps' worth (a traced closed loop switched to drafting there near a wave's end, for two
  steps). So a switch must pay for it (`pays_off`): the decoder reports the backlog and the
  tokens the sequences have left before each choice, the drafter's extends give the seconds
  per row, and drafting is chosen only if its saving per step (E[tokens | k] plain steps' time
  minus its own) over the steps it can last (`switch_horizon`, or the tokens left over
  E[tokens | k]) covers the catch-up. While drafting goes on the backlog stays at about a
  step's rows and there is nothing to pay. (Not a charge on drafting's step time: spread over a
  fixed number of steps on top of the margin, a plain stretch's growing backlog would keep
  drafting from ever winning back, at any batch.) In a closed loop at c=64, stepped in turn
  with a plain engine, this took the adaptive engine from 0.93-0.95 of its speed to 0.96-0.97.
- Few-sequence probes: while plain decoding is best, a probe of a k that has a time (measured,
  or borrowed from other buckets) drafts for `probe_seqs` sequences only (the decoder takes the
  batch's sequences in turn, so successive probes sample all of them). It refreshes acceptance,
  which a few sequences measure as well as all, without extending the drafter over every
  sequence's backlog; it is not a time sample, so such a bucket measures drafting only once it
  predicts drafting to win. (The decoder first took the sequences with the least backlog: in a
  closed loop in lockstep those were the ones probed before, so every probe of a wave measured
  the same 4 requests. In two paired c=64 runs their first drafts were accepted 28 times in
  40, against 0.53-0.54 over the full drafting steps, and the controller switched all 64
  sequences to one-token drafts for 12 and 3 steps at break-even; taken in turn, 17 in 40 and
  one such step: 0.986 of plain decoding both times, against 0.976 and 0.983.)
- Drafting must win by a margin: k > 0 is chosen only when its predicted tokens/s beats plain
  decoding's by `min_gain` (10%). Near break-even the estimates are within noise (step times
  of one run drift by +-10% on a shared CPU), and drafting has costs the per-step times miss
  (the drafter's catch-up after plain steps, sequences of one wave finishing apart), so a
  near-tie goes to plain decoding. With a 3% margin a CPU bench drafted at concurrency 4 where
  it lost 11%; where speculation really pays (batch 1 on CPU, small batches on GPU) the
  predicted gain is well above 10%.
- The margin grows with the measured noise (`noise_margin`): by the relative spread (median
  absolute deviation over median) of the bucket's samples for k and for plain steps, combined
  as sqrt(s_k^2 + s_0^2). Choosing the best of noisy estimates favours the one that happens to
  read high: at batch 16 and 64 on this project's CPU one-token drafts were predicted 8-16%
  ahead and chosen, and realised parity or a loss. Where the machine is quiet (a GPU's CUDA
  graphs) the spread is near 0 and the margin stays `min_gain`. Its price: the offline
  simulation (bench/controller_sim.py, 16 seeds, 10% step noise and slow spells) puts the
  controller at 0.92 of the best fixed shape at batch 4 with it (27% of the steps plain, where
  a 2-token chain gains 38%) against 0.97 without it, and shows no difference at batch 16 or
  64. But the simulation leaves out what a draft costs at large batches beyond its step time
  (the drafter's catch-up, a closed loop's split prefills), and a CPU bench with it off drafted
  one token for 184 of 430 steps at c=16 and read 0.91 there and 0.88 at c=64 (c=4: 1.17,
  against 1.15-1.16 with it on), so it stays on.

Chains and trees in one candidate set (`chains` > 0 with `tree`): the candidates are keys,
0 (plain), m > 0 (a tree of m nodes, as above) and -k (a chain of k tokens, 1 <= k <= chains).
Which shape is best depends on the batch: on this project's CPU a 4-node tree at batch 1 ran
75.0 tok/s against 63.8 for a 3-token chain (plain 46.2), while at batch 4 one- and two-token
chains ran 191 tok/s against 178-182 for 2-3-node trees (a tree's verify pays a masked attention
and its propose a search). Chains learn the per-position rates alpha_j, trees their running
means; step times are per key, and a key without a time of its own lies on the line through its
own family's points (plain steps included) by rows verified (|key|), or, with fewer than two of
those, through all the bucket's points.

Switching k costs nothing: the scheduler reserves k+1 slots, the proposer drafts k tokens and
the drafter's features keep flowing while k = 0 (it catches up at the next draft).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from statistics import median
from typing import Optional

from eyas.errors import ConfigError
from eyas.spec.context_line import ContextLine


# samples kept per (bucket, k) at most (a key chosen every step keeps those of its last span)
MAX_SAMPLES = 256


@dataclass(frozen=True)
class ControllerConfig:
    max_tokens: int  # k_max: chain length, or tree size budget
    tree: bool = False  # candidates 0 and tree_sizes(max_tokens) instead of 0..max_tokens
    time_window: int = 5  # step times per (bucket, k) whose median is the estimate
    accept_decay: float = 0.995  # per-record decay of acceptance counts
    probe_every: int = 32  # steps per bucket between probes of a non-best candidate...
    # ...doubling up to this while the best choice stays the same (the exploration budget is
    # what bounds expensive probes; a long back-off left a drafter stuck at plain decoding
    # after a streak of rejections, since acceptance is only learnt while drafting)
    max_probe_every: int = 64
    prior_accept: float = 0.6  # alpha_j before any data (with prior_weight pseudo-counts)
    prior_weight: float = 4.0
    borrow: bool = True  # buckets without a model of their own borrow step times from others
    extrapolated_probe: int = 4  # first probe of a bucket whose borrowed times are extrapolated
    explore_budget: float = 0.02  # probes' extra time as a share of all step time (1.0: no limit)
    min_gain: float = 0.10  # k > 0 must beat plain decoding's predicted tokens/s by this share
    noise_margin: bool = True  # ... plus the relative spread of the bucket's samples (see above)
    # a repeat probe while plain decoding is best drafts for this many sequences only (0: all)
    probe_seqs: int = 4
    # once drafting becomes best where plain decoding was, the next `confirm_steps` plain
    # reference steps come every `confirm_every` steps (not every probe_every): t(B, 0) may
    # be a stale sample from a slow spell of the machine, which is what made drafting look best
    confirm_steps: int = 4
    confirm_every: int = 4
    # a bucket entered again after more than this many steps in other buckets re-confirms a
    # drafting best against a plain step first, as if drafting had just overtaken (0: off)
    stale_steps: int = 256
    # while drafting wins clearly (its predicted tokens/s beats plain decoding's by twice the
    # margin it needs), the plain reference steps back off: their interval doubles from
    # probe_every up to this (probe_every: never back off; see _choose)
    max_plain_every: int = 128
    # step times are compared at the same context (a plain-step line per bucket; see above)
    by_context: bool = True
    # with tree: also chains of 1..chains tokens, as keys -1..-chains (0: trees only; see above)
    chains: int = 0
    # a key's window also keeps every sample of the bucket's last `span` timed steps, not only
    # its last time_window (0: the last time_window only; see record_time)
    span: int = 160
    # a switch to drafting pays the drafter's catch-up over the positions of the plain steps
    # before it: it must be won back within this many steps (fewer where the sequences have
    # fewer tokens left; see above)
    switch_horizon: int = 64
    # the machine's speed level: the median of the last `level_steps` timed steps' times over
    # their keys' estimates; samples are kept divided by the level at their step, so a probe is
    # judged against the steps just before it (0: off; see record_time)
    level_steps: int = 5
    # chains' acceptance counts also decay while plain steps run, by accept_decay per sequence
    # and step, as if each had recorded (False: only per record, so plain steps keep what was
    # learnt before them; see choose)
    idle_decay: bool = True
    # ... but by at most probe_seqs records a step, what a probe brings (False: by batch records)
    idle_cap: bool = True

    def __post_init__(self):
        if self.max_tokens < 1:
            raise ConfigError(f"adaptive speculation needs max draft tokens >= 1, got {self.max_tokens}")
        if self.time_window < 1 or not 0 < self.accept_decay <= 1:
            raise ConfigError(f"need time_window >= 1 and accept_decay in (0, 1], got "
                              f"{self.time_window}, {self.accept_decay}")
        if not 2 <= self.probe_every <= self.max_probe_every:
            raise ConfigError(f"need 2 <= probe_every <= max_probe_every, got {self.probe_every}, "
                              f"{self.max_probe_every}")
        for name in ("borrow", "by_context", "noise_margin", "idle_decay", "idle_cap"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.extrapolated_probe < 2:
            raise ConfigError(f"need extrapolated_probe >= 2, got {self.extrapolated_probe}")
        if not 0 < self.explore_budget <= 1:
            raise ConfigError(f"explore_budget must be in (0, 1], got {self.explore_budget}")
        if not 0 <= self.min_gain < 1:
            raise ConfigError(f"min_gain must be in [0, 1), got {self.min_gain}")
        if not isinstance(self.probe_seqs, int) or self.probe_seqs < 0:
            raise ConfigError(f"probe_seqs must be an integer >= 0, got {self.probe_seqs!r}")
        if not isinstance(self.switch_horizon, int) or isinstance(self.switch_horizon, bool) \
                or self.switch_horizon < 1:
            raise ConfigError(f"switch_horizon must be an integer >= 1, got {self.switch_horizon!r}")
        if not isinstance(self.span, int) or isinstance(self.span, bool) or not 0 <= self.span <= MAX_SAMPLES:
            raise ConfigError(f"span must be an integer in [0, {MAX_SAMPLES}], got {self.span!r}")
        if not isinstance(self.chains, int) or self.chains < 0 or (self.chains and not self.tree):
            raise ConfigError(f"chains must be an integer >= 0, and > 0 only with tree, got {self.chains!r}")
        if not isinstance(self.level_steps, int) or isinstance(self.level_steps, bool) or self.level_steps < 0:
            raise ConfigError(f"level_steps must be an integer >= 0, got {self.level_steps!r}")
        if not isinstance(self.max_plain_every, int) or self.max_plain_every < self.probe_every:
            raise ConfigError(f"need max_plain_every >= probe_every, got {self.max_plain_every!r}, "
                              f"{self.probe_every}")
        if not isinstance(self.stale_steps, int) or isinstance(self.stale_steps, bool) or self.stale_steps < 0:
            raise ConfigError(f"stale_steps must be an integer >= 0, got {self.stale_steps!r}")
        if self.confirm_steps < 0 or self.confirm_every < 2:
            raise ConfigError(f"need confirm_steps >= 0 and confirm_every >= 2, got {self.confirm_steps}, "
                              f"{self.confirm_every}")


def tree_sizes(n: int) -> list[int]:
    """Tree sizes the controller chooses from for a budget of n nodes: about n/4, n/2, 3n/4 and
    n (8 -> [2, 4, 6, 8]; 3 -> [1, 2, 3]). Fewer nodes verify fewer rows, which on a CPU or at
    larger batches can buy more than the tokens the extra nodes would add."""
    return sorted({max(1, -(-n * q // 4)) for q in (1, 2, 3, 4)})


def bucket_of(batch: int) -> int:
    """Smallest power of two >= batch."""
    return 1 << max(0, (int(batch) - 1).bit_length())


# a trend in batch size needs two modelled buckets; with fewer a new bucket explores on its own
MIN_SOURCES = 2


def line_fit(points: dict[int, float], k: int) -> float:
    """Value at k of the least-squares line through >= 2 points {k: seconds}."""
    ks, ts = list(points), list(points.values())
    mk, mt = sum(ks) / len(ks), sum(ts) / len(ts)
    var = sum((x - mk) ** 2 for x in ks)
    slope = sum((x - mk) * (y - mt) for x, y in zip(ks, ts)) / var
    return max(mt + slope * (k - mk), 1e-9)


def within_measured(points: dict[int, float], k: int, t: float) -> float:
    """A fitted time t for k, kept between the measured times around it: verifying more rows
    never makes a step cheaper, so t is at least every measured time of fewer rows and at most
    every one of more (when noise makes those overlap, t as fitted). A line through noisy times
    of 1 and 2 draft tokens once put 5 tokens at batch 5 at 0.5 ms a step."""
    lo = max((v for j, v in points.items() if j < k), default=0.0)
    hi = min((v for j, v in points.items() if j > k), default=float("inf"))
    return min(max(t, lo), hi) if lo <= hi else t


def along_batch(x: float, x1: float, t1: float, x2: float, t2: float) -> float:
    """Step time at batch size x from times t1, t2 at batch sizes x1 < x2, affine in batch size
    (fixed cost per step + cost per sequence). Outside [x1, x2] the line is clamped between the
    nearest point's time (flat) and that time scaled by the batch ratio (proportional)."""
    t = t1 + (t2 - t1) * (x - x1) / (x2 - x1)
    if x1 <= x <= x2:
        return t
    near_x, near_t = (x1, t1) if x < x1 else (x2, t2)
    lo, hi = sorted((near_t, near_t * x / near_x))
    return min(max(t, lo), hi)


class SpecController:
    def __init__(self, config: ControllerConfig):
        self.config = config
        n = config.max_tokens
        self.candidates = [0] + tree_sizes(n) if config.tree else list(range(n + 1))
        self.candidates += [-k for k in range(1, config.chains + 1)]  # mixed: chains as negative keys
        n = max(n, config.chains)
        self.reached = [0.0] * n  # position j drafted with all earlier drafts accepted
        self.accepted = [0.0] * n  # ... and accepted
        self.tree_tokens: dict[int, float] = {}  # tree size -> running mean tokens per sequence
        self.times: dict[int, dict[int, float]] = {}  # bucket -> k -> median seconds per step
        self.samples: dict[tuple[int, int], int] = {}  # (bucket, k) -> timed steps
        self.timed: dict[int, int] = {}  # bucket -> timed steps of any k (the windows' clock)
        self.batch_at: dict[tuple[int, int], float] = {}  # (bucket, k) -> median batch of the window
        # (bucket, k) -> recent (seconds, batch, context, the bucket's timed-step clock)
        self.window: dict[tuple[int, int], deque] = {}
        self._stats: dict[tuple[int, int], tuple] = {}  # (bucket, k) -> ratio_stats' cache
        self.lines: dict[int, ContextLine] = {}  # bucket -> plain-step time against the context
        self.context: dict[int, Optional[float]] = {}  # bucket -> context of its latest timed step
        self.steps: dict[int, int] = {}  # bucket -> steps chosen so far
        self.clock = 0  # steps chosen so far, all buckets
        self.last_seen: dict[int, int] = {}  # bucket -> self.clock at its latest step
        self.best: dict[int, int] = {}  # bucket -> current best k
        self.interval: dict[int, int] = {}  # bucket -> steps until the probe after next
        self.next_probe: dict[int, int] = {}  # bucket -> step count of the next probe
        self.next_plain: dict[int, int] = {}  # bucket -> step count of the next plain reference step
        self.plain_every: dict[int, int] = {}  # bucket -> steps between plain reference steps now
        self.confirm: dict[int, int] = {}  # bucket -> quick plain reference steps still to run
        self.probes: dict[int, int] = {}
        self.debt = 0.0  # seconds of probe overhead not yet paid off (see explore_budget)
        self.probe_baseline: Optional[float] = None  # predicted seconds of the best, for the probe in flight
        # sequences that draft in the step just chosen (None: all); see choose()
        self.draft_seqs: Optional[int] = None
        self.choices: dict[int, int] = {}  # k -> steps that chose it (bench reports, logs)
        # the drafter's catch-up: rows it would extend over if every decoding sequence drafted
        # now (set_backlog, before each choice), and decayed sums of its measured extends
        self.backlog_rows = 0
        self.tokens_left: Optional[float] = None
        self.extend_seconds = 0.0
        self.extend_rows = 0.0
        # the machine's speed now relative to the samples' scale (see record_time); `times` and
        # the windows hold seconds divided by the level at their step
        self.level = 1.0
        self.factors: deque = deque(maxlen=max(1, config.level_steps))  # the last steps' time / estimate

    # ------------------------------------------------------------------ model
    def is_tree(self, key: int) -> bool:
        """Whether a candidate key drafts a tree (else a chain, or nothing for 0)."""
        return self.config.tree and key > 0

    def alpha(self, j: int) -> float:
        c = self.config
        return (self.accepted[j] + c.prior_accept * c.prior_weight) / (self.reached[j] + c.prior_weight)

    def expected_tokens(self, k: int) -> float:
        """Expected tokens a sequence gains in one step that drafts k tokens."""
        if k == 0:
            return 1.0
        if self.is_tree(k):  # a size not seen yet gets at least what a smaller tree got
            return max([t for m, t in self.tree_tokens.items() if m <= k],
                       default=1.0 + self.config.prior_accept)
        total, run = 1.0, 1.0
        for j in range(abs(k)):
            run *= self.alpha(j)
            total += run
        return total

    def own_time(self, bucket: int, k: int) -> Optional[float]:
        """Seconds per step from the bucket's own data: measured, or on the least-squares line in
        rows verified (|k|) once >= 2 k are measured (of k's own family, plain steps included,
        where it has two; else of all); None otherwise."""
        known = self.times.get(bucket, {})
        if k in known:
            return known[k]
        if len(known) < 2:
            return None
        family = {abs(j): t for j, t in known.items() if j == 0 or self.is_tree(j) == self.is_tree(k)}
        if len(family) < 2:
            family = {}
            for j, t in known.items():  # a chain and a tree of equal rows: their mean
                family.setdefault(abs(j), []).append(t)
            family = {j: sum(ts) / len(ts) for j, ts in family.items()}
        if len(family) < 2:
            return next(iter(family.values()))
        return within_measured(family, abs(k), line_fit(family, abs(k)))

    def batch_behind(self, bucket: int, k: int) -> float:
        """Mean batch size of the steps behind a modelled bucket's time for k (measured k: its
        own steps; fitted k: the mean over the measured ones)."""
        if (bucket, k) in self.batch_at:
            return self.batch_at[(bucket, k)]
        at = [self.batch_at[(bucket, j)] for j in self.times[bucket]]
        return sum(at) / len(at)

    def across(self, batch: int, b1: int, b2: int, k: int) -> float:
        """Time for k at `batch` on the line (in batch size) through modelled buckets b1 < b2."""
        return along_batch(batch, self.batch_behind(b1, k), self.own_time(b1, k),
                           self.batch_behind(b2, k), self.own_time(b2, k))

    def sources(self, bucket: int) -> list[int]:
        """Modelled buckets (>= 2 measured k) other than `bucket` that it can borrow from, sorted;
        empty when borrowing is off or there are too few for a trend in batch size."""
        if not self.config.borrow:
            return []
        found = sorted(b for b, known in self.times.items() if b != bucket and len(known) >= 2)
        return found if len(found) >= MIN_SOURCES else []

    def extrapolated(self, bucket: int) -> bool:
        """Whether the bucket borrows from sources that lie all on one side of it."""
        found = self.sources(bucket)
        return bool(found) and not found[0] < bucket < found[-1]

    def borrowed_time(self, bucket: int, k: int, batch: int) -> Optional[float]:
        """Seconds per step for k at `batch` (in `bucket`) predicted from the two nearest modelled
        buckets (the ones bracketing it, else the two nearest on one side); None without any."""
        found = self.sources(bucket)
        if not found:
            return None
        below = [b for b in found if b < bucket]
        above = [b for b in found if b > bucket]
        if below and above:  # interpolation: between the neighbours' times, for every k
            return self.across(batch, below[-1], above[0], k)
        b1, b2 = (above[0], above[1]) if above else (below[-2], below[-1])
        t0 = self.across(batch, b1, b2, 0)
        if k == 0:
            return t0
        # extrapolation: the cost of drafting relative to a plain step, t(k)/t(0), follows the
        # lines but stays physical: it is >= 1 (drafting never makes a step cheaper) and grows
        # with batch (fixed costs weigh less), up to k+1 (k+1 tokens per sequence cost about k+1
        # plain steps). So toward smaller batches it lies between 1 and the nearest bucket's
        # ratio, toward larger ones between that ratio and k+1 (or that ratio, if above k+1).
        near = b1 if above else b2
        ratio = self.across(batch, b1, b2, k) / t0
        near_ratio = max(self.own_time(near, k) / self.own_time(near, 0), 1.0)
        lo, hi = (1.0, near_ratio) if above else (near_ratio, max(near_ratio, abs(k) + 1.0))
        return t0 * min(max(ratio, lo), hi)

    def step_time(self, bucket: int, k: int, batch: Optional[int] = None) -> Optional[float]:
        """Seconds per step at the machine's current level: the bucket's own (measured or
        fitted) time, else borrowed from other buckets for `batch` (default: the bucket's size),
        rescaled to the bucket's one measurement if it has one; None when neither."""
        t = self.own_time(bucket, k)
        if t is None:
            batch = bucket if batch is None else batch
            t = self.borrowed_time(bucket, k, batch)
            known = self.times.get(bucket, {})
            if t is not None and known:
                (k0, t0), = known.items()  # own_time covers >= 2 measured k
                t = t0 * t / self.borrowed_time(bucket, k0, batch)
        return None if t is None else t * self.level

    def throughput(self, batch: int, k: int) -> Optional[float]:
        t = self.step_time(bucket_of(batch), k, batch)
        return None if t is None else batch * self.expected_tokens(k) / t

    def catch_up_seconds(self, batch: int, k: int) -> float:
        """The drafter's catch-up if every decoding sequence drafted k now: the backlog beyond
        the rows a step that drafts every time extends over (about E[tokens | k] per sequence,
        already in its measured time), at the seconds per row of the extends timed so far.
        0 for plain steps and before any extend was timed."""
        if k == 0 or self.extend_rows <= 0:
            return 0.0
        extra = self.backlog_rows - batch * self.expected_tokens(k)
        return max(0.0, extra) * self.extend_seconds / self.extend_rows

    def pays_off(self, batch: int, k: int, rate_k: float, rate_0: float) -> bool:
        """Whether switching to drafting k now saves more than its catch-up costs, over the
        steps it can last: `switch_horizon`, or fewer when the sequences have fewer tokens left.
        A drafting step saves E[tokens | k] plain steps' time minus its own."""
        cost = self.catch_up_seconds(batch, k)
        if cost <= 0:
            return True
        tokens = self.expected_tokens(k)
        steps = float(self.config.switch_horizon)
        if self.tokens_left is not None:
            steps = min(steps, self.tokens_left / tokens)
        # per drafting step: E[tokens | k] plain steps' time minus its own
        saving = batch * tokens * (1.0 / rate_0 - 1.0 / rate_k)
        return cost <= saving * steps

    # ----------------------------------------------------------------- choose
    def first_probe(self, bucket: int) -> int:
        """Step of a bucket's first probe: early while its times are extrapolated (a trend seen
        at other batch sizes can break, e.g. where a GPU stops being latency bound), else the
        base interval."""
        if len(self.times.get(bucket, {})) < 2 and self.extrapolated(bucket):
            return min(self.config.extrapolated_probe, self.config.probe_every)
        return self.config.probe_every

    def choose(self, batch: int) -> int:
        """Draft tokens per sequence for a step with `batch` decoding sequences (0: don't draft)."""
        self.draft_seqs = None
        if batch <= 0:
            return 0
        k = self._choose(batch)
        self.choices[k] = self.choices.get(k, 0) + 1
        if k == 0 and self.config.idle_decay:  # acceptance not observed: let it age
            # as batch records would, at most as many as a probe brings (see above)
            capped = self.config.idle_cap and self.config.probe_seqs
            records = min(batch, self.config.probe_seqs) if capped else batch
            self.age(len(self.reached), self.config.accept_decay ** records)
        return k

    def _choose(self, batch: int) -> int:
        b = bucket_of(batch)
        known = self.times.get(b, {})
        n = self.steps[b] = self.steps.get(b, 0) + 1
        stale = self._back_after_long(b)
        if len(known) < 2 and not self.sources(b):  # nothing to borrow: explore on our own
            for k in (self.config.max_tokens, 0):  # two measured points before any model
                if k not in known:
                    return k
        rates = {k: self.throughput(batch, k) for k in self.candidates}
        best = max(self.candidates, key=rates.get)
        if best != 0 and rates[best] < (1 + self.config.min_gain + self.noise(b, best)) * rates[0]:
            best = 0  # within the margin: plain decoding
        if best != 0 and not self.pays_off(batch, best, rates[best], rates[0]):
            best = 0  # the drafter's catch-up would cost more than drafting can win back
        if best != self.best.get(b):  # the choice moved: probe at the base rate again
            if best != 0 and self.best.get(b) == 0 and self.config.confirm_steps:
                # drafting overtook plain decoding: confirm against fresh plain steps soon
                self.confirm[b] = self.config.confirm_steps
                self.next_plain[b] = min(self.next_plain.get(b, n + 2), n + 2)
            if stale:  # its best was set back to 0 and drafting won again: a plain reference first
                self.next_plain[b] = n
            self.best[b], self.interval[b] = best, self.config.probe_every
            self.plain_every[b] = self.config.probe_every
        if best != 0 and n >= self.next_plain.get(b, self.config.probe_every):
            # drafting is judged against plain decoding, so t(B, 0) stays fresh: a plain step
            # every probe_every steps (confirm_every right after a switch), backing off only
            # while drafting wins clearly
            left = self.confirm[b] = max(0, self.confirm.get(b, 0) - 1)
            every = self.plain_every.get(b, self.config.probe_every)
            if left:
                every = self.config.confirm_every
            elif rates[best] >= (1 + 2 * (self.config.min_gain + self.noise(b, best))) * rates[0]:
                self.plain_every[b] = min(2 * every, self.config.max_plain_every)
            else:
                every = self.plain_every[b] = self.config.probe_every
            self.next_plain[b] = n + every
            return 0
        if n >= self.next_probe.get(b, self.first_probe(b)) and self.debt <= 0:
            # probes back off (x2 up to max_probe_every) while the best choice holds
            self.next_probe[b] = n + self.interval[b]
            self.interval[b] = min(2 * self.interval[b], self.config.max_probe_every)
            k = self.probe_choice(b, best)
            # a shape's first timed step pays one-time costs (kernel selection, allocations) that
            # say nothing about later probes: only repeat probes count against the budget
            timed_before = self.samples.get((b, k), 0) > 0
            self.probe_baseline = self.step_time(b, best, batch) if timed_before else None
            if best == 0 and self.config.probe_seqs and (timed_before or self.sources(b)):
                # plain decoding is best and this k has a time (its own, or borrowed from other
                # batch sizes): the probe is for acceptance, which a few sequences measure as
                # well as all, while drafting for all would first extend the drafter over every
                # sequence's backlog since its last draft (at B=64 on CPU, ~2 s for one step)
                self.draft_seqs = self.config.probe_seqs
            return k
        return best

    def _back_after_long(self, b: int) -> bool:
        """Whether bucket b is entered again after more than `stale_steps` steps elsewhere while
        its best is to draft; if so its best is set back to plain decoding, so that drafting has
        to win again against a fresh plain step (the confirm steps above). Its times were
        sampled at another time and stored relative to the machine's level then: a bench's c=16
        level after a c=4 one predicted one-token drafts 1.41x ahead of plain decoding from its
        pre-warm samples, drafted for 10 steps (128 ms a step against 80 plain) and lost the
        closed loop's lockstep, which split its next prefills (0.90-0.91 of plain decoding,
        against 1.01 for the same level run first)."""
        self.clock += 1
        away = self.clock - self.last_seen.get(b, self.clock)
        self.last_seen[b] = self.clock
        if self.config.stale_steps and away > self.config.stale_steps and self.best.get(b, 0) != 0:
            self.best[b] = 0
            return True
        return False

    def probe_choice(self, b: int, best: int) -> int:
        """The candidate a probe in bucket b runs, given the bucket's current best."""
        # nearest first, the deeper one of two: [3, 1, 4, 0, 5] for best 2 of 0..5
        others = sorted((k for k in self.candidates if k != best),
                        key=lambda k: (abs(abs(k) - abs(best)), -abs(k), -k))
        p = self.probes[b] = self.probes.get(b, 0) + 1
        known = self.times.get(b, {})
        if len(known) == 1:  # a borrowing bucket's first own line in k: make it span widely
            (k0,) = known
            return max(others, key=lambda k: abs(abs(k) - abs(k0)))
        # every other probe a neighbour of the best (the likeliest next best, and the cheapest
        # probe when the best is 0), the others round robin: 3, 1, 1, 4, 3, 0, 1, 5, ...
        if p % 2:
            return others[(p // 2) % min(2, len(others))]
        return others[(p // 2) % len(others)]

    # ----------------------------------------------------------------- record
    def record_time(self, batch: int, k: int, seconds: float, context: Optional[float] = None) -> None:
        """A step with `batch` decoding sequences (and no prefill) drafting k took `seconds`;
        `context`: the tokens its sequences had computed, all together (None: not known)."""
        if batch <= 0 or seconds <= 0:
            return
        b = bucket_of(batch)
        n = self.samples[(b, k)] = self.samples.get((b, k), 0) + 1
        seconds = self.track_level(b, k, n, batch, seconds, context)
        recent = self.window.setdefault((b, k), deque(maxlen=MAX_SAMPLES))
        if n == 2:  # the first step of a shape pays one-time costs (kernel selection, allocations)
            recent.clear()
        clock = self.timed[b] = self.timed.get(b, 0) + 1  # the bucket's timed steps, all keys
        recent.append((seconds, batch, context, clock))
        while len(recent) > self.config.time_window and recent[0][3] <= clock - self.config.span:
            recent.popleft()
        if k == 0 and context and self.config.by_context:
            self.lines.setdefault(b, ContextLine()).add(context, seconds)
        self.context[b] = context
        self.batch_at[(b, k)] = median(x for _, x, _, _ in recent)  # where in the bucket (times grow with it)
        known = self.times.setdefault(b, {})
        for j in ([k] if k not in known else []) + list(known):  # every k: the reference context moved
            known[j] = self.estimate(b, j)

    def track_level(self, b: int, k: int, n: int, batch: int, seconds: float,
                    context: Optional[float]) -> float:
        """The sample divided by the machine's level before this step; then this step's time
        over its key's estimate at its context (clamped to within 1.5x of the level) joins the
        factors whose median is the level. Only a key whose window holds >= 3 samples (past
        the first, which pays one-time costs) gives a factor, and only at its window's median
        batch (a bucket spans a factor of two in batch, which the estimate does not model)."""
        scaled = seconds / self.level
        if not self.config.level_steps or n <= 2 or len(self.window[(b, k)]) < 3 \
                or abs(batch - self.batch_at.get((b, k), -1.0)) >= 0.5:
            return scaled
        factor = seconds / self.estimate_at(b, k, context)
        self.factors.append(min(max(factor, self.level / 1.5), self.level * 1.5))
        self.level = median(self.factors)
        return scaled

    def normalized(self, b: int, k: int) -> tuple[list[float], bool]:
        """The window's samples for k in bucket b as ratios to the plain-step line at their own
        contexts, and True; raw seconds and False where a context or the line is missing."""
        recent = self.window[(b, k)]
        line, now = self.lines.get(b), self.context.get(b)
        times, contexts = [t for t, _, _, _ in recent], [c for _, _, c, _ in recent]
        if line is None or not now or not all(contexts):
            return times, False
        return [t / at for t, at in zip(times, line.at_many(contexts))], True

    def ratio_stats(self, b: int, k: int) -> tuple[float, float, bool]:
        """(median, relative spread (median absolute deviation / median), whether they are
        ratios to the line) of the window's samples for k in bucket b, as `normalized` gives
        them. Cached until the window takes a sample or the line is refitted: every k is
        re-estimated at each timed step, and the key in use holds up to `span` samples."""
        recent = self.window[(b, k)]
        line = self.lines.get(b)
        fit = line.fit() if line is not None else None
        sig = (recent[-1][3], len(recent), bool(self.context.get(b)))  # the window's contents
        hit = self._stats.get((b, k))
        if hit is not None and hit[0] == sig and hit[1] is fit:
            return hit[2]
        values, scaled = self.normalized(b, k)
        mid = median(values)
        stats = (mid, median(abs(r - mid) for r in values) / mid, scaled)
        self._stats[(b, k)] = (sig, fit, stats)
        return stats

    def estimate(self, b: int, k: int) -> float:
        """Seconds per step for k in bucket b at the bucket's latest context (estimate_at)."""
        return self.estimate_at(b, k, self.context[b])

    def estimate_at(self, b: int, k: int, context: Optional[float]) -> float:
        """Seconds per step for k in bucket b at `context`: the median of its samples' ratios to
        the plain-step line at their own contexts, times the line there (the raw median where a
        context or the line is missing)."""
        mid, _, scaled = self.ratio_stats(b, k)
        return mid * self.lines[b].at(context) if scaled and context else mid

    def noise(self, b: int, k: int) -> float:
        """Relative spread of bucket b's samples for k and for plain steps, combined (0 unless
        noise_margin and both have >= 3 samples in their windows)."""
        if not self.config.noise_margin:
            return 0.0
        if any(len(self.window.get((b, j), ())) < 3 for j in (k, 0)):
            return 0.0
        return (self.ratio_stats(b, k)[1] ** 2 + self.ratio_stats(b, 0)[1] ** 2) ** 0.5

    def set_backlog(self, rows: int, tokens_left: Optional[float] = None) -> None:
        """Before a choice: the rows the drafter would extend over if every decoding sequence
        drafted in this step (its pending positions since their last draft), and the mean
        tokens the decoding sequences may still generate (None: not known)."""
        self.backlog_rows = max(0, int(rows))
        self.tokens_left = tokens_left

    def record_extend(self, seconds: float, rows: int) -> None:
        """The drafter extended over `rows` positions in `seconds` (a draft's catch-up, or a
        prompt's). Kept as decayed sums, so large extends, the ones a switch pays, weigh most."""
        if rows <= 0 or seconds <= 0:
            return
        self.extend_seconds = 0.9 * self.extend_seconds + seconds
        self.extend_rows = 0.9 * self.extend_rows + rows

    def record_step(self, seconds: float) -> None:
        """Every step this controller chose (timed or not: prefill, catch-up) took `seconds`;
        a probe adds its extra time to the exploration debt, other steps pay it off."""
        if self.probe_baseline is not None:
            self.debt += max(0.0, seconds - self.probe_baseline)
            self.probe_baseline = None
        else:
            self.debt = max(0.0, self.debt - self.config.explore_budget * seconds)

    def age(self, positions: int, factor: float) -> None:
        """Decay the chains' acceptance counts of the first `positions` draft positions."""
        for j in range(positions):
            self.reached[j] *= factor
            self.accepted[j] *= factor

    def record_accept(self, drafted: int, accepted: int,
                      path_ranks: Optional[list[int]] = None, tree: Optional[bool] = None) -> None:
        """One sequence drafted `drafted` tokens and `accepted` of them were accepted; `tree`:
        whether it was a tree (default: the config's `tree`; with `chains` a chain is False).
        Trees may add the search ranks of the accepted path's nodes (root first), which also
        give the tokens every smaller candidate tree would have got."""
        if drafted <= 0:
            return
        if self.config.tree if tree is None else tree:
            got = {drafted: 1.0 + accepted}
            if path_ranks is not None:
                for m in self.candidates:
                    if 0 < m <= drafted:  # the leading path nodes among the best m
                        got[m] = 1.0 + next((j for j, r in enumerate(path_ranks) if r >= m),
                                            len(path_ranks))
            top = max(got)
            shift = 0.05 * (got[top] - self.tree_tokens[top]) if top in self.tree_tokens else 0.0
            for m, old in self.tree_tokens.items():
                if m > top:  # not observed: follows the level of the largest observed size
                    self.tree_tokens[m] = old + shift
            for m, tokens in got.items():
                old = self.tree_tokens.get(m)
                self.tree_tokens[m] = tokens if old is None else 0.95 * old + 0.05 * tokens
            return
        self.age(min(drafted, len(self.reached)), self.config.accept_decay)
        for j in range(min(drafted, accepted + 1, len(self.reached))):
            self.reached[j] += 1
            if j < accepted:
                self.accepted[j] += 1
