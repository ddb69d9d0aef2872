"""GenerationService: the eyas.v1.Generation RPCs over an EngineLoop.

Admission happens here, on the event loop: a draining server refuses with UNAVAILABLE, bad
input gets INVALID_ARGUMENT (the field name also goes in the `eyas-field` trailing metadata),
and more than `max_pending` queued + running requests get RESOURCE_EXHAUSTED. A stream that
ends before its last message (client cancel, deadline) aborts the request in the engine.
"""
from __future__ import annotations

import asyncio
import logging
from typing import AsyncIterator

import grpc

from eyas.errors import InvalidRequestError
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
        self._idle = asyncio.Event()
        self._idle.set()

    # ------------------------------------------------------------------ RPCs
    async def Generate(self, request: pb.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[pb.GenerateResponse]:
        if self.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the server is shutting down")
        if not self.engine_loop.alive:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the engine is not running")
        try:
            engine_request = parse_request(request, self.limits)
        except InvalidRequestError as e:
            await abort_invalid(context, e)
        if self.pending >= self.max_pending:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"too many requests: {self.pending} queued or running (max_pending={self.max_pending})")
        self._enter()
        stream = self.engine_loop.submit(engine_request)
        finished = False
        logprobs_sent = 0
        try:
            while True:
                item = await stream.get()
                if isinstance(item, Admitted):
                    continue
                if isinstance(item, InvalidRequestError):
                    finished = True
                    await abort_invalid(context, item)
                if isinstance(item, DuplicateRequestError):
                    finished = True
                    await context.abort(grpc.StatusCode.ALREADY_EXISTS, str(item),
                                        trailing_metadata=((FIELD_METADATA_KEY, "request_id"),))
                if isinstance(item, Exception):
                    finished = True
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
