"""The gRPC server on a tiny random Llama, in-process on 127.0.0.1 with a free port: output equals
offline generation, streaming, abort, cancel and deadline free KV blocks, bad input is refused
with the field named, and the server keeps serving."""
import threading
import time

import grpc
import pytest
import torch

from eyas import LLM, SamplingParams
from eyas.client import AlreadyExists, Client, ClientError, DeadlineExceeded, InvalidArgument, build_request
from eyas.config import EngineConfig
from eyas.engine import LLMEngine
from eyas.serve.background import BackgroundServer
from eyas.serve.config import ServerConfig
from eyas.serve.v1 import generate_pb2 as pb
from eyas.serve.v1 import generate_pb2_grpc as pb_grpc

pytestmark = pytest.mark.timeout(120)

CAP = 200
PROMPTS = ["Hello, my name is", "The capital of France is", "1 2 3 4 5", "Once upon a time"]


def tiny_config(path, **kw) -> EngineConfig:
    return EngineConfig(model=str(path), block_size=4, num_kv_blocks=1024, max_model_len=256,
                        num_threads=1).replace(**kw)


def build_engine(config: EngineConfig) -> LLMEngine:
    """An engine whose 1-thread setting does not leak into the test process's main thread."""
    threads = torch.get_num_threads()
    try:
        return LLMEngine(config)
    finally:
        torch.set_num_threads(threads)


def wait_until(pred, timeout=20.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.01)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def wait_idle(engine, timeout=20.0):
    """Every request gone from the engine and every KV block back in the free list."""
    wait_until(lambda: not engine.requests and engine.allocator.num_free_blocks == engine.num_blocks,
               timeout, f"free KV blocks ({engine.allocator.num_free_blocks}/{engine.num_blocks})")
    engine.allocator.check_invariants([])


@pytest.fixture(scope="module")
def engine(tiny_llama_path):
    return build_engine(tiny_config(tiny_llama_path))


@pytest.fixture(scope="module")
def server(engine):
    srv = BackgroundServer(engine, ServerConfig(port=0, max_tokens_cap=CAP)).start()
    yield srv
    srv.stop(grace=0)


@pytest.fixture(scope="module")
def client(server):
    with Client(server.address, timeout=60) as c:
        yield c


def slow_down(engine, monkeypatch, seconds: float) -> None:
    """Make each engine step take >= `seconds`, so a request is still running when a test acts."""
    step = engine.step

    def slow_step():
        time.sleep(seconds)
        return step()

    monkeypatch.setattr(engine, "step", slow_step)


@pytest.fixture
def slow_engine(engine, monkeypatch):
    slow_down(engine, monkeypatch, 0.02)
    yield engine
    wait_idle(engine)


@pytest.fixture(scope="module")
def offline(tiny_llama_path):
    """Greedy reference outputs from the offline LLM API on the same model."""
    threads = torch.get_num_threads()
    try:
        llm = LLM(config=tiny_config(tiny_llama_path))
        params = SamplingParams(max_tokens=24, ignore_eos=True)
        return {
            "text": llm.generate(PROMPTS, params),
            "chat": llm.generate([{"messages": [{"role": "user", "content": p}]} for p in PROMPTS], params),
            "ids": llm.generate([[1, 2, 3, 4, 5, 6, 7]], params),
        }
    finally:
        torch.set_num_threads(threads)


def collect(client, **kw):
    deltas = list(client.stream(**kw))
    assert deltas and deltas[-1].finished and all(not d.finished for d in deltas[:-1])
    return deltas


def test_stream_equals_offline_generate(client, engine, offline):
    for i, prompt in enumerate(PROMPTS):
        deltas = collect(client, prompt=prompt, max_tokens=24, ignore_eos=True)
        ref = offline["text"][i]
        assert [t for d in deltas for t in d.token_ids] == ref.token_ids
        assert "".join(d.text for d in deltas) == ref.text
        last = deltas[-1]
        assert last.finish_reason == ref.finish_reason == "length"
        assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (ref.prompt_tokens, 24)
        assert last.spec is None
    wait_idle(engine)


