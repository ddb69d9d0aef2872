"""The workers of the Ray executor, without Ray or gRPC: what one process does with each plan.

Ranks of the torch.distributed world: 0 .. tp-1 are the target's tensor-parallel shards, rank tp
(when there is a draft) is the drafter. The world group is gloo; the shards' own group (NCCL on
GPU, gloo on CPU) carries the model's all-reduce/all-gather. Rank 0 and the drafter exchange
tensors point to point on the world group, on the CPU:
  rank 0 -> drafter   after each step: the aux hidden states of the positions whose KV became
                      final, [R, n_aux * H] in plan order (the drafter fuses them itself)
  drafter -> rank 0   after a proposal with sampled requests: their draft probabilities over the
                      target vocab, [sum q_rows, V] float32, in proposal order
Sends are non-blocking (the peer receives when its next plan says so); a send to a dead drafter is
simply never waited for.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from eyas.config import EngineConfig
from eyas.distributed.state import ParallelState
from eyas.errors import ConfigError
from eyas.executor import protocol
from eyas.serve.v1 import worker_pb2 as pb
from eyas.spec.tree import TreeDraft, move_kv
from eyas.workers.input_batch import SeqSpan
from eyas.workers.target_step import StepItem, kept_aux_rows, run_target_step

log = logging.getLogger("eyas.worker")


@dataclass(frozen=True)
class WorkerSpec:
    role: str  # "target" or "drafter"
    rank: int  # in the world: targets 0..tp-1, drafter tp
    tp: int
    world_size: int  # tp, plus one with a drafter
    master_port: int  # the world group's rendezvous on 127.0.0.1
    model: str  # target folder
    draft: Optional[str]  # drafter folder
    config: EngineConfig
    timeout_s: float = 120.0

    @property
    def drafter_rank(self) -> Optional[int]:
        return self.tp if self.draft is not None else None


def join_world(spec: WorkerSpec, device: torch.device) -> Optional[dist.ProcessGroup]:
    """Join the world group; return the target shards' group (None when tp == 1)."""
    if spec.world_size == 1:
        return None
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{spec.master_port}",
                                world_size=spec.world_size, rank=spec.rank,
                                timeout=timedelta(seconds=spec.timeout_s))
    except (RuntimeError, ValueError, OSError) as e:
        raise ConfigError(f"worker rank {spec.rank} of {spec.world_size} could not join the group at "
                          f"127.0.0.1:{spec.master_port}: {e}") from e
    if spec.tp == 1:
        return None
    backend = "nccl" if device.type == "cuda" else "gloo"
    return dist.new_group(list(range(spec.tp)), backend=backend)  # every rank must call this


def worker_device(config: EngineConfig) -> torch.device:
    from eyas.engine import resolve_device

    device = resolve_device(config.device)
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())  # Ray sets the visible GPU
    return device


def start_worker(spec: WorkerSpec) -> tuple[torch.device, torch.dtype, Optional[dist.ProcessGroup]]:
    """What every worker does first: threads, device and dtype from the config, then join the
    world group. Returns (device, dtype, the target shards' group or None)."""
    from eyas.engine import resolve_dtype

    if spec.config.num_threads:
        torch.set_num_threads(spec.config.num_threads)
    device = worker_device(spec.config)
    return device, resolve_dtype(spec.config.dtype, device), join_world(spec, device)


class _Sends:
    """Non-blocking point-to-point sends whose buffers must live until they complete."""

    def __init__(self):
        self.pending: list[tuple[dist.Work, torch.Tensor]] = []

    def send(self, tensor: torch.Tensor, dst: int) -> None:
        self.pending = [(w, t) for w, t in self.pending if not w.is_completed()]
        tensor = tensor.detach().to("cpu").contiguous()
        self.pending.append((dist.isend(tensor, dst=dst), tensor))


