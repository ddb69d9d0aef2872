"""Python clients for an `eyas serve` server: `Client` (blocking) and `AsyncClient` (asyncio).

    from eyas.client import Client
    with Client("127.0.0.1:50051") as c:
        r = c.generate("Why is the sky blue?", max_tokens=32)
        print(r.text, r.usage.completion_tokens)
        for d in c.stream(messages=[{"role": "user", "content": "Hi!"}]):
            print(d.text, end="", flush=True)

Errors are ClientError subclasses mapped from gRPC status codes: InvalidArgument (with .field),
Unauthenticated, ResourceExhausted, Unavailable, DeadlineExceeded, AlreadyExists, Cancelled,
InternalError.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, Iterator, Optional, Sequence, TypedDict, Union

try:
    from typing import Unpack
except ImportError:  # Python 3.10
    from typing_extensions import Unpack

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from eyas.errors import EyasError
from eyas.serve.v1 import generate_pb2 as pb
from eyas.serve.v1 import generate_pb2_grpc as pb_grpc

DEFAULT_ADDRESS = "127.0.0.1:50051"
FIELD_METADATA_KEY = "eyas-field"
MAX_MESSAGE_BYTES = 64 * 2**20
_CHAT_KEYS = frozenset({"role", "content", "name"})


# ---------------------------------------------------------------------- errors
class ClientError(EyasError):
    """A call failed. `code` is the grpc.StatusCode, `details` the server's message."""

    def __init__(self, details: str, code: Optional[grpc.StatusCode] = None):
        super().__init__(details)
        self.details = details
        self.code = code


class InvalidArgument(ClientError, ValueError):
    """The request was refused; `field` names the offending field."""

    def __init__(self, details: str, code=grpc.StatusCode.INVALID_ARGUMENT, field: str = ""):
        super().__init__(details, code)
        self.field = field


class Unauthenticated(ClientError):
    """Missing or wrong API key."""


class ResourceExhausted(ClientError):
    """The server's queue is full (or a message was too large); retry later."""


class Unavailable(ClientError):
    """The server cannot be reached or is shutting down."""


class DeadlineExceeded(ClientError, TimeoutError):
    """The call's timeout passed; the server aborts the request."""


class AlreadyExists(ClientError):
    """A request with this id is already running."""


class Cancelled(ClientError):
    """The call was cancelled."""


class InternalError(ClientError):
    """The server failed while handling the request."""


_ERRORS = {
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.CANCELLED: Cancelled,
    grpc.StatusCode.INTERNAL: InternalError,
}


def _trailing_field(error) -> str:
    try:
        metadata = error.trailing_metadata() or ()
    except Exception:
        return ""
    return next((v for k, v in metadata if k == FIELD_METADATA_KEY), "")


def _map_error(error: grpc.RpcError, field_name: str = "") -> ClientError:
    """The ClientError for a failed call (`field_name`: the invalid field, from trailing metadata)."""
    code = error.code()
    details = error.details() or code.name
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidArgument(details, code, field_name)
    return _ERRORS.get(code, ClientError)(details, code)


# --------------------------------------------------------------------- results
@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class SpecStats:
    drafted: int
    accepted: int
    target_steps: int
    accept_len: float


@dataclass(frozen=True)
class Delta:
    """One stream message: new text and token ids; the last has finish_reason, usage, spec."""

    id: str
    text: str
    token_ids: list[int]
    logprobs: Optional[list[dict]] = None
    finish_reason: Optional[str] = None
    usage: Optional[Usage] = None
    spec: Optional[SpecStats] = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class Result:
    """A finished request, with the fields of every eyas result (see to_dict)."""

    id: str
    text: str
    token_ids: list[int]
    finish_reason: str
    usage: Usage
    spec: Optional[SpecStats] = None
    logprobs: Optional[list[dict]] = None

    def to_dict(self) -> dict:
        d = {"id": self.id, "text": self.text, "token_ids": list(self.token_ids),
             "finish_reason": self.finish_reason, "num_tokens": len(self.token_ids),
             "usage": {"prompt_tokens": self.usage.prompt_tokens,
                       "completion_tokens": self.usage.completion_tokens}}
        if self.logprobs is not None:
            d["logprobs"] = self.logprobs
        if self.spec is not None:
            d["spec"] = {"drafted": self.spec.drafted, "accepted": self.spec.accepted,
                         "target_steps": self.spec.target_steps, "accept_len": round(self.spec.accept_len, 4)}
        return d


