"""Plain-step time against the batch's context, for one batch bucket of the adaptive controller.

A decode step's time grows with the context its sequences attend over: in a traced CPU run at
batch 64, plain steps went from 110 to about 220 ms while a wave of sequences grew from 128 to
256 tokens (the attention's key reads). Step times taken at different points of a wave are
therefore not comparable as they are. The controller divides each sample by this line's value at
the sample's context, so a drafting step is judged against plain steps at the same context.

The line is robust and bounded:
- samples go into context bins (`BINS_PER_OCTAVE` per doubling of the context); a bin's point is
  the median of its last `per_bin` samples (time and context), so one stalled step moves nothing
  and a bin follows the machine's drift when the context comes back to it;
- the slope is the median of the slopes between pairs of bin points (Theil-Sen);
- it is clamped so the time is at most proportional to the context at the centre (elasticity
  between 0 and 1): a step also has costs that do not grow with the context (weights, Python),
  so a line through the origin is the steepest one that makes physical sense. With one bin the
  line is flat: the median time, as if the context were not modelled.
"""
from __future__ import annotations

import math
from collections import OrderedDict, deque
from statistics import median
from typing import Optional

BINS_PER_OCTAVE = 8  # context bins per doubling (about 9% wide)
MAX_BINS = 24  # bins kept, the most recently used (3 octaves)


class ContextLine:
    def __init__(self, per_bin: int = 3):
        self.per_bin = per_bin
        self.bins: OrderedDict[int, deque] = OrderedDict()  # bin -> recent (context, seconds)
        self._fit: Optional[tuple[float, float, float]] = None  # (centre context, time there, slope)

    def add(self, context: float, seconds: float) -> None:
        """A plain step over `context` tokens (all sequences together) took `seconds`."""
        if context <= 0 or seconds <= 0:
            return
        key = round(BINS_PER_OCTAVE * math.log2(context))
        recent = self.bins.pop(key, None) or deque(maxlen=self.per_bin)
        recent.append((float(context), float(seconds)))
        self.bins[key] = recent  # most recently used last
        while len(self.bins) > MAX_BINS:
            self.bins.popitem(last=False)
        self._fit = None

    def points(self) -> list[tuple[float, float]]:
        """One (context, seconds) point per bin: the medians of its recent samples."""
        return [(median(c for c, _ in r), median(t for _, t in r)) for r in self.bins.values()]

    def fit(self) -> Optional[tuple[float, float, float]]:
        """(centre context, time at the centre, slope in seconds per token), None without data."""
        if self._fit is None and self.bins:
            pts = self.points()
            xc = median(x for x, _ in pts)
            slopes = [(y2 - y1) / (x2 - x1) for i, (x1, y1) in enumerate(pts) for x2, y2 in pts[i + 1:]
                      if x2 != x1]
            slope = max(median(slopes), 0.0) if slopes else 0.0
            # the line through the points' centre: the median of each point's level at xc
            level = median(y - slope * (x - xc) for x, y in pts)
            self._fit = (xc, level, min(slope, level / xc))
        return self._fit

    def at(self, context: float) -> Optional[float]:
        """Predicted plain-step seconds at `context` tokens; None before any sample."""
        values = self.at_many((context,))
        return None if values is None else values[0]

    def at_many(self, contexts) -> Optional[list[float]]:
        """`at` for each of `contexts` (one fit for all: windows hold up to hundreds of samples)."""
        fit = self.fit()
        if fit is None:
            return None
        xc, level, slope = fit
        # the clamp keeps the line at or above level * context / xc, so it stays positive
        return [max(level + slope * (c - xc), 1e-9) for c in contexts]
