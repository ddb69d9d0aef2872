"""`eyas train-drafter`: regenerate -> features -> draft vocab -> TTT training -> save.

Everything a run makes lives under OUT/work/; the drafter (config.json + model.safetensors) and
train_summary.json go to OUT itself. Each stage writes work/<stage>.params when it starts and
work/<stage>.done (its params and stats) when it ends; a rerun skips finished stages, and refuses
(InvalidRequestError naming the stage) to mix in work made with other settings. Training saves
work/ckpt.pt after every epoch and resumes from the last finished one.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from tqdm import tqdm

from eyas.errors import InvalidRequestError
from eyas.train import data
from eyas.train.ttt import (estimate_accept_length, shift_left, target_to_draft_index,
                            ttt_forward, ttt_loss)

log = logging.getLogger("eyas.train")

EventFn = Callable[..., None]  # on_event(name, **info); raising from it stops the run
STAGES = ("regenerate", "features", "vocab", "train")


@dataclass(frozen=True)
class TrainConfig:
    target: str
    prompts: str
    out: str
    draft_vocab: int = 8192
    ttt_steps: int = 7
    epochs: int = 4
    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # cosine decays to lr * this
    warmup_frac: float = 0.03  # of all optimizer steps, linear warm-up
    weight_decay: float = 0.01
    grad_clip: float = 0.5
    batch_tokens: int = 4096  # padded tokens per training batch (B * longest)
    patience: int = 2  # epochs without val improvement before stopping (0: never stop)
    step_weight: float = 0.8  # loss weight of unroll step i is step_weight ** i
    max_new_tokens: int = 256
    samples_per_prompt: int = 1
    temperature: float = 0.0
    extra_sample_temperature: float = 0.8
    val_fraction: float = 0.05
    device: str = "auto"
    dtype: str = "auto"  # target dtype for regeneration and features
    seed: int = 0
    max_prompts: Optional[int] = None
    aux_layers: Optional[tuple[int, ...]] = None
    topk: int = 32
    max_num_seqs: Optional[int] = None
    max_model_len: Optional[int] = None
    kv_cache_memory: Optional[str] = None  # regeneration engine's KV budget (default: engine's)
    num_threads: Optional[int] = None  # CPU threads (default: torch's)
    feature_batch_tokens: int = 4096
    capture: bool = True  # features captured while regenerating (else a second target pass)
    init_drafter: Optional[str] = None  # start from this drafter's weights (train/init_weights.py)
    init_vocab: str = "keep"  # with init_drafter: keep its draft vocab, or reselect from this data
    intermediate_size: Optional[int] = None  # MLP width (with init_drafter: >= its width)
    lm_head_init: str = "target"  # target: the target's head rows of the draft vocab; random
    save_dtype: str = "float16"
    train_dtype: str = "auto"  # drafter matmuls: auto (bf16 where fast) | float32 | bfloat16
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self):
        def need(ok: bool, field: str, msg: str):
            if not ok:
                raise InvalidRequestError(field, msg)
        need(self.draft_vocab >= 1, "draft_vocab", f"must be >= 1, got {self.draft_vocab}")
        need(self.ttt_steps >= 1, "ttt_steps", f"must be >= 1, got {self.ttt_steps}")
        need(self.epochs >= 1, "epochs", f"must be >= 1, got {self.epochs}")
        need(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        need(self.batch_tokens >= 1, "batch_tokens", f"must be >= 1, got {self.batch_tokens}")
        need(self.max_new_tokens >= 1, "max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")
        need(self.samples_per_prompt >= 1, "samples_per_prompt",
             f"must be >= 1, got {self.samples_per_prompt}")
        need(self.temperature >= 0, "temperature", f"must be >= 0, got {self.temperature}")
        need(0 <= self.val_fraction < 1, "val_fraction", f"must be in [0, 1), got {self.val_fraction}")
        need(self.topk >= 1, "topk", f"must be >= 1, got {self.topk}")
        need(self.grad_clip > 0, "grad_clip", f"must be > 0, got {self.grad_clip}")
        need(self.init_vocab in ("keep", "reselect"), "init_vocab",
             f"must be 'keep' or 'reselect', got {self.init_vocab!r}")
        need(self.init_vocab == "keep" or self.init_drafter is not None, "init_vocab",
             "'reselect' re-chooses the vocabulary of an --init-drafter; pass one")
        need(self.lm_head_init in ("target", "random"), "lm_head_init",
             f"must be 'target' or 'random', got {self.lm_head_init!r}")
        need(self.save_dtype in ("float16", "bfloat16", "float32"), "save_dtype",
             f"must be float16, bfloat16 or float32, got {self.save_dtype!r}")
        need(self.train_dtype in ("auto", "bfloat16", "float32"), "train_dtype",
             f"must be auto, bfloat16 or float32, got {self.train_dtype!r}")
        if self.aux_layers is not None:
            need(len(self.aux_layers) == 3, "aux_layers",
                 f"needs 3 layer ids, got {list(self.aux_layers)}")


class Pipeline:
    def __init__(self, cfg: TrainConfig, on_event: Optional[EventFn] = None):
        self.cfg = cfg
        self.on_event = on_event or (lambda name, **info: None)
        self.out = Path(cfg.out)
        self.work = self.out / "work"
        self.stats: dict[str, dict] = {}

    # ---- driver ------------------------------------------------------------------------------
    def run(self) -> dict:
        cfg = self.cfg
        specs = data.load_prompts(cfg.prompts, cfg.max_prompts)  # errors before any work
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        from eyas.hub import resolve_model

        self.target_folder = resolve_model(cfg.target)
        from transformers import AutoConfig

        self.target_config = AutoConfig.from_pretrained(self.target_folder)
        num_layers = self.target_config.num_hidden_layers
        from eyas.models.eagle3 import default_aux_layer_ids

        self.aux = tuple(cfg.aux_layers) if cfg.aux_layers else default_aux_layer_ids(num_layers)
        bad = [i for i in self.aux if not 0 <= i < num_layers]
        if bad:
            raise InvalidRequestError("aux_layers", f"layer ids {bad} are out of range [0, "
                                      f"{num_layers}) for this {num_layers}-layer target")
        if cfg.overwrite and self.work.exists():
            shutil.rmtree(self.work)
        self.work.mkdir(parents=True, exist_ok=True)
        self.vocab_size = self.target_config.vocab_size
        self.vd = min(cfg.draft_vocab, self.vocab_size)
        self.init = None
        if cfg.init_drafter:
            self.init = load_init_drafter(cfg.init_drafter, self.target_config, self.aux)
            if cfg.init_vocab == "keep":
                self.vd = self.init.draft_vocab_size

        val_ids = data.split_prompts([s.id for s in specs], cfg.val_fraction, cfg.seed)
        regen_params = {"target": str(self.target_folder), "prompts": data.file_digest(cfg.prompts),
                        "max_prompts": cfg.max_prompts, "max_new_tokens": cfg.max_new_tokens,
                        "samples_per_prompt": cfg.samples_per_prompt,
                        "temperature": cfg.temperature, "seed": cfg.seed,
                        "extra_sample_temperature": cfg.extra_sample_temperature,
                        "val_fraction": cfg.val_fraction, "max_model_len": cfg.max_model_len,
                        "capture": cfg.capture}
        if cfg.capture:  # the features come out of this stage
            regen_params.update(aux_layers=list(self.aux), topk=cfg.topk)
        self._stage("regenerate", regen_params, lambda: self._regenerate(specs, val_ids))
        self._stage("features", {"aux_layers": list(self.aux), "topk": cfg.topk},
                    self._features)
        # init_vocab is recorded only when not the default, so older work folders still resume
        reselect = {"init_vocab": cfg.init_vocab} if cfg.init_vocab != "keep" else {}
        self._stage("vocab", {"draft_vocab": self.vd, "init_drafter": cfg.init_drafter, **reselect},
                    self._vocab)
        train_params = {k: getattr(cfg, k) for k in (
            "ttt_steps", "epochs", "lr", "min_lr_ratio", "warmup_frac", "weight_decay",
            "grad_clip", "batch_tokens", "patience", "step_weight", "seed", "intermediate_size",
            "lm_head_init", "init_drafter")}
        train_params.update(reselect)
        self._stage("train", train_params, self._train)
        summary = self._save(len(specs))
        self.on_event("finished", summary=summary)
        return summary

    def _stage(self, name: str, params: dict, fn: Callable[[], dict]) -> dict:
        params = json.loads(json.dumps(params))
        started, done = self.work / f"{name}.params", self.work / f"{name}.done"
        if started.is_file():
            old = json.loads(started.read_text())
            if old != params:
                diff = sorted(k for k in set(old) | set(params) if old.get(k) != params.get(k))
                raise InvalidRequestError(
                    "out", f"{self.work} holds {name} work made with other settings "
                           f"({', '.join(diff)}); use a new --out or pass --overwrite")
        if done.is_file():
            self.stats[name] = json.loads(done.read_text())["stats"]
            self.on_event("stage_skip", stage=name)
            return self.stats[name]
        _write_json(started, params)
        self.on_event("stage_start", stage=name)
        stats = fn()
        _write_json(done, {"params": params, "stats": stats})
        self.stats[name] = stats
        self.on_event("stage_done", stage=name, stats=stats)
        return stats

    # ---- stages ------------------------------------------------------------------------------
    def _regenerate(self, specs, val_ids) -> dict:
        cfg = self.cfg
        opts = data.RegenOptions(
            max_new_tokens=cfg.max_new_tokens, samples_per_prompt=cfg.samples_per_prompt,
            temperature=cfg.temperature, extra_sample_temperature=cfg.extra_sample_temperature,
            seed=cfg.seed, device=cfg.device, dtype=cfg.dtype, max_num_seqs=cfg.max_num_seqs,
            max_model_len=cfg.max_model_len, kv_cache_memory=cfg.kv_cache_memory,
            num_threads=cfg.num_threads)
        capture = None
        if cfg.capture:
            capture = data.CaptureOptions(aux_layer_ids=self.aux, topk=cfg.topk,
                                          feature_dir=str(self.work / "features"))
        stats = data.regenerate(str(self.target_folder), specs, val_ids,
                                self.work / "responses.jsonl", opts, cfg.progress, capture)
        records = data.read_jsonl(self.work / "responses.jsonl")
        if not records:
            raise InvalidRequestError("prompts", "the target produced no responses (every "
                                      "prompt was skipped); see the warnings above")
        stats["sequences"] = {s: sum(r["split"] == s for r in records) for s in ("train", "val")}
        stats["response_tokens_total"] = {
            s: sum(len(r["response_ids"]) for r in records if r["split"] == s)
            for s in ("train", "val")}
        stats["prompts"] = len({r["id"] for r in records})
        return stats

    def _features(self) -> dict:
        cfg = self.cfg
        if cfg.capture:  # regeneration wrote the shards: only count them
            index = data.shard_lengths(self.work / "features")
            return {"shards": len(index), "sequences": sum(len(v) for v in index.values()),
                    "tokens": sum(sum(v) for v in index.values()), "elapsed_s": 0.0,
                    "captured_while_regenerating": True,
                    "clamped_values": self.stats["regenerate"].get("clamped_values", 0)}
        opts = data.FeatureOptions(aux_layer_ids=self.aux, topk=cfg.topk, device=cfg.device,
                                   dtype=cfg.dtype, batch_tokens=cfg.feature_batch_tokens)
        return data.capture_features(str(self.target_folder), self.work / "responses.jsonl",
                                     self.work / "features", opts, cfg.progress)

    def _vocab(self) -> dict:
        from eyas.models.eagle3 import build_vocab_maps

        records = data.read_jsonl(self.work / "responses.jsonl")
        counts = data.count_tokens(records, self.vocab_size, split="train")
        if counts.sum() == 0:
            counts = data.count_tokens(records, self.vocab_size, split=None)
        if self.init is not None and self.cfg.init_vocab == "keep":
            d2t, t2d = self.init.d2t.clone(), self.init.t2d.clone()
        else:
            d2t, t2d = build_vocab_maps(counts, self.vd)
        torch.save({"d2t": d2t, "t2d": t2d, "counts": counts}, self.work / "vocab.pt")
        total = float(counts.sum())
        return {"draft_vocab": self.vd, "distinct_tokens": int((counts > 0).sum()),
                "coverage": float(counts[t2d].sum()) / total if total else 0.0}

    def _train(self) -> dict:
        trainer = DrafterTrainer(self.cfg, self.target_folder, self.target_config, self.aux,
                                 self.work, self.on_event, init=self.init)
        stats = trainer.fit()
        if trainer.carried is not None:
            stats["carried_over"] = dataclasses.asdict(trainer.carried)
        return stats

    def _save(self, num_prompts: int) -> dict:
        from eyas.models.eagle3 import save_drafter

        cfg = self.cfg
        state = torch.load(self.work / "final.pt", map_location="cpu", weights_only=True)
        drafter = build_drafter(self.target_config, self.aux, cfg, state["d2t"], state["t2d"],
                                init=self.init)
        drafter.load_state_dict(state["model"])
        dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16,
                 "float32": torch.float32}[cfg.save_dtype]
        save_drafter(drafter, self.out, dtype=dtype)
        summary = self._summary(num_prompts)
        _write_json(self.out / "train_summary.json", summary)
        return summary

    def _summary(self, num_prompts: int) -> dict:
        regen, feats, vocab, train = (self.stats[s] for s in STAGES)
        best = train.get("best") or {}
        return {
            "target": str(self.target_folder), "prompt_file": str(self.cfg.prompts),
            "prompts": num_prompts, "samples_per_prompt": self.cfg.samples_per_prompt,
            "init_drafter": self.cfg.init_drafter, "init_vocab": self.cfg.init_vocab,
            "carried_over": train.get("carried_over"),
            "sequences": regen.get("sequences"), "response_tokens": regen.get("response_tokens_total"),
            "draft_vocab": vocab["draft_vocab"], "draft_vocab_coverage": round(vocab["coverage"], 4),
            "aux_layers": list(self.aux), "ttt_steps": self.cfg.ttt_steps,
            "epochs_run": train["epochs_run"], "best_epoch": best.get("epoch"),
            "early_stopped": train["early_stopped"],
            "train_loss": train["history"][-1]["train_loss"] if train["history"] else None,
            "val_loss": best.get("val_loss"), "val_loss_before_training": train.get("val_initial"),
            "val_top1_acc_before_training": train.get("val_initial_acc"),
            "val_top1_acc_per_step": best.get("val_acc"),
            "train_top1_acc_per_step": train["history"][-1]["train_acc"] if train["history"] else None,
            "est_accept_len_chain5": best.get("est_accept_len"),
            "est_accept_len_note": "ESTIMATE: greedy chain K=5, 1 + sum_k prod_{i<k} acc_i from "
                                   "teacher-forced validation accuracies; measure with "
                                   "`eyas eval-drafter`",
            "timings": {
                "regenerate": {"elapsed_s": round(regen.get("elapsed_s", 0.0), 1),
                               "tok_s": round(regen.get("tok_s", 0.0), 1)},
                "features": {"elapsed_s": round(feats.get("elapsed_s", 0.0), 1),
                             "tok_s": round(feats.get("tok_s", 0.0), 1)},
                "train": {"elapsed_s": round(train.get("elapsed_s", 0.0), 1),
                          "tok_s": round(train.get("tok_s", 0.0), 1)},
            },
            "history": train["history"],
            "output": str(self.out),
        }


# ---- the drafter -------------------------------------------------------------------------------
def load_init_drafter(name: str, target_config, aux: tuple[int, ...]):
    """The drafter to fine-tune (built-in name or folder), checked against the run's aux layers."""
    from eyas.hub import resolve_model
    from eyas.models.eagle3 import load_drafter

    drafter = load_drafter(resolve_model(name), target_config)
    if drafter.quant_config is not None:
        raise InvalidRequestError("init_drafter", f"{name} is quantized; fine-tune the "
                                  "unquantized drafter and quantize the result")
    got = tuple(drafter.aux_layers_for(target_config.num_hidden_layers))
    if got != tuple(aux):
        raise InvalidRequestError("init_drafter", f"{name} reads aux layers {list(got)}, this run "
                                  f"captures {list(aux)} (pass --aux-layers to match)")
    return drafter