class TargetWorker:
    """One tensor-parallel shard of the target. Every rank runs every plan's forward; rank 0
    also samples, accepts drafts and reports."""

    def __init__(self, spec: WorkerSpec):
        from eyas.models.loader import load_model

        self.spec = spec
        self.device, self.dtype, group = start_worker(spec)
        self.parallel = ParallelState(spec.tp, spec.rank, group)
        self.model = load_model(spec.model, dtype=self.dtype, device=self.device, parallel=self.parallel)
        self.aux_layer_ids: tuple[int, ...] = ()
        if spec.draft is not None:
            import json

            from eyas.models.eagle3 import check_compatible

            self.aux_layer_ids = check_compatible(json.loads((Path(spec.draft) / "config.json").read_text()),
                                                  self.model)
        self.runner = None
        self.generators: dict[str, Optional[torch.Generator]] = {}
        self.sends = _Sends()

    def info(self) -> dict:
        m = self.model
        return {"vocab_size": m.vocab_size, "max_position": m.arch.max_position,
                "sliding_window": getattr(m, "sliding_window", None), "num_layers": m.num_layers}

    def capacity(self, max_model_len: int, lookahead: int) -> int:
        """KV blocks this shard can hold under the configured budget."""
        from eyas.engine import kv_budget
        from eyas.kv.cache import kv_layout_for, num_blocks_for

        cfg = self.spec.config
        return num_blocks_for(kv_budget(cfg, self.device), [kv_layout_for(self.model)], cfg.block_size,
                              self.dtype, self.device, max_model_len, lookahead)

    def allocate(self, num_blocks: int, lookahead: int) -> None:
        from eyas.engine import build_target_runner

        self.runner, self.kv_caches = build_target_runner(self.model, self.spec.config, num_blocks,
                                                          lookahead, self.device, self.dtype)
        self.runner.aux_layer_ids = self.aux_layer_ids

    def step(self, plan: pb.StepPlan) -> pb.StepResult:
        t0 = time.perf_counter()
        reply = self._step(plan)
        reply.worker_seconds = time.perf_counter() - t0
        return reply

    @torch.inference_mode()
    def _step(self, plan: pb.StepPlan) -> pb.StepResult:
        protocol.check_version(plan.version)
        if plan.move_src:
            move_kv(self.kv_caches, torch.tensor(list(plan.move_src), device=self.device),
                    torch.tensor(list(plan.move_dst), device=self.device))
        for rid in plan.finished:
            self.generators.pop(rid, None)
        first = self.parallel.is_first_rank
        qs = self._receive_q(plan) if first else None
        items = []
        for i, it in enumerate(plan.items):
            params = protocol.sampling_from_pb(it.sampling)
            if first and it.request_id not in self.generators:
                self.generators[it.request_id] = protocol.generator_for(params)
            tokens = list(it.token_ids)
            draft = None
            if len(tokens) > it.num_new:
                draft = protocol.draft_from_pb(tokens[it.num_new:], it.tree, qs.get(i) if qs else None)
            tree = getattr(draft, "mask", None)
            items.append(StepItem(SeqSpan(tokens, it.start, list(it.block_table), tree_mask=tree), it.num_new,
                                  it.sample, params, self.generators.get(it.request_id), draft,
                                  request_id=it.request_id))
        out, result = run_target_step(self.runner, items, decide=first)
        reply = pb.StepResult(version=protocol.PROTOCOL_VERSION, step=plan.step)
        if not first:
            return reply
        if plan.send_features and self.spec.drafter_rank is not None:
            self.sends.send(kept_aux_rows(out, result.aux), self.spec.drafter_rank)
        for i in range(len(items)):
            reply.items.add(token_ids=out.tokens[i] or [], num_valid=out.num_valid[i], accepted=out.accepted[i],
                            logprobs_json=protocol.logprobs_to_json(out.logprobs[i]))
        reply.move_src.extend(out.move_src)
        reply.move_dst.extend(out.move_dst)
        return reply

    def _receive_q(self, plan: pb.StepPlan) -> dict[int, torch.Tensor]:
        """The drafter's probabilities for this plan's sampled drafts: item index -> [rows, V]."""
        counts = [(i, it.q_rows) for i, it in enumerate(plan.items) if it.q_rows > 0]
        if not counts:
            return {}
        buf = torch.empty(sum(n for _, n in counts), self.model.vocab_size, dtype=torch.float32)
        dist.recv(buf, src=self.spec.drafter_rank)
        parts = buf.to(self.device).split([n for _, n in counts])
        return {i: q for (i, _), q in zip(counts, parts)}


class TargetEmbedding:
    """The target's token embedding alone (the drafter's inputs), read from its checkpoint."""

    NAMES = ("model.embed_tokens.weight", "embed_tokens.weight", "transformer.wte.weight")

    def __init__(self, folder: str, dtype: torch.dtype, device: torch.device):
        from safetensors import safe_open

        from eyas.models.loader import safetensors_files

        self.weight = None
        for path in safetensors_files(folder):
            with safe_open(str(path), framework="pt", device="cpu") as f:
                name = next((n for n in self.NAMES if n in f.keys()), None)
                if name is not None:
                    self.weight = f.get_tensor(name).to(device=device, dtype=dtype)  # [V, H]
                    break
        if self.weight is None:
            raise ConfigError(f"no token embedding ({', '.join(self.NAMES)}) in the checkpoint at {folder}")
        self.vocab_size = self.weight.shape[0]

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:  # [T] -> [T, H]
        return torch.nn.functional.embedding(input_ids, self.weight)


