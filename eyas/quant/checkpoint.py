"""Write an FP8 copy of an EAGLE-3 drafter folder (`eyas quantize-draft --fp8`).

Each quantized `X.weight` [out, in] becomes float8 with `X.weight_scale` [out, 1] float32 beside
it; every other tensor (fc, lm_head by default, norms, biases, d2t, t2d) is copied unchanged, and
config.json gains `quantization_config` (see eyas/quant/config.py). Other files are copied too.
"""
from __future__ import annotations

import json
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, Union

import torch
from safetensors.torch import save_file

from eyas.errors import ConfigError
from eyas.layers.fp8 import fp8_dtype, is_fp8, quantize_per_channel
from eyas.quant.config import DEFAULT_SKIP, QUANTIZABLE, Fp8QuantConfig, check_skip, leaf

WEIGHTS_NAME = "model.safetensors"
_NOT_COPIED = {"config.json", WEIGHTS_NAME, "model.safetensors.index.json"}


@dataclass(frozen=True)
class QuantizeReport:
    out: Path
    quantized: tuple[str, ...]  # checkpoint layer names now in FP8
    ignored: tuple[str, ...]  # linear layers left in original precision (or absent)
    layer_bytes_before: int  # the quantized layers' weights, before
    layer_bytes_after: int  # the same layers' fp8 weights + scales
    total_bytes_before: int
    total_bytes_after: int

    @property
    def layer_reduction(self) -> float:
        return 1.0 - self.layer_bytes_after / max(self.layer_bytes_before, 1)

    def summary(self) -> str:
        mb = 1e6
        layers = ", ".join(leaf(n) for n in self.quantized)
        return (f"quantized {len(self.quantized)} layers to FP8 ({layers}): "
                f"{self.layer_bytes_before / mb:.2f} MB -> {self.layer_bytes_after / mb:.2f} MB "
                f"(-{100 * self.layer_reduction:.0f}%); checkpoint "
                f"{self.total_bytes_before / mb:.2f} MB -> {self.total_bytes_after / mb:.2f} MB; "
                f"kept in original precision: {', '.join(self.ignored) or 'none'}; "
                f"wrote {self.out}")


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _check_out(src: Path, out: Path, overwrite: bool) -> None:
    src, target = src.resolve(), out.resolve()
    if target == src or target in src.parents:
        raise ConfigError(f"--out {out} would replace the drafter being quantized; "
                          f"choose another folder")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"--out folder {out} exists and is not empty; "
                          f"pass --overwrite to replace it")


def quantize_drafter(draft: Union[str, Path], out: Union[str, Path], dtype: str = "e4m3fn",
                     skip: Sequence[str] = DEFAULT_SKIP,
                     overwrite: bool = False) -> QuantizeReport:
    """Quantize drafter `draft` (built-in name or folder) into folder `out`."""
    from eyas.hub import resolve_model
    from eyas.models.eagle3 import Eagle3Arch
    from eyas.models.loader import iter_safetensors

    src, out = resolve_model(draft), Path(out)
    config = json.loads((src / "config.json").read_text())
    if config.get("quantization_config") is not None:
        method = (config["quantization_config"] or {}).get("quant_method", "?")
        raise ConfigError(f"drafter {src} is already quantized (quant_method {method!r}); "
                          f"quantize the original checkpoint instead")
    Eagle3Arch.from_config(config)  # an EAGLE-3 drafter, or a clear error
    skip, qdtype = check_skip(tuple(skip)), fp8_dtype(dtype)
    _check_out(src, out, overwrite)

    tensors: dict[str, torch.Tensor] = {}
    quantized, ignored, present = [], [], set()
    before = after = total_before = 0
    for name, t in iter_safetensors(src):
        total_before += _nbytes(t)
        module = name.removesuffix(".weight")
        is_linear = name.endswith(".weight") and leaf(module) in QUANTIZABLE
        if is_linear:
            present.add(leaf(module))
            if is_fp8(t):
                raise ConfigError(f"{name} is already float8 but config.json has no "
                                  f"quantization_config")
        if not is_linear or leaf(module) in skip:
            tensors[name] = t  # unchanged
            if is_linear:
                ignored.append(module)
            continue
        if t.dim() != 2 or not t.is_floating_point():
            raise ConfigError(f"{name} is {t.dtype} {tuple(t.shape)}, not a 2-D float weight")
        if not bool(torch.isfinite(t).all()):
            raise ConfigError(f"{name} has non-finite values; cannot quantize it")
        q, scale = quantize_per_channel(t, qdtype)  # [out, in] fp8, [out, 1] f32
        tensors[name], tensors[f"{name}_scale"] = q, scale
        quantized.append(module)
        before, after = before + _nbytes(t), after + _nbytes(q) + _nbytes(scale)
    if not quantized:
        raise ConfigError(f"nothing to quantize in {src}: no {', '.join(QUANTIZABLE)} weights "
                          f"outside --skip {','.join(skip)}")
    # Absent layers (e.g. an lm_head shared with the target) stay unquantized when loading.
    ignored += sorted(n for n in QUANTIZABLE if n not in present)
    qconfig = Fp8QuantConfig(fp8_dtype=dtype, ignored_layers=tuple(ignored))
    config["quantization_config"] = qconfig.to_dict()

    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for f in src.iterdir():
            if f.is_file() and not f.name.startswith(".") and f.name not in _NOT_COPIED \
                    and f.suffix != ".safetensors":
                shutil.copy2(f, tmp / f.name)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return QuantizeReport(out=out, quantized=tuple(quantized), ignored=tuple(ignored),
                          layer_bytes_before=before, layer_bytes_after=after,
                          total_bytes_before=total_before,
                          total_bytes_after=sum(_nbytes(t) for t in tensors.values()))
