"""The target's half of a step: one forward pass over the scheduled spans, then sampling and
draft acceptance. The in-process engine (spec/decoder.py) and rank 0 of the Ray target workers
(executor/worker.py) run this same function; only where its results go differs.

Per item (one sequence in the step) with n real tokens and k drafts appended:
  flat rows       starts[i] .. starts[i] + n + k           of the forward's [T, H] outputs
  logits rows     the last k + 1 of them (only for items that sample)
  num_valid       n + a  positions whose KV is now final (a = drafts accepted)
  feature_rows    the flat rows of those positions (a tree's accepted nodes are not contiguous)
Tree acceptance leaves KV moves (src -> dst flat slots) that bring the accepted nodes' KV to
contiguous slots; they are returned, not applied, so the caller decides when every rank does them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

import torch

from eyas.core import SamplingParams
from eyas.layers.sampler import sample
from eyas.spec.proposer import Draft
from eyas.spec.tree import TreeDraft
from eyas.spec.verify import accept_chain, accept_tree
from eyas.workers.input_batch import SeqSpan, slots_for
from eyas.workers.model_runner import ForwardResult, ModelRunner


@dataclass
class StepItem:
    span: SeqSpan  # token_ids = the n real tokens, then the k drafts (tree: its nodes)
    num_new: int  # n
    sample: bool  # the span reaches the sequence's end: pick the next token(s)
    params: SamplingParams
    generator: Optional[torch.Generator] = None
    draft: Optional[Union[Draft, TreeDraft]] = None
    request_id: str = ""


@dataclass
class StepOutcome:
    tokens: list[Optional[list[int]]]  # per item: tokens to append (None: the item did not sample)
    logprobs: list[Optional[list]]  # per item: per appended token, or None
    num_valid: list[int]  # per item: n + drafts accepted
    accepted: list[int]  # per item: drafts accepted
    feature_rows: list[list[int]]  # per item: flat rows of its num_valid positions
    move_src: list[int] = field(default_factory=list)  # flat KV slots to move (tree paths)
    move_dst: list[int] = field(default_factory=list)
    paths: dict[int, list[int]] = field(default_factory=dict)  # item -> accepted tree nodes
    features: Optional[list[torch.Tensor]] = None  # per item [num_valid, H] (in-process drafter)


def run_target_step(runner: ModelRunner, items: list[StepItem],
                    decide: bool = True) -> tuple[StepOutcome, ForwardResult]:
    """Forward, then (decide=True) sample and accept. Tensor-parallel ranks other than 0 pass
    decide=False: they still compute the logits rows, whose vocab gather is a collective."""
    result = runner.forward([it.span for it in items])
    starts = result.inputs.query_start
    rows, first = [], {}  # logits rows; item -> its first row
    for i, it in enumerate(items):
        if it.sample:
            k = len(it.draft.tokens) if it.draft is not None else 0
            first[i] = len(rows)
            rows.extend(range(starts[i + 1] - 1 - k, starts[i + 1]))
    logits = None
    if rows:
        logits = runner.logits(result.hidden, torch.as_tensor(rows, device=runner.device))  # [R, V]

    n_items = len(items)
    out = StepOutcome([None] * n_items, [None] * n_items, [it.num_new for it in items], [0] * n_items,
                      [list(range(starts[i], starts[i] + it.num_new)) for i, it in enumerate(items)])
    if not decide:
        return out, result
    plain = [i for i in first if items[i].draft is None]
    if plain:
        sel = torch.as_tensor([first[i] for i in plain], device=runner.device)
        picked = sample(logits.index_select(0, sel), [items[i].params for i in plain],
                        [items[i].generator for i in plain])
        ids = picked.token_ids.tolist()  # one device -> host copy
        for j, i in enumerate(plain):
            out.tokens[i] = [ids[j]]
            out.logprobs[i] = [picked.logprobs[j]] if picked.logprobs else None
    for i in first:
        it = items[i]
        if it.draft is None:
            continue
        k = len(it.draft.tokens)
        block = logits[first[i]:first[i] + k + 1]  # [k+1, V]
        base = starts[i] + it.num_new  # flat row of the first draft
        if isinstance(it.draft, TreeDraft):
            path, tokens = accept_tree(block, it.draft, it.params, it.generator)
            root = it.span.start + it.num_new - 1  # position of the last real token
            slots = slots_for(it.span.block_table, root + 1, root + 1 + k, runner.block_size)
            for j, node in enumerate(path):
                if node != j:
                    out.move_src.append(int(slots[node]))
                    out.move_dst.append(int(slots[j]))
            out.feature_rows[i] += [base + node for node in path]
            out.paths[i] = list(path)
        else:
            tokens = accept_chain(block, it.draft.tokens, it.draft.q, it.params, it.generator)
            out.feature_rows[i] += list(range(base, base + len(tokens) - 1))
        out.tokens[i] = tokens
        out.accepted[i] = len(tokens) - 1  # the last token is the correction or bonus
        out.num_valid[i] += out.accepted[i]
    return out, result


def kept_aux_rows(out: StepOutcome, aux: list[torch.Tensor]) -> torch.Tensor:
    """The aux hidden states (each [T, H]) of every item's feature rows, side by side and in item
    order: [sum num_valid, n_aux * H], what the drafter keeps (gathered before the concat, so a
    verify step copies only its accepted rows)."""
    flat = torch.tensor([r for rows in out.feature_rows for r in rows], dtype=torch.long)
    flat = flat.to(aux[0].device)
    return torch.cat([a.index_select(0, flat) for a in aux], dim=-1)
