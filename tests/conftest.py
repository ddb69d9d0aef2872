"""Shared fixtures. Keep this file small; put helpers in tests/util_*.py."""
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a model hub


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """The pulled smollm2-135m-instruct folder (pulled once; later runs reuse it).

    Uses $EYAS_HOME when set (CI gives a fresh one), else the user's default
    ~/.cache/eyas, so local runs convert the GGUF only the first time (~30 s).
    """
    from eyas.hub import pull

    return pull("smollm2-135m-instruct", progress=lambda msg: print(f"[eyas pull] {msg}"))


@pytest.fixture(scope="session")
def tiny_llama_path(tmp_path_factory, smollm2_path) -> Path:
    """A 4-layer random Llama (hidden 64) with SmolLM2's tokenizer and vocabulary."""
    from util_engine import make_tiny_llama_folder

    return make_tiny_llama_folder(tmp_path_factory.mktemp("tiny-llama"), smollm2_path)


@pytest.fixture(scope="session")
def tiny_engine_factory(tiny_llama_path):
    """factory(**EngineConfig overrides) -> a fresh eager CPU LLMEngine on the tiny model."""
    from eyas.config import EngineConfig
    from eyas.engine import LLMEngine

    def make(**overrides):
        cfg = EngineConfig(model=str(tiny_llama_path), block_size=4, kv_cache_memory="64MiB",
                           max_model_len=256).replace(**overrides)
        return LLMEngine(cfg)

    return make


@pytest.fixture(scope="session")
def tiny_drafter_path(tmp_path_factory, tiny_llama_path) -> Path:
    """A random-init EAGLE-3 drafter for the tiny Llama, with a 4096-token draft vocabulary."""
    import torch
    from transformers import AutoConfig

    from eyas.models.eagle3 import Eagle3Drafter, build_vocab_maps, random_drafter_config, save_drafter

    cfg = AutoConfig.from_pretrained(tiny_llama_path)
    drafter = Eagle3Drafter(random_drafter_config(cfg, draft_vocab_size=4096))
    drafter.init_random_(torch.Generator().manual_seed(0))
    counts = torch.zeros(cfg.vocab_size)
    counts[torch.randperm(cfg.vocab_size, generator=torch.Generator().manual_seed(1))[:4096]] = 1.0
    drafter.set_vocab_maps(*build_vocab_maps(counts, 4096))
    return save_drafter(drafter, tmp_path_factory.mktemp("tiny-drafter") / "drafter", dtype=torch.float32)
