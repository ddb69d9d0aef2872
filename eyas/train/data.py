"""Training data for the drafter: regenerate responses with the target, then capture features.

Stage 1, `regenerate`: every prompt (chat template applied) is answered by the target through
our engine, `samples_per_prompt` times, and streamed as JSON lines to work/responses.jsonl:

    {"id": "p17", "sample": 0, "split": "train", "prompt_ids": [...], "response_ids": [...],
     "finish_reason": "stop"}

Lines are appended as requests finish, so an interrupted run keeps what it has.

Stage 2, `capture_features`: one target forward per sequence (prompt + response, batched
through a scratch paged KV cache) captures the aux hidden states and the target's top-k
next-token log-probs. Shards (torch.save of a list of records) go to work/features/:

    input_ids      int32 [n]        prompt + response
    prompt_len     int              tokens before the response (response = loss positions)
    aux            fp16  [n, 3 Ht]  residual streams entering the aux layers, concatenated
    topk_ids       int32 [m, k]     target top-k at positions prompt_len-1 .. n-2 (about
    topk_logprobs  fp16  [m, k]     the m = n - prompt_len response tokens), sorted
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch
from tqdm import tqdm

from eyas.errors import InvalidRequestError
from eyas.prompts import PromptSpec, read_prompt_file

log = logging.getLogger("eyas.train")

FP16_MAX = 65504.0


def fp16_features(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Aux rows as stored (fp16 on the CPU, clamped to its range) and how many values were
    clamped."""
    x = x.float()
    return x.clamp(-FP16_MAX, FP16_MAX).half().cpu(), int((x.abs() > FP16_MAX).sum())


# ---- prompts ----------------------------------------------------------------------------------
def load_prompts(path: str | Path, max_prompts: Optional[int] = None) -> list[PromptSpec]:
    """Read and validate a JSONL prompt file (InvalidRequestError on a missing, empty or
    malformed one); keep the first max_prompts."""
    specs = read_prompt_file(path)
    if max_prompts is not None:
        if max_prompts < 1:
            raise InvalidRequestError("max_prompts", f"must be >= 1, got {max_prompts}")
        specs = specs[:max_prompts]
    return specs


