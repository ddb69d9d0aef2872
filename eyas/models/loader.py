"""Load an HF-style folder (config.json + *.safetensors) into one of our models."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, Optional, Union

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig

from eyas.distributed.state import ParallelState
from eyas.errors import ConfigError, ModelNotFoundError
from eyas.models.registry import get_model_class

INDEX_NAME = "model.safetensors.index.json"


def safetensors_files(folder: Union[str, Path]) -> list[Path]:
    """The weight files of a folder: those named by the shard index, else every *.safetensors."""
    folder = Path(folder)
    index = folder / INDEX_NAME
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [folder / name for name in sorted(set(weight_map.values()))]
        absent = [str(f) for f in files if not f.is_file()]
        if absent:
            raise ModelNotFoundError(f"{index} names missing shard(s): {', '.join(absent)}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelNotFoundError(f"no *.safetensors weights in {folder}")
    return files


def iter_safetensors(folder: Union[str, Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) for every tensor of the folder's safetensors file(s), on the CPU."""
    for path in safetensors_files(folder):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def load_model(folder: Union[str, Path], dtype: torch.dtype = torch.float32,
               device: Union[str, torch.device] = "cpu",
               parallel: Optional[ParallelState] = None) -> nn.Module:
    """Build the folder's model (by its config's architectures) and load its weights.

    With a tensor-parallel `parallel` (tp_size > 1, group already joined), this rank builds
    and loads only its shard: every rank reads the checkpoint and keeps its slice.
    """
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ModelNotFoundError(f"no config.json in {folder}")
    safetensors_files(folder)  # fail before building a large model
    hf_config = AutoConfig.from_pretrained(folder)
    model_cls = get_model_class(hf_config)
    kwargs = {}
    if getattr(model_cls, "supports_tensor_parallel", False):
        kwargs["parallel"] = parallel
    elif parallel is not None and parallel.tp_size > 1:
        raise ConfigError(f"{model_cls.__name__} does not support tensor parallelism yet "
                          f"(tp_size={parallel.tp_size}); run it with tp_size=1")
    with torch.device(device):
        model = model_cls(hf_config, dtype=dtype, **kwargs)
    model.load_weights(iter_safetensors(folder))
    model.eval()
    model.requires_grad_(False)
    return model
