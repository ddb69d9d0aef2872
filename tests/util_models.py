"""Shared helpers for model tests: tiny HF configs, random HF references, paged runs."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from transformers import (AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config,
                          Qwen3Config)

from eyas.workers.input_batch import SeqSpan, build_forward_inputs

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
            rms_norm_eps=1e-6)


def tiny_configs() -> dict:
    """name -> HF config of a 2-layer, hidden-64 model of each supported flavour."""
    llama3 = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 32,
              "rope_theta": 10000.0}
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32,
            "rope_theta": 10000.0}
    linear = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    return {
        "llama": LlamaConfig(**TINY, tie_word_embeddings=False),
        "llama_bias_tied": LlamaConfig(**TINY, tie_word_embeddings=True, attention_bias=True,
                                       mlp_bias=True),
        "llama3_rope": LlamaConfig(**TINY, rope_scaling=llama3),
        "linear_rope": LlamaConfig(**TINY, rope_scaling=linear),
        "yarn_rope": LlamaConfig(**TINY, rope_scaling=yarn),
        "mistral": MistralConfig(**TINY, tie_word_embeddings=False),
        "qwen2_tied": Qwen2Config(**TINY, tie_word_embeddings=True),
        "qwen3": Qwen3Config(**TINY, head_dim=32, tie_word_embeddings=False),
    }


@torch.no_grad()
def make_hf_model(config, seed: int = 0):
    """HF model with weights large enough that attention is far from uniform."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    for name, p in model.named_parameters():
        if "norm" in name:
            p.copy_(1.0 + 0.1 * torch.randn_like(p))
        else:
            p.normal_(0.0, 0.15)
    return model.eval()


def save_hf_model(model, folder: Path, max_shard_size: str = "5GB") -> Path:
    model.save_pretrained(folder, safe_serialization=True, max_shard_size=max_shard_size)
    return folder


def alloc_kv_caches(model, num_blocks: int, block_size: int) -> list:
    shape = (num_blocks, block_size, model.num_kv_heads, model.head_dim)
    return [(torch.zeros(shape), torch.zeros(shape)) for _ in range(model.num_layers)]


@torch.no_grad()
def hf_reference(hf_model, token_ids: Sequence[int]):
    """(logits [L, V], hidden_states tuple of [L, H]) of one unpadded sequence."""
    out = hf_model(torch.tensor([list(token_ids)]), output_hidden_states=True)
    return out.logits[0].float(), [h[0] for h in out.hidden_states]


@torch.no_grad()
def run_chunked(model, seqs: Sequence[Sequence[int]], block_tables: Sequence[list[int]],
                chunks: Sequence[Sequence[int]], kv_caches: list, block_size: int,
                aux_layer_ids: tuple[int, ...] = ()):
    """Feed every sequence through the paged cache, chunks[b][step] tokens at a time, all
    sequences batched per step. Returns per sequence: logits [L, V] and each aux [L, H]."""
    done = [0] * len(seqs)
    logits = [[] for _ in seqs]
    aux = [[[] for _ in aux_layer_ids] for _ in seqs]
    for step in range(max(len(c) for c in chunks)):
        active = [b for b in range(len(seqs)) if step < len(chunks[b])]
        spans = []
        for b in active:
            end = done[b] + chunks[b][step]
            spans.append(SeqSpan(list(seqs[b][done[b]:end]), done[b], block_tables[b]))
            done[b] = end
        inputs = build_forward_inputs(spans, block_size)
        hidden, aux_step = model(inputs.input_ids, inputs.positions, inputs.attn, kv_caches,
                                 aux_layer_ids)
        step_logits = model.compute_logits(hidden)  # [T, V]
        for i, b in enumerate(active):
            rows = slice(inputs.query_start[i], inputs.query_start[i + 1])
            logits[b].append(step_logits[rows])
            for j, a in enumerate(aux_step):
                aux[b][j].append(a[rows])
    for b, seq in enumerate(seqs):
        if done[b] != len(seq):
            raise ValueError(f"chunks of sequence {b} cover {done[b]} of {len(seq)} tokens")
    return ([torch.cat(x) for x in logits],
            [[torch.cat(x) for x in per_seq] for per_seq in aux])


def assert_logits_close(ours: torch.Tensor, ref: torch.Tensor, rel: float = 1e-4) -> None:
    """fp32 agreement: max abs error within rel * (largest reference magnitude)."""
    tol = rel * max(1.0, ref.abs().max().item())
    err = (ours - ref).abs().max().item()
    assert err <= tol, f"max abs diff {err:.3g} > {tol:.3g}"
