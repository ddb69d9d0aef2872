"""Replica pools: the dispatcher's view of R replicas. LocalPool runs them in this process.

A pool has `replicas` (info per replica), `submit(r, items)`, `wait(timeout)` -> a list of
(r, records) or (r, exception) events (an exception means replica r is gone), and `close()`.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Optional, Protocol, Union

from eyas.batch.inputs import WorkItem
from eyas.batch.replica import ReplicaCore, ReplicaFailed
from eyas.config import EngineConfig

Event = tuple[int, Union[list[dict], BaseException]]


@dataclass
class ReplicaInfo:
    index: int
    node_id: Optional[str] = None
    alive: bool = True
    lines: int = 0  # result lines this replica produced
    tokens: int = 0  # completion tokens
    failure: Optional[str] = None
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = {"replica": self.index, "node_id": self.node_id, "alive": self.alive,
             "lines": self.lines, "tokens": self.tokens}
        if self.failure:
            d["failure"] = self.failure
        return d | self.extra


class Pool(Protocol):
    replicas: list[ReplicaInfo]

    def submit(self, r: int, items: list[WorkItem]) -> None: ...

    def wait(self, timeout: float) -> list[Event]: ...

    def close(self) -> None: ...


class LocalPool:
    """Replicas as ReplicaCore objects in this process (one is the usual case)."""

    def __init__(self, config: EngineConfig, replicas: int = 1, cores: Optional[list] = None):
        self._ready = threading.Event()
        self.cores = cores if cores is not None else [ReplicaCore(config, self._ready) for _ in range(replicas)]
        for c in self.cores:
            c.notify = self._ready
        self.replicas = [ReplicaInfo(i, node_id="local") for i in range(len(self.cores))]

    def submit(self, r: int, items: list[WorkItem]) -> None:
        self.cores[r].submit(items)

    def wait(self, timeout: float) -> list[Event]:
        self._ready.wait(timeout)
        self._ready.clear()
        events: list[Event] = []
        for info, core in zip(self.replicas, self.cores):
            if not info.alive:
                continue
            try:
                records = core.poll(0)
            except ReplicaFailed as e:
                core.close(0)
                events.append((info.index, e))
                continue
            if records:
                events.append((info.index, records))
        return events

    def close(self) -> None:
        for c in self.cores:
            c.close()
