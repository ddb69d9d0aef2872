"""Draft trees (topk > 1): best-first search over the drafter's outputs, and the tree it yields.

A tree for one sequence of length L has the root = the last real token x_{L-1} (target position
L-1) and n <= N = draft_tokens nodes; a node at depth d stands for target position L-1+d.

Search (EAGLE-2/3), depth = steps, branching = topk (k), per sequence:
  depth 1   the root's k children, from the drafter's extend output (its last row)
  depth d+1 expand the k best depth-d candidates (one drafter row each) -> k children each
  select    the n best of all candidates (k + (steps-1) k^2 of them); parents rank before
            children and earlier siblings before later ones, so the selection is ancestor-closed;
            output order = (depth, generation order): parents precede children and siblings
            keep their sampling order.
Ranking key of a candidate c, the j-th child of u:
  greedy    key(c) = score(c) = score(u) + log q_u(c)   (q = softmax of the raw draft logits;
            children are the top-k of q_u, in descending order)
  sampled   children c_1..c_k are k draws WITHOUT replacement from q_u (the request's processed
            draft distribution); score(c) = score(u) + log q_u(c) as above, but the key is
            key(c_j) = score(u) + log(1 - sum_{i<j} q_u(c_i)),
            the q-mass of "the path through u continues with a token not yet drawn". It does not
            depend on c_j itself. This matters for losslessness: recursive rejection sampling
            (verify.accept_tree) needs each node's children to be the first m draws of a
            without-replacement sequence, with the decision to keep draw j made without looking
            at draw j. Ranking by score(c_j) would keep high-q draws and drop low-q ones, so the
            kept children would no longer be distributed as q (a bias the verifier cannot see).
            With this key, revealing the selected nodes in rank order is a sequential process in
            which each node's inclusion depends only on nodes revealed before it: the set of
            candidates ranked above c_j (and whether they exist, i.e. whether their parents were
            expanded) does not depend on c_j's identity, because everything c_j influences (its
            subtree, later siblings and their subtrees) has a key <= key(c_j).
  Both keys are clamped to <= the parent's key and the previous sibling's key (they already are,
  up to rounding), and ties go to the shallower, then earlier-generated candidate.
  A candidate with key -inf (a sampled node whose q-support is exhausted) never enters the tree.
Expansion skips candidates already ranked below the n-th (they and their subtrees can never be
selected), which saves drafter rows and does not change the result.

Drafter KV for tree nodes (Eagle3Proposer): the target reserved slots for positions
[L-1, L-1+N] only, while the search keeps up to (steps-1) k expanded nodes in flight. So tree
steps never write paged slots: the drafter's cache tensor has extra *scratch* rows past the
allocator's blocks ([num_blocks*B + scratch, Hkv, D] in the block-size-1 view). Sequence b of a
propose call owns scratch rows base_b + [0, (steps-1) k); the node expanded r-th at depth d keeps
its K/V at base_b + (d-1) k + r. A tree step at depth d runs the unchanged paged drafter over
  queries  the <= k frontier nodes of each sequence      [S, k] rows, position L-2+d
  keys     paged prefix [0, L-1) (final after the extend) ++ scratch rows [0, d k)
  mask     prefix all visible; scratch: the node's expanded ancestors and itself
(see input_batch.build_scratch_tree_batch). The scratch is reused by the next propose call.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence as Seq

import torch

from eyas.core import SamplingParams
from eyas.layers.sampler import processed_probs, sample_from_probs


@dataclass
class TreeDraft:
    """One sequence's draft tree. Node i (0-based) sits at tree position i + 1; position 0 is
    the root (the last real token)."""

    tokens: list[int]  # [n] target ids, parents before children, siblings in sampling order
    parents: list[int]  # [n] parent node index, -1 = the root
    depths: list[int]  # [n] 1..steps
    mask: torch.Tensor  # [n+1, n+1] bool: row r sees column c iff c is r or an ancestor of r
    q: Optional[torch.Tensor] = None  # [n+1, Vd] drafter probs at each tree position (sampled
    #                                   requests; rows of positions without children are zero)
    draft_to_target: Optional[torch.Tensor] = None  # [Vd] target id of each q column (None: same)
    # [n] each node's rank in the search (0 = best key): the best m nodes form the tree a budget
    # of m would have drafted (the selection is ancestor-closed), which the adaptive controller
    # uses to learn acceptance for smaller trees; None when unknown (rebuilt from a message)
    ranks: Optional[list[int]] = None

    def children(self) -> list[list[int]]:
        """Child node indices of each tree position 0..n, in sampling order."""
        kids: list[list[int]] = [[] for _ in range(len(self.tokens) + 1)]
        for i, p in enumerate(self.parents):
            kids[p + 1].append(i)
        return kids

    def target_q(self, position: int, vocab_size: int) -> torch.Tensor:
        """q of tree position `position` over the target vocab: [V]."""
        row = self.q[position]
        if self.draft_to_target is None:
            return row.clone()
        return row.new_zeros(vocab_size).index_copy_(0, self.draft_to_target, row)


def _sampled_key(log_mass_before: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Ranking key (less the parent's score) of sampled children [s, k]: the log of the q-mass
    left before each draw, which does not depend on the draw itself (see the module docstring;
    a test swaps in log_q to show that ranking by the draw's own probability is biased)."""
    return log_mass_before