def read_target_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """The target's embedding and lm_head (the embedding when tied), fp32."""
    from safetensors import safe_open

    from eyas.models.loader import safetensors_files

    want = {"model.embed_tokens.weight": "embed", "lm_head.weight": "lm_head"}
    out: dict[str, torch.Tensor] = {}
    for path in safetensors_files(folder):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():
                if name in want:
                    out[want[name]] = f.get_tensor(name).float()
    if "embed" not in out:
        raise InvalidRequestError("target", f"{folder} has no model.embed_tokens.weight")
    out.setdefault("lm_head", out["embed"])
    return out


def build_drafter(target_config, aux: tuple[int, ...], cfg: TrainConfig, d2t: torch.Tensor,
                  t2d: torch.Tensor, target_tensors: Optional[dict] = None,
                  seed: Optional[int] = None, init=None):
    """A fp32 drafter shaped for the target. With target_tensors: freshly initialised (fc and
    midlayer random, norms 1; lm_head = the target's head rows of the draft vocab when
    cfg.lm_head_init == "target", else random). Copying the target's final norm as well was
    tried and started worse (initial CE ~28 against ~20 with norm 1 and ~9 with a random head,
    on SmolLM2), so the final norm starts at 1."""
    from eyas.models.eagle3 import Eagle3Drafter, default_aux_layer_ids, random_drafter_config

    custom = tuple(aux) != default_aux_layer_ids(target_config.num_hidden_layers)
    config = random_drafter_config(target_config, draft_vocab_size=int(d2t.shape[0]),
                                   intermediate_size=cfg.intermediate_size or (
                                       init.arch.intermediate_size if init is not None else None),
                                   aux_layer_ids=list(aux) if custom else None)
    drafter = Eagle3Drafter(config, dtype=torch.float32,
                            max_position=target_config.max_position_embeddings + cfg.ttt_steps)
    drafter.set_vocab_maps(d2t, t2d)
    if target_tensors is not None:
        drafter.init_random_(torch.Generator().manual_seed(cfg.seed if seed is None else seed))
        with torch.no_grad():
            for name, p in drafter.named_parameters():
                if "norm" in name:
                    p.fill_(1.0)
            if cfg.lm_head_init == "target":
                rows = drafter.map_to_target(torch.arange(drafter.draft_vocab_size))
                drafter.lm_head.weight.copy_(target_tensors["lm_head"][rows])
    return drafter


