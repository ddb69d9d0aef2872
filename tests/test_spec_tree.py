"""Tree drafting (topk > 1) is lossless: greedy output equals plain decoding (random drafter,
a planted continuation that forces multi-token acceptance and KV compaction, preemption,
aborts); the tree search respects its budget and shape; the drafter's tree steps compute what a
chain along the same path computes; sampled tree verification keeps the target's distribution
exactly (Markov-chain chi-square), and breaking the recursive rule is detected."""
import copy
import itertools
import math

import pytest
import torch

from eyas import SamplingParams
from eyas.layers.sampler import processed_probs
from eyas.spec import tree as tree_mod
from eyas.spec import verify
from eyas.spec.decoder import SpecDecoder
from eyas.spec.proposer import Proposer
from eyas.spec.tree import TreeSearch, make_tree_draft
from eyas.spec.verify import accept_tree
from test_engine import PROMPTS, run_all
from test_spec_sampling import chi2_crit

PARAMS = SamplingParams(max_tokens=16, ignore_eos=True)


@pytest.fixture(scope="module")
def plain(tiny_engine_factory):
    engine = tiny_engine_factory(enable_prefix_caching=False)
    return {str(i): run_all(engine, [p], PARAMS)["0"] for i, p in enumerate(PROMPTS)}


def tree_engine(factory, drafter, steps, topk, n, **kw):
    kw.setdefault("spec_policy", "fixed")  # the stats below count every step's full tree
    return factory(draft=str(drafter), spec_steps=steps, spec_topk=topk, spec_draft_tokens=n, **kw)


# ------------------------------------------------------------------ greedy end to end
@pytest.mark.parametrize("steps,topk,n", [(3, 2, 4), (4, 4, 8)])
def test_tree_random_drafter_equals_plain(tiny_engine_factory, tiny_drafter_path, plain, steps, topk, n):
    engine = tree_engine(tiny_engine_factory, tiny_drafter_path, steps, topk, n)
    outs = {}
    for i, p in enumerate(PROMPTS):
        engine.add_request(str(i), p, PARAMS)
        for o in engine.step() + engine.step():  # staggered arrivals
            outs[o.id] = o
    while engine.has_unfinished():
        for o in engine.step():
            outs[o.id] = o
        engine.allocator.check_invariants(engine.scheduler.running + list(engine.scheduler.waiting))
    assert {k: o.token_ids for k, o in outs.items()} == plain
    for o in outs.values():  # every verify step drafts a full tree (budget n, enough candidates)
        assert o.spec.drafted == n * (o.spec.target_steps - 1)
    assert engine.allocator.num_free_blocks == engine.allocator.num_blocks


def test_tree_with_preemption_and_prefix_cache(tiny_engine_factory, tiny_drafter_path, plain):
    engine = tree_engine(tiny_engine_factory, tiny_drafter_path, 3, 2, 6, num_kv_blocks=16,
                         max_model_len=48)
    first = run_all(engine, PROMPTS, PARAMS)
    assert first == plain
    assert engine.scheduler.num_preemptions > 0
    hits = engine.allocator.prefix_hits
    last = list(first)[-1]  # finished last: its blocks are the most recently freed
    assert run_all(engine, [PROMPTS[int(last)]], PARAMS) == {"0": plain[last]}
    assert engine.allocator.prefix_hits > hits


class PlantedTreeProposer(Proposer):
    """Greedy trees with the target's continuation planted off the first branch:

        root -> [w1, c1];  w1 -> [c2'];  c_j -> [w_{j+1}, c_{j+1}]
    (c = the continuation, w = wrong tokens, c2' = the right token under a wrong parent), in
    breadth-first order and cut to the budget, so the accepted path is not a prefix of the node
    list and its KV must be moved."""

    def __init__(self, continuations, vocab_size, depth):
        self.continuations, self.vocab_size, self.depth = continuations, vocab_size, depth

    def propose(self, seqs, num_tokens, tree=None):
        drafts = []
        for seq, n in zip(seqs, num_tokens):
            cont = self.continuations.get(seq.request_id, [])
            done = seq.num_output_tokens
            right = [cont[done + j] if done + j < len(cont) else 3 + j for j in range(self.depth)]
            wrong = [(t + 1 + j) % self.vocab_size for j, t in enumerate(right)]
            tokens, parents = [wrong[0], right[0]], [-1, -1]  # depth 1: w1, c1
            for j in range(1, self.depth):
                c_prev = len(tokens) - 1
                if j == 1:
                    tokens.append(right[1])  # the decoy under w1 (node 0)
                    parents.append(0)
                tokens += [wrong[j], right[j]]
                parents += [c_prev, c_prev]
            drafts.append(make_tree_draft(tokens[:n], parents[:n]))
        return drafts


