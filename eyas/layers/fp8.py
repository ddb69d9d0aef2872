"""Weight-only FP8 linear layer: float8 e4m3 weights with one float32 scale per output channel.

    W ~= dequantize(q, s) = q.float() * s      q [out, in] float8, s [out, 1] float32

Two ways to run y = x @ W.T (+ b), picked by `prepare()` from the device:

    scaled_mm  CUDA sm89+ (e4m3fn), ROCm MI300 gfx94x (e4m3fnuz) / MI350 gfx95x (e4m3fn):
               x is quantized per token on the fly (dynamic: one scale per row of x), then
               torch._scaled_mm(xq, q.T, scale_a=sx [T, 1], scale_b=s.T [1, out]).
    dequant    everywhere else (CPU, older GPUs): W is rebuilt in the compute dtype on each
               forward, so it saves memory but not time (slower than a plain linear on CPU).

An e4m3fn checkpoint on a gfx94x GPU is converted exactly to e4m3fnuz (same bits, scale x2);
an e4m3fnuz checkpoint on a GPU that takes e4m3fn is refused (re-quantize with e4m3fn).

This is not a LinearBase on purpose: `pack_linear_weights` must not pack its float8 weight.
Only tp_size=1 layers (the drafter's) are wrapped.
"""
from __future__ import annotations

import logging
import os
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from eyas.errors import ConfigError
from eyas.layers.linear import LinearBase, LMHead, MergedColumnLinear, QKVLinear, ShardId

log = logging.getLogger(__name__)

FP8_DTYPES: dict[str, torch.dtype] = {"e4m3fn": torch.float8_e4m3fn,
                                      "e4m3fnuz": torch.float8_e4m3fnuz}
PATHS = ("auto", "scaled_mm", "dequant")
PATH_ENV = "EYAS_FP8_MATMUL"  # force a path: auto | scaled_mm | dequant


def fp8_dtype(name: str) -> torch.dtype:
    if name not in FP8_DTYPES:
        raise ConfigError(f"fp8 dtype {name!r} is not supported; choose one of "
                          f"{', '.join(FP8_DTYPES)}")
    return FP8_DTYPES[name]


def fp8_name(dtype: torch.dtype) -> str:
    return next(k for k, v in FP8_DTYPES.items() if v == dtype)


def is_fp8(t: Optional[torch.Tensor]) -> bool:
    return t is not None and t.dtype in FP8_DTYPES.values()


