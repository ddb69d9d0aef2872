"""Proto <-> engine: validate a GenerateRequest into engine inputs, turn outputs into messages.

Everything here raises InvalidRequestError naming the offending field; the service maps it to
INVALID_ARGUMENT. Checks that need the tokenizer (prompt length, chat template) happen in the
engine's add_request, on the engine thread.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Optional

from google.protobuf.message import Message
from google.protobuf.unknown_fields import UnknownFieldSet

from eyas.core import RequestOutput, SamplingParams
from eyas.errors import InvalidRequestError
from eyas.serve.v1 import generate_pb2 as pb

MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True)
class Limits:
    """What the server accepts: set from the engine and the ServerConfig at start-up."""

    vocab_size: int
    max_tokens_cap: int
    default_max_tokens: int
    max_request_id_len: int = 256


@dataclass(frozen=True)
class EngineRequest:
    """A validated request, ready for LLMEngine.add_request."""

    request_id: str
    params: SamplingParams
    prompt: Optional[str] = None
    messages: Optional[list[dict]] = None
    prompt_token_ids: Optional[list[int]] = None
    chat: bool = False

    def add_to(self, engine) -> str:
        return engine.add_request(self.request_id, self.prompt, self.params, messages=self.messages,
                                  prompt_token_ids=self.prompt_token_ids, chat=self.chat)


def _check_no_unknown_fields(msg: Message, where: str) -> None:
    unknown = sorted({f.field_number for f in UnknownFieldSet(msg)})
    if unknown:
        raise InvalidRequestError(where, f"unknown field number(s) {unknown}; the client's proto is "
                                         "newer than the server's or the message is malformed")


def _messages(req: pb.GenerateRequest) -> list[dict]:
    out = []
    for i, m in enumerate(req.messages):
        where = f"messages[{i}]"
        _check_no_unknown_fields(m, where)
        if not m.role:
            raise InvalidRequestError(f"{where}.role", "must be a non-empty string")
        d = {"role": m.role, "content": m.content}
        if m.name:
            d["name"] = m.name
        out.append(d)
    return out


def _sampling(req: pb.GenerateRequest, limits: Limits) -> SamplingParams:
    cap = limits.max_tokens_cap
    if req.HasField("max_tokens"):
        max_tokens = req.max_tokens
        if max_tokens > cap:
            raise InvalidRequestError("max_tokens", f"must be <= {cap} (the server's cap), got {max_tokens}")
    else:
        max_tokens = min(limits.default_max_tokens, cap)
    bad_stop = [t for t in req.stop_token_ids if not 0 <= t < limits.vocab_size]
    if bad_stop:
        raise InvalidRequestError("stop_token_ids", f"ids out of range [0, {limits.vocab_size}): {bad_stop[:5]}")
    logprobs = None
    if req.return_logprobs or req.top_logprobs:
        if not 0 <= req.top_logprobs <= MAX_TOP_LOGPROBS:
            raise InvalidRequestError("top_logprobs", f"must be in [0, {MAX_TOP_LOGPROBS}], got {req.top_logprobs}")
        logprobs = req.top_logprobs
    kw = {name: getattr(req, name) for name in ("temperature", "top_p", "top_k", "min_p", "seed")
          if req.HasField(name)}
    return SamplingParams(max_tokens=max_tokens, stop=tuple(req.stop), stop_token_ids=tuple(req.stop_token_ids),
                          ignore_eos=req.ignore_eos, logprobs=logprobs, **kw)


def parse_request(req: pb.GenerateRequest, limits: Limits) -> EngineRequest:
    """Validate a GenerateRequest; raises InvalidRequestError(field, message)."""
    _check_no_unknown_fields(req, "request")
    request_id = req.request_id or f"req-{uuid.uuid4().hex}"
    if len(request_id) > limits.max_request_id_len:
        raise InvalidRequestError("request_id", f"must be at most {limits.max_request_id_len} characters")
    given = [name for name, present in (("prompt", req.HasField("prompt")),
                                        ("prompt_token_ids", len(req.prompt_token_ids) > 0),
                                        ("messages", len(req.messages) > 0)) if present]
    if len(given) != 1:
        what = "none" if not given else " and ".join(given)
        raise InvalidRequestError("prompt", f"give exactly one of prompt, prompt_token_ids or messages (got {what})")
    if req.HasField("prompt") and not req.prompt:
        raise InvalidRequestError("prompt", "must be a non-empty string")
    if req.chat and not req.HasField("prompt"):
        raise InvalidRequestError("chat", "applies to a text prompt only (messages always get the chat template)")
    bad_ids = [t for t in req.prompt_token_ids if not 0 <= t < limits.vocab_size]
    if bad_ids:
        raise InvalidRequestError("prompt_token_ids", f"ids out of range [0, {limits.vocab_size}): {bad_ids[:5]}")
    try:
        params = _sampling(req, limits)
    except InvalidRequestError as e:
        if e.field == "logprobs":
            raise InvalidRequestError("top_logprobs", e.message) from None
        raise
    return EngineRequest(
        request_id=request_id, params=params,
        prompt=req.prompt if req.HasField("prompt") else None,
        messages=_messages(req) if req.messages else None,
        prompt_token_ids=list(req.prompt_token_ids) or None,
        chat=req.chat)


def _logprob_messages(entries: list[dict]) -> list[pb.TokenLogprob]:
    return [pb.TokenLogprob(token_id=e["token_id"], logprob=e["logprob"],
                            top=[pb.TopLogprob(token_id=t, logprob=lp) for t, lp in e.get("top") or ()])
            for e in entries]


def response_from_output(out: RequestOutput, logprobs_sent: int = 0) -> pb.GenerateResponse:
    """One stream message: the deltas of `out`; on the last one finish_reason, usage and spec.

    `logprobs_sent` is how many entries of the cumulative out.logprobs earlier messages carried.
    """
    msg = pb.GenerateResponse(request_id=out.id, text=out.text_delta, token_ids=out.token_ids_delta)
    if out.logprobs:
        msg.logprobs.extend(_logprob_messages(out.logprobs[logprobs_sent:]))
    if out.finished:
        msg.finish_reason = out.finish_reason or "stop"
        msg.usage.prompt_tokens = out.prompt_tokens
        msg.usage.completion_tokens = len(out.token_ids)
        if out.spec is not None:
            msg.spec.drafted = out.spec.drafted
            msg.spec.accepted = out.spec.accepted
            msg.spec.target_steps = out.spec.target_steps
            msg.spec.accept_len = out.spec.accept_len
    return msg
