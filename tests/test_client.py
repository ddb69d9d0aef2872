"""The asyncio client against a real server: same results as the blocking client, 64 concurrent
streams each get their full output, cancelling streams frees every KV block; client-side errors."""
import asyncio
import socket

import grpc
import pytest

from eyas import LLM, SamplingParams
from eyas.client import (AsyncClient, Client, ClientError, DeadlineExceeded, InvalidArgument, Result,
                         Unavailable, Usage, build_request)
from eyas.serve.background import BackgroundServer
from eyas.serve.config import ServerConfig
from test_serve import build_engine, tiny_config, wait_idle

pytestmark = pytest.mark.timeout(120)

PARAMS = dict(max_tokens=12, ignore_eos=True)
PROMPTS = [f"Request number {i}: tell me about {w}" for i, w in
           enumerate(["cats", "dogs", "the sea", "trees", "rain", "snow", "music", "bread"] * 8)]


@pytest.fixture(scope="module")
def engine(tiny_llama_path):
    return build_engine(tiny_config(tiny_llama_path, num_kv_blocks=2048))


@pytest.fixture(scope="module")
def server(engine):
    srv = BackgroundServer(engine, ServerConfig(port=0)).start()
    yield srv
    srv.stop(grace=0)


@pytest.fixture(scope="module")
def reference(tiny_llama_path):
    import torch

    threads = torch.get_num_threads()
    try:
        llm = LLM(config=tiny_config(tiny_llama_path))
        return llm.generate(PROMPTS, SamplingParams(**PARAMS))
    finally:
        torch.set_num_threads(threads)


@pytest.mark.asyncio
async def test_async_generate_and_stream_match_sync(server, engine, reference):
    async with AsyncClient(server.address, timeout=30) as ac:
        r = await ac.generate(PROMPTS[0], **PARAMS)
        deltas = [d async for d in ac.stream(PROMPTS[0], **PARAMS)]
        assert await ac.health() == "SERVING"
        info = await ac.model_info()
        assert await ac.abort("not-running") is False
    with Client(server.address, timeout=30) as c:
        s = c.generate(PROMPTS[0], **PARAMS)
    assert r.token_ids == s.token_ids == reference[0].token_ids
    assert r.text == s.text == "".join(d.text for d in deltas) == reference[0].text
    assert [t for d in deltas for t in d.token_ids] == r.token_ids
    assert deltas[-1].usage == r.usage == Usage(reference[0].prompt_tokens, 12)
    assert info.vocab_size == engine.model.vocab_size and info.max_model_len == 256


@pytest.mark.asyncio
async def test_64_concurrent_streams_complete(server, engine, reference):
    async with AsyncClient(server.address, timeout=60) as ac:
        async def one(prompt):
            text, ids, last = [], [], None
            async for d in ac.stream(prompt, **PARAMS):
                text.append(d.text)
                ids.extend(d.token_ids)
                last = d
            return "".join(text), ids, last

        results = await asyncio.gather(*(one(p) for p in PROMPTS))
    assert len(results) == 64
    for (text, ids, last), ref in zip(results, reference):
        assert ids == ref.token_ids and text == ref.text
        assert last.finish_reason == "length" and last.usage.completion_tokens == 12
    wait_idle(engine)


@pytest.mark.asyncio
async def test_cancelling_streams_mid_generation_frees_all_blocks(server, engine, monkeypatch):
    step = engine.step

    def slow_step():
        import time
        time.sleep(0.01)
        return step()

    monkeypatch.setattr(engine, "step", slow_step)
    started = asyncio.Event()
    count = {"n": 0}

    async def consume(ac, prompt):
        async for _ in ac.stream(prompt, max_tokens=200, ignore_eos=True):
            count["n"] += 1
            if count["n"] >= 16:
                started.set()

    async with AsyncClient(server.address, timeout=60) as ac:
        tasks = [asyncio.create_task(consume(ac, p)) for p in PROMPTS[:16]]
        await asyncio.wait_for(started.wait(), 30)
        assert engine.requests  # mid-generation
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        # and a deadline on the async client
        with pytest.raises(DeadlineExceeded):
            await ac.generate(PROMPTS[0], max_tokens=200, ignore_eos=True, timeout=0.3)
    await asyncio.get_running_loop().run_in_executor(None, wait_idle, engine)


@pytest.mark.asyncio
async def test_async_invalid_argument_names_field(server):
    async with AsyncClient(server.address, timeout=30) as ac:
        with pytest.raises(InvalidArgument) as e:
            await ac.generate("hi", top_p=2.0)
        assert e.value.field == "top_p"


def test_client_side_checks_and_request_building():
    with pytest.raises(InvalidArgument) as e:
        build_request(messages=[{"role": "user", "content": "hi", "tool_calls": []}])
    assert e.value.field == "messages[0]"
    req = build_request("hi", max_tokens=5, stop="END", logprobs=2, seed=7)
    assert req.HasField("prompt") and req.max_tokens == 5 and list(req.stop) == ["END"]
    assert req.return_logprobs and req.top_logprobs == 2 and req.seed == 7
    assert not req.HasField("temperature")  # unset: the server's default
    assert issubclass(InvalidArgument, ClientError) and issubclass(DeadlineExceeded, ClientError)


def test_result_to_dict_has_the_contract_fields():
    r = Result(id="7", text="hi", token_ids=[1, 2], finish_reason="stop", usage=Usage(3, 2))
    assert r.to_dict() == {"id": "7", "text": "hi", "token_ids": [1, 2], "finish_reason": "stop",
                           "num_tokens": 2, "usage": {"prompt_tokens": 3, "completion_tokens": 2}}


def test_unreachable_server_is_unavailable():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with Client(f"127.0.0.1:{port}", timeout=3) as c:
        with pytest.raises(Unavailable) as e:
            c.generate("hi", max_tokens=2)
        assert e.value.code == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(Unavailable):
            c.wait_ready(timeout=0.5)
