"""EngineLoop: the one thread that owns the (synchronous, not thread-safe) LLMEngine.

The asyncio side never touches the engine. It sends commands (add, abort, cancel, stop) through
a thread-safe queue; the engine thread drains them between steps, runs `engine.step()` while
work remains, and hands each request's outputs back to the event loop with
`loop.call_soon_threadsafe` into that request's asyncio.Queue (a RequestStream).

Metrics: the engine thread times every request (first token, tokens, end and its reason) and
sets the engine-state gauges (KV blocks, running, waiting) after each step and each batch of
commands, so nothing else ever reads the engine.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import torch

from eyas.core import RequestOutput, SpecStats
from eyas.errors import EyasError, WorkerUnavailableError
from eyas.serve.convert import EngineRequest
from eyas.serve.metrics import RequestTimer, ServerMetrics

log = logging.getLogger("eyas.serve")


class DuplicateRequestError(EyasError):
    """A request id is already running."""

    def __init__(self, request_id: str):
        super().__init__(f"request_id: {request_id!r} is already running")
        self.request_id = request_id


class EngineFailure(EyasError):
    """The engine raised while stepping; the request cannot continue."""


@dataclass(frozen=True)
class Admitted:
    """First item of a stream: the engine accepted the request."""

    request_id: str


StreamItem = Union[Admitted, RequestOutput, Exception]


class RequestStream:
    """The asyncio side of one request: items arrive in order; a finished output ends it.

    `timer` starts at submission; after that only the engine thread touches it.
    """

    def __init__(self, request: EngineRequest):
        self.request = request
        self.queue: asyncio.Queue[StreamItem] = asyncio.Queue()
        self.timer = RequestTimer(time.monotonic())

    @property
    def request_id(self) -> str:
        return self.request.request_id

    async def get(self) -> StreamItem:
        return await self.queue.get()


@dataclass
class _Add:
    stream: RequestStream


@dataclass
class _Abort:
    """Abort by id (the Abort RPC, or shutdown when request_id is None: all requests)."""

    request_id: Optional[str]
    reply: Callable[[Any], None]


@dataclass
class _Cancel:
    """The client went away: abort the request if this very stream still owns it."""

    stream: RequestStream


@dataclass
class _Stop:
    """Abort what is left and end the engine thread."""


class EngineLoop:
    """Runs an LLMEngine on a dedicated thread and serves commands from an asyncio loop."""

    def __init__(self, engine, loop: asyncio.AbstractEventLoop, idle_poll_s: float = 1.0,
                 metrics: Optional[ServerMetrics] = None):
        self.engine = engine
        self.loop = loop
        self.idle_poll_s = idle_poll_s
        self.metrics = metrics if metrics is not None else ServerMetrics()
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, RequestStream] = {}  # engine thread only
        self._thread = threading.Thread(target=self._run, name="eyas-engine", daemon=True)
        self.num_steps = 0

    # ------------------------------------------------------------ asyncio side
    def start(self) -> None:
        self._thread.start()

    def submit(self, request: EngineRequest) -> RequestStream:
        """Queue a request; its stream yields Admitted or an error first, then outputs."""
        stream = RequestStream(request)
        self._commands.put(_Add(stream))
        return stream

    def cancel(self, stream: RequestStream) -> None:
        """Fire and forget: the client is gone, free the request's KV blocks."""
        self._commands.put(_Cancel(stream))

    async def abort(self, request_id: Optional[str]) -> Any:
        """Abort one request (-> found: bool), or every request when request_id is None (-> count)."""
        if not self.alive:
            return False if request_id is not None else 0
        fut = self.loop.create_future()

        def reply(value):
            self._to_loop(lambda: fut.done() or fut.set_result(value))

        self._commands.put(_Abort(request_id, reply))
        return await fut

    def stop(self, timeout: Optional[float] = None) -> None:
        """Abort what is left, end the thread and wait for it (blocking)."""
        if not self._thread.is_alive():
            return
        self._commands.put(_Stop())
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    # ------------------------------------------------------------- engine side
    def _to_loop(self, fn: Callable[[], Any]) -> None:
        try:
            self.loop.call_soon_threadsafe(fn)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass

    def _push(self, stream: RequestStream, item: StreamItem) -> None:
        self._to_loop(lambda: stream.queue.put_nowait(item))

    def _run(self) -> None:
        num_threads = getattr(self.engine.config, "num_threads", None)
        if num_threads:  # torch's intra-op thread count is per thread: apply it where the engine runs
            torch.set_num_threads(num_threads)
        try:
            self.metrics.record_engine_state(self.engine)
            while True:
                if not self._drain(block=not self.engine.has_unfinished()):
                    break
                if self.engine.has_unfinished():
                    self._step()
                self.metrics.record_engine_state(self.engine)
        except BaseException:  # never die silently: fail whoever is waiting
            log.exception("engine thread crashed")
            self._fail_all(EngineFailure("the engine thread crashed"))
            raise
        finally:
            self._abort_all()
            self.metrics.record_engine_state(self.engine)

    def _drain(self, block: bool) -> bool:
        """Run queued commands (waiting for one when idle). False once a stop arrived."""
        while True:
            try:
                cmd = self._commands.get(timeout=self.idle_poll_s) if block else self._commands.get_nowait()
            except queue.Empty:
                if block:
                    continue
                return True
            block = False
            if isinstance(cmd, _Stop):
                self._abort_all()
                return False
            self._handle(cmd)

    def _handle(self, cmd) -> None:
        if isinstance(cmd, _Add):
            stream = cmd.stream
            rid = stream.request_id
            if rid in self._streams:
                self._push(stream, DuplicateRequestError(rid))
                return
            try:
                stream.request.add_to(self.engine)
            except Exception as e:  # InvalidRequestError for bad prompts; anything else is ours
                self._push(stream, e)
                return
            self._streams[rid] = stream
            self._push(stream, Admitted(rid))
        elif isinstance(cmd, _Cancel):
            rid = cmd.stream.request_id
            if self._streams.get(rid) is cmd.stream:
                del self._streams[rid]
                final = self._aborted_output(rid)
                self.engine.abort(rid)
                self._record_end(cmd.stream, final, "cancelled")
        elif isinstance(cmd, _Abort):
            if cmd.request_id is None:
                cmd.reply(self._abort_all())
            else:
                cmd.reply(self._abort_one(cmd.request_id))

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except WorkerUnavailableError as e:  # the engine restarted its workers; new requests can come
            log.error("%s; failing %d in-flight requests", e, len(self._streams))
            self._fail_all(e)
            return
        except Exception as e:
            log.exception("engine step failed; failing %d in-flight requests", len(self._streams))
            self._fail_all(EngineFailure(f"engine step failed: {type(e).__name__}: {e}"))
            return
        self.num_steps += 1
        self.metrics.steps.inc()
        now = time.monotonic()
        for out in outputs:
            stream = self._streams.get(out.id)
            if stream is None:
                continue
            stream.timer.on_tokens(self.metrics, len(out.token_ids_delta), now)
            if out.finished:
                del self._streams[out.id]
                self._record_end(stream, out, out.finish_reason or "stop", now)
            self._push(stream, out)

    def _record_end(self, stream: RequestStream, final: RequestOutput, reason: str,
                    now: Optional[float] = None) -> None:
        stream.timer.on_end(self.metrics, reason, time.monotonic() if now is None else now,
                            final.prompt_tokens, final.spec)

    def _abort_one(self, request_id: str) -> bool:
        stream = self._streams.pop(request_id, None)
        if stream is None:
            return False
        final = self._aborted_output(request_id)
        self.engine.abort(request_id)
        self._record_end(stream, final, "abort")
        self._push(stream, final)
        return True

    def _abort_all(self) -> int:
        ids = list(self._streams)
        for rid in ids:
            self._abort_one(rid)
        return len(ids)

    def _fail_all(self, error: Exception) -> None:
        for rid, stream in list(self._streams.items()):
            try:
                self.engine.abort(rid)
            except Exception:
                log.exception("abort of %s failed", rid)
            stream.timer.on_end(self.metrics, "error", time.monotonic())
            self._push(stream, error)
        self._streams.clear()

    def _aborted_output(self, request_id: str) -> RequestOutput:
        """The last message of an aborted request: what it had generated so far."""
        req = self.engine.requests.get(request_id)
        if req is None:
            return RequestOutput(request_id, "", [], True, "abort", 0)
        seq = req.seq
        spec = None
        if getattr(self.engine, "spec", None) is not None:
            spec = SpecStats(seq.spec_drafted, seq.spec_accepted, seq.target_steps,
                             seq.num_output_tokens / max(seq.target_steps, 1))
        return RequestOutput(request_id, req.detok.text, seq.output_token_ids, True, "abort",
                             seq.num_prompt_tokens, spec=spec)