def file_digest(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def split_prompts(ids: list[str], val_fraction: float, seed: int) -> set[str]:
    """Prompt ids held out for validation: ceil(fraction * N) (at least 1 when the fraction is
    positive and N >= 2), picked by a seeded hash, so every sample of a prompt lands in one
    split."""
    if not 0.0 <= val_fraction < 1.0:
        raise InvalidRequestError("val_fraction", f"must be in [0, 1), got {val_fraction}")
    if val_fraction == 0.0 or len(ids) < 2:
        return set()
    count = min(len(ids) - 1, max(1, math.ceil(val_fraction * len(ids))))
    key = lambda i: hashlib.sha256(f"{seed}:{i}".encode()).hexdigest()  # noqa: E731
    return set(sorted(ids, key=key)[:count])


# ---- stage 1: regeneration --------------------------------------------------------------------
@dataclass(frozen=True)
class RegenOptions:
    max_new_tokens: int = 256
    samples_per_prompt: int = 1
    temperature: float = 0.0
    extra_sample_temperature: float = 0.8  # samples >= 1 when temperature == 0
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    max_num_seqs: Optional[int] = None  # None: 64 on CPU, 256 on GPU
    max_model_len: Optional[int] = None  # None: the engine's default
    kv_cache_memory: Optional[str] = None  # None: the engine's default
    num_threads: Optional[int] = None


def sample_temperature(opts: RegenOptions, sample: int) -> float:
    """Sample 0 uses --temperature; later samples of a greedy run are sampled at
    extra_sample_temperature (identical greedy copies would add nothing)."""
    if sample == 0 or opts.temperature > 0:
        return opts.temperature
    return opts.extra_sample_temperature


def read_jsonl(path: Path) -> list[dict]:
    """Complete JSON lines of a file (a torn last line from a crash is ignored)."""
    out = []
    if not path.is_file():
        return out
    with path.open() as f:
        for line in f:
            if not line.endswith("\n"):
                break
            if line.strip():
                out.append(json.loads(line))
    return out


@dataclass(frozen=True)
class CaptureOptions:
    """Capture the drafter's features while regenerating (train/capture.py)."""
    aux_layer_ids: tuple[int, ...]
    feature_dir: str
    topk: int = 32
    shard_bytes: int = 256 * 2**20  # about this much per shard file


def regenerate(target: str, specs: list[PromptSpec], val_ids: set[str], out_path: Path,
               opts: RegenOptions, progress: bool = True,
               capture: Optional[CaptureOptions] = None) -> dict:
    """Answer every (prompt, sample) not yet in out_path with the target; append as they finish
    (with `capture`: once their feature shard is on disk).

    Returns stats: requests, skipped (prompt too long), response tokens, elapsed, tok/s.
    """
    from eyas.config import EngineConfig
    from eyas.core import SamplingParams
    from eyas.engine import LLMEngine

    done = {(r["id"], r["sample"]) for r in read_jsonl(out_path)}
    _truncate_torn_tail(out_path)
    todo = [(s, k) for s in specs for k in range(opts.samples_per_prompt) if (s.id, k) not in done]
    stats = {"requests": len(specs) * opts.samples_per_prompt, "resumed": len(done),
             "skipped": 0, "response_tokens": 0, "elapsed_s": 0.0}
    if not todo:
        return stats
    from eyas.engine import resolve_device

    max_num_seqs = opts.max_num_seqs or (64 if resolve_device(opts.device).type == "cpu" else 256)
    cfg = EngineConfig(model=target, device=opts.device, dtype=opts.dtype, seed=opts.seed,
                       max_num_seqs=max_num_seqs, max_num_batched_tokens=max(2048, 8 * max_num_seqs))
    for name in ("max_model_len", "kv_cache_memory", "num_threads"):
        if getattr(opts, name) is not None:
            cfg = cfg.replace(**{name: getattr(opts, name)})
    if capture is not None:  # every prompt position must be fed to be captured: no cache hits
        cfg = cfg.replace(enable_prefix_caching=False)
    engine = LLMEngine(cfg)
    collector = writer = None
    if capture is not None:
        from eyas.train.capture import FeatureCollector, ShardWriter

        collector = FeatureCollector(capture.topk)
        engine.runner.aux_layer_ids = tuple(capture.aux_layer_ids)
        engine.step_observer = collector
        per_token = len(capture.aux_layer_ids) * engine.model.hidden_size * 2 + capture.topk * 6
        writer = ShardWriter(out_path, Path(capture.feature_dir), max(1024, capture.shard_bytes // per_token))
    meta: dict[str, tuple[str, int, list[int]]] = {}
    for n, (spec, k) in enumerate(todo):
        try:
            ids = engine.encode_prompt(spec.prompt, spec.messages, chat=True)
        except InvalidRequestError as e:
            log.warning("prompt %s skipped: %s", spec.id, e)
            stats["skipped"] += 1
            continue
        room = engine.max_model_len - len(ids)
        temp = sample_temperature(opts, k)
        params = SamplingParams(max_tokens=min(opts.max_new_tokens, room), temperature=temp,
                                seed=_request_seed(opts.seed, spec.id, k) if temp > 0 else None)
        rid = f"regen-{n}"
        engine.add_request(rid, params=params, prompt_token_ids=ids)
        if collector is not None:
            collector.start(rid, len(ids), params.max_tokens)
        meta[rid] = (spec.id, k, ids)
    start = time.perf_counter()
    tokens = 0
    bar = tqdm(total=len(meta), desc="regenerate", unit="seq", disable=not progress,
               file=sys.stderr, dynamic_ncols=True)
    try:
        with out_path.open("a") as f:
            while engine.has_unfinished():
                for out in engine.step():
                    tokens += len(out.token_ids_delta)
                    if not out.finished:
                        continue
                    pid, k, ids = meta.pop(out.id)
                    rec = {"id": pid, "sample": k, "split": "val" if pid in val_ids else "train",
                           "prompt_ids": ids, "response_ids": list(out.token_ids),
                           "finish_reason": out.finish_reason}
                    if writer is not None:
                        writer.add(rec, collector.finish(out.id, ids, rec["response_ids"]))
                    else:
                        f.write(json.dumps(rec) + "\n")
                        f.flush()
                    stats["response_tokens"] += len(out.token_ids)
                    bar.update(1)
                elapsed = time.perf_counter() - start
                bar.set_postfix_str(f"{tokens / max(elapsed, 1e-9):.0f} tok/s", refresh=False)
        if writer is not None:
            writer.flush()
    finally:
        bar.close()
    stats["elapsed_s"] = time.perf_counter() - start
    stats["tok_s"] = stats["response_tokens"] / max(stats["elapsed_s"], 1e-9)
    if collector is not None:
        stats["clamped_values"] = collector.clamped_values
    return stats


def _request_seed(seed: int, prompt_id: str, sample: int) -> int:
    digest = hashlib.sha256(f"{seed}:{prompt_id}:{sample}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def _truncate_torn_tail(path: Path) -> None:
    """Drop a partial last line (no newline) left by a crash, so appends start clean."""
    if not path.is_file():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        path.write_bytes(data[:data.rfind(b"\n") + 1])


# ---- stage 2: features ------------------------------------------------------------------------
@dataclass(frozen=True)
class FeatureOptions:
    aux_layer_ids: tuple[int, ...]
    topk: int = 32
    device: str = "auto"
    dtype: str = "auto"
    batch_tokens: int = 4096  # tokens per target forward
    shard_bytes: int = 256 * 2**20  # about this much per shard file


def plan_shards(records: list[dict], tokens_per_shard: int) -> list[tuple[str, list[int]]]:
    """Deterministic shards: (name, record indices), per split, cut at tokens_per_shard."""
    shards: list[tuple[str, list[int]]] = []
    for split in ("train", "val"):
        cur, size = [], 0
        for i, r in enumerate(records):
            if r["split"] != split or not r["response_ids"]:
                continue
            cur.append(i)
            size += len(r["prompt_ids"]) + len(r["response_ids"])
            if size >= tokens_per_shard:
                shards.append((f"{split}-{len(shards):05d}.pt", cur))
                cur, size = [], 0
        if cur:
            shards.append((f"{split}-{len(shards):05d}.pt", cur))
    return shards


def _batches(indices: list[int], lengths: list[int], batch_tokens: int) -> Iterator[list[int]]:
    cur, size = [], 0
    for i in indices:
        if cur and size + lengths[i] > batch_tokens:
            yield cur
            cur, size = [], 0
        cur.append(i)
        size += lengths[i]
    if cur:
        yield cur


@torch.inference_mode()
def capture_features(target: str, responses_path: Path, out_dir: Path, opts: FeatureOptions,
                     progress: bool = True) -> dict:
    """Write feature shards for every regenerated sequence; shards already on disk are kept."""
    from eyas.engine import resolve_device, resolve_dtype
    from eyas.hub import resolve_model
    from eyas.kv.cache import KVLayout, allocate_kv
    from eyas.models.loader import load_model
    from eyas.workers.input_batch import SeqSpan, build_forward_inputs

    records = read_jsonl(responses_path)
    device = resolve_device(opts.device)
    dtype = resolve_dtype(opts.dtype, device)
    folder = resolve_model(target)
    model = load_model(folder, dtype=dtype, device=device)
    hidden = model.hidden_size
    per_token = 3 * hidden * 2 + opts.topk * 6
    shards = plan_shards(records, max(1024, opts.shard_bytes // per_token))
    out_dir.mkdir(parents=True, exist_ok=True)
    lengths = [len(r["prompt_ids"]) + len(r["response_ids"]) for r in records]
    index = {name: [lengths[i] for i in idx] for name, idx in shards}
    (out_dir / "index.json").write_text(json.dumps(index) + "\n")
    todo = [(name, idx) for name, idx in shards if not (out_dir / name).is_file()]
    total_tokens = sum(lengths[i] for _, idx in todo for i in idx)
    stats = {"shards": len(shards), "sequences": sum(len(i) for _, i in shards),
             "tokens": sum(lengths[i] for _, idx in shards for i in idx), "elapsed_s": 0.0,
             "clamped_values": 0}
    if not todo:
        return stats
    block = 16
    longest = max(lengths[i] for _, idx in todo for i in idx)
    budget = max(opts.batch_tokens, longest)
    num_blocks = budget // block + 64  # slack for rounding up; grown below when short
    layout = KVLayout(model.num_kv_heads, model.head_dim, model.num_layers)
    kv = allocate_kv(layout, num_blocks, block, dtype, device)
    start = time.perf_counter()
    bar = tqdm(total=total_tokens, desc="features", unit="tok", unit_scale=True,
               disable=not progress, file=sys.stderr, dynamic_ncols=True)
    try:
        for name, idx in todo:
            shard = []
            for batch in _batches(idx, lengths, budget):
                spans, next_block = [], 0
                for i in batch:
                    r = records[i]
                    need = -(-lengths[i] // block)
                    spans.append(SeqSpan(r["prompt_ids"] + r["response_ids"], 0,
                                         list(range(next_block, next_block + need))))
                    next_block += need
                if next_block > num_blocks:  # many short sequences: grow the scratch cache
                    num_blocks = next_block
                    kv = allocate_kv(layout, num_blocks, block, dtype, device)
                inputs = build_forward_inputs(spans, block, device)
                final, aux = model(inputs.input_ids, inputs.positions, inputs.attn, kv,
                                   opts.aux_layer_ids)
                aux_cat = torch.cat(aux, dim=-1)  # [T, 3H]
                for j, i in enumerate(batch):
                    r = records[i]
                    a, b = inputs.query_start[j], inputs.query_start[j + 1]
                    p = len(r["prompt_ids"])
                    feats, clamped = fp16_features(aux_cat[a:b])
                    stats["clamped_values"] += clamped
                    rows = final[a + p - 1:b - 1]  # positions p-1 .. n-2
                    top_ids, top_lp = _topk_logprobs(model, rows, opts.topk)
                    shard.append({
                        "id": r["id"], "sample": r["sample"],
                        "input_ids": torch.tensor(r["prompt_ids"] + r["response_ids"],
                                                  dtype=torch.int32),
                        "prompt_len": p,
                        "aux": feats,
                        "topk_ids": top_ids.int().cpu(),
                        "topk_logprobs": top_lp.half().cpu(),
                    })
                    bar.update(lengths[i])
            tmp = out_dir / (name + ".tmp")
            torch.save(shard, tmp)
            os.replace(tmp, out_dir / name)
    finally:
        bar.close()
    stats["elapsed_s"] = time.perf_counter() - start
    stats["tok_s"] = total_tokens / max(stats["elapsed_s"], 1e-9)
    if stats["clamped_values"]:
        log.warning("%d aux values exceeded the fp16 range and were clamped",
                     stats["clamped_values"])
    return stats


def _topk_logprobs(model, rows: torch.Tensor, k: int,
                   chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """rows [m, H] final-normed hidden -> top-k (ids [m, k], log-probs [m, k]), sorted."""
    ids, lps = [], []
    for a in range(0, rows.shape[0], chunk):
        logp = model.compute_logits(rows[a:a + chunk]).log_softmax(dim=-1)  # [c, V]
        top = logp.topk(min(k, logp.shape[-1]), dim=-1)
        ids.append(top.indices)
        lps.append(top.values)
    if not ids:
        return torch.zeros(0, k, dtype=torch.long), torch.zeros(0, k)
    return torch.cat(ids), torch.cat(lps)


def list_shards(feature_dir: Path, split: str) -> list[Path]:
    return sorted(feature_dir.glob(f"{split}-*.pt"))


def shard_lengths(feature_dir: Path) -> dict[str, list[int]]:
    """Sequence lengths per shard file name (written before the shards themselves)."""
    path = feature_dir / "index.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def load_shard(path: Path) -> list[dict]:
    return torch.load(path, map_location="cpu", weights_only=True)


# ---- stage 3: draft vocabulary ----------------------------------------------------------------
def count_tokens(records: list[dict], vocab_size: int, split: Optional[str] = "train") -> torch.Tensor:
    """[V] float64 counts of response tokens (of one split, or all with split=None)."""
    counts = torch.zeros(vocab_size, dtype=torch.float64)
    for r in records:
        if split is not None and r["split"] != split:
            continue
        ids = torch.as_tensor(r["response_ids"], dtype=torch.long)
        if ids.numel():
            counts += torch.bincount(ids, minlength=vocab_size)[:vocab_size].double()
    return counts


# ---- training batches ------------------------------------------------------------------------
def make_batches(lengths: list[int], batch_tokens: int, rng: random.Random) -> list[list[int]]:
    """Pack indices of similar length so that B * longest <= batch_tokens; shuffled order."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], rng.random()))
    batches, cur, longest = [], [], 0
    for i in order:
        new_longest = max(longest, lengths[i])
        if cur and new_longest * (len(cur) + 1) > batch_tokens:
            batches.append(cur)
            cur, new_longest = [], lengths[i]
        cur.append(i)
        longest = new_longest
    if cur:
        batches.append(cur)
    rng.shuffle(batches)
    return batches


def collate(recs: list[dict], device: torch.device) -> dict[str, torch.Tensor]:
    """Pad records to [B, n]; topk rows sit at positions prompt_len-1 .. n-2."""
    bsz, n = len(recs), max(len(r["input_ids"]) for r in recs)
    k = recs[0]["topk_ids"].shape[1]
    width = recs[0]["aux"].shape[1]
    ids = torch.zeros(bsz, n, dtype=torch.long)
    aux = torch.zeros(bsz, n, width, dtype=torch.float16)
    resp = torch.zeros(bsz, n, dtype=torch.bool)
    top_ids = torch.zeros(bsz, n, k, dtype=torch.long)
    top_lp = torch.zeros(bsz, n, k, dtype=torch.float16)
    for b, r in enumerate(recs):
        m, p = len(r["input_ids"]), r["prompt_len"]
        ids[b, :m] = r["input_ids"].long()
        aux[b, :m] = r["aux"]
        resp[b, p:m] = True
        top_ids[b, p - 1:m - 1] = r["topk_ids"].long()
        top_lp[b, p - 1:m - 1] = r["topk_logprobs"]
    return {"ids": ids.to(device), "aux": aux.to(device).float(), "resp": resp.to(device),
            "topk_ids": top_ids.to(device), "topk_logprobs": top_lp.to(device).float(),
            "min_prompt_len": min(r["prompt_len"] for r in recs)}
