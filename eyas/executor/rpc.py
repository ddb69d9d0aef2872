"""gRPC for the worker protocol: each worker serves `eyas.v1.Worker` on 127.0.0.1, and the
coordinator keeps one bidirectional stream per worker (WorkerStream), one plan in, one result out.
"""
from __future__ import annotations

import logging
import queue
from concurrent import futures
from typing import Any, Optional

import grpc

from eyas.errors import EyasError
from eyas.executor.protocol import ProtocolMismatch
from eyas.serve.v1 import worker_pb2_grpc

log = logging.getLogger("eyas.worker")

MAX_MESSAGE_BYTES = 64 * 2**20
_OPTIONS = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]


class WorkerError(EyasError):
    """A worker's stream failed: the worker died, refused a plan, or raised while running it."""

    def __init__(self, name: str, code: Optional[grpc.StatusCode], details: str):
        super().__init__(f"worker {name}: {details}" + (f" ({code.name})" if code is not None else ""))
        self.name = name
        self.code = code
        self.details = details


class WorkerService(worker_pb2_grpc.WorkerServicer):
    """Runs each plan of a stream on its worker (TargetWorker.step / DrafterWorker.draft)."""

    def __init__(self, worker: Any):
        self.worker = worker

    def _serve(self, plans, context, run):
        for plan in plans:
            try:
                yield run(plan)
            except ProtocolMismatch as e:
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
            except Exception as e:  # report it to the coordinator, which decides what to do
                log.exception("worker failed on plan %d", plan.step)
                context.abort(grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}")

    def Steps(self, request_iterator, context):
        return self._serve(request_iterator, context, self.worker.step)

    def Drafts(self, request_iterator, context):
        return self._serve(request_iterator, context, self.worker.draft)


def serve_worker(worker: Any, host: str = "127.0.0.1") -> tuple[grpc.Server, int]:
    """Start the worker's gRPC server on a free port of host; returns (server, port)."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), options=_OPTIONS)
    worker_pb2_grpc.add_WorkerServicer_to_server(WorkerService(worker), server)
    port = server.add_insecure_port(f"{host}:0")
    if port == 0:
        raise EyasError(f"worker could not bind a port on {host}")
    server.start()
    return server, port


_END = object()


class WorkerStream:
    """The coordinator's end of one worker stream: send(plan) then recv() -> result, in order."""

    def __init__(self, address: str, method: str, name: str, ready_timeout_s: float = 30.0):
        self.name = name
        self.channel = grpc.insecure_channel(address, options=_OPTIONS)
        try:
            grpc.channel_ready_future(self.channel).result(timeout=ready_timeout_s)
        except grpc.FutureTimeoutError:
            self.channel.close()
            raise WorkerError(name, None, f"not reachable at {address} within {ready_timeout_s:g}s") from None
        stub = worker_pb2_grpc.WorkerStub(self.channel)
        self._plans: queue.Queue = queue.Queue()
        self._results = getattr(stub, method)(iter(self._plans.get, _END))
        self.outstanding = 0  # plans sent whose results were not read yet

    def send(self, plan) -> None:
        self._plans.put(plan)
        self.outstanding += 1

    def recv(self):
        try:
            result = next(self._results)
        except grpc.RpcError as e:
            raise WorkerError(self.name, e.code(), e.details() or str(e)) from None
        except StopIteration:
            raise WorkerError(self.name, None, "the stream ended") from None
        self.outstanding -= 1
        return result

    def post(self, plan) -> None:
        """Read (and drop) any results still owed, then send plan without waiting for its result."""
        while self.outstanding:
            self.recv()
        self.send(plan)

    def call(self, plan):
        """post(plan), then return its result."""
        self.post(plan)
        return self.recv()

    def close(self) -> None:
        self._plans.put(_END)
        try:
            self._results.cancel()
        except Exception:
            pass
        self.channel.close()
