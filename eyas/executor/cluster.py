"""ClusterEngine: the coordinator of the Ray executor. It keeps everything request-level (scheduler,
the one block allocator, detokenization, the speculation controller) and drives the workers of a
WorkerGroup with one plan per step:

  step t   [draft]  DraftPlan(items)  -> drafter     -> DraftResult(proposals)   (k > 0 only)
                    (sampled requests: q rows drafter -> rank 0 over torch.distributed)
           [verify] StepPlan(items, KV moves of step t-1) -> every target rank -> StepResult (rank 0)
                    (rank 0 -> drafter: aux hidden states of the accepted rows, torch.distributed)
           [observe] DraftPlan(observed rows) -> drafter; its reply is read before the next draft

The same SpecDecoder as the in-process engine runs the step; only its target (RemoteTarget) and
proposer (RemoteProposer) talk to workers. Without a draft it runs with zero draft tokens.

Faults: a dead drafter is logged and the engine goes on with plain decoding (outputs unchanged).
A dead or failing target shard fails every in-flight request with WorkerUnavailableError, the
group is restarted (fresh KV caches, so the allocator and prefix cache start over too), and
later requests are served again.
"""
from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from typing import Optional

import torch

from eyas.config import EngineConfig
from eyas.core import RequestOutput, SeqStatus
from eyas.engine import LLMEngine, make_controller, model_len_limit
from eyas.errors import WorkerUnavailableError
from eyas.executor import protocol
from eyas.executor.group import WorkerGroup
from eyas.executor.rpc import WorkerError
from eyas.hub import eos_token_ids, load_tokenizer, resolve_model
from eyas.kv.allocator import BlockAllocator
from eyas.scheduler import Scheduler
from eyas.serve.v1 import worker_pb2 as pb
from eyas.spec.decoder import DrafterLost, SpecDecoder
from eyas.spec.proposer import Proposer
from eyas.workers.target_step import StepItem, StepOutcome

log = logging.getLogger("eyas")


class DrafterLink:
    """The coordinator's view of the drafter worker; `alive` turns False for good on its first failure."""

    def __init__(self, group: WorkerGroup):
        self.group = group
        self.alive = group.drafter is not None
        self.dropped: list[str] = []  # requests to forget, sent with the next plan
        self.steps = itertools.count()

    def plan(self, **fields) -> pb.DraftPlan:
        plan = pb.DraftPlan(version=protocol.PROTOCOL_VERSION, step=next(self.steps), dropped=self.dropped, **fields)
        self.dropped = []
        return plan

    def lost(self, e: WorkerError) -> None:
        if self.alive:
            log.error("the drafter worker failed (%s); going on with plain decoding", e)
        self.alive = False


@dataclass
class _DraftCounts:
    """What the coordinator knows of one request's DraftState on the worker."""

    dstart: int  # the drafter's KV is final below this position
    pending: int = 0  # feature rows sent to the worker that its next draft extends over


class RemoteProposer(Proposer):
    """Drafts on the drafter worker. Mirrors the worker's DraftState counts, which is all
    valid_prefix and backlog need."""

    def __init__(self, link: DrafterLink):
        self.link = link
        self.states: dict[str, _DraftCounts] = {}
        self.sent: dict[str, int] = {}  # request -> tokens the drafter has of it
        self.q_rows: dict[str, int] = {}  # request -> probability rows its last draft sent to rank 0

    def observe(self, seq, start: int, features, num_rows: Optional[int] = None) -> None:
        st = self.states.get(seq.request_id)
        if st is None or st.dstart + st.pending != start:  # new, or recomputed after preemption
            st = self.states[seq.request_id] = _DraftCounts(dstart=start)
        st.pending += num_rows or 0  # the rows themselves went from rank 0 to the worker

    def valid_prefix(self, seq) -> int:
        st = self.states.get(seq.request_id)
        return st.dstart if st is not None else 0

    def backlog(self, seq) -> int:
        st = self.states.get(seq.request_id)
        return st.pending if st is not None else 0

    def drop(self, seq) -> None:
        if self.states.pop(seq.request_id, None) is not None or seq.request_id in self.sent:
            self.link.dropped.append(seq.request_id)
        self.sent.pop(seq.request_id, None)

    def propose(self, seqs, num_tokens: list[int], tree: Optional[bool] = None) -> list:
        link = self.link
        if not link.alive:
            raise DrafterLost("the drafter worker is gone")
        items = []
        for seq, k in zip(seqs, num_tokens):
            offset = min(self.sent.get(seq.request_id, 0), len(seq.token_ids))
            items.append(pb.DraftItem(request_id=seq.request_id, new_token_ids=seq.token_ids[offset:],
                                      token_offset=offset, num_computed=seq.num_computed_tokens,
                                      block_table=seq.block_table, num_tokens=k,
                                      sampling=protocol.sampling_to_pb(seq.params)))
            self.sent[seq.request_id] = len(seq.token_ids)
        try:
            result = link.group.drafter.call(link.plan(items=items, chain=tree is False))
        except WorkerError as e:
            link.lost(e)
            raise DrafterLost(str(e)) from None
        drafts = []
        for seq, prop in zip(seqs, result.proposals):
            st = self.states.get(seq.request_id)
            if st is not None:  # the worker's extend made every computed position final
                st.dstart, st.pending = seq.num_computed_tokens, 0
            self.q_rows[seq.request_id] = prop.q_rows  # the rows themselves went to rank 0
            drafts.append(protocol.draft_from_pb(prop.token_ids, prop.tree, None))
        return drafts