@dataclass(frozen=True)
class ModelInfo:
    model: str
    max_model_len: int
    vocab_size: int
    tp_size: int
    max_tokens_cap: int
    max_pending: int
    draft_model: Optional[str] = None
    spec: Optional[dict] = None  # steps, topk, draft_tokens, policy (with a draft model)


class _Collector:
    """Folds deltas into a Result."""

    def __init__(self):
        self.text: list[str] = []
        self.token_ids: list[int] = []
        self.logprobs: list[dict] = []
        self.last: Optional[Delta] = None
        self.any_logprobs = False

    def add(self, d: Delta) -> None:
        self.text.append(d.text)
        self.token_ids.extend(d.token_ids)
        if d.logprobs is not None:
            self.any_logprobs = True
            self.logprobs.extend(d.logprobs)
        self.last = d

    def result(self) -> Result:
        last = self.last
        if last is None or not last.finished:
            raise ClientError("the stream ended without a final message")
        return Result(id=last.id, text="".join(self.text), token_ids=self.token_ids,
                      finish_reason=last.finish_reason, usage=last.usage, spec=last.spec,
                      logprobs=self.logprobs if self.any_logprobs else None)


def _delta_from(msg: pb.GenerateResponse, want_logprobs: bool) -> Delta:
    logprobs = None
    if want_logprobs:
        logprobs = [{"token_id": lp.token_id, "logprob": lp.logprob,
                     "top": [[t.token_id, t.logprob] for t in lp.top]} for lp in msg.logprobs]
    finished = bool(msg.finish_reason)
    return Delta(
        id=msg.request_id, text=msg.text, token_ids=list(msg.token_ids), logprobs=logprobs,
        finish_reason=msg.finish_reason or None,
        usage=Usage(msg.usage.prompt_tokens, msg.usage.completion_tokens) if finished else None,
        spec=SpecStats(msg.spec.drafted, msg.spec.accepted, msg.spec.target_steps, msg.spec.accept_len)
        if finished and msg.HasField("spec") else None)


def _info_from(msg: pb.ModelInfo) -> ModelInfo:
    spec = None
    if msg.HasField("spec"):
        spec = {"steps": msg.spec.steps, "topk": msg.spec.topk, "draft_tokens": msg.spec.draft_tokens,
                "policy": msg.spec.policy}
    return ModelInfo(model=msg.model, max_model_len=msg.max_model_len, vocab_size=msg.vocab_size,
                     tp_size=msg.tp_size, max_tokens_cap=msg.max_tokens_cap, max_pending=msg.max_pending,
                     draft_model=msg.draft_model or None, spec=spec)


class GenerateArgs(TypedDict, total=False):
    """Keyword arguments of generate/stream (besides prompt and timeout): see build_request."""

    messages: Sequence[dict]
    prompt_token_ids: Sequence[int]
    chat: bool
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    seed: int
    stop: Union[str, Sequence[str]]
    stop_token_ids: Sequence[int]
    ignore_eos: bool
    logprobs: int
    request_id: str


