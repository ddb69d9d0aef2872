"""Drafter features captured while the target regenerates: no second target pass.

The regeneration engine already computes, at every step, the residual streams of every position
it feeds and the logits of every token it samples; a FeatureCollector (the engine's
`step_observer`) keeps the aux layers' rows and the top-k log-probs, so a finished request
comes out with the same record the separate features pass (data.capture_features) makes:

    input_ids      int32 [n]        prompt + response
    prompt_len     int              p
    aux            fp16  [n, 3 Ht]  positions 0 .. n-2 as fed; n-1 (the last response token, never
                                    fed) is zero: training reads no key or query there
    topk_ids       int32 [n-p, k]   the target's top-k at positions p-1 .. n-2, sorted
    topk_logprobs  fp16  [n-p, k]

A request preempted and recomputed simply writes its positions again. The logits are the
target's own (before temperature, top-p and the like), as in the features pass. The engine runs
without prefix caching: a prompt position served from the cache is never fed, so never seen.

ShardWriter streams finished records to feature shards (`{split}-c{N:05d}.pt`) and only then
appends their lines to responses.jsonl, so after a crash every response line has its features on
disk, and the requests whose shard was not written yet are regenerated on resume.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from eyas.train.data import fp16_features, read_jsonl


@dataclass
class _Buffer:
    prompt_len: int
    max_tokens: int
    aux: Optional[torch.Tensor] = None  # [p + max_tokens, 3 Ht] fp16, from the first step run
    top_ids: Optional[torch.Tensor] = None  # [max_tokens, k] int32
    top_lp: Optional[torch.Tensor] = None  # [max_tokens, k] fp16


class FeatureCollector:
    """Step observer of a plain LLMEngine: call start() for each request before it runs, then
    finish() once it has finished for its feature record."""

    def __init__(self, topk: int):
        self.topk = topk
        self.buffers: dict[str, _Buffer] = {}
        self.clamped_values = 0

    def start(self, request_id: str, prompt_len: int, max_tokens: int) -> None:
        """Collect for this request (its buffers are allocated when it first runs, so waiting
        requests hold no memory)."""
        self.buffers[request_id] = _Buffer(prompt_len, max_tokens)

    def _allocate(self, buf: _Buffer, width: int) -> None:
        buf.aux = torch.zeros(buf.prompt_len + buf.max_tokens, width, dtype=torch.float16)
        buf.top_ids = torch.zeros(buf.max_tokens, self.topk, dtype=torch.int32)
        buf.top_lp = torch.zeros(buf.max_tokens, self.topk, dtype=torch.float16)

    @torch.inference_mode()
    def __call__(self, items, result, sampled: list[int], logits: Optional[torch.Tensor]) -> None:
        """One engine step: items (the plan's, before num_computed_tokens advances), its
        ForwardResult, the indices of the items that sample and their logits [S, V]."""
        # the whole step's aux rows go to the host once: [T, 3 Ht] fp16 on the CPU
        aux, clamped = fp16_features(torch.cat(result.aux, dim=-1))
        self.clamped_values += clamped
        starts = result.inputs.query_start
        for i, it in enumerate(items):
            buf = self.buffers.get(it.seq.request_id)
            if buf is None:
                continue
            if buf.aux is None:
                self._allocate(buf, aux.shape[-1])
            rows = aux[starts[i]:starts[i] + it.num_new_tokens]
            first = it.seq.num_computed_tokens
            buf.aux[first:first + it.num_new_tokens] = rows
        if not sampled:
            return
        k = min(self.topk, logits.shape[-1])
        top = logits.float().log_softmax(dim=-1).topk(k, dim=-1)  # [S, k], sorted
        ids, lps = top.indices.int().cpu(), top.values.half().cpu()
        for j, i in enumerate(sampled):
            seq = items[i].seq
            buf = self.buffers.get(seq.request_id)
            if buf is None:
                continue
            row = len(seq.token_ids) - buf.prompt_len  # the token sampled now lands at this index
            buf.top_ids[row, :k] = ids[j]
            buf.top_lp[row, :k] = lps[j]

    def finish(self, request_id: str, prompt_ids: list[int], response_ids: list[int]) -> dict:
        """The feature record of a finished request (its buffer is released)."""
        buf = self.buffers.pop(request_id)
        p, m = len(prompt_ids), len(response_ids)
        n = p + m
        aux = buf.aux[:n].clone()
        aux[n - 1:] = 0  # the last token was never fed
        return {"input_ids": torch.tensor(prompt_ids + response_ids, dtype=torch.int32),
                "prompt_len": p, "aux": aux,
                "topk_ids": buf.top_ids[:m].clone(), "topk_logprobs": buf.top_lp[:m].clone()}

    def drop(self, request_id: str) -> None:
        self.buffers.pop(request_id, None)


class ShardWriter:
    """Finished (response line, feature record) pairs -> feature shards of about
    `tokens_per_shard` tokens per split, then their lines in responses.jsonl.

    A flush writes the shard, then records it (index.json: sequence lengths, read by training;
    shards.json: its (id, sample) keys), then appends its lines. A run that resumes drops what a
    crash left half-done: shard files never recorded, and recorded shards whose lines did not all
    land (their requests are regenerated), so no record is duplicated."""

    def __init__(self, responses: Path, feature_dir: Path, tokens_per_shard: int):
        self.responses = responses
        self.dir = feature_dir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.tokens_per_shard = tokens_per_shard
        self.pending: dict[str, list[tuple[dict, dict]]] = {"train": [], "val": []}
        self.index = self._read("index.json")  # shard -> sequence lengths
        self.keys = self._read("shards.json")  # shard -> [[id, sample], ...]
        done = {(r["id"], r["sample"]) for r in read_jsonl(responses)}
        for shard in [s for s, keys in self.keys.items() if not all(tuple(k) in done for k in keys)]:
            (self.dir / shard).unlink(missing_ok=True)
            del self.keys[shard]
            self.index.pop(shard, None)
        for path in self.dir.glob("*-c*.pt"):
            if path.name not in self.keys:
                path.unlink()
        self._record()
        taken = [int(name.split("-c")[1][:5]) for name in self.keys]
        self.next_shard = max(taken, default=-1) + 1

    def _read(self, name: str) -> dict:
        path = self.dir / name
        return json.loads(path.read_text()) if path.is_file() else {}

    def _record(self) -> None:
        for name, obj in (("shards.json", self.keys), ("index.json", self.index)):
            tmp = self.dir / (name + ".tmp")
            tmp.write_text(json.dumps(obj) + "\n")
            os.replace(tmp, self.dir / name)

    def add(self, line: dict, record: dict) -> None:
        split = line["split"]
        self.pending[split].append((line, {"id": line["id"], "sample": line["sample"], **record}))
        if sum(len(r["input_ids"]) for _, r in self.pending[split]) >= self.tokens_per_shard:
            self.flush(split)

    def flush(self, split: Optional[str] = None) -> None:
        for name in ([split] if split else list(self.pending)):
            batch, self.pending[name] = self.pending[name], []
            if not batch:
                continue
            shard = f"{name}-c{self.next_shard:05d}.pt"
            self.next_shard += 1
            tmp = self.dir / (shard + ".tmp")
            torch.save([r for _, r in batch], tmp)
            os.replace(tmp, self.dir / shard)
            self.index[shard] = [len(r["input_ids"]) for _, r in batch]
            self.keys[shard] = [[line["id"], line["sample"]] for line, _ in batch]
            self._record()
            with self.responses.open("a") as f:  # only now are these requests done
                for line, _ in batch:
                    f.write(json.dumps(line) + "\n")