def test_planted_tree_accepts_paths_and_moves_kv(tiny_engine_factory, plain):
    engine = tiny_engine_factory(spec_topk=2, spec_steps=3, spec_draft_tokens=8)
    engine.spec = SpecDecoder(engine, PlantedTreeProposer(plain, engine.model.vocab_size, 3), 8)
    outs = {}
    for i, p in enumerate(PROMPTS):
        engine.add_request(str(i), p, PARAMS)
    while engine.has_unfinished():
        for o in engine.step():
            outs[o.id] = o
        engine.allocator.check_invariants(engine.scheduler.running)
    for rid, out in outs.items():
        assert out.token_ids == plain[rid]
        # prefill (1 token), then 3 accepted + 1 bonus per step: 16 tokens in 1 + ceil(15 / 4) steps
        assert out.spec.target_steps == 5
        assert out.spec.accepted == 4 * 3  # the last step's bonus falls past max_tokens
        assert out.spec.drafted == 4 * 7
    assert engine.allocator.num_free_blocks == engine.allocator.num_blocks


def test_abort_mid_tree_frees_blocks(tiny_engine_factory, tiny_drafter_path):
    engine = tree_engine(tiny_engine_factory, tiny_drafter_path, 3, 2, 5)
    for i, p in enumerate(PROMPTS):
        engine.add_request(str(i), p, SamplingParams(max_tokens=60, ignore_eos=True,
                                                     temperature=1.0 if i % 2 else 0.0, seed=i))
    for _ in range(3):
        engine.step()
        engine.allocator.check_invariants(engine.scheduler.running + list(engine.scheduler.waiting))
    for i in range(len(PROMPTS)):
        assert engine.abort(str(i))
    engine.allocator.check_invariants([])
    assert engine.allocator.num_free_blocks == engine.allocator.num_blocks
    assert not engine.spec.proposer.states


def test_sampled_tree_requests_are_seeded(tiny_engine_factory, tiny_drafter_path):
    params = SamplingParams(max_tokens=8, ignore_eos=True, temperature=1.0, top_k=5, seed=7)
    runs = [run_all(tree_engine(tiny_engine_factory, tiny_drafter_path, 3, 3, 6), PROMPTS[:2], params,
                    stagger=1) for _ in range(2)]
    assert runs[0] == runs[1] and all(len(v) == 8 for v in runs[0].values())


# ---------------------------------------------------- drafter tree steps = chain along a path
def test_tree_drafter_logits_match_chain_along_path(tiny_engine_factory, tiny_drafter_path, monkeypatch):
    # fp32 drafter: the comparison is to 1e-4, and bf16 rounds a row differently in another batch
    engine = tree_engine(tiny_engine_factory, tiny_drafter_path, 3, 3, 12, spec_dtype="float32")
    for i in range(2):
        engine.add_request(str(i), PROMPTS[i + 2], SamplingParams(max_tokens=20, ignore_eos=True))
    engine.step()  # prefill both; the drafter has pending features, nothing extended yet
    seqs = list(engine.scheduler.running)
    for s in seqs:
        engine.allocator.reserve(s, len(s) + 3)  # room for the chain's paged draft slots
    prop = engine.spec.proposer
    saved = copy.deepcopy(prop.states)

    seen = []  # (b, path tokens, logits [Vd]) for every expanded tree node

    def record(self, nodes, logits):
        for r, (b, i) in enumerate(nodes):
            path = []
            while i >= 0:
                path.insert(0, self.node(b, i).token)
                i = self.node(b, i).parent
            seen.append((b, path, logits[r].clone()))
        return expand(self, nodes, logits)

    expand = TreeSearch.expand
    monkeypatch.setattr(TreeSearch, "expand", record)
    drafts = prop.propose(seqs, [12, 12])
    monkeypatch.setattr(TreeSearch, "expand", expand)
    assert [len(d.tokens) for d in drafts] == [12, 12]
    assert max(len(p) for _, p, _ in seen) == 2  # nodes of depth 2 were expanded

    prop.topk = 1  # the chain path, with tokens forced along each recorded path
    for b, path, logits in seen:
        prop.states = copy.deepcopy(saved)
        got = []

        def forced(lg, ss, path=path, got=got):
            got.append(lg[0].clone())
            tok = path[len(got) - 1] if len(got) <= len(path) else 0
            return torch.tensor([tok]), [None]

        prop._pick = forced
        prop.propose([seqs[b]], [len(path) + 1])
        torch.testing.assert_close(got[len(path)], logits, atol=1e-4, rtol=1e-4)
    del prop._pick
    prop.topk, prop.states = 3, saved
    for i in range(2):
        engine.abort(str(i))
    engine.allocator.check_invariants([])


