"""Runs the target model over a step's spans through the paged KV cache."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence as Seq

import torch

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

    @torch.inference_mode()
    def forward(self, spans: Seq[SeqSpan]) -> ForwardResult:
        inputs = build_forward_inputs(spans, self.block_size, self.device)
        hidden, aux = self.model(inputs.input_ids, inputs.positions, inputs.attn, self.kv_caches,
                                 self.aux_layer_ids)
        return ForwardResult(hidden, aux, inputs)

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """[T, H] hidden, [S] row indices -> [S, V] float32 logits."""
        return self.model.compute_logits(hidden.index_select(0, rows)).float()
