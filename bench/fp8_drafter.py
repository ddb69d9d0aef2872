"""EAGLE-3 drafter memory and per-draft-step time: original precision vs FP8 (quantize-draft).

Usage: python bench/fp8_drafter.py [--draft D --target T] [--device cpu|cuda] [--dtype float32]
           [--batch 1,4] [--context 128] [--iters 50] [--threads 2] [--scaled-mm-on-cpu]
Without --draft it times a random drafter shaped for a tiny target (hidden 64), which proves
the script runs but says nothing about real sizes. One draft step = the drafter's forward for
one token per sequence (paged attention over `context` cached tokens) + logits + argmax.
On CPU the FP8 layers dequantize their weights on every forward: expected SLOWER than fp32,
the gain is memory. On fp8 GPUs (CUDA sm89+, ROCm MI300+) they run torch._scaled_mm.
Prints a Markdown table.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch


def tiny_drafter(folder: Path):
    """A random drafter (and its target config) like the tests' tiny one."""
    from transformers import LlamaConfig

    from eyas.models.eagle3 import Eagle3Drafter, random_drafter_config, save_drafter

    target = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, rms_norm_eps=1e-5)
    drafter = Eagle3Drafter(random_drafter_config(target, draft_vocab_size=4096))
    drafter.init_random_(torch.Generator().manual_seed(0))
    return save_drafter(drafter, folder / "tiny-drafter", dtype=torch.float32), target


def resolve(draft: str, target: str | None):
    from transformers import AutoConfig

    from eyas.hub import BUILTIN_MODELS, resolve_model

    if target is None:
        builtin = BUILTIN_MODELS.get(draft)
        if builtin is None or builtin.target is None:
            raise SystemExit("--target is required unless --draft is a built-in drafter")
        target = builtin.target
    return resolve_model(draft), AutoConfig.from_pretrained(resolve_model(target))


def nbytes(module: torch.nn.Module) -> int:
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def linear_bytes(module: torch.nn.Module) -> int:
    """Bytes of the midlayer's q/k/v/o and gate/up/down weights (+ scales): what FP8 shrinks."""
    return sum(t.numel() * t.element_size() for n, t in module.named_parameters()
               if n.startswith("midlayer.") and "norm" not in n)


@torch.no_grad()
def step_ms(drafter, batch: int, context: int, iters: int, device: torch.device) -> float:
    """Median ms of one draft step for `batch` sequences, each with `context` cached tokens."""
    from eyas.workers.input_batch import SeqSpan, build_forward_inputs

    block = 16
    per_seq = -(-(context + 1) // block)
    spans = [SeqSpan([0], context, list(range(b * per_seq, (b + 1) * per_seq)))
             for b in range(batch)]
    fi = build_forward_inputs(spans, block, device)
    shape = (batch * per_seq, block, drafter.num_kv_heads, drafter.head_dim)
    cache = (torch.randn(shape, dtype=drafter.dtype, device=device),
             torch.randn(shape, dtype=drafter.dtype, device=device))
    embeds = torch.randn(batch, drafter.hidden_size, dtype=drafter.dtype, device=device)
    hidden = torch.randn(batch, drafter.hidden_size, dtype=drafter.dtype, device=device)
    times = []
    for i in range(iters + 5):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        out = drafter(embeds, hidden, fi.positions, fi.attn, cache)  # [B, H]
        drafter.map_to_target(drafter.compute_logits(out).argmax(-1))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= 5:  # warm-up
            times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--draft", help="drafter: built-in name or folder (default: tiny random)")
    ap.add_argument("--target", help="its target model, for the config (built-in drafters know it)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, help="compute dtype (default float32 on CPU, "
                                                  "bfloat16 on CUDA)")
    ap.add_argument("--batch", default="1,4", help="comma-separated sequences per draft step")
    ap.add_argument("--context", type=int, default=128, help="cached tokens per sequence")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--scaled-mm-on-cpu", action="store_true",
                    help="also time torch._scaled_mm forced on the CPU (the GPU path's math)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from eyas.layers.linear import pack_linear_weights
    from eyas.models.eagle3 import load_drafter
    from eyas.quant.apply import prepare_fp8_linears
    from eyas.quant.checkpoint import quantize_drafter

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("float32" if device.type == "cpu" else "bfloat16"))
    batches = [int(b) for b in args.batch.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        if args.draft:
            folder, target = resolve(args.draft, args.target)
        else:
            folder, target = tiny_drafter(Path(tmp))
        fp8_folder = quantize_drafter(folder, Path(tmp) / "fp8").out
        rows = []

        def measure(name: str, drafter, extra: int = 0) -> None:
            ms = [step_ms(drafter, b, args.context, args.iters, device) for b in batches]
            rows.append((name, nbytes(drafter) + extra, linear_bytes(drafter), ms))

        orig = load_drafter(folder, target, dtype=dtype, device=device)
        measure(f"{str(dtype).removeprefix('torch.')} (plain)", orig)
        if device.type == "cpu" and dtype == torch.float32:
            packed = pack_linear_weights(orig)  # what the engine does on CPU
            measure("float32 + oneDNN-packed copies (engine default)", orig, packed)
        del orig
        fp8 = load_drafter(fp8_folder, target, dtype=dtype, device=device)
        paths = sorted(set(prepare_fp8_linears(fp8).values()))
        measure(f"fp8 e4m3fn ({'/'.join(paths)})", fp8)
        if args.scaled_mm_on_cpu and device.type == "cpu":
            if set(prepare_fp8_linears(fp8, "scaled_mm").values()) == {"scaled_mm"}:
                measure("fp8 e4m3fn (scaled_mm forced on CPU)", fp8)

    name = str(dtype).removeprefix("torch.")
    print(f"\nEAGLE-3 drafter {args.draft or 'tiny random (hidden 64)'} on {device}, compute "
          f"{name}, context {args.context}, {args.threads} threads, median of {args.iters} steps\n")
    print("| drafter | memory MB | midlayer linears MB | "
          + " | ".join(f"ms/draft step B={b}" for b in batches) + " |")
    print("|---|---|---|" + "---|" * len(batches))
    for name, mem, lin, ms in rows:
        print(f"| {name} | {mem / 1e6:.2f} | {lin / 1e6:.2f} | "
              + " | ".join(f"{m:.3f}" for m in ms) + " |")
    if device.type == "cpu":
        print("\nCPU: FP8 layers dequantize to the compute dtype on every forward, so the FP8 "
              "drafter is expected to be slower here; it saves memory (fc, lm_head and the "
              "norms stay in original precision). torch._scaled_mm is used on fp8 GPUs.")


if __name__ == "__main__":
    main()
