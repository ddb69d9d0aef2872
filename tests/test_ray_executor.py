"""The Ray executor (eyas/executor): tensor-parallel target shards and a drafter worker as Ray actors,
driven over gRPC, tensors over gloo. Greedy output equals the in-process engine's; a dead drafter
means plain decoding with the same output; a dead target shard fails in-flight requests
(UNAVAILABLE through serving) and the workers come back; other protocol versions are refused.

One local Ray for the module (num_cpus set, short temp dir, auth off), shut down after.
"""
import os
import shutil
import tempfile
import time

import grpc
import pytest

from eyas import SamplingParams
from eyas.config import EngineConfig
from eyas.engine import LLMEngine, create_engine
from eyas.errors import ConfigError, WorkerUnavailableError
from test_engine import PROMPTS, run_all

pytestmark = [pytest.mark.timeout(300), pytest.mark.ray]

GREEDY = SamplingParams(max_tokens=12, ignore_eos=True)


def config(path, **kw) -> EngineConfig:
    return EngineConfig(model=str(path), block_size=4, kv_cache_memory="16MiB", max_model_len=128, num_threads=1,
                        executor="ray", worker_start_timeout_s=120).replace(**kw)


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    temp = tempfile.mkdtemp(prefix="ray-eyas-", dir="/tmp")  # socket paths must stay < 107 bytes
    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
    os.environ["RAY_AUTH_MODE"] = "disabled"
    os.environ.pop("RAY_ADDRESS", None)
    ray.init(num_cpus=16, include_dashboard=False, _temp_dir=temp, log_to_driver=False,
             object_store_memory=100 * 2**20,
             _system_config={"worker_niceness": 0})  # as eyas's own: workers must not starve under load
    try:
        yield ray
    finally:
        ray.shutdown()
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def reference(tiny_llama_path):
    """The in-process engine, greedy, each prompt in one batch."""
    engine = LLMEngine(config(tiny_llama_path, executor="local"))
    return run_all(engine, PROMPTS, GREEDY)


@pytest.fixture(scope="module")
def tp2(ray_local, tiny_llama_path):
    engine = create_engine(config(tiny_llama_path, tp=2))
    yield engine
    engine.close()


def test_tp2_greedy_equals_local(tp2, reference, tiny_llama_path):
    from transformers import AutoConfig

    assert tp2.vocab_size == AutoConfig.from_pretrained(tiny_llama_path).vocab_size  # as rank 0 reports it
    assert run_all(tp2, PROMPTS, GREEDY, stagger=2) == reference
    assert run_all(tp2, PROMPTS, GREEDY) == reference  # prefix-cache hits on the workers' KV


def test_tp2_shard_death_fails_in_flight_then_recovers(tp2, reference):
    for i, p in enumerate(PROMPTS[:3]):
        tp2.add_request(f"doomed-{i}", p, GREEDY)
    tp2.step()
    tp2.group.kill("target", rank=1)
    with pytest.raises(WorkerUnavailableError, match="restarted"):
        for _ in range(20):
            tp2.step()
    assert not tp2.requests and not tp2.has_unfinished() and tp2.restarts == 1
    assert run_all(tp2, PROMPTS, GREEDY) == reference  # the new group serves again


def test_serving_shard_death_is_unavailable_then_serves_again(tp2, reference):
    from eyas.client import Client, Unavailable
    from eyas.serve.background import BackgroundServer
    from eyas.serve.config import ServerConfig

    srv = BackgroundServer(tp2, ServerConfig(port=0, tp_size=2)).start()
    try:
        with Client(srv.address, timeout=120) as c:
            stream = c.stream(PROMPTS[0], max_tokens=120, ignore_eos=True)
            next(stream)  # the request is in flight
            tp2.group.kill("target", rank=0)
            with pytest.raises(Unavailable, match="target worker failed"):
                for _ in stream:
                    pass
            out = c.generate(PROMPTS[1], max_tokens=GREEDY.max_tokens, ignore_eos=True)
            assert out.token_ids == reference["1"]
    finally:
        srv.stop(grace=0)


@pytest.fixture(scope="module")
def tp2_spec(ray_local, tiny_llama_path, tiny_drafter_path):
    engine = create_engine(config(tiny_llama_path, tp=2, draft=str(tiny_drafter_path), spec_steps=3,
                                  spec_policy="fixed"))
    yield engine
    engine.close()


