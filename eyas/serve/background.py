"""BackgroundServer: a GenerationServer on its own event loop in a daemon thread.

For tests, notebooks and embedding a server in a program that is not asyncio:

    with BackgroundServer(engine, ServerConfig(port=0)) as srv:
        Client(srv.address).generate("Hi")
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from typing import Optional

from eyas.serve.config import ServerConfig
from eyas.serve.server import GenerationServer


class BackgroundServer:
    def __init__(self, engine, config: ServerConfig = ServerConfig(port=0)):
        self.server = GenerationServer(engine, config)
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._ready = threading.Event()
        self._stop_requested: Optional[asyncio.Event] = None
        self._grace: Optional[float] = None
        self._error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._run, name="eyas-server", daemon=True)

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def address(self) -> str:
        return self.server.address

    @property
    def engine_loop(self):
        return self.server.engine_loop

    def start(self, timeout: float = 60.0) -> "BackgroundServer":
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError(f"server did not start within {timeout}s")
        if self._error is not None:
            raise self._error
        return self

    def begin_stop(self, grace: Optional[float] = None) -> None:
        """Start a graceful shutdown and return at once (join() waits for the end)."""
        if self._loop is None or self._stop_requested is None:
            return
        self._grace = grace
        try:
            self._loop.call_soon_threadsafe(self._stop_requested.set)
        except RuntimeError:  # the loop already ended
            pass

    def join(self, timeout: Optional[float] = None) -> bool:
        """Wait for the server to stop; True when it did."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def stop(self, grace: Optional[float] = None, timeout: float = 60.0) -> None:
        self.begin_stop(grace)
        if not self.join(timeout):
            raise TimeoutError(f"server did not stop within {timeout}s")

    def hurry(self) -> None:
        """Cut a running grace period short."""
        if self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self.server.hurry)
            except RuntimeError:
                pass

    def call(self, coro_fn, timeout: float = 30.0):
        """Run `coro_fn()` on the server's loop and return its result (for tests and tools)."""
        fut: concurrent.futures.Future = asyncio.run_coroutine_threadsafe(coro_fn(), self._loop)
        return fut.result(timeout)

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop_requested = asyncio.Event()
        try:
            await self.server.start()
        except BaseException as e:
            self._error = e
            self._ready.set()
            if self.server.engine_loop is not None:
                self.server.engine_loop.stop(5.0)
            return
        self._ready.set()
        await self._stop_requested.wait()
        await self.server.stop(self._grace)

    def __enter__(self) -> "BackgroundServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
