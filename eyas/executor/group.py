"""The Ray side of the executor: one STRICT_PACK placement group on one node, holding `tp`
target-shard actors and (with a draft) one drafter actor, and the coordinator's streams to them.

Start-up, in order, every wait bounded by `worker_start_timeout_s`:
  1. the placement group is placed (else: a ConfigError naming what was asked and what is free);
  2. every actor joins the torch.distributed world and loads its part (`start`);
  3. each reports how many KV blocks its budget holds; all allocate the minimum, so the
     coordinator's one allocator and block tables address every worker's cache (`serve`);
  4. each starts its gRPC server on 127.0.0.1 and the coordinator opens one stream per worker.
"""
from __future__ import annotations

import logging
import os
import uuid
from typing import Optional

from eyas.config import EngineConfig
from eyas.distributed import free_port
from eyas.errors import ConfigError, EyasError
from eyas.executor.rpc import WorkerStream
from eyas.executor.worker import WorkerSpec
from eyas.ray_util import import_ray, short_error

log = logging.getLogger("eyas.worker")


class WorkerActor:
    """The body of a worker actor (a Ray actor class via `ray.remote`)."""

    def __init__(self, spec: WorkerSpec):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        self.spec = spec
        self.worker = None
        self.server = None

    def start(self) -> dict:
        from eyas.executor.worker import DrafterWorker, TargetWorker

        cls = TargetWorker if self.spec.role == "target" else DrafterWorker
        self.worker = cls(self.spec)
        info = self.worker.info() if self.spec.role == "target" else {}
        return {**info, "pid": os.getpid()}

    def capacity(self, max_model_len: int, lookahead: int) -> int:
        return self.worker.capacity(max_model_len, lookahead)

    def serve(self, num_blocks: int, lookahead: int) -> int:
        from eyas.executor.rpc import serve_worker

        self.worker.allocate(num_blocks, lookahead)
        self.server, port = serve_worker(self.worker)
        return port


def _free(ray) -> dict:
    free = ray.available_resources()
    return {k: free[k] for k in ("CPU", "GPU") if k in free}