# ---- training ----------------------------------------------------------------------------------
class Meter:
    """Sums of per-step CE (row-weighted) and accuracy counts over many batches."""

    def __init__(self, steps: int, step_weight: float):
        self.steps, self.w = steps, step_weight
        self.ce = [0.0] * steps
        self.rows = [0] * steps
        self.correct = [0] * steps
        self.total = [0] * steps
        self.tokens = 0

    def add(self, res, tokens: int) -> None:
        for i in range(self.steps):
            self.ce[i] += res.step_loss[i] * res.step_rows[i]
            self.rows[i] += res.step_rows[i]
            self.correct[i] += res.step_correct[i]
            self.total[i] += res.step_total[i]
        self.tokens += tokens

    def step_loss(self) -> list[float]:
        return [c / r if r else 0.0 for c, r in zip(self.ce, self.rows)]

    def loss(self) -> float:
        ws = [self.w ** i for i in range(self.steps)]
        return sum(w * l for w, l in zip(ws, self.step_loss())) / sum(ws)

    def acc(self) -> list[float]:
        return [round(c / t, 4) if t else 0.0 for c, t in zip(self.correct, self.total)]


class DrafterTrainer:
    def __init__(self, cfg: TrainConfig, target_folder: Path, target_config, aux, work: Path,
                 on_event: EventFn, init=None):
        from eyas.engine import resolve_device

        self.cfg, self.work, self.on_event = cfg, work, on_event
        self.device = resolve_device(cfg.device)
        self.bf16 = use_bf16_autocast(cfg.train_dtype, self.device)
        vocab = torch.load(work / "vocab.pt", map_location="cpu", weights_only=True)
        self.d2t, self.t2d = vocab["d2t"], vocab["t2d"]
        tensors = read_target_tensors(target_folder)
        self.embed = tensors["embed"].to(self.device)  # [V, H], frozen
        self.drafter = build_drafter(target_config, aux, cfg, self.d2t, self.t2d, tensors, init=init)
        self.carried = None
        if init is not None:  # fine-tune: start from the given drafter (widened, new vocab rows)
            from eyas.train.init_weights import carry_over

            self.carried = carry_over(self.drafter, init)
            log.info("started from the --init-drafter: %s", self.carried)
        self.drafter.to(self.device).requires_grad_(True).train()
        self.t2d_index = target_to_draft_index(self.drafter)
        feats = work / "features"
        self.train_shards = data.list_shards(feats, "train")
        self.val_shards = data.list_shards(feats, "val")
        if not self.train_shards:
            raise InvalidRequestError("prompts", "no training sequences (all prompts went to "
                                      "validation or were skipped); add prompts or lower "
                                      "--val-fraction")
        self.ckpt = work / "ckpt.pt"

    # one "window" = shards loaded together; everything when it fits in memory_budget
    def _windows(self, shards: list[Path], rng: Optional[random.Random]):
        order = list(shards)
        if rng is not None:
            rng.shuffle(order)
        budget = _memory_budget()
        cur, size = [], 0
        for path in order:
            if cur and size + path.stat().st_size > budget:
                yield cur
                cur, size = [], 0
            cur.extend(data.load_shard(path))
            size += path.stat().st_size
        if cur:
            yield cur

    def _batch_loss(self, batch: dict, with_grad: bool):
        cfg = self.cfg
        next_embeds = shift_left(F.embedding(batch["ids"], self.embed), 1)  # e_{s+1} at s
        # step i of chain s predicts x_{s+2+i}: chains s < p - 1 - steps (p: the shortest
        # prompt) predict no response token at any step, so they are not followed
        start = max(0, batch["min_prompt_len"] - 1 - cfg.ttt_steps)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            outs = ttt_forward(self.drafter, next_embeds, batch["aux"], cfg.ttt_steps, start)
            return ttt_loss(self.drafter, outs, batch["topk_ids"], batch["topk_logprobs"],
                            batch["resp"], self.t2d_index, cfg.step_weight, with_grad, start)

    @torch.no_grad()
    def evaluate(self) -> Optional[Meter]:
        if not self.val_shards:
            return None
        self.drafter.eval()
        meter = Meter(self.cfg.ttt_steps, self.cfg.step_weight)
        for recs in self._windows(self.val_shards, None):
            lengths = [len(r["input_ids"]) for r in recs]
            for idx in data.make_batches(lengths, self.cfg.batch_tokens, random.Random(0)):
                batch = data.collate([recs[i] for i in idx], self.device)
                meter.add(self._batch_loss(batch, with_grad=False), int(batch["resp"].sum()))
        self.drafter.train()
        return meter

    def _schedule(self, total_steps: int):
        warmup = max(1, int(self.cfg.warmup_frac * total_steps))
        floor = self.cfg.min_lr_ratio

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
        return factor

    def _steps_per_epoch(self) -> int:
        """Batches in one epoch (exact when all shards fit in one window)."""
        if not hasattr(self, "_steps"):
            index = data.shard_lengths(self.work / "features")
            lengths = []
            for path in self.train_shards:
                if path.name in index:
                    lengths += index[path.name]
                else:
                    lengths += [len(r["input_ids"]) for r in data.load_shard(path)]
            self._steps = len(data.make_batches(lengths, self.cfg.batch_tokens, random.Random(0)))
        return self._steps

    def fit(self) -> dict:
        cfg, drafter = self.cfg, self.drafter
        params = [p for p in drafter.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95),
                                weight_decay=cfg.weight_decay)
        total_steps = cfg.epochs * self._steps_per_epoch()
        sched = torch.optim.lr_scheduler.LambdaLR(opt, self._schedule(total_steps))
        state = {"epoch": 0, "history": [], "best": None, "bad_epochs": 0, "elapsed_s": 0.0,
                 "tokens": 0, "val_initial": None, "stopped": False}
        best_model = None
        if self.ckpt.is_file():
            ck = torch.load(self.ckpt, map_location="cpu", weights_only=True)
            drafter.load_state_dict(ck["model"])
            opt.load_state_dict(ck["optim"])
            sched.load_state_dict(ck["sched"])
            state = ck["state"]
            best_model = ck["best_model"]
            torch.set_rng_state(ck["rng"])
            self.on_event("resume", epoch=state["epoch"])
            log.info("resuming training after epoch %d", state["epoch"])
        elif self.val_shards:
            init = self.evaluate()
            state["val_initial"], state["val_initial_acc"] = round(init.loss(), 4), init.acc()
            print(f"before training: val loss {state['val_initial']:.4f} acc "
                  f"{state['val_initial_acc']}", file=sys.stderr, flush=True)
        start = time.perf_counter() - state["elapsed_s"]
        while state["epoch"] < cfg.epochs and not state["stopped"]:
            epoch = state["epoch"] + 1
            meter = Meter(cfg.ttt_steps, cfg.step_weight)
            rng = random.Random(cfg.seed * 1000 + epoch)
            bar = tqdm(total=self._steps_per_epoch(), desc=f"train epoch {epoch}/{cfg.epochs}",
                       unit="batch", disable=not cfg.progress, file=sys.stderr,
                       dynamic_ncols=True)
            try:
                for recs in self._windows(self.train_shards, rng):
                    lengths = [len(r["input_ids"]) for r in recs]
                    for idx in data.make_batches(lengths, cfg.batch_tokens, rng):
                        batch = data.collate([recs[i] for i in idx], self.device)
                        res = self._batch_loss(batch, with_grad=True)
                        opt.zero_grad(set_to_none=True)
                        res.loss.backward()
                        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                        opt.step()
                        sched.step()
                        meter.add(res, int(batch["resp"].sum()))
                        bar.update(1)
                        bar.set_postfix_str(f"loss {res.loss.item():.3f} acc0 "
                                            f"{res.step_correct[0] / max(1, res.step_total[0]):.2f}",
                                            refresh=False)
            finally:
                bar.close()
            val = self.evaluate()
            entry = {"epoch": epoch, "train_loss": round(meter.loss(), 4),
                     "train_step_loss": [round(x, 4) for x in meter.step_loss()],
                     "train_acc": meter.acc(), "lr": sched.get_last_lr()[0]}
            if val is not None:
                entry.update(val_loss=round(val.loss(), 4), val_acc=val.acc(),
                             est_accept_len=round(estimate_accept_length(val.acc()), 3))
            state["history"].append(entry)
            state["tokens"] += meter.tokens
            improved = val is None or state["best"] is None or \
                entry["val_loss"] < state["best"]["val_loss"] - 1e-4
            if improved:
                state["best"] = {"epoch": epoch, "val_loss": entry.get("val_loss"),
                                 "val_acc": entry.get("val_acc"),
                                 "est_accept_len": entry.get("est_accept_len")}
                best_model = {k: v.detach().cpu().clone() for k, v in drafter.state_dict().items()}
                state["bad_epochs"] = 0
            else:
                state["bad_epochs"] += 1
                if cfg.patience and state["bad_epochs"] >= cfg.patience:
                    state["stopped"] = True
            state["epoch"] = epoch
            state["elapsed_s"] = time.perf_counter() - start
            log.info("epoch %d: %s", epoch, entry)
            print(_epoch_line(entry), file=sys.stderr, flush=True)
            _atomic_save({"model": drafter.state_dict(), "optim": opt.state_dict(),
                          "sched": sched.state_dict(), "state": state, "best_model": best_model,
                          "rng": torch.get_rng_state()}, self.ckpt)
            self.on_event("epoch_end", epoch=epoch, entry=entry)
        _atomic_save({"model": best_model, "d2t": self.d2t, "t2d": self.t2d},
                     self.work / "final.pt")
        elapsed = state["elapsed_s"]
        return {"epochs_run": state["epoch"], "early_stopped": state["stopped"],
                "history": state["history"], "best": state["best"],
                "val_initial": state["val_initial"],
                "val_initial_acc": state.get("val_initial_acc"), "elapsed_s": elapsed,
                "tokens": state["tokens"], "tok_s": state["tokens"] / max(elapsed, 1e-9)}