class RemoteTarget:
    """Runs the target's half of a step on the shards; holds KV moves until the next plan."""

    def __init__(self, group: WorkerGroup, link: DrafterLink, proposer: Optional[RemoteProposer]):
        self.group = group
        self.link = link
        self.proposer = proposer
        self.steps = itertools.count()
        self.moves: tuple[list[int], list[int]] = ([], [])
        self.finished: list[str] = []  # requests that ended: rank 0 drops their RNG
        self.worker_seconds = 0.0  # rank 0's time on plans, summed (the rest is control plane)

    def execute(self, items: list[StepItem]) -> StepOutcome:
        send_features = self.link.alive
        plan = pb.StepPlan(version=protocol.PROTOCOL_VERSION, step=next(self.steps), move_src=self.moves[0],
                           move_dst=self.moves[1], finished=self.finished, send_features=send_features)
        self.finished = []
        for it in items:
            msg = plan.items.add(request_id=it.request_id, token_ids=it.span.token_ids, start=it.span.start,
                                 block_table=it.span.block_table, num_new=it.num_new, sample=it.sample,
                                 sampling=protocol.sampling_to_pb(it.params))
            if it.draft is not None:
                protocol.tree_to_pb(it.draft, msg.tree)
                if self.proposer is not None:
                    msg.q_rows = self.proposer.q_rows.pop(it.request_id, 0)
        for stream in self.group.targets:
            stream.send(plan)
        results = [stream.recv() for stream in self.group.targets]  # WorkerError: a shard is gone
        r0 = results[0]
        self.worker_seconds += r0.worker_seconds
        self.moves = (list(r0.move_src), list(r0.move_dst))
        out = StepOutcome(tokens=[list(r.token_ids) or None for r in r0.items],
                          logprobs=[protocol.logprobs_from_json(r.logprobs_json) for r in r0.items],
                          num_valid=[r.num_valid for r in r0.items], accepted=[r.accepted for r in r0.items],
                          feature_rows=[[] for _ in items])
        if send_features:
            observed = [pb.Observed(request_id=it.request_id, start=it.span.start, num_rows=n)
                        for it, n in zip(items, out.num_valid)]
            try:  # its reply is read before the next plan to the drafter
                self.group.drafter.post(self.link.plan(observed=observed))
            except WorkerError as e:
                self.link.lost(e)
        return out


class ClusterEngine(LLMEngine):
    """LLMEngine whose model runs on Ray workers (tensor-parallel shards + a drafter)."""

    def __init__(self, config: EngineConfig):
        self.config = config
        self.device = torch.device("cpu")  # the coordinator holds no tensors of consequence
        folder = resolve_model(config.model)
        self.model_path = folder
        self.tokenizer = load_tokenizer(folder)
        self.eos_token_ids = tuple(eos_token_ids(folder))
        self.draft_path = resolve_model(config.spec.draft) if config.spec.enabled else None
        self.group = WorkerGroup(config, str(folder), str(self.draft_path) if self.draft_path else None)
        self.lookahead = config.spec.num_draft_tokens + 1 if config.spec.enabled else 0
        self.requests = {}
        self._ids = itertools.count()
        self.num_steps = 0
        self.restarts = 0
        self._start()

    def _start(self) -> None:
        cfg = self.config

        def limit(info: dict) -> int:
            self.max_model_len = model_len_limit(cfg, info["max_position"], info["sliding_window"])
            return self.max_model_len

        self.group.start(limit, self.lookahead)
        self.vocab_size = self.group.info["vocab_size"]
        self.num_blocks = self.group.num_blocks
        self.allocator = BlockAllocator(self.num_blocks, cfg.block_size, cfg.enable_prefix_caching)
        self.scheduler = Scheduler(self.allocator, cfg.max_num_seqs, cfg.max_num_batched_tokens,
                                   self.max_model_len, cfg.enable_chunked_prefill)
        self.link = DrafterLink(self.group)
        proposer = RemoteProposer(self.link) if self.link.alive else Proposer()
        target = RemoteTarget(self.group, self.link, proposer if self.link.alive else None)
        steps = cfg.spec.num_draft_tokens if cfg.spec.enabled else 0
        self.decoder = SpecDecoder(self, proposer, steps, controller=make_controller(cfg.spec) if steps else None,
                                   target=target)
        self.spec = self.decoder if cfg.spec.enabled else None  # per-request speculation stats

    def step(self) -> list[RequestOutput]:
        try:
            return self.decoder.step()
        except WorkerError as e:
            log.error("a target worker failed (%s): failing %d in-flight request(s), restarting the workers",
                      e, len(self.requests))
            self._restart()
            raise WorkerUnavailableError(f"a target worker failed ({e.details}); in-flight requests were "
                                         f"dropped and the workers restarted") from None

    def _restart(self) -> None:
        for req in list(self.requests.values()):
            req.seq.status = SeqStatus.FINISHED
            req.seq.finish_reason = "error"
        self.requests.clear()
        self.group.stop()
        self.restarts += 1
        self._start()

    def _finish(self, seq, reason: str) -> None:
        super()._finish(seq, reason)
        self.decoder.target.finished.append(seq.request_id)

    def abort(self, request_id: str) -> bool:
        req = self.requests.get(str(request_id))
        if req is not None:
            self.decoder.target.finished.append(req.seq.request_id)
        return super().abort(request_id)

    def close(self) -> None:
        self.group.stop()