class WorkerGroup:
    """Starts (and restarts) the actors; `targets[r]` and `drafter` are the coordinator's streams."""

    def __init__(self, config: EngineConfig, model: str, draft: Optional[str]):
        self.config, self.model, self.draft = config, model, draft
        self.ray = self._connect()
        self.pg = None
        self.actors: list = []
        self.targets: list[WorkerStream] = []
        self.drafter: Optional[WorkerStream] = None
        self.info: dict = {}
        self.num_blocks = 0

    def _connect(self):
        """Join the configured cluster ($RAY_ADDRESS by default), or start a local one sized so that
        the workers fit (they wait on each other most of the time, so they may share cores)."""
        ray = import_ray()
        if ray.is_initialized():
            return ray
        address = self.config.ray_address or os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            # Ray renices its workers by +15 by default (worker_niceness); model workers are the
            # latency path, so they keep this process's priority
            need = self.world_size * self.config.worker_cpus
            ray.init(num_cpus=max(os.cpu_count() or 1, int(need + 0.999)), include_dashboard=False,
                     log_to_driver=False, _system_config={"worker_niceness": 0})
        return ray

    def _check_fits(self, bundles: list[dict]) -> None:
        """Fail at once when no node could ever hold the whole group (STRICT_PACK: one node)."""
        need = {k: sum(b.get(k, 0) for b in bundles) for k in ("CPU", "GPU")}
        nodes = [n["Resources"] for n in self.ray.nodes() if n.get("Alive")]
        if nodes and not any(all(r.get(k, 0) >= v for k, v in need.items() if v) for r in nodes):
            biggest = max(nodes, key=lambda r: (r.get("GPU", 0), r.get("CPU", 0)))
            raise ConfigError(f"no Ray node can hold the workers ({need['CPU']:g} CPUs, {need['GPU']:g} GPUs on "
                              f"one node); the largest has {biggest.get('CPU', 0):g} CPUs, "
                              f"{biggest.get('GPU', 0):g} GPUs: lower --tp, --worker-cpus or --worker-gpus")

    @property
    def world_size(self) -> int:
        return self.config.tp + (1 if self.draft is not None else 0)

    def _resources(self) -> tuple[dict, dict]:
        cfg, ray = self.config, self.ray
        gpu = cfg.device.startswith("cuda") or (cfg.device == "auto" and ray.cluster_resources().get("GPU", 0) > 0)
        target = {"CPU": cfg.worker_cpus} | ({"GPU": cfg.worker_gpus if cfg.worker_gpus is not None else 1.0}
                                             if gpu else {})
        drafter = {"CPU": cfg.worker_cpus} | ({"GPU": cfg.drafter_gpus if cfg.drafter_gpus is not None else 1.0}
                                              if gpu else {})
        return target, drafter

    def start(self, max_model_len_fn, lookahead: int) -> None:
        """Place, start and connect every worker. max_model_len_fn(info of rank 0) -> max_model_len."""
        ray, cfg = self.ray, self.config
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        target_res, drafter_res = self._resources()
        bundles = [dict(target_res) for _ in range(cfg.tp)] + ([dict(drafter_res)] if self.draft else [])
        timeout = cfg.worker_start_timeout_s
        self._check_fits(bundles)
        self.pg = placement_group(bundles, strategy="STRICT_PACK", name=f"eyas-workers-{uuid.uuid4().hex[:8]}")
        try:
            ray.get(self.pg.ready(), timeout=timeout)
        except ray.exceptions.GetTimeoutError:
            self.stop()
            raise ConfigError(f"the Ray cluster could not place {cfg.tp} target shard(s) of {target_res}"
                              + (f" and a drafter of {drafter_res}" if self.draft else "")
                              + f" on one node within {timeout:g}s (free now: {_free(ray)}); "
                              "lower --tp or --worker-cpus, or add resources") from None
        port = free_port()
        actor_cls = ray.remote(WorkerActor)
        for rank, res in enumerate(bundles):
            role = "target" if rank < cfg.tp else "drafter"
            spec = WorkerSpec(role, rank, cfg.tp, self.world_size, port, self.model, self.draft, cfg,
                              timeout_s=timeout)
            self.actors.append(actor_cls.options(
                num_cpus=res["CPU"], num_gpus=res.get("GPU", 0), max_concurrency=2,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=rank),
            ).remote(spec))
        infos = self._all("start", [a.start.remote() for a in self.actors], timeout)
        self.info = infos[0]
        self.pids = [i["pid"] for i in infos]
        max_model_len = max_model_len_fn(self.info)
        caps = self._all("capacity", [a.capacity.remote(max_model_len, lookahead) for a in self.actors], timeout)
        self.num_blocks = cfg.num_kv_blocks or min(caps)
        ports = self._all("serve", [a.serve.remote(self.num_blocks, lookahead) for a in self.actors], timeout)
        self.targets = [WorkerStream(f"127.0.0.1:{p}", "Steps", f"target rank {r}")
                        for r, p in enumerate(ports[:cfg.tp])]
        self.drafter = WorkerStream(f"127.0.0.1:{ports[-1]}", "Drafts", "drafter") if self.draft else None
        log.info("ray executor: %d target shard(s)%s, %d KV blocks of %d tokens each",
                 cfg.tp, " + drafter" if self.draft else "", self.num_blocks, cfg.block_size)

    def _all(self, what: str, refs: list, timeout: float) -> list:
        ray = self.ray
        try:
            return ray.get(refs, timeout=timeout)
        except ray.exceptions.GetTimeoutError:
            self.stop()
            raise ConfigError(f"ray executor: workers did not finish '{what}' within {timeout:g}s") from None
        except Exception as e:  # a worker raised (model not found, KV budget too small, ...)
            self.stop()
            raise EyasError(f"ray executor: a worker failed to {what}: {short_error(e)}") from None

    def kill(self, role: str, rank: int = 0) -> None:
        """Kill one worker process (fault-injection for tests and drills)."""
        index = rank if role == "target" else self.config.tp
        self.ray.kill(self.actors[index], no_restart=True)

    def stop(self) -> None:
        for s in self.targets + ([self.drafter] if self.drafter else []):
            s.close()
        self.targets, self.drafter = [], None
        for a in self.actors:
            try:
                self.ray.kill(a, no_restart=True)
            except Exception:
                pass
        self.actors = []
        if self.pg is not None:
            from ray.util.placement_group import remove_placement_group

            try:
                remove_placement_group(self.pg)
            except Exception:
                pass
            self.pg = None
