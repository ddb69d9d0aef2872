"""One speculative engine step: schedule -> draft -> one target pass -> accept -> roll back.

Shapes for a step with S decoding sequences drafting K tokens each, plus prefill chunks:
  target input  T = sum(prefill chunk lengths) + S * (1 + K) flat tokens
  aux features  3 x [T, H] -> fc -> [T, H]     (kept for the drafter's next extend)
  verify logits [S, K+1, V]: row j scores the token after (last, d_1..d_j)
The scheduler reserved 1 + K slots per decoding sequence; after accepting a of the K drafts,
the sequence keeps num_computed + 1 + a tokens of KV and `truncate` returns emptied blocks.

Trees (topk > 1, K = n <= draft_tokens nodes): the target sees [x_last, node_1..node_n] with the
tree's ancestor mask (positions L-1+depth, KV slots L-1..L-1+n). After accepting the path
i_1..i_a (node indices), the target KV of node i_j moves from slot position L+i_j to L-1+j in
every layer, and the features of rows [root, i_1+1, .., i_a+1] go to the drafter.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Optional

import torch

from eyas.core import RequestOutput
from eyas.layers.sampler import sample
from eyas.spec.controller import SpecController
from eyas.spec.proposer import Draft, Proposer
from eyas.spec.tree import TreeDraft, move_kv
from eyas.spec.verify import accept_chain, accept_tree
from eyas.workers.input_batch import SeqSpan, slots_for

if TYPE_CHECKING:
    from eyas.engine import LLMEngine


class SpecDecoder:
    def __init__(self, engine: "LLMEngine", proposer: Proposer, num_steps: int,
                 fuse_features=None, controller: Optional[SpecController] = None):
        self.engine = engine
        self.proposer = proposer
        self.num_steps = num_steps  # max draft tokens verified per sequence (the KV lookahead)
        self.fuse_features = fuse_features  # aux list -> [T, H], or None (proposer needs none)
        self.controller = controller  # picks the draft length per step; None: always num_steps

    def step(self) -> list[RequestOutput]:
        eng = self.engine
        start = time.perf_counter()
        k = self.num_steps
        if self.controller is not None:
            k = self.controller.choose(len(eng.scheduler.running))
        plan = eng.scheduler.schedule(lookahead=k)
        for seq in plan.preempted:
            self.proposer.drop(seq)
        if not plan:
            return []
        items = plan.items
        spec_idx = [i for i, it in enumerate(items) if it.num_draft_tokens > 0]
        drafts: dict[int, Draft] = {}
        # a draft after plain (k = 0) steps first catches up on their positions: not a typical step
        catch_up = max((self.proposer.backlog(items[i].seq) for i in spec_idx), default=0)
        if spec_idx:
            proposed = self.proposer.propose([items[i].seq for i in spec_idx],
                                             [items[i].num_draft_tokens for i in spec_idx])
            drafts = dict(zip(spec_idx, proposed))

        spans = []
        for i, it in enumerate(items):
            seq, c = it.seq, it.seq.num_computed_tokens
            tokens = seq.token_ids[c:c + it.num_new_tokens] + (drafts[i].tokens if i in drafts else [])
            tree = drafts[i].mask if isinstance(drafts.get(i), TreeDraft) else None  # [n+1, n+1]
            spans.append(SeqSpan(tokens, c, seq.block_table, tree_mask=tree))
        result = eng.runner.forward(spans)
        features = self.fuse_features(result.aux) if self.fuse_features else None  # [T, H]
        starts = result.inputs.query_start

        # Target logits: the last row of plain items, rows start..start+K of drafted items.
        rows, row_of = [], {}
        for i, it in enumerate(items):
            if not it.sample:
                continue
            k = len(drafts[i].tokens) if i in drafts else 0
            row_of[i] = (len(rows), k)
            rows.extend(range(starts[i + 1] - 1 - k, starts[i + 1]))
        logits = eng.runner.logits(result.hidden, torch.as_tensor(rows, device=eng.device)) if rows else None

        plain = [i for i in row_of if i not in drafts]
        plain_tokens = {}
        if plain:
            seqs = [items[i].seq for i in plain]
            sel = torch.as_tensor([row_of[i][0] for i in plain], device=eng.device)
            out = sample(logits.index_select(0, sel), [s.params for s in seqs], [s.generator for s in seqs])
            for j, i in enumerate(plain):
                plain_tokens[i] = ([int(out.token_ids[j])], [out.logprobs[j]] if out.logprobs else None)

        # Accept drafts. Tree paths: move the accepted nodes' target KV to contiguous slots.
        accepted, paths, src, dst = {}, {}, [], []
        for i in drafts:
            first, k = row_of[i]
            seq = items[i].seq
            if isinstance(drafts[i], TreeDraft):
                path, accepted[i] = accept_tree(logits[first:first + k + 1], drafts[i], seq.params,
                                                seq.generator)
                root = seq.num_computed_tokens + items[i].num_new_tokens - 1  # position of x_last
                slots = slots_for(seq.block_table, root + 1, root + 1 + k, eng.allocator.block_size)
                moved = [j for j, node in enumerate(path) if node != j]
                src += [slots[path[j]] for j in moved]
                dst += [slots[j] for j in moved]
                paths[i] = path
            else:
                accepted[i] = accept_chain(logits[first:first + k + 1], drafts[i].tokens, drafts[i].q,
                                           seq.params, seq.generator)
        if src:
            move_kv(eng.kv_caches, torch.stack(src).to(eng.device), torch.stack(dst).to(eng.device))

        eng.num_steps += 1
        outputs = []
        for i, it in enumerate(items):
            seq, c = it.seq, it.seq.num_computed_tokens
            if i in drafts:
                k = len(drafts[i].tokens)
                a = len(accepted[i]) - 1  # drafts accepted; the last token is the correction/bonus
                seq.spec_drafted += k
                new_tokens, lps = accepted[i], None
                n_valid = it.num_new_tokens + a
            else:
                new_tokens, lps = plain_tokens.get(i, (None, None))
                n_valid = it.num_new_tokens
            seq.num_computed_tokens = c + n_valid
            if features is not None and i in paths:  # rows of the real tokens + accepted nodes
                rows = list(range(starts[i], starts[i] + it.num_new_tokens))
                rows += [starts[i] + it.num_new_tokens + node for node in paths[i]]
                self.proposer.observe(seq, c, features[torch.as_tensor(rows, device=eng.device)])
            elif features is not None:
                self.proposer.observe(seq, c, features[starts[i]:starts[i] + n_valid])
            else:
                self.proposer.observe(seq, c, None)
            if new_tokens is not None:
                seq.target_steps += 1
                out = eng.append_tokens(seq, new_tokens, lps)
                if i in drafts:  # count only drafts that made it into the output
                    seq.spec_accepted += min(a, len(out.token_ids_delta))
                    if out.spec is not None:
                        out.spec = eng._spec_stats(seq)
                outputs.append(out)
            if seq.is_finished:
                self.proposer.drop(seq)
                continue
            eng.allocator.truncate(seq, len(seq))
            eng.allocator.commit(seq, limit=self.proposer.valid_prefix(seq))
        if self.controller is not None:
            self._record(items, drafts, accepted, k, start, timed=catch_up <= self.num_steps + 1)
        return outputs

    def _record(self, items, drafts: dict, accepted: dict, k: int, start: float, timed: bool) -> None:
        """Feed the controller this step's acceptance and, for typical pure decode steps, its time."""
        for i in drafts:
            self.controller.record_accept(len(drafts[i].tokens), len(accepted[i]) - 1)
        if timed and all(it.num_new_tokens == 1 for it in items) and all(
                it.num_draft_tokens == k for it in items):
            if self.engine.device.type == "cuda":
                torch.cuda.synchronize(self.engine.device)
            self.controller.record_time(len(items), k, time.perf_counter() - start)