class MirrorSeq:
    """The drafter's copy of what the proposer reads of a Sequence."""

    def __init__(self, request_id: str):
        self.request_id = request_id
        self.token_ids: list[int] = []
        self.block_table: list[int] = []
        self.num_computed_tokens = 0
        self.params = None
        self.generator: Optional[torch.Generator] = None

    def __len__(self) -> int:
        return len(self.token_ids)


def _target_q(draft, vocab_size: int) -> torch.Tensor:
    """A draft's probabilities over the target vocab: chains [K, V] already; trees [n+1, V]."""
    if isinstance(draft, TreeDraft):
        return torch.stack([draft.target_q(p, vocab_size) for p in range(len(draft.tokens) + 1)])
    return draft.q


class DrafterWorker:
    """The EAGLE-3 head with its own KV cache (same block ids and size as the target's)."""

    def __init__(self, spec: WorkerSpec):
        from transformers import AutoConfig

        from eyas.engine import resolve_draft_dtype
        from eyas.models.eagle3 import load_drafter

        self.spec = spec
        self.device, self.dtype, _ = start_worker(spec)  # the drafter is in no shard group
        self.target_config = AutoConfig.from_pretrained(spec.model)
        self.embedding = TargetEmbedding(spec.model, self.dtype, self.device)
        draft_dtype = resolve_draft_dtype(spec.config.spec.dtype, self.dtype, self.device)
        self.drafter = load_drafter(spec.draft, self.target_config, dtype=draft_dtype, device=self.device)
        self.aux_width = len(self.drafter.aux_layers_for(self.target_config.num_hidden_layers)) * \
            self.target_config.hidden_size
        self.proposer = None
        self.seqs: dict[str, MirrorSeq] = {}
        self.sends = _Sends()

    def capacity(self, max_model_len: int, lookahead: int) -> int:
        from eyas.engine import kv_budget
        from eyas.kv.cache import KVLayout, num_blocks_for

        cfg = self.spec.config
        layout = KVLayout(self.drafter.num_kv_heads, self.drafter.head_dim, 1)
        return num_blocks_for(kv_budget(cfg, self.device), [layout], cfg.block_size, self.drafter.dtype,
                              self.device, max_model_len, lookahead)

    def allocate(self, num_blocks: int, lookahead: int) -> None:
        from eyas.engine import build_proposer

        self.proposer = build_proposer(self.drafter, self.embedding, self.spec.config, num_blocks,
                                       self.device)

    def _seq(self, request_id: str) -> MirrorSeq:
        if request_id not in self.seqs:
            self.seqs[request_id] = MirrorSeq(request_id)
        return self.seqs[request_id]

    @torch.inference_mode()
    def draft(self, plan: pb.DraftPlan) -> pb.DraftResult:
        protocol.check_version(plan.version)
        for rid in plan.dropped:  # first: a drop (preemption) happened before this plan's rows
            seq = self.seqs.pop(rid, None)
            if seq is not None:
                self.proposer.drop(seq)
        rows = sum(o.num_rows for o in plan.observed)
        if rows:
            buf = torch.empty(rows, self.aux_width, dtype=self.dtype)  # [R, n_aux * H]
            dist.recv(buf, src=0)
            aux = buf.to(self.device)  # fused by the proposer when it extends over them
            for o, part in zip(plan.observed, aux.split([o.num_rows for o in plan.observed])):
                self.proposer.observe(self._seq(o.request_id), o.start, part)
        reply = pb.DraftResult(version=protocol.PROTOCOL_VERSION, step=plan.step)
        if not plan.items:
            return reply
        seqs = []
        for it in plan.items:
            seq = self._seq(it.request_id)
            del seq.token_ids[it.token_offset:]
            seq.token_ids.extend(it.new_token_ids)
            seq.num_computed_tokens = it.num_computed
            seq.block_table = list(it.block_table)
            if seq.params is None:
                seq.params = protocol.sampling_from_pb(it.sampling)
                seq.generator = protocol.generator_for(seq.params)
            seqs.append(seq)
        drafts = self.proposer.propose(seqs, [it.num_tokens for it in plan.items],
                                       tree=False if plan.chain else None)
        qs = []
        for d in drafts:
            reply.proposals.append(protocol.draft_to_pb(d))
            if d.q is not None:
                qs.append(_target_q(d, self.embedding.vocab_size))
        if qs:
            self.sends.send(torch.cat(qs).float(), 0)
        return reply
