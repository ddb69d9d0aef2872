"""LLMEngine: add_request / step / abort over the scheduler, the allocator and the model."""
from __future__ import annotations

import itertools
import logging
import os
import time
from dataclasses import dataclass
from typing import Optional

import torch

from eyas.config import EngineConfig
from eyas.core import RequestOutput, SamplingParams, Sequence, SeqStatus, SpecStats
from eyas.detok import IncrementalDetokenizer
from eyas.errors import ConfigError, InvalidRequestError
from eyas.hub import eos_token_ids, load_tokenizer, resolve_model
from eyas.kv.allocator import BlockAllocator
from eyas.kv.cache import KVLayout, allocate_kv, available_memory, kv_layout_for, num_blocks_for
from eyas.layers.few_rows import measure_mkl_rows, set_mkl_rows
from eyas.layers.linear import can_pack_weights, pack_linear_weights
from eyas.layers.sampler import sample
from eyas.models.loader import load_model
from eyas.scheduler import Scheduler
from eyas.workers.input_batch import SeqSpan
from eyas.workers.model_runner import ModelRunner

log = logging.getLogger("eyas")

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device: unknown device {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: cuda requested but no GPU is available")
    return device


def use_graphs(config: EngineConfig, device: torch.device) -> bool:
    """Compiled decode/verify graphs: on by default on GPU, off on CPU; EYAS_EAGER=1 forces off."""
    if os.environ.get("EYAS_EAGER") == "1":
        return False
    return not config.eager if config.eager is not None else device.type == "cuda"


def compile_backend(config: EngineConfig) -> Optional[str]:
    """The torch.compile backend of the bucketed steps: EYAS_COMPILE_BACKEND, else the config's."""
    return os.environ.get("EYAS_COMPILE_BACKEND") or config.compile_backend


def step_widths(spec) -> list[int]:
    """Tokens per sequence of the uniform steps this configuration runs (decode, verify)."""
    if not spec.enabled:
        return [1]
    if spec.mixed:  # chains of 1..steps and trees (padded to draft_tokens + 1)
        return sorted(set(range(1, spec.steps + 2)) | {spec.draft_tokens + 1})
    if spec.topk > 1:
        return [1, spec.draft_tokens + 1]
    if spec.policy == "adaptive":
        return list(range(1, spec.steps + 2))
    return [1, spec.steps + 1]


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    if name not in _DTYPES:
        raise ConfigError(f"dtype: expected one of auto, {', '.join(_DTYPES)}; got {name!r}")
    return _DTYPES[name]


def resolve_draft_dtype(name: str, target_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The drafter's dtype. auto: bf16 beside an fp32 target on a CPU whose oneDNN has native bf16
    (half the weight bytes: a batch-1 propose measured a fifth cheaper on this project's CPU, at
    the same acceptance; the drafter trains under bf16 autocast anyway), else the target's dtype.
    Verification stays in the target's dtype, so greedy output is unchanged either way."""
    if name != "auto":
        return resolve_dtype(name, device)
    if device.type == "cpu" and target_dtype == torch.float32 and can_pack_weights(device, torch.bfloat16):
        return torch.bfloat16
    return target_dtype


def model_len_limit(config: EngineConfig, max_position: int, sliding_window: Optional[int]) -> int:
    """max_model_len: configured (checked against the model), else min(max positions, 4096)."""
    limit = config.max_model_len or min(max_position, 4096)
    if limit > max_position:
        raise ConfigError(f"max_model_len={limit} exceeds the model's max_position_embeddings={max_position}")
    if sliding_window and limit > sliding_window:
        log.warning("attention is full, so results match the model only within its sliding "
                    "window: capping max_model_len %d -> %d", limit, sliding_window)
        limit = sliding_window
    return limit


def kv_budget(config: EngineConfig, device: torch.device):
    """The KV cache budget: bytes, or a fraction of free memory ('auto': 0.8 on GPU, else the
    smaller of 2 GiB and a quarter of free RAM)."""
    if config.kv_cache_memory != "auto":
        return config.kv_cache_memory
    return 0.8 if device.type == "cuda" else min(2 * 2**30, 0.25 * available_memory(device))


def pack_weights(config: EngineConfig, device: torch.device, dtype: torch.dtype) -> bool:
    """oneDNN-packed weight copies: configured, else on for CPU fp32 eager."""
    if config.packed_weights is not None:
        return config.packed_weights
    return can_pack_weights(device, dtype) and not use_graphs(config, device)


def pack_cpu_weights(model, config: EngineConfig, what: str) -> None:
    """oneDNN-packed copies of the model's weights, and the few-row products that still take the
    plain weight: as configured, else as measured on this CPU (layers/few_rows.py)."""
    pack_linear_weights(model)
    rows = config.mkl_max_rows
    if rows is None:
        rows = measure_mkl_rows(model)
        log.info("%s: fp32 products of at most %d rows take MKL's plain weight (measured)", what, rows)
    set_mkl_rows(model, rows)


def build_target_runner(model, config: EngineConfig, num_blocks: int, lookahead: int, device: torch.device,
                        dtype: torch.dtype, warm_up: bool = True) -> tuple[ModelRunner, list]:
    """The target's KV cache (num_blocks, plus never-allocated pad blocks for compiled steps),
    its ModelRunner, packed weights and compiled step graphs, as the config asks."""
    compiled = use_graphs(config, device)
    max_q = max(lookahead, 1)  # widest uniform step: verify of all drafts + the last token
    pad_blocks = -(-max_q // config.block_size) if compiled else 0  # never allocated
    kv_caches = allocate_kv(kv_layout_for(model), num_blocks + pad_blocks, config.block_size, dtype, device)
    runner = ModelRunner(model, kv_caches, config.block_size, device)
    if pack_weights(config, device, dtype):
        pack_cpu_weights(model, config, "target")
    if compiled:
        runner.enable_graphs(num_blocks * config.block_size, config.max_num_seqs, max_q=max_q,
                             backend=compile_backend(config))
        if warm_up and config.compile_warmup:
            log.info("compiled %d step graphs", runner.warm_up(step_widths(config.spec), progress=True))
    return runner, kv_caches


def build_proposer(drafter, target, config: EngineConfig, num_blocks: int, device: torch.device,
                   warm_up: bool = True, max_len: Optional[int] = None):
    """The EAGLE-3 proposer over its own KV cache (same block ids and size as the target's, in
    the drafter's dtype).
    `target` gives the token embedding (`embed`) and `vocab_size`. When compiling, chain drafts
    run their q = 1 steps through compiled graphs (warmed up when `warm_up` and the config ask);
    trees stay eager."""
    from eyas.spec.proposer import Eagle3Proposer

    spec = config.spec
    # Trees keep (steps-1)*topk drafter K/V rows per sequence in flight: scratch blocks past
    # the allocator's, never handed out (see spec/tree.py).
    scratch = config.max_num_seqs * (spec.steps - 1) * spec.topk if spec.topk > 1 else 0
    scratch_blocks = -(-scratch // config.block_size)
    # chains with steps j >= 1 (with topk > 1 only where the adaptive controller also picks chains)
    compiled = use_graphs(config, device) and (spec.topk == 1 or spec.mixed) and spec.steps > 1
    pad_blocks = 1 if compiled else 0  # after the scratch blocks: padded rows of compiled steps
    layout = KVLayout(drafter.num_kv_heads, drafter.head_dim, 1)
    total_blocks = num_blocks + scratch_blocks + pad_blocks
    draft_kv = allocate_kv(layout, total_blocks, config.block_size, drafter.dtype, device)[0]
    proposer = Eagle3Proposer(drafter, target, draft_kv, config.block_size, device, steps=spec.steps,
                              topk=spec.topk, num_paged_blocks=num_blocks)
    if compiled:
        proposer.enable_graphs((num_blocks + scratch_blocks) * config.block_size, config.max_num_seqs,
                               backend=compile_backend(config))
        if warm_up and config.compile_warmup:
            log.info("compiled %d draft step graphs", proposer.warm_up(progress=True, max_len=max_len))
    return proposer


def make_controller(spec):
    """The adaptive speculation controller, when the policy asks for one."""
    if spec.policy != "adaptive":
        return None
    from eyas.spec.controller import ControllerConfig, SpecController

    if spec.topk > 1:  # trees of up to draft_tokens nodes, and chains of up to `steps` tokens
        return SpecController(ControllerConfig(spec.draft_tokens, tree=True, chains=spec.steps))
    return SpecController(ControllerConfig(spec.steps))


@dataclass
class Request:
    seq: Sequence
    detok: IncrementalDetokenizer
    start_time: float
    first_token_time: Optional[float] = None
    sent_tokens: int = 0  # output tokens already reported in a delta


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        folder = resolve_model(config.model)
        self.model_path = folder
        self.tokenizer = load_tokenizer(folder)
        self.eos_token_ids = tuple(eos_token_ids(folder))
        self.model = load_model(folder, dtype=self.dtype, device=self.device)
        self.vocab_size = self.model.vocab_size
        self.max_model_len = model_len_limit(config, self.model.arch.max_position,
                                             getattr(self.model, "sliding_window", None))
        self.spec = None  # a SpecDecoder when a draft is configured
        self.drafter = None
        lookahead = config.spec.num_draft_tokens + 1 if config.spec.enabled else 0
        layouts = [kv_layout_for(self.model)]  # model.kv_layout() if defined (MLA: latent)
        if config.spec.enabled:
            from eyas.models.eagle3 import load_drafter

            self.draft_path = resolve_model(config.spec.draft)
            draft_dtype = resolve_draft_dtype(config.spec.dtype, self.dtype, self.device)
            self.drafter = load_drafter(self.draft_path, self.model, dtype=draft_dtype, device=self.device)
            layouts.append(KVLayout(self.drafter.num_kv_heads, self.drafter.head_dim, 1))
        memory = kv_budget(config, self.device)
        if config.num_kv_blocks is not None:
            memory = config.num_kv_blocks * sum(l.bytes_per_block(config.block_size, self.dtype) for l in layouts)
        self.num_blocks = num_blocks_for(memory, layouts, config.block_size, self.dtype, self.device,
                                         self.max_model_len, lookahead)
        self.allocator = BlockAllocator(self.num_blocks, config.block_size, config.enable_prefix_caching)
        self.compiled = use_graphs(config, self.device)
        self.runner, self.kv_caches = build_target_runner(self.model, config, self.num_blocks, lookahead,
                                                          self.device, self.dtype, warm_up=False)
        if self.drafter is not None:
            from eyas.spec.decoder import SpecDecoder

            spec = config.spec
            self.runner.aux_layer_ids = self.drafter.aux_layers_for(self.model.num_layers)
            proposer = build_proposer(self.drafter, self.model, config, self.num_blocks, self.device,
                                      max_len=self.max_model_len)
            self.spec = SpecDecoder(self, proposer, spec.num_draft_tokens, capture_features=True,
                                    controller=make_controller(spec))
        if self.drafter is not None and pack_weights(config, self.device, self.drafter.dtype):
            pack_cpu_weights(self.drafter, config, "drafter")
        self.scheduler = Scheduler(self.allocator, config.max_num_seqs, config.max_num_batched_tokens,
                                   self.max_model_len, config.enable_chunked_prefill)
        if self.compiled and config.compile_warmup:
            n = self.runner.warm_up(step_widths(config.spec), progress=True, max_len=self.max_model_len)
            log.info("compiled %d step graphs", n)
        self.requests: dict[str, Request] = {}
        self._ids = itertools.count()
        # plain steps only: observer(plan items, ForwardResult, sampled item indices, their logits
        # [S, V] or None), called before sampling (train/capture.py collects drafter features)
        self.step_observer = None
        self.num_steps = 0
        log.info("engine ready: %s on %s/%s, %d KV blocks of %d tokens, max_model_len %d",
                 folder, self.device, self.dtype, self.num_blocks, config.block_size, self.max_model_len)

    # ------------------------------------------------------------------ inputs
    def encode_prompt(self, prompt: Optional[str] = None, messages: Optional[list] = None,
                      prompt_token_ids: Optional[list[int]] = None, chat: bool = False) -> list[int]:
        given = [x is not None for x in (prompt, messages, prompt_token_ids)]
        if sum(given) != 1:
            raise InvalidRequestError("prompt", "give exactly one of prompt, messages or prompt_token_ids")
        if messages is not None:
            ids = self.apply_chat_template(messages)
        elif prompt is not None:
            if not isinstance(prompt, str) or not prompt:
                raise InvalidRequestError("prompt", "must be a non-empty string")
            if chat:
                ids = self.apply_chat_template([{"role": "user", "content": prompt}])
            else:
                ids = self.tokenizer.encode(prompt)
        else:
            ids = [int(t) for t in prompt_token_ids]
            vocab = self.vocab_size
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise InvalidRequestError("prompt_token_ids", f"ids out of range [0, {vocab}): {bad[:5]}")
        if not ids:
            raise InvalidRequestError("prompt", "must not be empty")
        if len(ids) >= self.max_model_len:
            raise InvalidRequestError(
                "prompt", f"{len(ids)} tokens does not fit max_model_len={self.max_model_len} "
                          "(at least one token must be left to generate)")
        return ids

    def apply_chat_template(self, messages: list) -> list[int]:
        if not isinstance(messages, list) or not messages:
            raise InvalidRequestError("messages", "must be a non-empty list of {role, content}")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or set(m) - {"role", "content", "name"} or \
                    not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise InvalidRequestError(f"messages[{i}]", "must be {role: str, content: str}")
        if not getattr(self.tokenizer, "chat_template", None):
            raise InvalidRequestError("messages", "this model's tokenizer has no chat template")
        out = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(out, dict) or hasattr(out, "input_ids"):
            out = out["input_ids"]
        return list(out)

    def add_request(self, request_id: Optional[str] = None, prompt: Optional[str] = None,
                    params: Optional[SamplingParams] = None, *, messages: Optional[list] = None,
                    prompt_token_ids: Optional[list[int]] = None, chat: bool = False) -> str:
        params = params or SamplingParams()
        ids = self.encode_prompt(prompt, messages, prompt_token_ids, chat)
        request_id = str(next(self._ids)) if request_id is None else str(request_id)
        if request_id in self.requests:
            raise InvalidRequestError("request_id", f"{request_id!r} is already running")
        seq = Sequence(request_id, ids, params, self.eos_token_ids)
        self.requests[request_id] = Request(seq, IncrementalDetokenizer(self.tokenizer, ids, stop=params.stop),
                                            time.perf_counter())
        self.scheduler.add(seq)
        return request_id

    def abort(self, request_id: str) -> bool:
        req = self.requests.pop(str(request_id), None)
        if req is None:
            return False
        self.scheduler.abort(req.seq)
        if self.spec is not None:
            self.spec.proposer.drop(req.seq)
        req.seq.status = SeqStatus.FINISHED
        req.seq.finish_reason = "abort"
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    # -------------------------------------------------------------------- step
    def step(self) -> list[RequestOutput]:
        """Run one scheduling step; return the outputs of the requests that progressed."""
        if self.spec is not None:
            return self.spec.step()
        plan = self.scheduler.schedule()
        if not plan:
            return []
        spans = [SeqSpan(it.seq.token_ids[it.seq.num_computed_tokens:it.seq.num_computed_tokens + it.num_new_tokens],
                         it.seq.num_computed_tokens, it.seq.block_table) for it in plan.items]
        result = self.runner.forward(spans)
        sampled = [i for i, it in enumerate(plan.items) if it.sample]
        new_tokens: dict[int, list[int]] = {}
        logprobs: dict[int, Optional[dict]] = {}
        logits = None
        if sampled:
            rows = result.inputs.last_index[sampled]
            logits = self.runner.logits(result.hidden, rows)  # [S, V]
        if self.step_observer is not None:
            self.step_observer(plan.items, result, sampled, logits)
        if sampled:
            seqs = [plan.items[i].seq for i in sampled]
            out = sample(logits, [s.params for s in seqs], [s.generator for s in seqs])
            ids = out.token_ids.tolist()  # one device -> host copy for the whole step
            for j, i in enumerate(sampled):
                new_tokens[i] = [ids[j]]
                logprobs[i] = out.logprobs[j] if out.logprobs else None
        self.num_steps += 1
        outputs = []
        for i, it in enumerate(plan.items):
            it.seq.num_computed_tokens += it.num_new_tokens
            if i in new_tokens:
                it.seq.target_steps += 1
                outputs.append(self.append_tokens(it.seq, new_tokens[i], [logprobs[i]]))
            if not it.seq.is_finished:
                self.allocator.commit(it.seq)
        return outputs

    def append_tokens(self, seq: Sequence, tokens: list[int], logprobs=None) -> RequestOutput:
        """Append accepted tokens one by one, stopping at the first finish condition."""
        req = self.requests[seq.request_id]
        if req.first_token_time is None:
            req.first_token_time = time.perf_counter()
        p = seq.params
        added: list[int] = []
        delta = ""
        for k, tok in enumerate(tokens):
            seq.token_ids.append(tok)
            added.append(tok)
            if logprobs and k < len(logprobs) and logprobs[k] is not None:
                seq.logprobs.append(logprobs[k])
            reason = None
            if tok in p.stop_token_ids or (not p.ignore_eos and tok in seq.eos_token_ids):
                reason = "stop"
            piece, stopped = req.detok.push([tok])
            delta += piece
            if stopped:
                reason = "stop"
            if reason is None and (seq.num_output_tokens >= p.max_tokens or len(seq) >= self.max_model_len):
                reason = "length"
            if reason is not None:
                if not stopped:
                    delta += req.detok.flush()
                self._finish(seq, reason)
                break
        return self._output(req, added, delta)

    def _finish(self, seq: Sequence, reason: str) -> None:
        seq.finish_reason = reason
        seq.status = SeqStatus.FINISHED
        self.scheduler.finish(seq)

    def _output(self, req: Request, added: list[int], delta: str) -> RequestOutput:
        seq = req.seq
        out = RequestOutput(
            id=seq.request_id, text=req.detok.text, token_ids=seq.output_token_ids,
            finished=seq.is_finished, finish_reason=seq.finish_reason,
            prompt_tokens=seq.num_prompt_tokens, text_delta=delta, token_ids_delta=added,
            logprobs=list(seq.logprobs) if seq.params.logprobs is not None else None,
            spec=self._spec_stats(seq))
        if seq.is_finished:
            self.requests.pop(seq.request_id, None)
        return out

    def _spec_stats(self, seq: Sequence) -> Optional[SpecStats]:
        if self.spec is None:
            return None
        steps = max(seq.target_steps, 1)
        return SpecStats(seq.spec_drafted, seq.spec_accepted, seq.target_steps, seq.num_output_tokens / steps)



def create_engine(config: EngineConfig) -> LLMEngine:
    """The engine the config asks for: in-process, or a coordinator of Ray workers."""
    if config.uses_ray:
        from eyas.executor.cluster import ClusterEngine

        return ClusterEngine(config)
    return LLMEngine(config)
