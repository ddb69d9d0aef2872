"""Adaptive speculation: pick how many tokens to draft each step so that tokens/s is highest.

For a step with B decoding sequences drafting k tokens each the controller predicts

    tokens/s (k) = B * E[tokens per sequence | k] / time(B, k)

and picks the best k among the candidates (0 = plain decoding, no drafter work at all).

- E[tokens | k] for chains: 1 + sum_{i<=k} prod_{j<=i} alpha_j, where alpha_j is the running
  rate at which draft position j is accepted once positions < j were (decayed counts, so it
  follows drift). For trees the candidates are {0, n}; E[tokens | n] is a running mean.
- time(B, k): an exponential moving average of measured step times (draft + verify) per batch
  bucket (powers of two) and k (the first sample, which pays one-time costs, is replaced). Unmeasured k in a bucket come from a least-squares line through
  the measured ones; a bucket first tries k_max, then 0, to get two points.
- Every `probe_every` steps in a bucket it runs a candidate other than the best (round robin),
  so stale times and acceptance for unused depths get refreshed. While the best choice holds,
  the interval doubles up to `max_probe_every` (a probe after a run of plain steps also pays
  the drafter's catch-up), and it resets when the best choice changes.

Switching k costs nothing: the scheduler reserves k+1 slots, the proposer drafts k tokens and
the drafter's features keep flowing while k = 0 (it catches up at the next draft).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from eyas.errors import ConfigError


@dataclass(frozen=True)
class ControllerConfig:
    max_tokens: int  # k_max: chain length, or tree size budget
    tree: bool = False  # candidates {0, max_tokens} instead of 0..max_tokens
    time_ema: float = 0.3  # weight of the newest step time
    accept_decay: float = 0.995  # per-record decay of acceptance counts
    probe_every: int = 32  # steps per bucket between probes of a non-best candidate...
    max_probe_every: int = 512  # ...doubling up to this while the best choice stays the same
    prior_accept: float = 0.6  # alpha_j before any data (with prior_weight pseudo-counts)
    prior_weight: float = 4.0

    def __post_init__(self):
        if self.max_tokens < 1:
            raise ConfigError(f"adaptive speculation needs max draft tokens >= 1, got {self.max_tokens}")
        if not 0 < self.time_ema <= 1 or not 0 < self.accept_decay <= 1:
            raise ConfigError("time_ema and accept_decay must be in (0, 1]")
        if not 2 <= self.probe_every <= self.max_probe_every:
            raise ConfigError(f"need 2 <= probe_every <= max_probe_every, got {self.probe_every}, "
                              f"{self.max_probe_every}")


def bucket_of(batch: int) -> int:
    """Smallest power of two >= batch."""
    return 1 << max(0, (int(batch) - 1).bit_length())


class SpecController:
    def __init__(self, config: ControllerConfig):
        self.config = config
        self.candidates = [0, config.max_tokens] if config.tree else list(range(config.max_tokens + 1))
        n = config.max_tokens
        self.reached = [0.0] * n  # position j drafted with all earlier drafts accepted
        self.accepted = [0.0] * n  # ... and accepted
        self.tree_tokens: Optional[float] = None  # running mean tokens/sequence of tree steps
        self.times: dict[int, dict[int, float]] = {}  # bucket -> k -> EMA seconds per step
        self.samples: dict[tuple[int, int], int] = {}  # (bucket, k) -> timed steps
        self.steps: dict[int, int] = {}  # bucket -> steps chosen so far
        self.best: dict[int, int] = {}  # bucket -> current best k
        self.interval: dict[int, int] = {}  # bucket -> steps until the probe after next
        self.next_probe: dict[int, int] = {}  # bucket -> step count of the next probe
        self.probes: dict[int, int] = {}

    # ------------------------------------------------------------------ model
    def alpha(self, j: int) -> float:
        c = self.config
        return (self.accepted[j] + c.prior_accept * c.prior_weight) / (self.reached[j] + c.prior_weight)

    def expected_tokens(self, k: int) -> float:
        """Expected tokens a sequence gains in one step that drafts k tokens."""
        if k == 0:
            return 1.0
        if self.config.tree:
            return self.tree_tokens if self.tree_tokens is not None else 1.0 + self.config.prior_accept
        total, run = 1.0, 1.0
        for j in range(k):
            run *= self.alpha(j)
            total += run
        return total

    def step_time(self, bucket: int, k: int) -> Optional[float]:
        """Measured or interpolated seconds per step; None when the bucket has no data."""
        known = self.times.get(bucket, {})
        if k in known:
            return known[k]
        if len(known) < 2:
            return None
        ks, ts = list(known), list(known.values())
        mk, mt = sum(ks) / len(ks), sum(ts) / len(ts)
        var = sum((x - mk) ** 2 for x in ks)
        slope = sum((x - mk) * (y - mt) for x, y in zip(ks, ts)) / var
        return max(mt + slope * (k - mk), 1e-9)

    def throughput(self, batch: int, k: int) -> Optional[float]:
        t = self.step_time(bucket_of(batch), k)
        return None if t is None else batch * self.expected_tokens(k) / t

    # ----------------------------------------------------------------- choose
    def choose(self, batch: int) -> int:
        """Draft tokens per sequence for a step with `batch` decoding sequences (0: don't draft)."""
        if batch <= 0:
            return 0
        b = bucket_of(batch)
        known = self.times.get(b, {})
        n = self.steps[b] = self.steps.get(b, 0) + 1
        for k in (self.config.max_tokens, 0):  # two measured points before any model
            if k not in known:
                return k
        best = max(self.candidates, key=lambda k: self.throughput(batch, k))
        if best != self.best.get(b):  # the choice moved: probe at the base rate again
            self.best[b], self.interval[b] = best, self.config.probe_every
        if n >= self.next_probe.get(b, self.config.probe_every):
            # probes back off (x2 up to max_probe_every) while the best choice holds
            self.next_probe[b] = n + self.interval[b]
            self.interval[b] = min(2 * self.interval[b], self.config.max_probe_every)
            others = [k for k in self.candidates if k != best]
            self.probes[b] = self.probes.get(b, 0) + 1
            return others[self.probes[b] % len(others)]
        return best

    # ----------------------------------------------------------------- record
    def record_time(self, batch: int, k: int, seconds: float) -> None:
        """A step with `batch` decoding sequences (and no prefill) drafting k took `seconds`."""
        if batch <= 0 or seconds <= 0:
            return
        b = bucket_of(batch)
        known = self.times.setdefault(b, {})
        n = self.samples[(b, k)] = self.samples.get((b, k), 0) + 1
        w = self.config.time_ema
        # the first step of a shape pays one-time costs (kernel selection, allocations): the
        # second sample replaces it instead of averaging with it
        known[k] = seconds if n <= 2 else (1 - w) * known[k] + w * seconds

    def record_accept(self, drafted: int, accepted: int) -> None:
        """One sequence drafted `drafted` tokens and `accepted` of them were accepted."""
        if drafted <= 0:
            return
        if self.config.tree:
            got = 1.0 + accepted
            self.tree_tokens = got if self.tree_tokens is None else 0.95 * self.tree_tokens + 0.05 * got
            return
        d = self.config.accept_decay
        for j in range(min(drafted, len(self.reached))):
            self.reached[j] *= d
            self.accepted[j] *= d
        for j in range(min(drafted, accepted + 1, len(self.reached))):
            self.reached[j] += 1
            if j < accepted:
                self.accepted[j] += 1
