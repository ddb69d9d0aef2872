"""EAGLE-3 on an MLA + MoE target (tiny random DeepSeek-V3): one block size (16) for the
target's latent cache and the drafter's standard KV, same block ids; greedy speculative output
equals plain decoding, with preemption and prefix-cache hits; plain equals HF greedy."""
from __future__ import annotations

import shutil

import pytest
import torch
from transformers import AutoConfig, DeepseekV3Config

from eyas import SamplingParams
from eyas.config import EngineConfig
from eyas.engine import LLMEngine
from eyas.spec.decoder import SpecDecoder
from eyas.spec.proposer import ReplayProposer
from test_engine import PROMPTS as BASE_PROMPTS
from test_engine import run_all
from util_engine import make_random_drafter
from util_models import make_hf_model, save_hf_model

PROMPTS = BASE_PROMPTS + [
    "Call me Ishmael. Some years ago, never mind how long precisely, having little or no money "
    "in my purse, and nothing particular to interest me on shore, I thought I would sail about"]
PARAMS = SamplingParams(max_tokens=16, ignore_eos=True)
BLOCK = 16
MAX_LEN = 80


@pytest.fixture(scope="module")
def dsv3_target(tmp_path_factory, smollm2_path):
    """4-layer DeepSeek-V3 (MLA with q LoRA + YaRN; layer 0 dense, then MoE with groups and a
    shared expert) over SmolLM2's vocabulary and tokenizer, with its HF model."""
    src = AutoConfig.from_pretrained(smollm2_path)
    cfg = DeepseekV3Config(
        vocab_size=src.vocab_size, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=32,
        q_lora_rank=48, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16,
        n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1, n_shared_experts=1,
        first_k_dense_replace=1, max_position_embeddings=256, tie_word_embeddings=False,
        rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                         "mscale": 1.0, "mscale_all_dim": 1.0, "rope_theta": 10000.0},
        bos_token_id=src.bos_token_id, eos_token_id=src.eos_token_id,
        architectures=["DeepseekV3ForCausalLM"])
    hf = make_hf_model(cfg, seed=7)
    folder = save_hf_model(hf, tmp_path_factory.mktemp("tiny-dsv3"))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (smollm2_path / name).is_file():
            shutil.copy(smollm2_path / name, folder / name)
    return folder, hf


@pytest.fixture(scope="module")
def dsv3_drafter(tmp_path_factory, dsv3_target):
    """A random EAGLE-3 drafter (standard attention) for the tiny DeepSeek-V3 target."""
    folder, _ = dsv3_target
    return make_random_drafter(folder, tmp_path_factory.mktemp("dsv3-drafter") / "drafter")


def make_engine(folder, **overrides) -> LLMEngine:
    cfg = EngineConfig(model=str(folder), block_size=BLOCK, kv_cache_memory="64MiB",
                       max_model_len=MAX_LEN, num_threads=1, device="cpu").replace(**overrides)
    return LLMEngine(cfg)


@pytest.fixture(scope="module")
def plain(dsv3_target):
    """Each prompt alone, no speculation, no prefix cache."""
    engine = make_engine(dsv3_target[0], enable_prefix_caching=False)
    return {str(i): run_all(engine, [p], PARAMS)["0"] for i, p in enumerate(PROMPTS)}


def test_plain_engine_matches_hf_greedy(dsv3_target, plain):
    folder, hf = dsv3_target
    engine = make_engine(folder, enable_prefix_caching=False)
    for i in (0, 5):
        ids = engine.encode_prompt(PROMPTS[i])
        with torch.no_grad():  # full recompute each step: no HF cache involved
            for _ in range(PARAMS.max_tokens):
                ids = ids + [int(hf(torch.tensor([ids])).logits[0, -1].argmax())]
        assert ids[-PARAMS.max_tokens:] == plain[str(i)]


def test_engine_builds_latent_target_cache_and_standard_drafter_cache(dsv3_target, dsv3_drafter):
    engine = make_engine(dsv3_target[0], draft=str(dsv3_drafter), spec_steps=3)
    (k, v) = engine.kv_caches[0]
    assert len(engine.kv_caches) == 4
    assert k.shape == (engine.num_blocks, BLOCK, 1, 32 + 16)  # [latent | rope] per token
    assert v.shape == (engine.num_blocks, BLOCK, 1, 32) and v.data_ptr() == k.data_ptr()
    draft_k, draft_v = engine.spec.proposer.kv_cache
    assert draft_k.shape == (engine.num_blocks, BLOCK, engine.drafter.num_kv_heads,
                             engine.drafter.head_dim)  # same block ids and block size
    assert engine.runner.aux_layer_ids == (2, 2, 1)


def run_staggered(engine: LLMEngine, prompts: list[str]) -> tuple[dict, int]:
    """One new prompt every other step; returns ({id: token_ids}, draft tokens proposed)."""
    pending, done, drafted, step = list(enumerate(prompts)), {}, 0, 0
    while pending or engine.has_unfinished():
        if pending and step % 2 == 0:
            i, p = pending.pop(0)
            engine.add_request(str(i), p, PARAMS)
        for out in engine.step():
            if out.finished:
                done[out.id], drafted = out.token_ids, drafted + out.spec.drafted
        engine.allocator.check_invariants(engine.scheduler.running + list(engine.scheduler.waiting))
        step += 1
    assert engine.allocator.num_free_blocks == engine.allocator.num_blocks
    return done, drafted


@pytest.mark.parametrize("spec", [dict(spec_steps=1), dict(spec_steps=3),
                                  dict(spec_steps=3, spec_topk=2, spec_draft_tokens=4)],
                         ids=["chain1", "chain3", "tree"])
def test_eagle3_greedy_on_mla_moe_target_equals_plain(dsv3_target, dsv3_drafter, plain, spec):
    """Trees also move accepted nodes' target KV: in the latent cache, (K, V-view) pairs."""
    engine = make_engine(dsv3_target[0], draft=str(dsv3_drafter), spec_policy="fixed", **spec)
    out, drafted = run_staggered(engine, PROMPTS)
    assert out == plain
    assert drafted > 0


def test_eagle3_with_preemption_and_prefix_cache(dsv3_target, dsv3_drafter, plain):
    engine = make_engine(dsv3_target[0], draft=str(dsv3_drafter), spec_steps=3,
                         spec_policy="fixed", num_kv_blocks=8)
    assert run_all(engine, PROMPTS, PARAMS) == plain
    assert engine.scheduler.num_preemptions > 0
    hits = engine.allocator.prefix_hits
    assert run_all(engine, PROMPTS, PARAMS) == plain
    assert engine.allocator.prefix_hits > hits


def test_replay_drafts_all_accepted_on_mla_target(dsv3_target, plain):
    """Drafts equal to the plain continuation: every verify step accepts all of them, so the
    latent cache grows by K + 1 tokens per step through the absorbed verify path."""
    engine = make_engine(dsv3_target[0])
    engine.spec = SpecDecoder(engine, ReplayProposer(plain, engine.model.vocab_size), 4)
    for i, p in enumerate(PROMPTS):
        engine.add_request(str(i), p, PARAMS)
    outs = {}
    while engine.has_unfinished():
        for o in engine.step():
            if o.finished:
                outs[o.id] = o
    assert {k: o.token_ids for k, o in outs.items()} == plain
    assert all(o.spec.drafted == o.spec.accepted > 0 for o in outs.values())
