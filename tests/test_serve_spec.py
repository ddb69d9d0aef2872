"""Serving with an EAGLE-3 draft: greedy streams equal plain offline generation (lossless), the
last message carries spec stats, and model_info describes the speculation settings."""
import pytest
import torch

from eyas import LLM, SamplingParams
from eyas.client import Client
from eyas.serve.background import BackgroundServer
from eyas.serve.config import ServerConfig
from test_serve import build_engine, tiny_config, wait_idle

pytestmark = pytest.mark.timeout(120)

PROMPTS = ["Hello, my name is", "The capital of France is", "1 2 3 4 5"]
PARAMS = dict(max_tokens=16, ignore_eos=True)


@pytest.fixture(scope="module")
def spec_engine(tiny_llama_path, tiny_drafter_path):
    return build_engine(tiny_config(tiny_llama_path, draft=str(tiny_drafter_path), spec_steps=3))


@pytest.fixture(scope="module")
def plain_reference(tiny_llama_path):
    threads = torch.get_num_threads()
    try:
        return LLM(config=tiny_config(tiny_llama_path)).generate(PROMPTS, SamplingParams(**PARAMS))
    finally:
        torch.set_num_threads(threads)


def test_spec_stream_equals_plain_generate(spec_engine, plain_reference, tiny_drafter_path):
    srv = BackgroundServer(spec_engine, ServerConfig(port=0)).start()
    try:
        with Client(srv.address, timeout=60) as c:
            info = c.model_info()
            assert info.draft_model == str(tiny_drafter_path)
            spec = spec_engine.config.spec
            assert info.spec == {"steps": 3, "topk": spec.topk, "draft_tokens": spec.draft_tokens,
                                 "policy": spec.policy}
            for prompt, ref in zip(PROMPTS, plain_reference):
                deltas = list(c.stream(prompt, **PARAMS))
                ids = [t for d in deltas for t in d.token_ids]
                assert ids == ref.token_ids
                assert "".join(d.text for d in deltas) == ref.text
                last = deltas[-1]
                assert last.finish_reason == "length" and last.usage.completion_tokens == 16
                s = last.spec
                assert s is not None and s.target_steps >= 1 and s.drafted >= s.accepted >= 0
                assert s.accept_len == pytest.approx(16 / s.target_steps)
                assert c.generate(prompt, **PARAMS).to_dict()["spec"]["target_steps"] == s.target_steps
        wait_idle(spec_engine)
    finally:
        srv.stop(grace=0)