# ---- math ------------------------------------------------------------------------------------
def quantize_per_channel(w: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """w [out, in] -> (q [out, in] float8, scale [out, 1] float32), each row's max |w| -> fp8 max.

    Round to nearest, so |q * scale - w| <= 2^-4 |w| for values in e4m3's normal range (half of
    the 2^-3 mantissa step) and <= half a subnormal step times scale below it.
    """
    fmax = torch.finfo(dtype).max
    w = w.float()
    amax = w.abs().amax(dim=1, keepdim=True)  # [out, 1]
    scale = amax / fmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # all-zero rows: q = 0
    q = (w / scale).clamp(-fmax, fmax).to(dtype)
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:  # [out, in], [out, 1]
    return (q.float() * scale).to(dtype)


def quantize_per_token(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, in] -> (xq [T, in] float8, scale [T, 1] float32): dynamic activation scaling."""
    fmax = torch.finfo(dtype).max
    x = x.float()
    scale = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / fmax  # [T, 1]
    return (x / scale).clamp(-fmax, fmax).to(dtype), scale


def e4m3fn_to_fnuz(q: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact: e4m3fnuz's exponent bias is one more, so the same bits mean half the value.
    0x80 (-0 in fn) is NaN in fnuz and becomes +0."""
    bits = q.view(torch.uint8).clone()
    bits[bits == 0x80] = 0
    return bits.view(torch.float8_e4m3fnuz), scale * 2.0


# ---- device -------------------------------------------------------------------------------------
def native_fp8_dtype(device: torch.device) -> Optional[torch.dtype]:
    """The float8 type torch._scaled_mm takes on this device; None where there is no fp8 matmul."""
    if device.type != "cuda" or not torch.cuda.is_available() or not hasattr(torch, "_scaled_mm"):
        return None
    if getattr(torch.version, "hip", None):
        arch = torch.cuda.get_device_properties(device).gcnArchName
        if arch.startswith("gfx94"):  # MI300X / MI325X
            return torch.float8_e4m3fnuz
        return torch.float8_e4m3fn if arch.startswith("gfx95") else None  # MI350 / MI355X: OCP
    return torch.float8_e4m3fn if torch.cuda.get_device_capability(device) >= (8, 9) else None


def plan_matmul(ckpt: torch.dtype, device_type: str, native: Optional[torch.dtype],
                path: str = "auto") -> str:
    """'scaled_mm' or 'dequant' for a checkpoint fp8 type on a device; ConfigError if neither."""
    if path not in PATHS:
        raise ConfigError(f"{PATH_ENV}={path!r}: choose one of {', '.join(PATHS)}")
    if device_type not in ("cpu", "cuda"):
        raise ConfigError(f"FP8 drafter weights are not supported on device {device_type!r} "
                          f"(only cpu and cuda); use the unquantized drafter there")
    if path != "auto":
        return path
    if native is None:
        return "dequant"
    if ckpt == native or (ckpt, native) == (torch.float8_e4m3fn, torch.float8_e4m3fnuz):
        return "scaled_mm"
    raise ConfigError(f"this GPU runs FP8 as {fp8_name(native)} but the drafter checkpoint is "
                      f"{fp8_name(ckpt)} (the ROCm MI300 format); re-quantize the original with "
                      f"`eyas quantize-draft --fp8 --dtype {fp8_name(native)}`")


# ---- layer ---------------------------------------------------------------------------------------
def _shard_rows(base: nn.Module) -> dict[ShardId, tuple[int, int]]:
    """Shard id -> (row offset, rows) of the fused output, as the base layer lays them out."""
    if isinstance(base, QKVLinear):
        return {s: (offset, size) for s, (offset, size, _) in base.shards.items()}
    if isinstance(base, MergedColumnLinear):
        starts = [sum(base.local_sizes[:i]) for i in range(len(base.local_sizes))]
        return {i: (starts[i], n) for i, n in enumerate(base.local_sizes)}
    return {None: (0, base.weight.shape[0])}


class Fp8Linear(nn.Module):
    """y = x @ (q * scale).T + b, loading float8 weight shards and their [rows, 1] scales."""

    def __init__(self, base: nn.Module, dtype: torch.dtype):
        super().__init__()
        if not isinstance(base, (LinearBase, LMHead)):
            raise ConfigError(f"cannot quantize a {type(base).__name__} to FP8")
        if getattr(base, "tp_size", 1) != 1:
            raise ConfigError("FP8 linear layers run with tp_size=1 only")
        if dtype not in FP8_DTYPES.values():
            raise ConfigError(f"{dtype} is not an FP8 dtype")
        out_features, in_features = base.weight.shape
        device = base.weight.device
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype = base.weight.dtype
        self.shards = _shard_rows(base)
        self.weight = nn.Parameter(torch.zeros(out_features, in_features, dtype=dtype,
                                               device=device), requires_grad=False)
        self.weight.weight_loader = self._load_weight
        self.weight_scale = nn.Parameter(torch.ones(out_features, 1, dtype=torch.float32,
                                                    device=device), requires_grad=False)
        self.weight_scale.weight_loader = self._load_scale
        if getattr(base, "bias", None) is not None:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=self.compute_dtype,
                                                 device=device), requires_grad=False)
            self.bias.weight_loader = self._load_bias
        else:
            self.register_parameter("bias", None)
        self.path = "dequant"  # until prepare() finds an fp8 matmul
        self.out_dtype = self.compute_dtype
        self.register_buffer("scale_row", None, persistent=False)  # [1, out] for scaled_mm

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, {fp8_name(self.weight.dtype)}, "
                f"path={self.path}")

    # ---- loading (checkpoint shard -> rows of the fused parameter) ------------------------------
    def _rows(self, shard_id: ShardId) -> tuple[int, int]:
        if shard_id not in self.shards:
            raise ConfigError(f"FP8 layer has shards {list(self.shards)}, got {shard_id!r}")
        return self.shards[shard_id]

    def _load_weight(self, param: nn.Parameter, loaded: torch.Tensor,
                     shard_id: ShardId = None) -> None:
        offset, rows = self._rows(shard_id)
        if loaded.dtype != param.dtype:
            raise ConfigError(f"expected a float8 weight ({fp8_name(param.dtype)}, as "
                              f"quantization_config says), got {loaded.dtype}")
        if tuple(loaded.shape) != (rows, self.in_features):
            raise ConfigError(f"fp8 weight {tuple(loaded.shape)} does not fit "
                              f"[{rows}, {self.in_features}]")
        param.data.narrow(0, offset, rows).copy_(loaded)

    def _load_scale(self, param: nn.Parameter, loaded: torch.Tensor,
                    shard_id: ShardId = None) -> None:
        offset, rows = self._rows(shard_id)
        if not loaded.is_floating_point() or is_fp8(loaded):
            raise ConfigError(f"weight_scale must be float32, got {loaded.dtype}")
        if tuple(loaded.shape) != (rows, 1):
            raise ConfigError(f"weight_scale has shape {tuple(loaded.shape)}, expected one scale "
                              f"per output channel: [{rows}, 1]")
        loaded = loaded.float()
        if not bool(torch.isfinite(loaded).all() and (loaded > 0).all()):
            raise ConfigError("weight_scale has zero, negative or non-finite entries")
        param.data.narrow(0, offset, rows).copy_(loaded)

    def _load_bias(self, param: nn.Parameter, loaded: torch.Tensor,
                   shard_id: ShardId = None) -> None:
        offset, rows = self._rows(shard_id)
        if tuple(loaded.shape) != (rows,):
            raise ConfigError(f"bias {tuple(loaded.shape)} does not fit [{rows}]")
        param.data.narrow(0, offset, rows).copy_(loaded)

    # ---- running ---------------------------------------------------------------------------------
    @torch.no_grad()
    def prepare(self, path: Optional[str] = None) -> str:
        """Pick the matmul for the weight's device (after loading); returns the path chosen."""
        path = path or os.environ.get(PATH_ENV, "auto")
        device = self.weight.device
        native = native_fp8_dtype(device)
        chosen = plan_matmul(self.weight.dtype, device.type, native, path)
        if chosen == "scaled_mm" and device.type == "cuda" and (self.in_features % 16
                                                                or self.out_features % 16):
            chosen = "dequant"  # _scaled_mm needs both dims divisible by 16
        if chosen == "scaled_mm" and native is not None and self.weight.dtype != native:
            q, s = e4m3fn_to_fnuz(self.weight.data, self.weight_scale.data)
            self.weight = nn.Parameter(q, requires_grad=False)
            self.weight_scale = nn.Parameter(s, requires_grad=False)
        self.path = chosen
        if chosen == "scaled_mm":
            self.scale_row = self.weight_scale.detach().reshape(1, -1).contiguous()  # [1, out]
            chosen = self._probe()
        return chosen

    def _probe(self) -> str:
        """Run _scaled_mm once; some builds want a bf16 output with row-wise scales."""
        x = torch.ones(2, self.in_features, dtype=self.compute_dtype, device=self.weight.device)
        for out_dtype in dict.fromkeys((self.compute_dtype, torch.bfloat16)):
            self.out_dtype = out_dtype
            try:
                self._scaled_mm(x)
                return self.path
            except RuntimeError as e:
                error = e
        log.warning("torch._scaled_mm failed on %s (%s); FP8 layer falls back to dequantizing",
                    self.weight.device, str(error).splitlines()[0])
        self.path, self.out_dtype, self.scale_row = "dequant", self.compute_dtype, None
        return self.path

    def _scaled_mm(self, x: torch.Tensor) -> torch.Tensor:  # [T, in] -> [T, out]
        if x.shape[0] == 0:
            return x.new_empty(0, self.out_features)
        xq, sx = quantize_per_token(x, self.weight.dtype)  # [T, in] fp8, [T, 1]
        y = torch._scaled_mm(xq, self.weight.t(), scale_a=sx, scale_b=self.scale_row,
                             out_dtype=self.out_dtype)  # [T, out]
        y = y.to(x.dtype)
        return y + self.bias if self.bias is not None else y

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in] -> [..., out]
        if self.path == "scaled_mm":
            y = self._scaled_mm(x.reshape(-1, self.in_features))  # [T, out]
            return y.reshape(*x.shape[:-1], self.out_features)
        w = dequantize(self.weight, self.weight_scale, x.dtype)  # [out, in], transient
        return F.linear(x, w, self.bias)
