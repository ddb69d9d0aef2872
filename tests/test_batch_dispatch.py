"""The batch dispatcher on fake engines: bounded in-flight work, lazy input, least-loaded spreading,
re-dispatch when a replica dies, and a poison line that cannot take the whole job down."""
import itertools
import json

import pytest

from eyas.batch.dispatcher import Dispatcher
from eyas.batch.inputs import BadLine, WorkItem
from eyas.batch.pool import LocalPool
from eyas.batch.progress import BatchStats, Progress
from eyas.batch.replica import ReplicaCore
from eyas.batch.results import ResultWriter
from eyas.core import RequestOutput, SamplingParams
from eyas.errors import EyasError, InvalidRequestError

PARAMS = SamplingParams(max_tokens=3)


class FakeEngine:
    """Finishes each request after `steps` steps with token ids [len(prompt)] * 3."""

    def __init__(self, steps=2, die_after=None, poison=()):
        self.steps, self.die_after, self.poison = steps, die_after, set(poison)
        self.running: dict[str, list] = {}
        self.num_steps = 0
        self.max_running = 0

    def add_request(self, rid, prompt, params, messages=None, chat=False):
        if prompt == "reject":
            raise InvalidRequestError("prompt", "rejected by the engine")
        self.running[rid] = [prompt, 0]
        self.max_running = max(self.max_running, len(self.running))

    def has_unfinished(self):
        return bool(self.running)

    def step(self):
        self.num_steps += 1
        if self.die_after is not None and self.num_steps > self.die_after:
            raise RuntimeError("engine crashed")
        if self.poison & set(self.running):
            raise RuntimeError("poisoned")
        outs = []
        for rid, state in list(self.running.items()):
            state[1] += 1
            if state[1] >= self.steps:
                del self.running[rid]
                outs.append(RequestOutput(rid, state[0].upper(), [len(state[0])] * 3, True, "length", 4))
        return outs


def items(n, start=0):
    for i in range(start, start + n):
        yield WorkItem(f"id{i}", i + 1, f"in.jsonl line {i + 1}", f"prompt {i}", None, PARAMS)


def dispatch(tmp_path, engines, lines, cap=4, max_attempts=3):
    pool = LocalPool(None, cores=[ReplicaCore(None, engine=e) for e in engines])
    writer = ResultWriter(tmp_path / "out.jsonl")
    stats = BatchStats(total=0)
    d = Dispatcher(pool, writer, stats, Progress(stats, bar=False, interval=1e9), cap, max_attempts)
    try:
        d.run(lines)
    finally:
        writer.close()
        pool.close()
    return d, writer, stats


def test_bounded_inflight_and_lazy_input(tmp_path):
    consumed = itertools.count()
    engines = [FakeEngine(), FakeEngine()]
    out = tmp_path / "out.jsonl"
    lag = []

    def source():
        for i, it in enumerate(items(200)):
            next(consumed)
            written = len(out.read_text().splitlines()) if out.exists() else 0
            lag.append(i - written)  # lines taken from the input but not yet written
            yield it

    d, writer, stats = dispatch(tmp_path, engines, source(), cap=3)
    assert stats.ok == 200 and len(writer.done) == 200
    assert d.max_seen_inflight <= 6 and all(e.max_running <= 3 for e in engines)
    assert next(consumed) == 200 and max(lag) <= 6  # read once, only as replicas have room
    assert all(r.lines > 50 for r in d.pool.replicas)  # least-loaded: both replicas did real work


def test_dead_replica_work_is_redispatched(tmp_path):
    engines = [FakeEngine(), FakeEngine(die_after=1)]  # dies on its 2nd step, its first lines still running
    d, writer, stats = dispatch(tmp_path, engines, items(40), cap=4)
    lines = (tmp_path / "out.jsonl").read_text().splitlines()
    assert len(lines) == 40 and len(writer.done) == 40  # every id exactly once
    assert stats.redispatched > 0 and stats.ok == 40
    assert [r.alive for r in d.pool.replicas] == [True, False]
    assert "engine crashed" in d.pool.replicas[1].failure


def test_poison_line_is_recorded_after_max_attempts(tmp_path):
    engines = [FakeEngine(poison={"id7"}) for _ in range(3)]  # id7 kills whichever replica runs it
    d, writer, stats = dispatch(tmp_path, engines, items(20), cap=8, max_attempts=2)
    assert len(writer.done) == 20
    assert stats.failed >= 1 and stats.ok + stats.failed == 20

    recs = {r["id"]: r for r in map(json.loads, (tmp_path / "out.jsonl").read_text().splitlines())}
    assert "failed on 2 replicas" in recs["id7"]["error"]


def test_every_replica_dead_is_an_error_and_resume_finishes(tmp_path):
    with pytest.raises(EyasError, match="every replica failed"):
        dispatch(tmp_path, [FakeEngine(die_after=2)], items(30), cap=4)
    done_before = len(ResultWriter(tmp_path / "out.jsonl").done)
    assert 0 < done_before < 30
    _, writer, stats = dispatch(tmp_path, [FakeEngine()], items(30), cap=4)
    assert len(writer.done) == 30 and stats.ok == 30 - done_before


def test_bad_and_rejected_lines_are_recorded(tmp_path):
    lines = [BadLine(None, 1, "in.jsonl line 1: not valid JSON"),
             WorkItem("r", 2, "in.jsonl line 2", "reject", None, PARAMS), *items(3, start=5)]
    _, writer, stats = dispatch(tmp_path, [FakeEngine()], iter(lines))
    assert (stats.ok, stats.failed) == (3, 2) and writer.done == {1, "r", "id5", "id6", "id7"}


def test_progress_bar_on_a_terminal_and_log_lines_otherwise():
    import io

    stats = BatchStats(total=3)
    stats.add({"id": "a", "usage": {"prompt_tokens": 2, "completion_tokens": 5}})
    bar_out, log_out = io.StringIO(), io.StringIO()
    bar = Progress(stats, bar=True, stream=bar_out)
    bar.update(1)
    bar.close()
    assert "1/3" in bar_out.getvalue() and "tok/s" in bar_out.getvalue()
    logger = Progress(stats, bar=False, interval=1e-9, stream=log_out)
    logger.update(1)
    assert "1/3 lines (1 ok, 0 failed), 5 tokens" in log_out.getvalue() and "lines/s" in log_out.getvalue()
