"""Runs the target model over a step's spans through the paged KV cache."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence as Seq

import torch

from eyas.workers.graphs import GraphRunner, uniform_q
from eyas.workers.input_batch import ForwardInputs, SeqSpan, build_forward_inputs


@dataclass
class ForwardResult:
    hidden: torch.Tensor  # [T, H] final-normed hidden states
    aux: list[torch.Tensor]  # per aux layer: [T, H] residual stream entering that layer
    inputs: ForwardInputs


class ModelRunner:
    def __init__(self, model: torch.nn.Module, kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
                 block_size: int, device: torch.device, aux_layer_ids: tuple[int, ...] = ()):
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.device = device
        self.aux_layer_ids = tuple(aux_layer_ids)
        self.graphs: Optional[GraphRunner] = None  # compiled decode/verify steps (see enable_graphs)

    def enable_graphs(self, pad_slot: int, max_batch: int, max_q: int = 1,
                      backend: Optional[str] = None) -> GraphRunner:
        """Run uniform-q steps (decode, verify) through compiled graphs; pad_slot must be a cache
        slot that no sequence owns."""
        self.graphs = GraphRunner(self.model.forward, self.kv_caches, self.device, pad_slot, max_batch,
                                  max_q=max_q, backend=backend)
        return self.graphs

    @torch.inference_mode()
    def forward(self, spans: Seq[SeqSpan]) -> ForwardResult:
        inputs = build_forward_inputs(spans, self.block_size, self.device)
        if self.graphs is not None and self.graphs.can_run(spans):
            hidden, aux = self.graphs.run(inputs, uniform_q(spans), self.kv_caches, self.aux_layer_ids)
        else:
            hidden, aux = self.model(inputs.input_ids, inputs.positions, inputs.attn, self.kv_caches,
                                     self.aux_layer_ids)
        return ForwardResult(hidden, aux, inputs)

    def warm_up(self, q_sizes: Seq[int], progress: bool = False, max_len: Optional[int] = None) -> int:
        """Compile (capture) every batch bucket x q in q_sizes x key bucket now (the key buckets
        of BucketedGraphs.warm_key_lengths); returns graphs. The spans read and write the pad
        block only."""
        from tqdm import tqdm

        graphs = self.graphs
        pad_block = graphs.pad_slot // self.block_size
        shapes = [(b, q, kv) for kv in graphs.warm_key_lengths(max_len) for b in graphs.buckets
                  for q in q_sizes if q <= kv]
        for b, q, kv in tqdm(shapes, desc="compile", disable=not progress, leave=False):
            blocks = [pad_block] * -(-kv // self.block_size)  # every key slot in the pad block
            self.forward([SeqSpan([0] * q, kv - q, blocks)] * b)
        return len(shapes)

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """[T, H] hidden, [S] row indices -> [S, V] float32 logits."""
        return self.model.compute_logits(hidden.index_select(0, rows)).float()