def test_tp2_eagle3_greedy_equals_local_and_sampling_runs(tp2_spec, reference):
    engine = tp2_spec
    assert run_all(engine, PROMPTS, GREEDY, stagger=2) == reference
    sampled = SamplingParams(max_tokens=10, temperature=0.8, seed=3, ignore_eos=True)
    out = run_all(engine, PROMPTS[:2], sampled)
    assert all(len(ids) == 10 for ids in out.values())
    assert engine.link.alive  # the drafter stayed up through sampled drafting and verification


def test_serving_tp2_with_draft(tp2_spec, reference, tiny_drafter_path):
    from eyas.client import Client
    from eyas.serve.background import BackgroundServer
    from eyas.serve.config import ServerConfig

    srv = BackgroundServer(tp2_spec, ServerConfig(port=0, tp_size=2)).start()
    try:
        with Client(srv.address, timeout=120) as c:
            info = c.model_info()
            assert info.draft_model == str(tiny_drafter_path) and info.tp_size == 2
            for i in ("0", "3"):
                deltas = list(c.stream(PROMPTS[int(i)], max_tokens=GREEDY.max_tokens, ignore_eos=True))
                assert [t for d in deltas for t in d.token_ids] == reference[i]
                assert deltas[-1].spec is not None and deltas[-1].spec.target_steps >= 1
    finally:
        srv.stop(grace=0)


def test_drafter_death_falls_back_to_plain_decoding(ray_local, tiny_llama_path, tiny_drafter_path, reference):
    engine = create_engine(config(tiny_llama_path, draft=str(tiny_drafter_path), spec_steps=3, spec_topk=2,
                                  spec_draft_tokens=4, spec_policy="fixed"))
    try:
        for i, p in enumerate(PROMPTS):
            engine.add_request(str(i), p, GREEDY)
        done = {}
        for step in range(500):
            if step == 3:
                engine.group.kill("drafter")
            for out in engine.step():
                if out.finished:
                    done[out.id] = out.token_ids
            if not engine.has_unfinished():
                break
        assert done == reference
        assert not engine.link.alive and not engine.decoder.drafting
        assert engine.allocator.num_free_blocks == engine.allocator.num_blocks
    finally:
        engine.close()


def test_placement_that_cannot_fit_fails_fast(ray_local, tiny_llama_path):
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match="no Ray node can hold the workers"):
        create_engine(config(tiny_llama_path, tp=2, worker_cpus=64))
    with pytest.raises(ConfigError, match="could not place"):  # fits the node, but not what is free now
        create_engine(config(tiny_llama_path, tp=2, worker_cpus=7, worker_start_timeout_s=3))
    assert not [pg for pg in ray_local.util.placement_group_table().values() if pg["state"] == "PENDING"]
    assert time.monotonic() - t0 < 60


def test_other_protocol_version_is_refused(tiny_llama_path):
    """A worker served in this process (world of one) refuses a plan of another version."""
    from eyas.executor.protocol import PROTOCOL_VERSION
    from eyas.executor.rpc import WorkerError, WorkerStream, serve_worker
    from eyas.executor.worker import TargetWorker, WorkerSpec
    from eyas.serve.v1 import worker_pb2 as pb

    import torch

    cfg = config(tiny_llama_path, executor="local")
    threads = torch.get_num_threads()
    try:
        worker = TargetWorker(WorkerSpec("target", 0, 1, 1, 0, str(tiny_llama_path), None, cfg))
    finally:
        torch.set_num_threads(threads)  # the worker's 1-thread setting must not leak into other tests
    worker.allocate(64, 0)
    server, port = serve_worker(worker)
    stream = WorkerStream(f"127.0.0.1:{port}", "Steps", "target rank 0")
    try:
        plan = pb.StepPlan(version=PROTOCOL_VERSION, step=0)
        plan.items.add(request_id="a", token_ids=[1, 2, 3], start=0, block_table=[0], num_new=3, sample=True,
                       sampling=pb.Sampling(top_p=1.0))
        assert len(stream.call(plan).items[0].token_ids) == 1  # the right version runs
        with pytest.raises(WorkerError, match=f"speaks version {PROTOCOL_VERSION}, the plan has version 99") as e:
            stream.call(pb.StepPlan(version=99, step=1))
        assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        stream.close()
        server.stop(0)