def make_tree_draft(tokens: Seq[int], parents: Seq[int], q: Optional[torch.Tensor] = None,
                    draft_to_target: Optional[torch.Tensor] = None) -> TreeDraft:
    """Build a TreeDraft from node tokens [n] and parents [n] (-1 = root; parents first)."""
    n = len(tokens)
    mask = torch.zeros(n + 1, n + 1, dtype=torch.bool)  # [n+1, n+1], 0 = root
    mask[0, 0] = True
    depths = []
    for i, p in enumerate(parents):
        if not -1 <= p < i:
            raise ValueError(f"node {i}: parent {p} must be -1 or an earlier node")
        mask[i + 1] = mask[p + 1]
        mask[i + 1, i + 1] = True
        depths.append(depths[p] + 1 if p >= 0 else 1)
    return TreeDraft(list(tokens), list(parents), depths, mask, q, draft_to_target)


@dataclass
class _Node:
    token: int  # target id
    parent: int  # node index, -1 = root
    depth: int
    score: float  # cumulative log q of the path (drafter's view)
    key: float  # ranking key (see module docstring)
    src_row: int  # row, in the expand() call that made this node, of its parent's drafter output
    slot: int = -1  # scratch index (d-1)*k + r once expanded as the r-th node of its depth d


@dataclass
class _Tree:
    budget: int
    nodes: list[_Node] = field(default_factory=list)
    q: dict[int, tuple[torch.Tensor, int]] = field(default_factory=dict)  # node (-1 root) -> (probs, row)

    def ranked(self) -> list[int]:
        live = [i for i, nd in enumerate(self.nodes) if nd.key > -math.inf]
        return sorted(live, key=lambda i: (-self.nodes[i].key, self.nodes[i].depth, i))


