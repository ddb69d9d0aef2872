"""Mixtral and Qwen3-MoE against HF transformers on tiny random checkpoints (fp32): batched
prefill and paged step-by-step decode across block boundaries, aux hidden states, loading
errors, and the registry."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import DeepseekV3Config, LlamaConfig, MixtralConfig, Qwen3MoeConfig

from eyas.errors import ConfigError
from eyas.kv.cache import allocate_kv, kv_layout_for
from eyas.layers.moe import SparseMoE
from eyas.models.deepseek_v3 import DeepseekV3ForCausalLM
from eyas.models.llama import LlamaForCausalLM
from eyas.models.loader import load_model
from eyas.models.mixtral import MixtralForCausalLM
from eyas.models.qwen3_moe import Qwen3MoeForCausalLM, qwen3_moe_sparse_layers
from eyas.models.registry import get_model_class
from util_models import assert_logits_close, hf_reference, make_hf_model, run_chunked, save_hf_model

BLOCK_SIZE = 4
NUM_BLOCKS = 16
BLOCK_TABLES = [[5, 2, 7, 12], [9, 0, 3], [11, 1]]  # disjoint, non-contiguous: 16, 12, 8 slots
VOCAB = 256
COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=128, rms_norm_eps=1e-6, tie_word_embeddings=False)
CONFIGS = {
    "mixtral": MixtralConfig(**COMMON, intermediate_size=48, num_hidden_layers=2,
                             num_local_experts=4, num_experts_per_tok=2),
    # layer 1 dense (mlp_only_layers); layers 0 and 2 sparse; weights renormalized
    "qwen3_moe": Qwen3MoeConfig(**COMMON, head_dim=32, intermediate_size=96,
                                moe_intermediate_size=32, num_hidden_layers=3, num_experts=8,
                                num_experts_per_tok=2, mlp_only_layers=[1], norm_topk_prob=True),
    # every second layer sparse, top-3 weights not renormalized, tied embeddings
    "qwen3_moe_step2": Qwen3MoeConfig(**{**COMMON, "tie_word_embeddings": True}, head_dim=16,
                                      intermediate_size=96, moe_intermediate_size=32,
                                      num_hidden_layers=2, num_experts=6, num_experts_per_tok=3,
                                      decoder_sparse_step=2, norm_topk_prob=False),
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
    """name -> (HF model, our model loaded from its saved folder), built once per module."""
    cache = {}

    def get(name):
        if name not in cache:
            hf = make_hf_model(CONFIGS[name], seed=len(cache) + 10)
            folder = save_hf_model(hf, tmp_path_factory.mktemp(name))
            cache[name] = (hf, load_model(folder), folder)
        return cache[name]
    return get


def _prompts(seed: int, lengths=(13, 9, 6)) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in lengths]


def check_against_hf(hf, ours, prompts, chunks, aux_layer_ids=(0, 1)):
    kv = allocate_kv(kv_layout_for(ours), NUM_BLOCKS, BLOCK_SIZE, torch.float32, "cpu")
    logits, aux = run_chunked(ours, prompts, BLOCK_TABLES, chunks, kv, BLOCK_SIZE, aux_layer_ids)
    for b, prompt in enumerate(prompts):
        ref_logits, ref_hidden = hf_reference(hf, prompt)
        assert_logits_close(logits[b], ref_logits)
        for j, layer in enumerate(aux_layer_ids):
            assert_logits_close(aux[b][j], ref_hidden[layer])


@pytest.mark.parametrize("name", list(CONFIGS))
def test_prefill_batch_matches_hf(checkpoints, name):
    hf, ours, _ = checkpoints(name)
    prompts = _prompts(1)
    check_against_hf(hf, ours, prompts, [[len(p)] for p in prompts])


@pytest.mark.parametrize("name", list(CONFIGS))
def test_decode_through_paged_cache_matches_hf(checkpoints, name):
    """A few prefill tokens, then one token per step (crossing blocks of 4), one chunked step."""
    hf, ours, _ = checkpoints(name)
    prompts = _prompts(2)
    chunks = [[3, 1, 1, 4] + [1] * 4, [5] + [1] * 4, [2, 1, 3]]
    check_against_hf(hf, ours, prompts, chunks, aux_layer_ids=(1, 0))


def test_structure_follows_hf_config(checkpoints):
    _, mixtral, _ = checkpoints("mixtral")
    assert all(isinstance(layer.block_sparse_moe, SparseMoE) for layer in mixtral.model.layers)
    assert mixtral.model.layers[0].block_sparse_moe.experts.gate_up_proj.shape == (4, 96, 64)
    _, qwen, _ = checkpoints("qwen3_moe")
    kinds = [type(layer.mlp).__name__ for layer in qwen.model.layers]
    assert kinds == ["SparseMoE", "LlamaMLP", "SparseMoE"]
    assert qwen3_moe_sparse_layers(CONFIGS["qwen3_moe_step2"]) == (1,)
    _, tied, _ = checkpoints("qwen3_moe_step2")
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    assert kv_layout_for(qwen).latent is False
    assert (qwen.num_kv_heads, qwen.head_dim, qwen.num_layers) == (2, 32, 3)


def test_missing_and_unknown_expert_weights(checkpoints):
    _, _, folder = checkpoints("mixtral")
    saved = load_file(str(folder / "model.safetensors"))  # per-expert names, as on the hub
    model = MixtralForCausalLM(CONFIGS["mixtral"])
    gone = "model.layers.1.block_sparse_moe.experts.3.w3.weight"
    with pytest.raises(ConfigError, match=r"layers.1.block_sparse_moe.experts.gate_up_proj"
                                          r"\[expert 3, part 1\]"):
        model.load_weights([(k, v) for k, v in saved.items() if k != gone])
    extra = list(saved.items()) + [("model.layers.0.block_sparse_moe.experts.9.w1.weight",
                                    torch.zeros(48, 64))]
    with pytest.raises(ConfigError, match="expert 9 out of range"):
        model.load_weights(extra)
    with pytest.raises(ConfigError, match="does not know: model.layers.0.mlp.experts.0.w9"):
        model.load_weights([("model.layers.0.mlp.experts.0.w9.weight", torch.zeros(1))])


def test_registry_new_families_and_unsupported(tmp_path):
    assert get_model_class(MixtralConfig(architectures=["MixtralForCausalLM"])) is MixtralForCausalLM
    assert get_model_class(Qwen3MoeConfig(architectures=["Qwen3MoeForCausalLM"])) is Qwen3MoeForCausalLM
    assert get_model_class(DeepseekV3Config(architectures=["DeepseekV3ForCausalLM"])) is \
        DeepseekV3ForCausalLM
    # no architectures: the model_type decides
    assert get_model_class(DeepseekV3Config()) is DeepseekV3ForCausalLM
    assert get_model_class(LlamaConfig()) is LlamaForCausalLM
    for names in (["GPT2LMHeadModel"], ["MiniMaxM2ForCausalLM"]):
        with pytest.raises(ConfigError, match=r"unsupported.*DeepseekV3ForCausalLM.*MixtralForCausalLM"
                                              r".*Qwen3MoeForCausalLM"):
            get_model_class(MixtralConfig(architectures=names))
    (tmp_path / "config.json").write_text(json.dumps(
        {"model_type": "mixtral", "architectures": ["FooMoeForCausalLM"], "vocab_size": 32}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError, match="FooMoeForCausalLM"):
        load_model(tmp_path)


def test_unsupported_moe_configs():
    with pytest.raises(ConfigError, match="quantized"):
        DeepseekV3ForCausalLM(DeepseekV3Config(**_tiny_dsv3(), quantization_config={
            "quant_method": "fp8", "weight_block_size": [128, 128]}))
    cfg = DeepseekV3Config(**_tiny_dsv3())
    cfg.scoring_func = "softmax"
    with pytest.raises(ConfigError, match="scoring_func"):
        DeepseekV3ForCausalLM(cfg)
    with pytest.raises(ConfigError, match="num_experts_per_tok"):
        MixtralForCausalLM(MixtralConfig(**COMMON, intermediate_size=8, num_hidden_layers=1,
                                         num_local_experts=2, num_experts_per_tok=3))


def _tiny_dsv3() -> dict:
    return dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                n_routed_experts=4, num_experts_per_tok=2, n_group=2, topk_group=1,
                kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8,
                v_head_dim=8, max_position_embeddings=64)