# ------------------------------------------------------------------------ tree search
def fake_drafter(vocab, seed):
    """Deterministic draft logits for a node from its path (so trees can be rebuilt)."""
    def logits(paths):
        out = []
        for path in paths:
            g = torch.Generator().manual_seed(hash((seed,) + tuple(path)) % 2**31)
            out.append(torch.randn(vocab, generator=g) * 2)
        return torch.stack(out)
    return logits


def build(steps, topk, budgets, params, seed=0, vocab=12):
    draft = fake_drafter(vocab, seed)
    gens = [torch.Generator().manual_seed(seed + b) for b in range(len(budgets))]
    search = TreeSearch(steps, topk, budgets, params, gens)
    paths = {}

    def path(b, i):
        return paths[(b, i)] if i >= 0 else []

    search.expand([(b, -1) for b in range(len(budgets))], draft([[] for _ in budgets]))
    for d in range(1, steps):
        for b, tree in enumerate(search.trees):
            for i, nd in enumerate(tree.nodes):
                paths[(b, i)] = path(b, nd.parent) + [nd.token]
        front = search.frontier(d)
        if not front:
            break
        assert all(sum(1 for fb, _ in front if fb == b) <= topk for b in range(len(budgets)))
        search.expand(front, draft([path(b, i) for b, i in front]))
    return search.result(), draft


def check_shape(tree, steps, budget):
    n = len(tree.tokens)
    assert n <= budget
    assert tree.mask.shape == (n + 1, n + 1)
    for i, (p, d) in enumerate(zip(tree.parents, tree.depths)):
        assert -1 <= p < i  # parents precede children
        assert d == (tree.depths[p] + 1 if p >= 0 else 1) and d <= steps
        anc, j = {0, i + 1}, p
        while j >= 0:
            anc.add(j + 1)
            j = tree.parents[j]
        assert set(tree.mask[i + 1].nonzero().flatten().tolist()) == anc
    assert tree.mask[0].tolist() == [True] + [False] * n
    for kids in tree.children():  # siblings are distinct tokens
        assert len({tree.tokens[c] for c in kids}) == len(kids)


def _paths(tree) -> list[tuple]:
    """Each node's token path from the root (its ancestors' tokens, then its own)."""
    out = []
    for i in range(len(tree.tokens)):
        path, j = [], i
        while j >= 0:
            path.insert(0, tree.tokens[j])
            j = tree.parents[j]
        out.append(tuple(path))
    return out


@pytest.mark.parametrize("steps,topk,budget", [(1, 3, 8), (3, 2, 4), (4, 3, 10), (5, 4, 8), (3, 4, 50)])
def test_greedy_tree_is_the_best_budget_nodes(steps, topk, budget):
    greedy = SamplingParams()
    (tree,), draft = build(steps, topk, [budget], [greedy], seed=steps * topk)
    check_shape(tree, steps, budget)
    # Reference EAGLE-2 search: per depth, expand the topk best by cumulative log-prob.
    cands, frontier = [], [((), 0.0)]
    for depth in range(1, steps + 1):
        new = []
        for path, score in frontier:
            logq = draft([list(path)])[0].log_softmax(-1)
            vals, ids = logq.topk(topk)
            new += [(path + (t,), score + v) for t, v in zip(ids.tolist(), vals.tolist())]
        cands += new
        frontier = sorted(new, key=lambda c: -c[1])[:topk]
    want = sorted(cands, key=lambda c: -c[1])[:budget]
    assert sorted(_paths(tree)) == sorted(p for p, _ in want)
    assert len(tree.tokens) == min(budget, topk + (steps - 1) * topk * topk)


def test_sampled_tree_shape_and_probs():
    params = [SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_k=3), SamplingParams()]
    trees, _ = build(4, 4, [9, 9, 5], params, seed=3)
    for tree, p in zip(trees, params):
        check_shape(tree, 4, 9)
        if p.greedy:
            assert tree.q is None
            continue
        kids = tree.children()
        for pos, cs in enumerate(kids):
            if cs:  # children were drawn from this row's q, which carries the request's filters
                q = tree.q[pos]
                assert q.sum().item() == pytest.approx(1.0, abs=1e-5)
                assert all(q[tree.tokens[c]] > 0 for c in cs)
                if p.top_k:
                    assert (q > 0).sum() <= p.top_k and len(cs) <= p.top_k
    assert len(trees[2].tokens) == 5


# ----------------------------------------------------------- sampled verification (exact)
V = 4


def markov():
    g = torch.Generator().manual_seed(0)
    target = torch.randn(V, V, generator=g) * 1.5  # logits of the next token given the previous
    drafter = torch.randn(V, V, generator=g) * 3.0  # a different, over-confident drafter
    return target, drafter