def build_request(prompt: Optional[str] = None, *, messages: Optional[Sequence[dict]] = None,
                  prompt_token_ids: Optional[Sequence[int]] = None, chat: bool = False,
                  max_tokens: Optional[int] = None, temperature: Optional[float] = None,
                  top_p: Optional[float] = None, top_k: Optional[int] = None, min_p: Optional[float] = None,
                  seed: Optional[int] = None, stop: Union[str, Sequence[str], None] = None,
                  stop_token_ids: Optional[Sequence[int]] = None, ignore_eos: bool = False,
                  logprobs: Optional[int] = None, request_id: Optional[str] = None) -> pb.GenerateRequest:
    """The GenerateRequest for these arguments (the server validates them; unset = server default).

    `logprobs`: None returns none; 0 the sampled token's log-prob; k also the k best."""
    req = pb.GenerateRequest(request_id=request_id or "", chat=chat, ignore_eos=ignore_eos)
    if prompt is not None:
        req.prompt = prompt
    if prompt_token_ids is not None:
        req.prompt_token_ids.extend(int(t) for t in prompt_token_ids)
    for i, m in enumerate(messages or ()):
        if not isinstance(m, dict) or set(m) - _CHAT_KEYS:
            raise InvalidArgument(f"messages[{i}]: a chat message has only the keys role, content, name",
                                  field=f"messages[{i}]")
        req.messages.add(**m)
    for name, value in (("max_tokens", max_tokens), ("temperature", temperature), ("top_p", top_p),
                        ("top_k", top_k), ("min_p", min_p), ("seed", seed)):
        if value is not None:
            setattr(req, name, value)
    if stop is not None:
        req.stop.extend([stop] if isinstance(stop, str) else list(stop))
    if stop_token_ids is not None:
        req.stop_token_ids.extend(int(t) for t in stop_token_ids)
    if logprobs is not None:
        req.return_logprobs = True
        req.top_logprobs = logprobs
    return req


def _metadata(api_key: Optional[str]) -> Optional[tuple]:
    return (("authorization", f"Bearer {api_key}"),) if api_key else None


def _credentials(tls_root_cert: Union[str, Path, bytes, bool, None]):
    if tls_root_cert is None or tls_root_cert is False:
        return None
    if tls_root_cert is True:  # system roots
        return grpc.ssl_channel_credentials()
    pem = tls_root_cert if isinstance(tls_root_cert, bytes) else Path(tls_root_cert).read_bytes()
    return grpc.ssl_channel_credentials(root_certificates=pem)


_CHANNEL_OPTIONS = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]


class _Base:
    def __init__(self, address: str, api_key: Optional[str], timeout: Optional[float],
                 tls_root_cert: Union[str, Path, bytes, bool, None]):
        self.address = address
        self.timeout = timeout
        self._metadata = _metadata(api_key)
        self._credentials = _credentials(tls_root_cert)

    def _timeout(self, timeout: Optional[float]) -> Optional[float]:
        return self.timeout if timeout is None else timeout