def test_chat_messages_and_token_ids_equal_offline(client, offline):
    for i, prompt in enumerate(PROMPTS):
        r = client.generate(messages=[{"role": "user", "content": prompt}], max_tokens=24, ignore_eos=True)
        assert r.token_ids == offline["chat"][i].token_ids and r.text == offline["chat"][i].text
    r = client.generate(prompt_token_ids=[1, 2, 3, 4, 5, 6, 7], max_tokens=24, ignore_eos=True)
    assert r.token_ids == offline["ids"][0].token_ids
    assert r.usage.prompt_tokens == 7
    # chat=True applies the template to a text prompt: same as the one-message conversation
    r = client.generate(PROMPTS[0], chat=True, max_tokens=24, ignore_eos=True)
    assert r.token_ids == offline["chat"][0].token_ids


def test_result_fields_and_ids(client):
    r = client.generate(PROMPTS[1], max_tokens=5, request_id="my-id")
    d = r.to_dict()
    assert d["id"] == "my-id"
    assert set(d) >= {"id", "text", "token_ids", "finish_reason", "usage"}
    assert d["usage"] == {"prompt_tokens": r.usage.prompt_tokens, "completion_tokens": len(r.token_ids)}
    assert d["finish_reason"] in ("stop", "length")
    auto = client.generate(PROMPTS[1], max_tokens=2)
    assert auto.id and auto.id != "my-id"  # the server assigns an id when none is given


def test_stop_token_ids_logprobs_and_seeded_sampling(client):
    first = client.generate(PROMPTS[2], max_tokens=6, ignore_eos=True)
    stopped = client.generate(PROMPTS[2], max_tokens=6, stop_token_ids=[first.token_ids[2]], ignore_eos=True)
    assert stopped.finish_reason == "stop"
    assert stopped.token_ids == first.token_ids[:first.token_ids.index(first.token_ids[2]) + 1]
    r = client.generate(PROMPTS[2], max_tokens=6, ignore_eos=True, logprobs=3)
    assert r.token_ids == first.token_ids
    assert [lp["token_id"] for lp in r.logprobs] == r.token_ids
    assert all(len(lp["top"]) == 3 and lp["top"][0][0] == lp["token_id"] for lp in r.logprobs)
    kw = dict(max_tokens=12, ignore_eos=True, temperature=1.0, top_p=0.95, seed=1234)
    assert client.generate(PROMPTS[3], **kw).token_ids == client.generate(PROMPTS[3], **kw).token_ids


def test_model_info_and_health(client, engine):
    info = client.model_info()
    assert info.model == str(engine.config.model)
    assert (info.max_model_len, info.vocab_size, info.tp_size) == (256, engine.model.vocab_size, 1)
    assert info.max_tokens_cap == CAP and info.draft_model is None and info.spec is None
    assert client.health() == "SERVING"
    assert client.health("eyas.v1.Generation") == "SERVING"
    with pytest.raises(ClientError) as e:
        client.health("no.such.Service")
    assert e.value.code == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_the_service(server):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(server.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = list(stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services=""),
                  reflection_pb2.ServerReflectionRequest(file_containing_symbol="eyas.v1.Generation")]),
            timeout=10))
    names = {s.name for s in replies[0].list_services_response.service}
    assert {"eyas.v1.Generation", "grpc.health.v1.Health"} <= names
    assert replies[1].file_descriptor_response.file_descriptor_proto  # the .proto itself is served


def test_abort_by_id_ends_stream_and_frees_blocks(client, slow_engine):
    got = []

    def run():
        got.extend(client.stream(PROMPTS[0], max_tokens=CAP, ignore_eos=True, request_id="to-abort"))

    t = threading.Thread(target=run)
    t.start()
    wait_until(lambda: len(got) >= 2, what="first deltas")
    assert client.abort("to-abort") is True
    t.join(20)
    assert not t.is_alive()
    assert got[-1].finish_reason == "abort"
    assert 2 <= got[-1].usage.completion_tokens < CAP
    assert got[-1].usage.completion_tokens == sum(len(d.token_ids) for d in got)
    assert client.abort("to-abort") is False
    with pytest.raises(InvalidArgument) as e:
        client.abort("")
    assert e.value.field == "request_id"
    wait_idle(slow_engine)


