"""Request-level types: SamplingParams, Sequence, StepPlan and RequestOutput."""
from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field
from typing import Optional

import torch

from eyas.errors import InvalidRequestError


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens for one request. temperature == 0 means greedy."""

    max_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    seed: Optional[int] = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: Optional[int] = None  # None: off; 0: sampled token only; k: plus top-k

    def __post_init__(self):
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 1:
            raise InvalidRequestError("max_tokens", f"must be an integer >= 1, got {self.max_tokens!r}")
        if not self.temperature >= 0.0:
            raise InvalidRequestError("temperature", f"must be >= 0, got {self.temperature!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidRequestError("top_p", f"must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            raise InvalidRequestError("top_k", f"must be -1, 0 (off) or a positive integer, got {self.top_k!r}")
        if not 0.0 <= self.min_p <= 1.0:
            raise InvalidRequestError("min_p", f"must be in [0, 1], got {self.min_p!r}")
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or self.logprobs < 0):
            raise InvalidRequestError("logprobs", f"must be None or an integer >= 0, got {self.logprobs!r}")
        if any(not s for s in self.stop):
            raise InvalidRequestError("stop", "stop strings must be non-empty")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_arrival = itertools.count()


class Sequence:
    """One request's tokens and KV bookkeeping. `token_ids` = prompt + accepted output.

    Invariant: num_computed_tokens <= len(token_ids); the KV of token_ids[:num_computed_tokens]
    is in the cache at the slots named by block_table.
    """

    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 eos_token_ids: tuple[int, ...] = ()):
        self.request_id = request_id
        self.token_ids: list[int] = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.params = params
        self.eos_token_ids = eos_token_ids
        self.block_table: list[int] = []
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0  # prompt tokens served from the prefix cache
        self.num_hashed_blocks = 0  # leading full blocks registered in the prefix cache
        self.block_hashes: list[int] = []
        self.status = SeqStatus.WAITING
        self.arrival = next(_arrival)
        self.finish_reason: Optional[str] = None
        self.num_preemptions = 0
        self.generator: Optional[torch.Generator] = None
        if params.seed is not None:
            self.generator = torch.Generator().manual_seed(params.seed)
        self.logprobs: list[dict] = []
        # speculation stats
        self.spec_drafted = 0
        self.spec_accepted = 0
        self.target_steps = 0

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SeqStatus.FINISHED

    @property
    def in_prefill(self) -> bool:
        """True while the KV of more than the last token is missing (prompt or recompute)."""
        return len(self.token_ids) - self.num_computed_tokens > 1


@dataclass
class ScheduledSeq:
    """One sequence in a step: compute `num_new_tokens` tokens starting at num_computed_tokens."""

    seq: Sequence
    num_new_tokens: int
    sample: bool  # the chunk reaches the end of token_ids: sample (or verify) the next token
    num_draft_tokens: int = 0  # speculative tokens appended after the real ones (verify step)


@dataclass
class StepPlan:
    """What the scheduler decided for one engine step."""

    items: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(i.num_new_tokens + i.num_draft_tokens for i in self.items)

    def __bool__(self) -> bool:
        return bool(self.items)


@dataclass
class SpecStats:
    drafted: int
    accepted: int
    target_steps: int
    accept_len: float

    def to_dict(self) -> dict:
        return {"drafted": self.drafted, "accepted": self.accepted,
                "target_steps": self.target_steps, "accept_len": round(self.accept_len, 4)}


@dataclass
class RequestOutput:
    """A request's state after a step. `text`/`token_ids` are cumulative; `*_delta` is new this step."""

    id: str
    text: str
    token_ids: list[int]
    finished: bool
    finish_reason: Optional[str]
    prompt_tokens: int
    text_delta: str = ""
    token_ids_delta: list[int] = field(default_factory=list)
    logprobs: Optional[list[dict]] = None
    spec: Optional[SpecStats] = None
    error: Optional[str] = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    def to_dict(self) -> dict:
        d = {
            "id": self.id,
            "text": self.text,
            "token_ids": list(self.token_ids),
            "finish_reason": self.finish_reason,
            "num_tokens": len(self.token_ids),
            "usage": {"prompt_tokens": self.prompt_tokens, "completion_tokens": len(self.token_ids)},
        }
        if self.logprobs is not None:
            d["logprobs"] = self.logprobs
        if self.spec is not None:
            d["spec"] = self.spec.to_dict()
        if self.error is not None:
            d["error"] = self.error
        return d