def _epoch_line(e: dict) -> str:
    line = f"epoch {e['epoch']}: train loss {e['train_loss']:.4f} acc {e['train_acc']}"
    if "val_loss" in e:
        line += (f" | val loss {e['val_loss']:.4f} acc {e['val_acc']} "
                 f"est. accept len (K=5) {e['est_accept_len']:.2f}")
    return line


def use_bf16_autocast(train_dtype: str, device: torch.device) -> bool:
    """Whether the drafter's forward runs under bf16 autocast (weights, optimizer and loss
    reductions stay fp32). auto: on CUDA, and on CPUs with native bf16 matmuls (AVX512-BF16 or
    AMX; on the 2-core dev machine a TTT step takes ~1.7x less time than in fp32)."""
    if train_dtype != "auto":
        return train_dtype == "bfloat16"
    if device.type == "cuda":
        return True
    if device.type != "cpu":
        return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _memory_budget() -> int:
    from eyas.kv.cache import available_memory

    return int(0.4 * available_memory(torch.device("cpu")))


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def format_summary(s: dict) -> str:
    t = s["timings"]
    lines = [
        f"drafter saved to {s['output']}",
        f"prompts {s['prompts']} x {s['samples_per_prompt']} samples; sequences {s['sequences']}; "
        f"response tokens {s['response_tokens']}",
        f"draft vocab {s['draft_vocab']} (covers {100 * s['draft_vocab_coverage']:.1f}% of "
        f"train response tokens); TTT steps {s['ttt_steps']}; epochs {s['epochs_run']}"
        f"{' (early stop)' if s['early_stopped'] else ''}, best {s['best_epoch']}",
        f"train loss {s['train_loss']}; val loss {s['val_loss']} "
        f"(before training {s['val_loss_before_training']})",
        f"val top-1 accuracy per step {s['val_top1_acc_per_step']}",
        f"estimated accept length, chain K=5 (estimate, not measured): "
        f"{s['est_accept_len_chain5']}",
        f"time: regenerate {t['regenerate']['elapsed_s']} s ({t['regenerate']['tok_s']} tok/s), "
        f"features {t['features']['elapsed_s']} s ({t['features']['tok_s']} tok/s), "
        f"train {t['train']['elapsed_s']} s ({t['train']['tok_s']} tok/s)",
    ]
    return "\n".join(lines)


def train_drafter(cfg: TrainConfig, on_event: Optional[EventFn] = None) -> dict:
    """Run (or resume) the whole pipeline; returns the summary written to train_summary.json."""
    return Pipeline(cfg, on_event).run()


def config_from_dict(values: dict) -> TrainConfig:
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in values.items() if k in known and v is not None})
