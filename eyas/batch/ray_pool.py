"""RayPool: R replicas as Ray actors, one engine each, spread over the cluster's nodes.

Placement: one placement group with a bundle per replica and strategy SPREAD, so replicas land
on different nodes when the cluster has them (and share a node when it does not). A tp > 1
replica would need its shards PACKed on one node, a group per replica; that executor is not
built yet. Each actor runs a ReplicaCore (its own step thread); the pool keeps one `poll` call
outstanding per replica and waits on all of them with `ray.wait`.
"""
from __future__ import annotations

import logging
import uuid
from typing import Optional

from eyas.batch.inputs import WorkItem
from eyas.batch.pool import Event, ReplicaInfo
from eyas.batch.settings import BatchConfig
from eyas.config import EngineConfig
from eyas.errors import ConfigError, EyasError
from eyas.ray_util import import_ray, short_error

log = logging.getLogger("eyas.batch")

POLL_S = 1.0  # how long a replica's poll waits for results before returning empty


class ReplicaActor:
    """The body of a replica actor (made a Ray actor class by `_actor_class`)."""

    def __init__(self, config: EngineConfig):
        import os

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from eyas.batch.replica import ReplicaCore

        self.core = ReplicaCore(config)

    def ready(self) -> dict:
        import os

        import ray

        return {"node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid(),
                "device": str(self.core.engine.device)}

    def submit(self, items: list[WorkItem]) -> int:
        return self.core.submit(items)

    def poll(self, timeout: float) -> list[dict]:
        return self.core.poll(timeout)


def connect(address: Optional[str]):
    """Join the cluster at `address` ($RAY_ADDRESS under `ray job submit`), or start a local one."""
    import os

    ray = import_ray()
    if not ray.is_initialized():
        joining = bool(address or os.environ.get("RAY_ADDRESS"))
        ray.init(address=address, **({} if joining else {"include_dashboard": False}))
    return ray


class RayPool:
    def __init__(self, cfg: BatchConfig, config: EngineConfig):
        if cfg.tp > 1:
            raise ConfigError("batch: Ray replicas with --tp > 1 are not supported yet; run one replica with "
                              "--executor local --tp N (its shards still run as Ray actors)")
        ray = self.ray = connect(cfg.ray_address)
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        gpus = cfg.replica_gpus
        if gpus is None:
            has_gpu = ray.cluster_resources().get("GPU", 0) > 0
            gpus = float(cfg.tp) if has_gpu and (config.device == "auto" or config.device.startswith("cuda")) else 0.0
        bundle = {"CPU": cfg.replica_cpus} | ({"GPU": gpus} if gpus else {})
        self.pg = placement_group([dict(bundle) for _ in range(cfg.replicas)], strategy="SPREAD",
                                  name=f"eyas-batch-{uuid.uuid4().hex[:8]}")
        try:
            ray.get(self.pg.ready(), timeout=cfg.placement_timeout)
        except ray.exceptions.GetTimeoutError:
            self.close()
            raise ConfigError(f"batch: the cluster could not fit {cfg.replicas} replicas of {bundle} within "
                              f"{cfg.placement_timeout:.0f}s (available: {ray.available_resources()}); "
                              "lower --replicas, --replica-cpus or --replica-gpus") from None
        actor_cls = ray.remote(ReplicaActor)
        tag = uuid.uuid4().hex[:8]
        self.actors = [
            actor_cls.options(
                num_cpus=cfg.replica_cpus, num_gpus=gpus, max_concurrency=4, name=f"eyas-replica-{tag}-{i}",
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=i),
            ).remote(config)
            for i in range(cfg.replicas)
        ]
        self.replicas = [ReplicaInfo(i) for i in range(cfg.replicas)]
        refs = [a.ready.remote() for a in self.actors]
        for info, ref in zip(self.replicas, refs):
            try:
                meta = ray.get(ref, timeout=cfg.placement_timeout)
            except Exception as e:  # engine construction failed (model not found, bad config...)
                self.close()
                raise EyasError(f"batch: replica {info.index} failed to start: {short_error(e)}") from None
            info.node_id = meta["node_id"]
            info.extra = {"pid": meta["pid"], "device": meta["device"]}
        log.info("batch: %d replicas on nodes %s", len(self.actors), sorted({r.node_id for r in self.replicas}))
        self._polls: dict = {}  # ObjectRef -> replica index

    def submit(self, r: int, items: list[WorkItem]) -> None:
        self.actors[r].submit.remote(items)  # failures surface through the replica's poll

    def wait(self, timeout: float) -> list[Event]:
        ray = self.ray
        outstanding = set(self._polls.values())
        for info in self.replicas:
            if info.alive and info.index not in outstanding:
                self._polls[self.actors[info.index].poll.remote(POLL_S)] = info.index
        if not self._polls:
            return []
        ready, _ = ray.wait(list(self._polls), num_returns=1, timeout=timeout)
        if ready:
            ready, _ = ray.wait(list(self._polls), num_returns=len(self._polls), timeout=0)
        events: list[Event] = []
        for ref in ready:
            r = self._polls.pop(ref)
            try:
                events.append((r, ray.get(ref)))
            except Exception as e:  # actor died (killed, node lost) or its engine failed
                ray.kill(self.actors[r], no_restart=True)
                events.append((r, EyasError(short_error(e))))
        return events

    def close(self) -> None:
        from ray.util.placement_group import remove_placement_group

        for a in getattr(self, "actors", []):
            try:
                self.ray.kill(a, no_restart=True)
            except Exception:  # already gone
                pass
        try:
            remove_placement_group(self.pg)
        except Exception:
            pass
