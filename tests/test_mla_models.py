"""DeepSeek-V3 (MLA + MoE) against HF transformers on tiny random checkpoints (fp32), the two
MLA paths (plain == absorbed), and the latent cache read through its block-size-1 view ==
through the blocked view of the same storage."""
from __future__ import annotations

import pytest
import torch
from transformers import DeepseekV3Config

from eyas.kv.cache import KVLayout, allocate_kv, block_size_one_view, kv_layout_for
from eyas.layers.mla import MLAttention, read_entries
from eyas.layers.moe import SparseMoE
from eyas.models.loader import iter_safetensors, load_model
from eyas.models.llama import LlamaMLP
from eyas.workers.input_batch import SeqSpan, build_forward_inputs
from util_models import assert_logits_close, hf_reference, make_hf_model, run_chunked, save_hf_model

VOCAB = 256
NUM_BLOCKS = 16
BLOCK_TABLES = [[5, 2, 7, 12], [9, 0, 3], [11, 1]]  # at block size 4: 16, 12, 8 slots
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
              num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=32,
              qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=24,
              max_position_embeddings=128, rms_norm_eps=1e-6, tie_word_embeddings=False)
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32,
        "mscale": 0.8, "mscale_all_dim": 1.0, "rope_theta": 10000.0}
CONFIGS = {
    # q LoRA, interleaved rope (DeepSeek's default), YaRN with mscale != mscale_all_dim (both
    # the cos/sin factor and the softmax scale move), 1 dense layer then MoE with group-limited
    # routing, a shared expert
    "dsv3": DeepseekV3Config(**COMMON, q_lora_rank=48, num_hidden_layers=3, first_k_dense_replace=1,
                             n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2,
                             n_shared_experts=1, routed_scaling_factor=2.5, rope_parameters=YARN),
    # no q LoRA, plain (non-interleaved) rope, default rope, one group, no renormalization,
    # every layer MoE, two shared experts
    "dsv3_plain_rope": DeepseekV3Config(**COMMON, q_lora_rank=None, num_hidden_layers=2,
                                        first_k_dense_replace=0, n_routed_experts=4,
                                        num_experts_per_tok=2, n_group=1, topk_group=1,
                                        n_shared_experts=2, norm_topk_prob=False,
                                        rope_interleave=False),
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matmuls: one intra-op thread (two spin-wait against a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """name -> (HF model, our model, folder), built once per module."""
    cache = {}

    def get(name):
        if name not in cache:
            hf = make_hf_model(CONFIGS[name], seed=len(cache) + 20)
            with torch.no_grad():  # HF initializes the correction bias to zeros; make it count
                for buf_name, buf in hf.named_buffers():
                    if buf_name.endswith("e_score_correction_bias"):
                        buf.normal_(0.0, 0.1)
            folder = save_hf_model(hf, tmp_path_factory.mktemp(name))
            cache[name] = (hf, load_model(folder), folder)
        return cache[name]
    return get


@pytest.fixture(scope="module")
def hf_outputs():
    """(HF model, prompt) -> (logits, hidden states), computed once per module."""
    cache = {}

    def get(hf, prompt):
        key = (id(hf), tuple(prompt))
        if key not in cache:
            cache[key] = hf_reference(hf, prompt)
        return cache[key]
    return get


def _prompts(seed: int, lengths=(13, 9, 6)) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in lengths]


def _run(model, prompts, chunks, block_size=4, aux_layer_ids=(0, 1)):
    kv = allocate_kv(kv_layout_for(model), NUM_BLOCKS * 4 // block_size, block_size,
                     torch.float32, "cpu")
    tables = BLOCK_TABLES if block_size == 4 else [[3], [0], [2]]
    return run_chunked(model, prompts, tables, chunks, kv, block_size, aux_layer_ids)


DECODE_CHUNKS = [[3, 1, 1, 4] + [1] * 4, [5] + [1] * 4, [2, 1, 3]]


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("mode", ["auto", "plain", "absorbed"])
def test_prefill_and_paged_decode_match_hf(checkpoints, hf_outputs, name, mode):
    """Batched prefill, then one token per step across blocks of 4 (plus a chunked step)."""
    hf, ours, _ = checkpoints(name)
    ours.set_mla_mode(mode)
    try:
        prompts = _prompts(1)
        for chunks in ([[len(p)] for p in prompts], DECODE_CHUNKS):
            logits, aux = _run(ours, prompts, chunks)
            for b, prompt in enumerate(prompts):
                ref_logits, ref_hidden = hf_outputs(hf, prompt)
                assert_logits_close(logits[b], ref_logits)
                for j in range(2):
                    assert_logits_close(aux[b][j], ref_hidden[j])
    finally:
        ours.set_mla_mode("auto")


def test_absorbed_equals_plain(checkpoints):
    _, ours, _ = checkpoints("dsv3")
    prompts = _prompts(3)
    out = {}
    for mode in ("plain", "absorbed"):
        ours.set_mla_mode(mode)
        out[mode] = _run(ours, prompts, DECODE_CHUNKS)[0]
    ours.set_mla_mode("auto")
    for plain, absorbed in zip(out["plain"], out["absorbed"]):
        torch.testing.assert_close(absorbed, plain, rtol=1e-5, atol=1e-5)


def test_auto_mode_picks_plain_for_prefill_and_absorbed_for_decode(checkpoints):
    _, ours, _ = checkpoints("dsv3")
    attn: MLAttention = ours.model.layers[0].self_attn
    prefill = build_forward_inputs([SeqSpan(list(range(12)), 0, [0, 1, 2])], 4).attn
    decode = build_forward_inputs([SeqSpan([1], 11, [0, 1, 2])], 4).attn
    verify = build_forward_inputs([SeqSpan([1] * 4, 40, list(range(11)))], 4).attn
    assert not attn.use_absorbed(prefill)
    assert attn.use_absorbed(decode) and attn.use_absorbed(verify)


@pytest.mark.parametrize("mode", ["plain", "absorbed"])
def test_block_size_one_view_equals_blocked_view(checkpoints, mode):
    """The same cache read through [N*B, 1, ...] (slot list as block table) and through
    (block, offset) gives bit-identical results, at block size 4 and 16."""
    _, ours, _ = checkpoints("dsv3")
    prompts = _prompts(4)
    for block_size, chunks in ((4, DECODE_CHUNKS), (16, [[6, 1, 1, 5], [9], [1] * 6])):
        out = {}
        for view in ("flat", "blocked"):
            ours.set_mla_mode(mode, kv_view=view)
            out[view] = _run(ours, prompts, chunks, block_size=block_size)[0]
        for flat, blocked in zip(out["flat"], out["blocked"]):
            assert torch.equal(flat, blocked)
    ours.set_mla_mode("auto")


def test_latent_layout_and_views_share_storage(checkpoints):
    _, ours, _ = checkpoints("dsv3")
    layout = kv_layout_for(ours)
    assert layout == KVLayout.mla(32, 16, 3) and layout.latent
    assert (layout.num_kv_heads, layout.head_dim, layout.latent_dim) == (1, 48, 32)
    # K only: half the bytes of a standard layout with the same entry width
    assert layout.bytes_per_block(16, torch.float32) == 3 * 16 * 48 * 4
    assert KVLayout(1, 48, 3).bytes_per_block(16, torch.float32) == 2 * 3 * 16 * 48 * 4
    (k, v), = allocate_kv(KVLayout.mla(32, 16, 1), 5, 16, torch.float32, "cpu")
    assert k.shape == (5, 16, 1, 48) and v.shape == (5, 16, 1, 32)
    assert v.data_ptr() == k.data_ptr()  # V is the latent part of K, no storage of its own
    flat = block_size_one_view(k)
    assert flat.shape == (80, 1, 1, 48) and flat.data_ptr() == k.data_ptr()
    k.normal_()
    slots = torch.tensor([[0, 17, 79], [33, 34, 35]])
    assert torch.equal(read_entries(k, slots, "flat"), read_entries(k, slots, "blocked"))
    assert torch.equal(read_entries(k, slots)[0, 1], k[1, 1, 0])


def test_structure_and_mtp_layers_ignored(checkpoints, tmp_path):
    _, ours, folder = checkpoints("dsv3")
    mlps = [layer.mlp for layer in ours.model.layers]
    assert isinstance(mlps[0], LlamaMLP) and all(isinstance(m, SparseMoE) for m in mlps[1:])
    assert mlps[1].gate.weight.dtype == torch.float32
    assert mlps[1].shared_experts.gate_up_proj.weight.shape == (64, 64)
    assert (ours.num_kv_heads, ours.head_dim) == (1, 48)
    # a checkpoint with an extra (multi-token prediction) layer past num_hidden_layers loads
    weights = list(iter_safetensors(folder))
    mtp = [(n.replace("model.layers.2.", "model.layers.3."), t) for n, t in weights
           if n.startswith("model.layers.2.")]
    fresh = type(ours)(CONFIGS["dsv3"])
    fresh.load_weights(weights + mtp)
    for (name, p), (_, q) in zip(fresh.named_parameters(), ours.named_parameters()):
        assert torch.equal(p, q), name


def test_kv_moves_keep_latent_pairs_consistent():
    """Tree acceptance moves target KV slot by slot over (K, V) pairs; for a latent layer V is
    a view of K, so the move lands once and V follows."""
    from eyas.spec.tree import move_kv

    kv = allocate_kv(KVLayout.mla(4, 2, 1), 3, 4, torch.float32, "cpu")
    k, v = kv[0]
    k.copy_(torch.arange(k.numel(), dtype=torch.float32).view_as(k))
    before = k.clone()
    move_kv(kv, torch.tensor([6, 9]), torch.tensor([5, 6]))
    flat, old = k.view(12, 6), before.view(12, 6)
    assert torch.equal(flat[5], old[6]) and torch.equal(flat[6], old[9])
    assert torch.equal(v.reshape(12, 4), flat[:, :4])
