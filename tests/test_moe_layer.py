"""The MoE layer on its own: routing against HF's routers, grouped expert compute against a
per-pair loop, tensor/expert-parallel shards summing to the whole, checkpoint loading errors."""
from __future__ import annotations

import pytest
import torch
from transformers import DeepseekV3Config, MixtralConfig, Qwen3MoeConfig
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter
from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

from eyas.errors import ConfigError
from eyas.layers.moe import FusedExperts, RoutingConfig, SparseMoE, select_experts
from eyas.models.weights import HF_EXPERT_NAMES, MIXTRAL_EXPERT_NAMES, expert_target

H, I, E = 16, 12, 8


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matmuls: one intra-op thread (two spin-wait against a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _sorted(weights: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Order each token's k (weight, id) pairs by id, so top-k order does not matter."""
    ids, order = ids.sort(dim=-1)
    return weights.gather(1, order), ids


def _check_router(hf_router, routing: RoutingConfig, bias=None):
    torch.manual_seed(0)
    with torch.no_grad():
        hf_router.weight.normal_()
    x = torch.randn(64, H)
    _, ref_w, ref_ids = hf_router(x)
    logits = x @ hf_router.weight.T
    w, ids = select_experts(logits, routing, bias)
    ref_w, ref_ids = _sorted(ref_w, ref_ids)
    w, ids = _sorted(w, ids)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(w, ref_w.float())


def test_routing_matches_hf_mixtral_and_qwen3():
    cfg = MixtralConfig(hidden_size=H, num_local_experts=E, num_experts_per_tok=2)
    _check_router(MixtralTopKRouter(cfg), RoutingConfig(E, 2, "softmax", renormalize=True))
    for norm in (True, False):
        cfg = Qwen3MoeConfig(hidden_size=H, num_experts=E, num_experts_per_tok=3,
                             norm_topk_prob=norm)
        _check_router(Qwen3MoeTopKRouter(cfg), RoutingConfig(E, 3, "softmax", renormalize=norm))


@pytest.mark.parametrize("groups,topk_groups,norm", [(4, 2, True), (1, 1, False), (2, 1, True)])
def test_group_limited_sigmoid_routing_matches_hf_deepseek(groups, topk_groups, norm):
    cfg = DeepseekV3Config(hidden_size=H, n_routed_experts=E, num_experts_per_tok=2,
                           n_group=groups, topk_group=topk_groups, norm_topk_prob=norm,
                           routed_scaling_factor=2.5)
    router = DeepseekV3TopkRouter(cfg)
    torch.manual_seed(1)
    with torch.no_grad():
        router.e_score_correction_bias.normal_(0, 0.3)
    routing = RoutingConfig(E, 2, "sigmoid", renormalize=norm, num_groups=groups,
                            topk_groups=topk_groups, scaling_factor=2.5, correction_bias=True)
    _check_router(router, routing, router.e_score_correction_bias)


def test_group_limit_keeps_experts_inside_chosen_groups():
    routing = RoutingConfig(8, 2, "sigmoid", num_groups=4, topk_groups=1, correction_bias=True)
    logits = torch.full((1, 8), -5.0)
    logits[0, [0, 3, 5]] = 5.0  # group 0: (0, 1), group 1: (2, 3), group 2: (4, 5)
    logits[0, 4] = 4.0  # group 2 scores 5 + 4, beats group 0 / 1 (5 + -5)
    _, ids = select_experts(logits, routing, torch.zeros(8))
    assert sorted(ids[0].tolist()) == [4, 5]
    bias = torch.zeros(8)
    bias[3] = bias[2] = 2.0  # the correction bias moves the choice, not the weights
    w, ids = select_experts(logits, routing, bias)
    assert sorted(ids[0].tolist()) == [2, 3]
    torch.testing.assert_close(w.sum(), torch.tensor(1.0))


def _random_experts(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    gate, up = torch.randn(E, I, H, generator=g), torch.randn(E, I, H, generator=g)
    down = torch.randn(E, H, I, generator=g)
    return gate, up, down


def _load(layer: FusedExperts, gate, up, down) -> None:
    for e in range(E):
        layer.gate_up_proj.weight_loader(layer.gate_up_proj, gate[e], (e, 0))
        layer.gate_up_proj.weight_loader(layer.gate_up_proj, up[e], (e, 1))
        layer.down_proj.weight_loader(layer.down_proj, down[e], (e, 0))


def _reference(x, weights, ids, gate, up, down):
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = ids[t, j]
            h = torch.nn.functional.silu(gate[e] @ x[t]) * (up[e] @ x[t])
            out[t] += weights[t, j] * (down[e] @ h)
    return out


def test_grouped_experts_equal_per_pair_loop():
    gate, up, down = _random_experts()
    layer = FusedExperts(E, H, I)
    _load(layer, gate, up, down)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(10, H, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:3] for _ in range(10)])  # [T, 3]
    ids[:4] = torch.tensor([1, 2, 6])  # crowd some experts, leave others unused
    weights = torch.rand(10, 3, generator=g)
    torch.testing.assert_close(layer(x, weights, ids), _reference(x, weights, ids, gate, up, down),
                               rtol=1e-5, atol=1e-4)
    assert torch.equal(layer(x[:0], weights[:0], ids[:0]), x[:0])  # no tokens


def test_tp2_and_ep2_shards_sum_to_the_whole():
    gate, up, down = _random_experts(1)
    full = FusedExperts(E, H, I)
    _load(full, gate, up, down)
    g = torch.Generator().manual_seed(4)
    x, weights = torch.randn(7, H, generator=g), torch.rand(7, 2, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:2] for _ in range(7)])
    expected = full(x, weights, ids)
    for kind in ("tp", "ep"):
        total = torch.zeros_like(x)
        for rank in range(2):
            part = FusedExperts(E, H, I, **{f"{kind}_size": 2, f"{kind}_rank": rank})
            _load(part, gate, up, down)  # each rank keeps only its slice / its experts
            total += part(x, weights, ids)  # what the all-reduce sums
        torch.testing.assert_close(total, expected, rtol=1e-5, atol=1e-4)
    ep1 = FusedExperts(E, H, I, ep_size=2, ep_rank=1)
    assert ep1.gate_up_proj.shape == (E // 2, 2 * I, H)
    assert {e for e, _ in ep1.gate_up_proj.expert_shards} == set(range(4, 8))
    tp1 = FusedExperts(E, H, I, tp_size=2, tp_rank=1)
    assert tp1.down_proj.shape == (E, H, I // 2)


def test_shared_experts_are_added():
    routing = RoutingConfig(E, 2)
    shared = torch.nn.Linear(H, H, bias=False)
    moe = SparseMoE(H, I, routing, torch.float32, shared_experts=shared)
    torch.nn.init.normal_(moe.gate.weight)
    gate, up, down = _random_experts(2)
    _load(moe.experts, gate, up, down)
    x = torch.randn(5, H)
    w, ids = moe.gate(x)
    torch.testing.assert_close(moe(x), moe.experts(x, w, ids) + shared(x))


def test_expert_weight_errors_and_names():
    layer = FusedExperts(E, H, I)
    with pytest.raises(ConfigError, match="shard id"):
        layer.gate_up_proj.weight_loader(layer.gate_up_proj, torch.zeros(I, H), 0)
    with pytest.raises(ConfigError, match="expert 8 out of range"):
        layer.gate_up_proj.weight_loader(layer.gate_up_proj, torch.zeros(I, H), (8, 0))
    with pytest.raises(ConfigError, match="does not fit"):
        layer.down_proj.weight_loader(layer.down_proj, torch.zeros(H + 1, I), (0, 0))
    with pytest.raises(ConfigError, match="not divisible"):
        FusedExperts(E, H, I, tp_size=5, tp_rank=0)
    with pytest.raises(ConfigError, match="n_group"):
        RoutingConfig(8, 2, "sigmoid", num_groups=3)
    with pytest.raises(ConfigError, match="scoring"):
        RoutingConfig(8, 2, "relu")
    assert expert_target("model.layers.3.mlp.experts.17.up_proj.weight", HF_EXPERT_NAMES) == (
        "model.layers.3.mlp.experts.gate_up_proj", (17, 1))
    assert expert_target("model.layers.0.block_sparse_moe.experts.2.w2.weight",
                         MIXTRAL_EXPERT_NAMES) == ("model.layers.0.block_sparse_moe.experts.down_proj",
                                                   (2, 0))
    assert expert_target("model.layers.3.mlp.shared_experts.up_proj.weight", HF_EXPERT_NAMES) is None