class Client(_Base):
    """Blocking client. `timeout` (seconds) is the default per call; None waits forever.

    `tls_root_cert`: a PEM file (or bytes) to trust, True for the system roots, None for plain TCP.
    """

    def __init__(self, address: str = DEFAULT_ADDRESS, api_key: Optional[str] = None,
                 timeout: Optional[float] = None, tls_root_cert: Union[str, Path, bytes, bool, None] = None):
        super().__init__(address, api_key, timeout, tls_root_cert)
        if self._credentials is not None:
            self._channel = grpc.secure_channel(address, self._credentials, options=_CHANNEL_OPTIONS)
        else:
            self._channel = grpc.insecure_channel(address, options=_CHANNEL_OPTIONS)
        self._stub = pb_grpc.GenerationStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def stream(self, prompt: Optional[str] = None, *, timeout: Optional[float] = None,
               **kwargs: Unpack[GenerateArgs]) -> Iterator[Delta]:
        """Yield deltas as the server produces them; the last has finish_reason and usage.

        Stopping the iteration early (break, close) cancels the request on the server."""
        req = build_request(prompt, **kwargs)
        want_logprobs = req.return_logprobs
        call = self._stub.Generate(req, timeout=self._timeout(timeout), metadata=self._metadata)
        try:
            for msg in call:
                yield _delta_from(msg, want_logprobs)
        except grpc.RpcError as e:
            raise _map_error(e, _trailing_field(e)) from None
        finally:
            call.cancel()  # no-op once the call has ended

    def generate(self, prompt: Optional[str] = None, *, timeout: Optional[float] = None,
                 **kwargs: Unpack[GenerateArgs]) -> Result:
        """Run one request to the end and return the full result. Keyword arguments: see
        build_request (messages, prompt_token_ids, max_tokens, temperature, ..., request_id)."""
        collector = _Collector()
        for d in self.stream(prompt, timeout=timeout, **kwargs):
            collector.add(d)
        return collector.result()

    def abort(self, request_id: str, timeout: Optional[float] = None) -> bool:
        """Abort a running request by id; False when no running request has it."""
        try:
            resp = self._stub.Abort(pb.AbortRequest(request_id=request_id), timeout=self._timeout(timeout),
                                    metadata=self._metadata)
        except grpc.RpcError as e:
            raise _map_error(e, _trailing_field(e)) from None
        return resp.found

    def model_info(self, timeout: Optional[float] = None) -> ModelInfo:
        try:
            msg = self._stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=self._timeout(timeout),
                                          metadata=self._metadata)
        except grpc.RpcError as e:
            raise _map_error(e, _trailing_field(e)) from None
        return _info_from(msg)

    def health(self, service: str = "", timeout: Optional[float] = None) -> str:
        """The serving status name: "SERVING", "NOT_SERVING", ... (raises Unavailable when down)."""
        try:
            resp = self._health.Check(health_pb2.HealthCheckRequest(service=service),
                                      timeout=self._timeout(timeout), metadata=self._metadata)
        except grpc.RpcError as e:
            raise _map_error(e, _trailing_field(e)) from None
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Block until the channel connects (raises Unavailable after timeout)."""
        try:
            grpc.channel_ready_future(self._channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise Unavailable(f"no server at {self.address} after {timeout}s",
                              grpc.StatusCode.UNAVAILABLE) from None

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncClient(_Base):
    """asyncio client with the same methods as Client, as coroutines (stream: async iterator)."""

    def __init__(self, address: str = DEFAULT_ADDRESS, api_key: Optional[str] = None,
                 timeout: Optional[float] = None, tls_root_cert: Union[str, Path, bytes, bool, None] = None):
        super().__init__(address, api_key, timeout, tls_root_cert)
        if self._credentials is not None:
            self._channel = grpc.aio.secure_channel(address, self._credentials, options=_CHANNEL_OPTIONS)
        else:
            self._channel = grpc.aio.insecure_channel(address, options=_CHANNEL_OPTIONS)
        self._stub = pb_grpc.GenerationStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    async def stream(self, prompt: Optional[str] = None, *, timeout: Optional[float] = None,
                     **kwargs: Unpack[GenerateArgs]) -> AsyncIterator[Delta]:
        """Yield deltas; leaving the loop early (or cancelling the task) cancels the request."""
        req = build_request(prompt, **kwargs)
        want_logprobs = req.return_logprobs
        call = self._stub.Generate(req, timeout=self._timeout(timeout), metadata=self._metadata)
        try:
            async for msg in call:
                yield _delta_from(msg, want_logprobs)
        except grpc.aio.AioRpcError as e:
            raise _map_error(e, _trailing_field(e)) from None
        finally:
            call.cancel()

    async def generate(self, prompt: Optional[str] = None, *, timeout: Optional[float] = None,
                       **kwargs: Unpack[GenerateArgs]) -> Result:
        collector = _Collector()
        stream = self.stream(prompt, timeout=timeout, **kwargs)
        try:
            async for d in stream:
                collector.add(d)
        finally:
            await stream.aclose()
        return collector.result()

    async def abort(self, request_id: str, timeout: Optional[float] = None) -> bool:
        try:
            resp = await self._stub.Abort(pb.AbortRequest(request_id=request_id),
                                          timeout=self._timeout(timeout), metadata=self._metadata)
        except grpc.aio.AioRpcError as e:
            raise _map_error(e, _trailing_field(e)) from None
        return resp.found

    async def model_info(self, timeout: Optional[float] = None) -> ModelInfo:
        try:
            msg = await self._stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=self._timeout(timeout),
                                                metadata=self._metadata)
        except grpc.aio.AioRpcError as e:
            raise _map_error(e, _trailing_field(e)) from None
        return _info_from(msg)

    async def health(self, service: str = "", timeout: Optional[float] = None) -> str:
        try:
            resp = await self._health.Check(health_pb2.HealthCheckRequest(service=service),
                                            timeout=self._timeout(timeout), metadata=self._metadata)
        except grpc.aio.AioRpcError as e:
            raise _map_error(e, _trailing_field(e)) from None
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
