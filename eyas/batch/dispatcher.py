"""The dispatcher: stream lines to the least-loaded live replica, at most `cap` in flight each.

Memory stays flat: lines are pulled from a lazy iterator only when a replica has room. A line's
result is written the moment it comes back. When a replica dies its in-flight lines go back to
the front of the queue for the others; a line that has taken down `max_attempts` replicas is
recorded as an error instead of being retried forever.
"""
from __future__ import annotations

import collections
import logging
from typing import Iterator, Union

from eyas.batch.inputs import BadLine, WorkItem
from eyas.batch.pool import Pool
from eyas.batch.progress import BatchStats, Progress
from eyas.batch.results import ResultWriter, bad_line_record, item_error_record
from eyas.errors import EyasError

log = logging.getLogger("eyas.batch")

WAIT_S = 0.5


class Dispatcher:
    def __init__(self, pool: Pool, writer: ResultWriter, stats: BatchStats, progress: Progress,
                 cap: int, max_attempts: int = 3):
        self.pool = pool
        self.writer = writer
        self.stats = stats
        self.progress = progress
        self.cap = cap
        self.max_attempts = max_attempts
        self.inflight: dict[int, dict[str, WorkItem]] = {r.index: {} for r in pool.replicas}
        self.attempts: collections.Counter[str] = collections.Counter()
        self.retry: collections.deque[WorkItem] = collections.deque()
        self.max_seen_inflight = 0  # the most lines in flight at once (all replicas): for tests

    def run(self, lines: Iterator[Union[WorkItem, BadLine]]) -> None:
        source = iter(lines)
        exhausted = False
        while True:
            exhausted = self._fill(source, exhausted)
            if exhausted and not self.retry and not any(self.inflight.values()):
                return
            for r, result in self.pool.wait(WAIT_S):
                if isinstance(result, BaseException):
                    self._replica_lost(r, result)
                else:
                    self._finished(r, result)

    # ---------------------------------------------------------------- fill
    def _live(self) -> list[int]:
        return [r.index for r in self.pool.replicas if r.alive]

    def _next(self, source: Iterator) -> Union[WorkItem, None]:
        """The next servable line (retries first); bad lines are recorded on the way."""
        if self.retry:
            return self.retry.popleft()
        for x in source:
            if x.key in self.writer.done:  # counted in stats.skipped by the pre-scan
                continue
            if isinstance(x, BadLine):
                self._record(bad_line_record(x))
                continue
            return x
        return None

    def _fill(self, source: Iterator, exhausted: bool) -> bool:
        while True:
            live = self._live()
            if not live and exhausted and not self.retry:
                return True  # nothing left to serve anyway
            if not live:
                raise EyasError("batch: every replica failed; rerun the same command to resume "
                                f"({self.stats.done} lines were written)")
            r = min(live, key=lambda i: len(self.inflight[i]))
            room = self.cap - len(self.inflight[r])
            if room <= 0:
                return exhausted
            batch: list[WorkItem] = []
            while len(batch) < room:
                item = None if (exhausted and not self.retry) else self._next(source)
                if item is None:
                    exhausted = True
                    break
                batch.append(item)
            if batch:
                for it in batch:
                    self.inflight[r][it.id] = it
                self.pool.submit(r, batch)
                self.max_seen_inflight = max(self.max_seen_inflight, sum(map(len, self.inflight.values())))
            if exhausted and not self.retry:
                return True

    # ------------------------------------------------------------- results
    def _record(self, rec: dict) -> int:
        self.writer.write(rec)
        tokens = self.stats.add(rec)
        self.progress.update(1)
        return tokens

    def _finished(self, r: int, records: list[dict]) -> None:
        info = self.pool.replicas[r]
        for rec in records:
            if self.inflight[r].pop(rec["id"], None) is None:
                continue  # not ours any more (should not happen): never write an id twice
            info.lines += 1
            info.tokens += self._record(rec)

    def _replica_lost(self, r: int, err: BaseException) -> None:
        info = self.pool.replicas[r]
        info.alive = False
        info.failure = str(err)
        lost = list(self.inflight[r].values())
        self.inflight[r] = {}
        log.warning("batch: replica %d died (%s); re-dispatching its %d in-flight lines", r, err, len(lost))
        for it in lost:
            self.attempts[it.id] += 1
            if self.attempts[it.id] >= self.max_attempts:
                self._record(item_error_record(it, f"failed on {self.attempts[it.id]} replicas (last: {err})"))
            else:
                self.stats.redispatched += 1
                self.retry.append(it)
