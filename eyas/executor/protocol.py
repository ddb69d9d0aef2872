"""The worker protocol's version and the conversions between its messages and engine objects.

Messages are defined in proto/eyas/v1/worker.proto (generated code: eyas/serve/v1/worker_pb2).
Bump PROTOCOL_VERSION whenever a message changes meaning; workers refuse other versions.
"""
from __future__ import annotations

import json
from typing import Optional

import torch

from eyas.core import SamplingParams
from eyas.errors import EyasError
from eyas.serve.v1 import worker_pb2 as pb
from eyas.spec.proposer import Draft
from eyas.spec.tree import TreeDraft, make_tree_draft

PROTOCOL_VERSION = 2  # 2: DraftPlan.chain (chains from a tree-drafting worker)


class ProtocolMismatch(EyasError):
    """A plan came with another protocol version than the worker speaks."""


def check_version(version: int) -> None:
    if version != PROTOCOL_VERSION:
        raise ProtocolMismatch(f"worker protocol version mismatch: this worker speaks version "
                               f"{PROTOCOL_VERSION}, the plan has version {version}; run the "
                               f"coordinator and the workers from the same eyas release")


def sampling_to_pb(p: SamplingParams) -> pb.Sampling:
    msg = pb.Sampling(temperature=p.temperature, top_p=p.top_p, top_k=p.top_k, min_p=p.min_p)
    if p.seed is not None:
        msg.seed = p.seed
    if p.logprobs is not None:
        msg.logprobs = p.logprobs
    return msg


def sampling_from_pb(msg: pb.Sampling) -> SamplingParams:
    """Only the fields that sampling and acceptance read (stops and lengths stay with the coordinator)."""
    return SamplingParams(temperature=msg.temperature, top_p=msg.top_p, top_k=msg.top_k, min_p=msg.min_p,
                          seed=msg.seed if msg.HasField("seed") else None,
                          logprobs=msg.logprobs if msg.HasField("logprobs") else None)


def generator_for(params: SamplingParams) -> Optional[torch.Generator]:
    """A request's own RNG on a worker, seeded like Sequence.generator (None: the global RNG)."""
    return torch.Generator().manual_seed(params.seed) if params.seed is not None else None


def tree_to_pb(draft, tree: pb.Tree) -> None:
    """Fill a message's Tree field from a TreeDraft (a chain leaves it empty)."""
    if isinstance(draft, TreeDraft):
        tree.parents.extend(draft.parents)
        tree.depths.extend(draft.depths)


def draft_to_pb(draft) -> pb.Proposal:
    msg = pb.Proposal(token_ids=draft.tokens)
    tree_to_pb(draft, msg.tree)
    if draft.q is not None:
        msg.q_rows = int(draft.q.shape[0])
    return msg


def draft_from_pb(tokens: list[int], tree: Optional[pb.Tree], q: Optional[torch.Tensor]):
    """Rebuild a Draft (chain: no tree, or an empty one) or TreeDraft from the message; q [rows, V]
    over the target vocab."""
    if tree is not None and len(tree.parents):
        return make_tree_draft(list(tokens), list(tree.parents), q)
    return Draft(list(tokens), q)


def logprobs_to_json(lps: Optional[list]) -> str:
    return json.dumps(lps) if lps is not None else ""


def logprobs_from_json(text: str) -> Optional[list]:
    return json.loads(text) if text else None
