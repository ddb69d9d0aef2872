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