def tree_generate(target, drafter, x0, n, params, gen, steps=3, topk=2, budget=4):
    """n tokens after x0 by speculative tree rounds with the real search and verifier."""
    out = [x0]
    while len(out) - 1 < n:
        search = TreeSearch(steps, topk, [budget], [params], [gen])
        search.expand([(0, -1)], drafter[out[-1]][None])
        for d in range(1, steps):
            front = search.frontier(d)
            if not front:
                break
            search.expand(front, drafter[[search.node(b, i).token for b, i in front]])
        tree = search.result()[0]
        _, tokens = accept_tree(target[[out[-1]] + tree.tokens], tree, params, gen)
        out.extend(tokens)
    return tuple(out[1:n + 1])


def markov_chi2(draws, n, steps, topk, budget, params=SamplingParams(temperature=1.0)):
    """Chi-square of the joint law of n generated tokens against the exact one."""
    target, drafter = markov()
    gen = torch.Generator().manual_seed(1)
    counts = {}
    for _ in range(draws):
        s = tree_generate(target, drafter, 0, n, params, gen, steps, topk, budget)
        counts[s] = counts.get(s, 0) + 1
    p = processed_probs(target, [params] * V)
    stat, cells = 0.0, 0
    for seq in itertools.product(range(V), repeat=n):
        prob = math.prod(p[a, b].item() for a, b in zip((0,) + seq[:-1], seq))
        if prob > 0:
            stat += (counts.get(seq, 0) - draws * prob) ** 2 / (draws * prob)
            cells += 1
        else:
            assert seq not in counts
    return stat, cells - 1


def test_sampled_tree_matches_target_distribution():
    stat, df = markov_chi2(2000, n=3, steps=3, topk=3, budget=5)
    assert stat < chi2_crit(df), f"chi-square {stat:.1f} over the 0.1% critical value ({df} df)"


@pytest.mark.parametrize("broken,draws", [("intact", 2000), ("keep_rejected_in_q", 1000),
                                          ("no_residual", 1000), ("rank_by_own_q", 2000)])
def test_broken_tree_rule_is_detected(monkeypatch, broken, draws):
    """Small trees, 2 tokens: the intact rule passes, each rule broken on purpose fails."""
    if broken == "keep_rejected_in_q":  # q_{i+1} = q_i: the rejected child stays in q
        monkeypatch.setattr(verify, "_without", lambda q, token: q)
    elif broken == "no_residual":  # p_{i+1} = p_i: no residual after a rejection
        monkeypatch.setattr(verify, "_residual", lambda p, q: p)
    elif broken == "rank_by_own_q":  # EAGLE-2's ranking of sampled draws by their own q
        monkeypatch.setattr(tree_mod, "_sampled_key", lambda log_mass, log_q: log_q)
    stat, df = markov_chi2(draws, n=2, steps=2, topk=3, budget=3)
    assert (stat < chi2_crit(df)) == (broken == "intact"), f"chi-square {stat:.1f} ({df} df)"


def test_greedy_tree_verification_walks_argmax():
    # root -> [5, 7]; 7 -> [1, 2]; 5 -> [2]
    tree = make_tree_draft([5, 7, 2, 1, 2], [-1, -1, 0, 1, 1])
    logits = torch.full((6, 9), -1.0)
    for pos, best in enumerate([7, 0, 2, 4, 8, 6]):
        logits[pos, best] = 1.0
    assert accept_tree(logits, tree, SamplingParams(), None) == ([1, 4], [7, 2, 6])
    logits[0] = 0.0
    logits[0, 3] = 1.0
    assert accept_tree(logits, tree, SamplingParams(), None) == ([], [3])


@pytest.mark.parametrize("steps,topk,budget", [(3, 2, 4), (5, 4, 8), (4, 3, 10)])
def test_tree_ranks_give_every_smaller_tree(steps, topk, budget):
    """A greedy tree's nodes of rank < m are exactly the tree a budget of m drafts (what the
    adaptive controller relies on to learn smaller trees' acceptance from larger ones)."""
    greedy = SamplingParams()
    (tree,), _ = build(steps, topk, [budget], [greedy], seed=steps * topk)
    n = len(tree.tokens)
    assert sorted(tree.ranks) == list(range(n))
    assert all(p < 0 or tree.ranks[p] < tree.ranks[i] for i, p in enumerate(tree.parents))
    paths = _paths(tree)
    for m in range(1, n):
        (small,), _ = build(steps, topk, [m], [greedy], seed=steps * topk)
        assert sorted(_paths(small)) == sorted(p for p, r in zip(paths, tree.ranks) if r < m)