class TreeSearch:
    """Best-first tree search for a batch of sequences; the caller runs the drafter.

        search = TreeSearch(steps, topk, budgets, params, generators)
        search.expand([(b, -1) for b in range(S)], root_logits)      # [S, Vd]
        for d in range(1, steps):
            front = search.frontier(d)              # [(b, node)], <= k per sequence
            if not front: break
            search.expand(front, drafter_logits_of(front))           # [len(front), Vd]
        drafts = search.result()
    """

    def __init__(self, steps: int, topk: int, budgets: Seq[int], params: Seq[SamplingParams],
                 generators: Seq[Optional[torch.Generator]],
                 draft_to_target: Optional[torch.Tensor] = None):
        if not len(budgets) == len(params) == len(generators):
            raise ValueError("budgets, params and generators must have one entry per sequence")
        self.steps, self.topk = steps, topk
        self.params, self.generators = list(params), list(generators)
        self.draft_to_target = draft_to_target
        self.trees = [_Tree(int(n)) for n in budgets]

    # ------------------------------------------------------------------ queries
    def node(self, b: int, i: int) -> _Node:
        return self.trees[b].nodes[i]

    def ancestor_slots(self, b: int, i: int) -> list[int]:
        """Scratch indices of node i and its ancestors (all expanded), root excluded."""
        out, nodes = [], self.trees[b].nodes
        while i >= 0:
            out.append(nodes[i].slot)
            i = nodes[i].parent
        return out

    # ---------------------------------------------------------------- expansion
    def _to_target(self, draft_ids: torch.Tensor) -> torch.Tensor:
        return draft_ids if self.draft_to_target is None else self.draft_to_target[draft_ids]

    @torch.inference_mode()
    def expand(self, nodes: Seq[tuple[int, int]], logits: torch.Tensor) -> None:
        """Add up to k children to each (sequence b, node i; -1 = root) from logits [R, Vd]."""
        k = self.topk
        kids: list[list[tuple[int, float, float]]] = [[] for _ in nodes]  # (target id, log q, raw key)
        greedy = [r for r, (b, _) in enumerate(nodes) if self.params[b].greedy]
        sampled = [r for r, (b, _) in enumerate(nodes) if not self.params[b].greedy]
        if greedy:
            logq = logits[greedy].float().log_softmax(dim=-1)  # [g, Vd]
            vals, ids = logq.topk(min(k, logq.shape[1]), dim=-1)  # [g, k] descending
            tok = self._to_target(ids).tolist()
            for row, r in enumerate(greedy):
                kids[r] = [(t, v, v) for t, v in zip(tok[row], vals[row].tolist())]
        if sampled:
            q = processed_probs(logits[sampled], [self.params[nodes[r][0]] for r in sampled])  # [s, Vd]
            gens = [self.generators[nodes[r][0]] for r in sampled]
            rest = q.clone()  # q with the tokens drawn so far removed (not renormalised)
            masses, picks = [], []
            for _ in range(k):  # k draws without replacement, in order
                masses.append(rest.sum(dim=-1))  # [s] mass left before this draw
                pick = sample_from_probs(rest, gens)  # [s]
                picks.append(pick)
                rest.scatter_(1, pick[:, None], 0.0)
            mass = torch.stack(masses, 1)  # [s, k]
            pick = torch.stack(picks, 1)  # [s, k]
            logq = q.gather(1, pick).log()  # [s, k]
            raw = _sampled_key(mass.log(), logq).tolist()
            logq, left = logq.tolist(), mass.tolist()
            tok = self._to_target(pick).tolist()
            for row, r in enumerate(sampled):
                b, i = nodes[r]
                self.trees[b].q[i] = (q, row)
                for j in range(k):
                    if left[row][j] <= 0:
                        break  # support exhausted (no mass left): no further children
                    kids[r].append((tok[row][j], logq[row][j], raw[row][j]))
        for r, (b, i) in enumerate(nodes):
            tree = self.trees[b]
            parent = tree.nodes[i] if i >= 0 else None
            score0 = parent.score if parent else 0.0
            key = parent.key if parent else 0.0
            depth = parent.depth + 1 if parent else 1
            for t, lq, raw_key in kids[r]:
                key = min(key, score0 + raw_key)  # <= parent and previous sibling
                if key == -math.inf:
                    break
                tree.nodes.append(_Node(t, i, depth, score0 + lq, key, r))

    def frontier(self, depth: int) -> list[tuple[int, int]]:
        """The depth-`depth` nodes to expand next: per sequence the k best that still rank within
        its budget, in rank order. Assigns their scratch slots."""
        out = []
        for b, tree in enumerate(self.trees):
            if depth >= min(self.steps, tree.budget):
                continue
            best = [i for i in tree.ranked()[:tree.budget] if tree.nodes[i].depth == depth]
            for r, i in enumerate(best[:self.topk]):
                tree.nodes[i].slot = (depth - 1) * self.topk + r
                out.append((b, i))
        return out

    # ------------------------------------------------------------------- result
    def result(self) -> list[TreeDraft]:
        drafts = []
        for b, tree in enumerate(self.trees):
            top = tree.ranked()[:tree.budget]  # node indices, best first
            chosen = sorted(top, key=lambda i: (tree.nodes[i].depth, i))
            where = {i: pos for pos, i in enumerate(chosen)}
            n = len(chosen)
            if any(tree.nodes[i].parent >= 0 and tree.nodes[i].parent not in where for i in chosen):
                raise RuntimeError("tree selection is not ancestor-closed")  # a bug, not bad input
            parents = [where.get(tree.nodes[i].parent, -1) for i in chosen]
            q = None
            if not self.params[b].greedy:
                probs, _ = tree.q[-1]
                q = probs.new_zeros(n + 1, probs.shape[1])
                for pos, i in [(-1, -1)] + list(enumerate(chosen)):
                    if i in tree.q:
                        src, row = tree.q[i]
                        q[pos + 1] = src[row]
            draft = make_tree_draft([tree.nodes[i].token for i in chosen], parents, q,
                                    self.draft_to_target if q is not None else None)
            rank = {i: r for r, i in enumerate(top)}
            draft.ranks = [rank[i] for i in chosen]
            drafts.append(draft)
        return drafts


def move_kv(kv_caches: Seq[tuple[torch.Tensor, torch.Tensor]], src: torch.Tensor,
            dst: torch.Tensor) -> None:
    """Copy K/V of flat slots src -> dst in every layer ([N, B, Hkv, D] caches, [M] slot ids).

    All sources are gathered before any destination is written, so overlapping moves are safe
    (after tree acceptance dst_j = L-1+j <= src_j = L-1+i_j and both increase with j).
    """
    if src.numel() == 0:
        return
    for k_cache, v_cache in kv_caches:
        # a latent (MLA) layer's V is a view of its K: move that storage once, not twice
        aliased = v_cache.data_ptr() == k_cache.data_ptr()
        for cache in (k_cache,) if aliased else (k_cache, v_cache):
            flat = cache.view(-1, *cache.shape[2:])  # [N * B, Hkv, D]
            flat.index_copy_(0, dst, flat.index_select(0, src))
