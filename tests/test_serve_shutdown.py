"""Server lifecycle and limits: graceful shutdown lets in-flight requests finish (health goes
NOT_SERVING, new requests get UNAVAILABLE), the grace period ends in aborts, max_pending gives
RESOURCE_EXHAUSTED, and an engine failure fails its requests with INTERNAL but not the server."""
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from eyas.client import Client, InternalError, ResourceExhausted, Unavailable
from eyas.serve.background import BackgroundServer
from eyas.serve.config import ServerConfig
from test_serve import build_engine, slow_down, tiny_config, wait_idle, wait_until

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def engine(tiny_llama_path):
    return build_engine(tiny_config(tiny_llama_path))


@pytest.fixture
def slow_engine(engine, monkeypatch):
    slow_down(engine, monkeypatch, 0.02)
    yield engine
    wait_idle(engine)


def start(engine, **kw) -> BackgroundServer:
    return BackgroundServer(engine, ServerConfig(port=0, **kw)).start()


def stream_in_thread(client, **kw):
    got: list = []
    errors: list = []

    def run():
        try:
            got.extend(client.stream(**kw))
        except Exception as e:  # noqa: BLE001 - handed to the test
            errors.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, got, errors


def test_graceful_shutdown_finishes_in_flight(slow_engine):
    srv = start(slow_engine, grace_period=30)
    with Client(srv.address, timeout=30) as c:
        t, got, errors = stream_in_thread(c, prompt="Hello", max_tokens=60, ignore_eos=True)
        wait_until(lambda: len(got) >= 2, what="first deltas")
        srv.begin_stop()
        wait_until(lambda: c.health() == "NOT_SERVING", what="NOT_SERVING")
        assert c.health("eyas.v1.Generation") == "NOT_SERVING"
        with pytest.raises(Unavailable):
            c.generate("Hi", max_tokens=2)
        t.join(30)
        assert not errors and got[-1].finish_reason == "length"
        assert sum(len(d.token_ids) for d in got) == 60
        assert srv.join(30)
        with pytest.raises(Unavailable):
            c.health(timeout=2)


def test_grace_period_over_aborts_in_flight(slow_engine):
    srv = start(slow_engine, grace_period=0.3)
    with Client(srv.address, timeout=30) as c:
        t, got, errors = stream_in_thread(c, prompt="Hello", max_tokens=200, ignore_eos=True)
        wait_until(lambda: len(got) >= 1, what="first delta")
        t0 = time.monotonic()
        srv.stop(timeout=30)
        assert time.monotonic() - t0 < 10
        t.join(10)
        assert not errors and got[-1].finish_reason == "abort"
        assert got[-1].usage.completion_tokens < 200


def test_second_signal_cuts_the_grace_period_short(slow_engine):
    srv = start(slow_engine, grace_period=60)
    with Client(srv.address, timeout=30) as c:
        t, got, errors = stream_in_thread(c, prompt="Hello", max_tokens=200, ignore_eos=True)
        wait_until(lambda: len(got) >= 1, what="first delta")
        srv.begin_stop()
        wait_until(lambda: c.health() == "NOT_SERVING", what="NOT_SERVING")
        srv.hurry()
        assert srv.join(20)
        t.join(10)
        assert got[-1].finish_reason == "abort"


def test_max_pending_gives_resource_exhausted(slow_engine):
    srv = start(slow_engine, max_pending=1)
    try:
        with Client(srv.address, timeout=30) as c:
            first = c.stream("Hello", max_tokens=200, ignore_eos=True)
            next(first)
            with pytest.raises(ResourceExhausted):
                c.generate("Hi", max_tokens=2)
            first.close()
            wait_idle(slow_engine)
            assert c.generate("Hi", max_tokens=3, ignore_eos=True).usage.completion_tokens == 3
    finally:
        srv.stop(grace=0)


def test_concurrent_burst_over_max_pending(slow_engine):
    srv = start(slow_engine, max_pending=2)
    try:
        with Client(srv.address, timeout=30) as c:
            def one(i):
                try:
                    return c.generate(f"Prompt {i}", max_tokens=25, ignore_eos=True)
                except ResourceExhausted as e:
                    return e

            with ThreadPoolExecutor(8) as pool:
                results = list(pool.map(one, range(8)))
        done = [r for r in results if not isinstance(r, Exception)]
        refused = [r for r in results if isinstance(r, ResourceExhausted)]
        assert len(done) + len(refused) == 8
        assert done and refused
        assert all(len(r.token_ids) == 25 and r.finish_reason == "length" for r in done)
    finally:
        srv.stop(grace=0)


def test_engine_failure_is_internal_and_server_survives(engine, monkeypatch):
    srv = start(engine)
    try:
        with Client(srv.address, timeout=30) as c:
            step = engine.step
            calls = {"n": 0}

            def failing_step():
                calls["n"] += 1
                if calls["n"] == 1:
                    raise RuntimeError("boom")
                return step()

            monkeypatch.setattr(engine, "step", failing_step)
            with pytest.raises(InternalError, match="boom"):
                c.generate("Hello", max_tokens=5)
            wait_idle(engine)
            assert c.generate("Hello", max_tokens=5, ignore_eos=True).usage.completion_tokens == 5
            assert c.health() == "SERVING"
    finally:
        srv.stop(grace=0)
