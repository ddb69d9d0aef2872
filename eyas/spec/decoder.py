"""One speculative engine step: schedule -> draft -> one target pass -> accept -> roll back.

Shapes for a step with S decoding sequences drafting K tokens each, plus prefill chunks:
  target input  T = sum(prefill chunk lengths) + S * (1 + K) flat tokens
  aux features  3 x [T, H] -> the kept rows [n, 3H] (the drafter fuses them when it extends)
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
from eyas.spec.controller import SpecController
from eyas.spec.proposer import Draft, Proposer
from eyas.spec.tree import TreeDraft, move_kv
from eyas.workers.input_batch import SeqSpan
from eyas.workers.model_runner import ModelRunner
from eyas.workers.target_step import StepItem, StepOutcome, kept_aux_rows, run_target_step

if TYPE_CHECKING:
    from eyas.engine import LLMEngine


class DrafterLost(RuntimeError):
    """The proposer can no longer draft (its worker died): the engine goes on without drafts."""


class LocalTarget:
    """The target in this process: run the step, move tree KV at once, hand the drafter the aux
    rows of the positions each sequence keeps."""

    def __init__(self, runner: ModelRunner, kv_caches, capture_features: bool = False):
        self.runner = runner
        self.kv_caches = kv_caches
        self.capture_features = capture_features  # False: the proposer needs no target features

    def execute(self, items: list[StepItem]) -> StepOutcome:
        out, result = run_target_step(self.runner, items)
        if out.move_src:
            dev = self.runner.device
            move_kv(self.kv_caches, torch.tensor(out.move_src, device=dev), torch.tensor(out.move_dst, device=dev))
        if self.capture_features:
            # gathered once for all items, split into views per item; the proposer fuses them
            # (fc) when it extends
            picked = kept_aux_rows(out, result.aux)  # [n, n_aux * Ht]
            out.features = list(picked.split([len(rows) for rows in out.feature_rows]))
        return out


class SpecDecoder:
    def __init__(self, engine: "LLMEngine", proposer: Proposer, num_steps: int,
                 capture_features: bool = False, controller: Optional[SpecController] = None,
                 target=None):
        self.engine = engine
        self.proposer = proposer
        self.num_steps = num_steps  # max draft tokens verified per sequence (the KV lookahead)
        self.controller = controller  # picks the draft length per step; None: always num_steps
        # runs the target's half of a step: execute(items) -> StepOutcome (in process by default)
        self.target = target or LocalTarget(engine.runner, engine.kv_caches, capture_features)
        self.drafting = num_steps > 0  # False once the proposer is lost: plain decoding from then on
        self.probe_turn = 0  # few-sequence probes so far (each takes the next sequences in turn)
        if controller is not None:
            proposer.time_extend = True  # catch-up time is taken out of the step's time sample

    def step(self) -> list[RequestOutput]:
        eng = self.engine
        start = time.perf_counter()
        key = self.num_steps if self.drafting else 0
        tree = None  # None: the proposer's own shape (a fixed policy)
        if self.controller is not None and self.drafting:
            # a candidate key: 0 plain, else |key| draft tokens, a tree or a chain (controller.py)
            self._report_backlog()
            key = self.controller.choose(len(eng.scheduler.running))
            tree = self.controller.is_tree(key)
        k = abs(key)
        plan = eng.scheduler.schedule(lookahead=k)
        for seq in plan.preempted:
            self.proposer.drop(seq)
        if not plan:
            return []
        items = plan.items
        # keys the step attends over, for the controller (it compares step times at the same context)
        context = sum(it.seq.num_computed_tokens for it in items) if self.controller is not None else 0
        spec_idx = [i for i, it in enumerate(items) if it.num_draft_tokens > 0]
        few = self.controller.draft_seqs if self.controller is not None else None  # an acceptance probe
        if few is not None:
            spec_idx = self._few_drafters(items, spec_idx, few)
        drafts: dict[int, Draft] = {}
        # a draft after plain (k = 0) steps first catches up on their positions: not a typical step
        catch_up = max((self.proposer.backlog(items[i].seq) for i in spec_idx), default=0)
        self.proposer.last_extend = None
        if spec_idx:
            try:
                proposed = self.proposer.propose([items[i].seq for i in spec_idx],
                                                 [items[i].num_draft_tokens for i in spec_idx], tree=tree)
                drafts = dict(zip(spec_idx, proposed))
            except DrafterLost:  # verify the real tokens only; the unused lookahead is truncated
                self.drafting = False

        step_items = []
        for i, it in enumerate(items):
            seq, c = it.seq, it.seq.num_computed_tokens
            draft = drafts.get(i)
            tokens = seq.token_ids[c:c + it.num_new_tokens] + (draft.tokens if draft is not None else [])
            tree = draft.mask if isinstance(draft, TreeDraft) else None  # [n+1, n+1]
            step_items.append(StepItem(SeqSpan(tokens, c, seq.block_table, tree_mask=tree), it.num_new_tokens,
                                       it.sample, seq.params, seq.generator, draft, seq.request_id))
        out = self.target.execute(step_items)
        probe_only = set()  # drafts verified for acceptance only
        # (in process only: a drafter worker already got the target's rows of every accepted token)
        if few is not None and isinstance(self.target, LocalTarget):
            probe_only = self._first_tokens_only(out, drafts)

        eng.num_steps += 1
        outputs = []
        for i, it in enumerate(items):
            seq, c = it.seq, it.seq.num_computed_tokens
            seq.num_computed_tokens = c + out.num_valid[i]
            self.proposer.observe(seq, c, out.features[i] if out.features is not None else None,
                                  out.num_valid[i])
            counted = i in drafts and i not in probe_only
            if out.tokens[i] is not None:
                seq.target_steps += 1
                if counted:
                    seq.spec_drafted += len(drafts[i].tokens)
                res = eng.append_tokens(seq, out.tokens[i], out.logprobs[i])
                if counted:  # count only drafts that made it into the output
                    seq.spec_accepted += min(out.accepted[i], len(res.token_ids_delta))
                    if res.spec is not None:
                        res.spec = eng._spec_stats(seq)
                outputs.append(res)
            if seq.is_finished:
                self.proposer.drop(seq)
                continue
            eng.allocator.truncate(seq, len(seq))
            eng.allocator.commit(seq, limit=self.proposer.valid_prefix(seq) if self.drafting else None)
        if self.controller is not None and self.drafting:
            self._record(items, drafts, out, key, start, catch_up, context)
            self._extend_prompts(items, drafts)
        return outputs

    def _report_backlog(self) -> None:
        """Tell the controller what drafting now would first catch up on, and the mean tokens
        the decoding sequences may still generate (sequences still prefilling are caught up
        when their prompt is done)."""
        eng = self.engine
        decoding = [s for s in eng.scheduler.running if s.num_computed_tokens >= s.num_prompt_tokens]
        left = [min(s.params.max_tokens - s.num_output_tokens, eng.max_model_len - len(s)) for s in decoding]
        self.controller.set_backlog(sum(self.proposer.backlog(s) for s in decoding),
                                    sum(left) / len(left) if left else None)

    def _extend_prompts(self, items, drafts: dict) -> None:
        """Extend the drafter now over prompts that finished prefilling in this step. The prefix
        cache takes a block only once the drafter's KV of it is computed too (the commit limit is
        the proposer's valid prefix), so where the controller picks plain steps for long, prompt
        blocks (a shared system prompt) would otherwise never be cached: on CPU at c=16-64 the
        plain engine's prefix hits were worth more than the drafter pass over prompts costs."""
        seqs = [it.seq for i, it in enumerate(items)
                if it.sample and it.num_new_tokens > 1 and i not in drafts and not it.seq.is_finished]
        if not seqs:
            return
        self.proposer.last_extend = None
        self.proposer.catch_up(seqs)
        if self.proposer.last_extend is not None:  # a prompt's extend: the controller's rows/s
            self.controller.record_extend(*self.proposer.last_extend)
        for seq in seqs:
            self.engine.allocator.commit(seq, limit=self.proposer.valid_prefix(seq))

    @staticmethod
    def _first_tokens_only(out: StepOutcome, drafts: dict) -> set[int]:
        """A few-sequence probe measures acceptance only: each probed sequence keeps just the
        step's first token, which is what a plain step would give (the first token of a verified
        draft is distributed as the target's next token, greedy or sampled, accepted or not), and
        its later accepted tokens' KV and features are dropped. So the probed sequences stay in
        step with the others: a closed loop of equal requests would otherwise fall out of lockstep
        and prefill its replacements one by one, which costs the CPU more than one batched
        prefill. Returns the probed item indices."""
        for i in drafts:
            if out.tokens[i] is None:
                continue
            out.tokens[i] = out.tokens[i][:1]
            if out.logprobs[i] is not None:
                out.logprobs[i] = out.logprobs[i][:1]
            out.num_valid[i] -= out.accepted[i]
            out.feature_rows[i] = out.feature_rows[i][:out.num_valid[i]]
            if out.features is not None:
                out.features[i] = out.features[i][:out.num_valid[i]]
        return set(drafts)

    def _few_drafters(self, items, spec_idx: list[int], n: int) -> list[int]:
        """Keep drafts for n of the sequences of spec_idx, taken in turn: the k-th probe takes
        positions k*n .. k*n + n-1 (mod the batch), so successive probes walk through the batch
        and their acceptance stands for all of it (the least backlogged, taken before, were
        the same few requests probe after probe; see controller.py). The others verify no
        drafts (their lookahead is truncated)."""
        start = self.probe_turn * n
        self.probe_turn += 1
        keep = {spec_idx[(start + j) % len(spec_idx)] for j in range(min(n, len(spec_idx)))}
        for i in spec_idx:
            if i not in keep:
                items[i].num_draft_tokens = 0
        return [i for i in spec_idx if i in keep]

    def _record(self, items, drafts: dict, out: StepOutcome, key: int, start: float, catch_up: int,
                context: int) -> None:
        """Feed the controller this step's acceptance, its time (every step, for the exploration
        budget) and, for pure decode steps where every sequence drafted |key|, its time as a sample
        of t(batch, key): with the drafter's catch-up over positions of earlier plain steps taken
        out (scaled to the rows a step that drafts every time extends over), so that a probe
        after plain steps measures a typical drafting step."""
        for i, draft in drafts.items():
            ranks, path = getattr(draft, "ranks", None), out.paths.get(i)
            self.controller.record_accept(len(draft.tokens), out.accepted[i],
                                          [ranks[n] for n in path] if ranks and path is not None else None,
                                          tree=isinstance(draft, TreeDraft))
        if self.engine.device.type == "cuda":
            torch.cuda.synchronize(self.engine.device)
        seconds = time.perf_counter() - start
        extend = self.proposer.last_extend
        if extend is not None:
            self.controller.record_extend(*extend)
        self.controller.record_step(seconds)
        if not (all(it.num_new_tokens == 1 for it in items) and all(it.num_draft_tokens == abs(key) for it in items)):
            return
        if extend is not None and drafts:
            ext_s, rows = extend
            typical = len(drafts) * self.controller.expected_tokens(key)  # rows of a steady drafting step
            if rows > typical:
                seconds -= ext_s * (1 - typical / rows)
        elif catch_up > self.num_steps + 1:  # catch-up not measured: not a typical step
            return
        self.controller.record_time(len(items), key, seconds, context)
