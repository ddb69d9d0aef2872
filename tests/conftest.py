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
    from util_engine import make_random_drafter

    return make_random_drafter(tiny_llama_path, tmp_path_factory.mktemp("tiny-drafter") / "drafter")
