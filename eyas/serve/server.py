"""GenerationServer: a grpc.aio server around one LLMEngine (Generation, health, reflection).

Threads: the asyncio event loop runs gRPC and admission; one engine thread (EngineLoop) owns
the engine. Shutdown: health goes NOT_SERVING and new Generate calls get UNAVAILABLE, in-flight
requests get `grace_period` seconds to finish, the rest are aborted, then gRPC and the engine
thread stop.
With `metrics_port` set, Prometheus metrics are served at http://HOST:PORT/metrics from a small
HTTP server thread (see metrics.py); it stops last, so the final counts stay readable while draining.
"""
from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path
from typing import Optional

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from eyas.errors import ConfigError
from eyas.serve.auth import ApiKeyInterceptor
from eyas.serve.config import ServerConfig
from eyas.serve.convert import Limits
from eyas.serve.engine_loop import EngineLoop
from eyas.serve.metrics import MetricsHTTPServer, ServerMetrics
from eyas.serve.service import GenerationService
from eyas.serve.v1 import generate_pb2 as pb
from eyas.serve.v1 import generate_pb2_grpc as pb_grpc

log = logging.getLogger("eyas.serve")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Generation"].full_name  # "eyas.v1.Generation"
HEALTH_NAMES = ("", SERVICE_NAME)


def model_info_for(engine, config: ServerConfig) -> pb.ModelInfo:
    """Describe the served model and the server's limits."""
    ecfg = engine.config
    info = pb.ModelInfo(model=str(ecfg.model), max_model_len=engine.max_model_len,
                        vocab_size=engine.vocab_size, tp_size=config.tp_size,
                        max_tokens_cap=config.effective_max_tokens_cap(engine.max_model_len),
                        max_pending=config.max_pending)
    if ecfg.spec.enabled:
        info.draft_model = str(ecfg.spec.draft)
        info.spec.CopyFrom(pb.SpecInfo(steps=ecfg.spec.steps, topk=ecfg.spec.topk,
                                       draft_tokens=ecfg.spec.draft_tokens, policy=ecfg.spec.policy))
    return info


class GenerationServer:
    """Start with `await start()` (returns the bound port), end with `await stop()`."""

    def __init__(self, engine, config: ServerConfig = ServerConfig()):
        self.engine = engine
        self.config = config
        self.port: Optional[int] = None
        self.metrics = ServerMetrics()
        self.metrics_port: Optional[int] = None  # bound metrics port (None: metrics HTTP off)
        self._metrics_http: Optional[MetricsHTTPServer] = None
        self.engine_loop: Optional[EngineLoop] = None
        self.service: Optional[GenerationService] = None
        self._server: Optional[grpc.aio.Server] = None
        self._health: Optional[health.aio.HealthServicer] = None
        self._hurry: Optional[asyncio.Event] = None
        self._stopped: Optional[asyncio.Event] = None
        self._stopping = False

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.port}"

    async def start(self) -> int:
        cfg = self.config
        loop = asyncio.get_running_loop()
        self._hurry = asyncio.Event()
        self._stopped = asyncio.Event()
        limits = Limits(vocab_size=self.engine.vocab_size,
                        max_tokens_cap=cfg.effective_max_tokens_cap(self.engine.max_model_len),
                        default_max_tokens=cfg.default_max_tokens, max_request_id_len=cfg.max_request_id_len)
        self.engine_loop = EngineLoop(self.engine, loop, metrics=self.metrics)
        self.service = GenerationService(self.engine_loop, limits, model_info_for(self.engine, cfg),
                                         cfg.max_pending)
        interceptors = [ApiKeyInterceptor(cfg.api_key)] if cfg.api_key else []
        options = [("grpc.max_send_message_length", cfg.max_message_bytes),
                   ("grpc.max_receive_message_length", cfg.max_message_bytes),
                   ("grpc.so_reuseport", 0)]
        server = grpc.aio.server(interceptors=interceptors, options=options)
        pb_grpc.add_GenerationServicer_to_server(self.service, server)
        self._health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        try:
            if cfg.tls:
                creds = grpc.ssl_server_credentials([(Path(cfg.tls_key).read_bytes(), Path(cfg.tls_cert).read_bytes())])
                port = server.add_secure_port(cfg.address, creds)
            else:
                port = server.add_insecure_port(cfg.address)
        except RuntimeError:
            port = 0
        if not port:
            raise ConfigError(f"could not listen on {cfg.address} (port in use, or not a local address?)")
        if cfg.metrics_port is not None:
            self._start_metrics_http()
        self.engine_loop.start()
        await server.start()
        self._server, self.port = server, port
        for name in HEALTH_NAMES:
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        return port

    def _start_metrics_http(self) -> None:
        http = MetricsHTTPServer(self.metrics, self.config.host, self.config.metrics_port)
        try:
            self.metrics_port = http.start()
        except OSError as e:
            raise ConfigError(f"could not serve metrics on {self.config.host}:{self.config.metrics_port}: "
                              f"{e.strerror or e}") from None
        self._metrics_http = http
        log.info("metrics on %s", http.url)

    async def _stop_metrics_http(self) -> None:
        if self._metrics_http is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._metrics_http.stop)
            self._metrics_http = None

    def hurry(self) -> None:
        """End the grace period now (a second SIGTERM/SIGINT)."""
        if self._hurry is not None:
            self._hurry.set()

    async def stop(self, grace: Optional[float] = None) -> None:
        """Graceful shutdown: NOT_SERVING, drain for `grace` s (default: config), abort the rest."""
        if self._server is None:
            return
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        self.service.draining = True
        grace = self.config.grace_period if grace is None else grace
        await self._health.enter_graceful_shutdown()
        await self.service.drain(grace, self._hurry)
        await self._server.stop(1.0)
        await asyncio.get_running_loop().run_in_executor(None, self.engine_loop.stop, 30.0)
        await self._stop_metrics_http()
        self._stopped.set()
        log.info("server on %s stopped", self.address)

    async def wait_stopped(self) -> None:
        await self._stopped.wait()


async def serve_until_signal(engine, config: ServerConfig) -> None:
    """Serve until SIGTERM or SIGINT; a second signal cuts the grace period short."""
    server = GenerationServer(engine, config)
    await server.start()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def on_signal(signum: int) -> None:
        if stop.is_set():
            log.info("second signal: aborting in-flight requests now")
            server.hurry()
        else:
            log.info("received %s: shutting down (grace %.1fs)", signal.Signals(signum).name,
                     config.grace_period)
            stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    log.info("serving on %s", server.address)
    try:
        await stop.wait()
        await server.stop()
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)


def run_server(engine, config: ServerConfig) -> None:
    """Blocking entry point of `eyas serve`."""
    asyncio.run(serve_until_signal(engine, config))