def test_client_cancel_frees_blocks(client, slow_engine):
    stream = client.stream(PROMPTS[1], max_tokens=CAP, ignore_eos=True)
    for i, _ in enumerate(stream):
        if i == 2:
            break
    assert slow_engine.requests  # still running in the engine until the cancel arrives
    stream.close()  # cancels the RPC
    wait_idle(slow_engine)


def test_deadline_aborts_and_frees_blocks(client, slow_engine):
    with pytest.raises(DeadlineExceeded):
        client.generate(PROMPTS[2], max_tokens=CAP, ignore_eos=True, timeout=0.5)
    wait_idle(slow_engine)


def test_duplicate_running_id_is_refused(client, slow_engine):
    stream = client.stream(PROMPTS[0], max_tokens=CAP, ignore_eos=True, request_id="dup")
    next(stream)
    with pytest.raises(AlreadyExists):
        client.generate(PROMPTS[1], max_tokens=2, request_id="dup")
    stream.close()
    wait_idle(slow_engine)
    assert client.generate(PROMPTS[1], max_tokens=2, request_id="dup").id == "dup"  # free again


BAD = [
    (dict(prompt=""), "prompt"),
    (dict(), "prompt"),
    (dict(prompt="hi", prompt_token_ids=[1, 2]), "prompt"),
    (dict(prompt="hi", messages=[{"role": "user", "content": "hi"}]), "prompt"),
    (dict(prompt="hello " * 400), "prompt"),
    (dict(prompt_token_ids=[5] * 256), "prompt"),
    (dict(prompt="hi", max_tokens=0), "max_tokens"),
    (dict(prompt="hi", max_tokens=-3), "max_tokens"),
    (dict(prompt="hi", max_tokens=CAP + 1), "max_tokens"),
    (dict(prompt="hi", temperature=-0.5), "temperature"),
    (dict(prompt="hi", temperature=float("nan")), "temperature"),
    (dict(prompt="hi", top_p=0.0), "top_p"),
    (dict(prompt="hi", top_p=1.5), "top_p"),
    (dict(prompt="hi", top_k=-2), "top_k"),
    (dict(prompt="hi", min_p=2.0), "min_p"),
    (dict(prompt="hi", stop=[""]), "stop"),
    (dict(prompt="hi", stop_token_ids=[-1]), "stop_token_ids"),
    (dict(prompt="hi", logprobs=100), "top_logprobs"),
    (dict(prompt_token_ids=[1, -1]), "prompt_token_ids"),
    (dict(prompt_token_ids=[1, 10**6]), "prompt_token_ids"),
    (dict(prompt_token_ids=[1, 2], chat=True), "chat"),
    (dict(messages=[{"role": "", "content": "hi"}]), "messages[0].role"),
    (dict(prompt="hi", request_id="x" * 1000), "request_id"),
]


@pytest.mark.parametrize("kwargs,field", BAD, ids=[f"{i}-{f}" for i, (_, f) in enumerate(BAD)])
def test_bad_input_is_invalid_argument_naming_the_field(client, kwargs, field):
    with pytest.raises(InvalidArgument) as e:
        client.generate(**kwargs)
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.field == field
    assert field.split("[")[0] in str(e.value)


def test_unknown_fields_in_chat_messages_are_refused(server):
    """A client built from a newer proto sends a chat message field this server does not know."""
    message = pb.ChatMessage()
    message.ParseFromString(pb.ChatMessage(role="user", content="hi").SerializeToString() + b"\x78\x01")
    req = build_request(messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    req.messages[0].CopyFrom(message)
    with grpc.insecure_channel(server.address) as channel:
        with pytest.raises(grpc.RpcError) as e:
            list(pb_grpc.GenerationStub(channel).Generate(req, timeout=10))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "messages[0]" in e.value.details() and "unknown field" in e.value.details()
    assert ("eyas-field", "messages[0]") in tuple(e.value.trailing_metadata())


def test_server_keeps_serving_after_errors(client, engine, offline):
    for kwargs, _ in BAD[:5]:
        with pytest.raises(InvalidArgument):
            client.generate(**kwargs)
    r = client.generate(PROMPTS[0], max_tokens=24, ignore_eos=True)
    assert r.token_ids == offline["text"][0].token_ids
    wait_idle(engine)
