"""GenerationService: the eyas.v1.Generation RPCs over an EngineLoop.

Admission happens here, on the event loop: a draining server refuses with UNAVAILABLE, bad
input gets INVALID_ARGUMENT (the field name also goes in the `eyas-field` trailing metadata),
and more than `max_pending` queued + running requests get RESOURCE_EXHAUSTED. A stream that
ends before its last message (client cancel, deadline) aborts the request in the engine.
Every refused Generate call counts in `eyas_requests_rejected_total{code}`; admitted requests
are counted by the engine thread when they end.
"""
from __future__ import annotations

import asyncio
import logging
from typing import AsyncIterator, Optional

import grpc

from eyas.errors import InvalidRequestError, WorkerUnavailableError
from eyas.serve.convert import Limits, parse_request, response_from_output
from eyas.serve.engine_loop import Admitted, DuplicateRequestError, EngineLoop
from eyas.serve.v1 import generate_pb2 as pb
from eyas.serve.v1 import generate_pb2_grpc as pb_grpc

log = logging.getLogger("eyas.serve")

FIELD_METADATA_KEY = "eyas-field"  # trailing metadata naming the invalid field


async def abort_invalid(context: grpc.aio.ServicerContext, error: InvalidRequestError) -> None:
    """End the RPC with INVALID_ARGUMENT naming the field (raises)."""
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error),
                        trailing_metadata=((FIELD_METADATA_KEY, error.field),))


class GenerationService(pb_grpc.GenerationServicer):
    def __init__(self, engine_loop: EngineLoop, limits: Limits, model_info: pb.ModelInfo, max_pending: int):
        self.engine_loop = engine_loop
        self.limits = limits
        self.model_info = model_info
        self.max_pending = max_pending
        self.pending = 0  # admitted Generate calls not yet ended (event-loop thread only)
        self.draining = False
        self.metrics = engine_loop.metrics
        self._idle = asyncio.Event()
        self._idle.set()

    # ------------------------------------------------------------------ RPCs
    async def Generate(self, request: pb.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[pb.GenerateResponse]:
        if self.draining:
            await self._refuse(context, grpc.StatusCode.UNAVAILABLE, "the server is shutting down")
        if not self.engine_loop.alive:
            await self._refuse(context, grpc.StatusCode.UNAVAILABLE, "the engine is not running")
        try:
            engine_request = parse_request(request, self.limits)
        except InvalidRequestError as e:
            await self._refuse(context, grpc.StatusCode.INVALID_ARGUMENT, str(e), e.field)
        if self.pending >= self.max_pending:
            await self._refuse(context, grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"too many requests: {self.pending} queued or running (max_pending={self.max_pending})")
        self._enter()
        stream = self.engine_loop.submit(engine_request)
        finished = False
        admitted = False
        logprobs_sent = 0
        try:
            while True:
                item = await stream.get()
                if isinstance(item, Admitted):
                    admitted = True
                    continue
                if isinstance(item, Exception):
                    finished = True
                    if not admitted:  # refused by the engine thread (prompt checks, duplicate id)
                        self._count_refusal(item)
                if isinstance(item, InvalidRequestError):
                    await abort_invalid(context, item)
                if isinstance(item, DuplicateRequestError):
                    await context.abort(grpc.StatusCode.ALREADY_EXISTS, str(item),
                                        trailing_metadata=((FIELD_METADATA_KEY, "request_id"),))
                if isinstance(item, WorkerUnavailableError):  # a worker died; retrying is safe
                    await context.abort(grpc.StatusCode.UNAVAILABLE, str(item))
                if isinstance(item, Exception):
                    await context.abort(grpc.StatusCode.INTERNAL, str(item))
                message = response_from_output(item, logprobs_sent)
                logprobs_sent += len(message.logprobs)
                finished = item.finished
                yield message
                if finished:
                    return
        finally:
            if not finished:  # cancelled, deadline, or the client stopped reading
                self.engine_loop.cancel(stream)
            self._exit()

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context) -> pb.ModelInfo:
        return self.model_info

    async def Abort(self, request: pb.AbortRequest, context) -> pb.AbortResponse:
        if not request.request_id:
            await abort_invalid(context, InvalidRequestError("request_id", "must be non-empty"))
        found = await self.engine_loop.abort(request.request_id)
        return pb.AbortResponse(found=found)

    # ----------------------------------------------------------- refusals
    async def _refuse(self, context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str,
                      field: Optional[str] = None) -> None:
        """Count a refused Generate call and end it with `code` (raises)."""
        self.metrics.rejected.inc(code=code.name)
        await context.abort(code, message, trailing_metadata=((FIELD_METADATA_KEY, field),) if field else ())

    def _count_refusal(self, error: Exception) -> None:
        if isinstance(error, InvalidRequestError):
            code = grpc.StatusCode.INVALID_ARGUMENT
        elif isinstance(error, DuplicateRequestError):
            code = grpc.StatusCode.ALREADY_EXISTS
        else:
            code = grpc.StatusCode.INTERNAL
        self.metrics.rejected.inc(code=code.name)

    # ------------------------------------------------------------- shutdown
    def _enter(self) -> None:
        self.pending += 1
        self._idle.clear()

    def _exit(self) -> None:
        self.pending -= 1
        if self.pending == 0:
            self._idle.set()

    async def drain(self, grace: float, hurry: asyncio.Event) -> None:
        """Refuse new requests; let in-flight ones finish for up to `grace` seconds (or until
        `hurry` is set), then abort the rest (their streams end with finish_reason "abort")."""
        self.draining = True
        if self.pending:
            log.info("waiting up to %.1fs for %d in-flight requests", grace, self.pending)
            waiters = [asyncio.ensure_future(self._idle.wait()), asyncio.ensure_future(hurry.wait())]
            await asyncio.wait(waiters, timeout=grace, return_when=asyncio.FIRST_COMPLETED)
            for w in waiters:
                w.cancel()
        if self.pending:
            try:
                count = await asyncio.wait_for(self.engine_loop.abort(None), timeout=10.0)
                log.info("grace period over: aborted %d requests", count)
                await asyncio.wait_for(self._idle.wait(), timeout=5.0)
            except asyncio.TimeoutError:
                log.warning("%d streams did not end after abort", self.pending)
