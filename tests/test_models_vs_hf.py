"""Our Llama-family model against HF transformers on tiny random checkpoints (fp32)."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig

from eyas.errors import ConfigError, ModelNotFoundError
from eyas.layers.linear import (LMHead, MergedColumnLinear, QKVLinear, RowLinear,
                                VocabEmbedding)
from eyas.models.llama import LlamaForCausalLM
from eyas.models.loader import iter_safetensors, load_model
from eyas.models.registry import get_model_class
from util_models import (TINY, alloc_kv_caches, assert_logits_close, hf_reference,
                               make_hf_model, run_chunked, save_hf_model, tiny_configs)

BLOCK_SIZE = 4
NUM_BLOCKS = 16
# Disjoint, non-contiguous block tables: 16, 12 and 8 token slots.
BLOCK_TABLES = [[5, 2, 7, 12], [9, 0, 3], [11, 1]]
CONFIGS = tiny_configs()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """name -> (HF model, our model loaded from its saved folder), built once per module."""
    cache = {}

    def get(name):
        if name not in cache:
            hf = make_hf_model(CONFIGS[name], seed=len(cache))
            folder = save_hf_model(hf, tmp_path_factory.mktemp(name))
            cache[name] = (hf, load_model(folder))
        return cache[name]
    return get


def _prompts(seed: int, lengths=(13, 9, 6)) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, TINY["vocab_size"], (n,), generator=g).tolist() for n in lengths]


def _check(hf, ours, prompts, chunks, aux_layer_ids=(1, 0)):
    kv = alloc_kv_caches(ours, NUM_BLOCKS, BLOCK_SIZE)
    logits, aux = run_chunked(ours, prompts, BLOCK_TABLES, chunks, kv, BLOCK_SIZE,
                              aux_layer_ids)
    for b, prompt in enumerate(prompts):
        ref_logits, ref_hidden = hf_reference(hf, prompt)
        assert_logits_close(logits[b], ref_logits)
        for j, layer in enumerate(aux_layer_ids):
            assert_logits_close(aux[b][j], ref_hidden[layer])


@pytest.mark.parametrize("name", list(CONFIGS))
def test_prefill_batch_matches_hf(checkpoints, name):
    hf, ours = checkpoints(name)
    prompts = _prompts(1)
    _check(hf, ours, prompts, [[len(p)] for p in prompts])


@pytest.mark.parametrize("name", list(CONFIGS))
def test_decode_through_paged_cache_matches_hf(checkpoints, name):
    """Prefill a few tokens, then one token per step (with one chunked-prefill step)."""
    hf, ours = checkpoints(name)
    prompts = _prompts(2)
    chunks = [[3, 1, 1, 4] + [1] * 4, [5] + [1] * 4, [2, 1, 3]]
    _check(hf, ours, prompts, chunks, aux_layer_ids=(0, 1))


def test_model_attributes_and_tied_head(checkpoints):
    hf, ours = checkpoints("qwen3")
    assert (ours.num_layers, ours.num_kv_heads, ours.head_dim) == (2, 2, 32)
    assert (ours.hidden_size, ours.vocab_size) == (64, 256)
    _, tied = checkpoints("qwen2_tied")
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    ids = torch.tensor([3, 5])
    assert torch.equal(ours.embed(ids), hf.model.embed_tokens(ids))


def test_sharded_checkpoint_loads(tmp_path):
    hf = make_hf_model(CONFIGS["llama"])
    save_hf_model(hf, tmp_path, max_shard_size="50KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    names = {name for name, _ in iter_safetensors(tmp_path)}
    assert names == set(hf.state_dict())
    ours = load_model(tmp_path)
    prompt = _prompts(3, lengths=(7,))
    _check(hf, ours, prompt, [[7]], aux_layer_ids=())


def test_load_errors(tmp_path, checkpoints):
    with pytest.raises(ModelNotFoundError, match="config.json"):
        load_model(tmp_path)
    CONFIGS["llama"].save_pretrained(tmp_path)
    with pytest.raises(ModelNotFoundError, match="safetensors"):
        load_model(tmp_path)

    model = LlamaForCausalLM(CONFIGS["llama"])
    hf, _ = checkpoints("llama")
    partial = [(k, v) for k, v in hf.state_dict().items()
               if "layers.1.self_attn.k_proj" not in k and k != "lm_head.weight"]
    with pytest.raises(ConfigError, match=r"qkv_proj.weight\[k\].*lm_head.weight"):
        model.load_weights(partial)
    with pytest.raises(ConfigError, match="does not know: model.extra"):
        model.load_weights([("model.extra.weight", torch.zeros(1))])
    with pytest.raises(ConfigError, match="model.norm.weight"):
        model.load_weights([("model.norm.weight", torch.zeros(3))])


def test_registry_and_unsupported_configs(tmp_path):
    cfg = LlamaConfig(**TINY, architectures=["MistralForCausalLM"])
    assert get_model_class(cfg) is LlamaForCausalLM
    cfg.architectures = ["GPT2LMHeadModel"]
    with pytest.raises(ConfigError, match="Qwen3ForCausalLM"):
        get_model_class(cfg)
    with pytest.raises(ConfigError, match="dynamic"):
        LlamaForCausalLM(LlamaConfig(**TINY, rope_scaling={"rope_type": "dynamic",
                                                           "factor": 2.0}))
    (tmp_path / "config.json").write_text(json.dumps(
        {"model_type": "llama", "architectures": ["FooForCausalLM"], **TINY}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError, match="FooForCausalLM"):
        load_model(tmp_path)


def test_aux_layer_out_of_range(checkpoints):
    _, ours = checkpoints("llama")
    kv = alloc_kv_caches(ours, NUM_BLOCKS, BLOCK_SIZE)
    with pytest.raises(ConfigError, match="aux layer id 2"):
        run_chunked(ours, [[1, 2]], BLOCK_TABLES, [[2]], kv, BLOCK_SIZE, aux_layer_ids=(2,))


# ---- tensor-parallel shard loading (tp=2, simulated by building both ranks) ----

def test_tp2_qkv_and_merged_column_shards():
    torch.manual_seed(0)
    x = torch.randn(3, 8)
    for num_kv in (2, 1):  # 1 kv head on 2 ranks: replicated
        wq, wk, wv = torch.randn(4 * 2, 8), torch.randn(num_kv * 2, 8), torch.randn(num_kv * 2, 8)
        for rank in range(2):
            layer = QKVLinear(8, head_dim=2, num_heads=4, num_kv_heads=num_kv, tp_size=2,
                              tp_rank=rank)
            for shard, w in (("q", wq), ("k", wk), ("v", wv)):
                layer.weight.weight_loader(layer.weight, w, shard)
            q, k, v = layer(x).split([4, 2, 2], dim=-1)  # 2 q heads, 1 kv head per rank
            kv_head = rank if num_kv == 2 else 0
            torch.testing.assert_close(q, x @ wq[rank * 4:(rank + 1) * 4].T)
            torch.testing.assert_close(k, x @ wk[kv_head * 2:(kv_head + 1) * 2].T)
            torch.testing.assert_close(v, x @ wv[kv_head * 2:(kv_head + 1) * 2].T)

    gate, up = torch.randn(6, 8), torch.randn(6, 8)
    for rank in range(2):
        layer = MergedColumnLinear(8, [6, 6], tp_size=2, tp_rank=rank)
        layer.weight.weight_loader(layer.weight, gate, 0)
        layer.weight.weight_loader(layer.weight, up, 1)
        rows = slice(rank * 3, (rank + 1) * 3)
        torch.testing.assert_close(layer.weight, torch.cat([gate[rows], up[rows]]))


def test_tp2_row_and_vocab_shards():
    torch.manual_seed(0)
    w, b, x = torch.randn(5, 8), torch.randn(5), torch.randn(3, 8)
    total = 0
    for rank in range(2):
        layer = RowLinear(8, 5, bias=True, tp_size=2, tp_rank=rank)
        layer.weight.weight_loader(layer.weight, w)
        layer.bias.weight_loader(layer.bias, b)
        total = total + layer(x[:, rank * 4:(rank + 1) * 4])  # what the all-reduce sums
    torch.testing.assert_close(total, x @ w.T + b)

    table, ids, hidden = torch.randn(7, 3), torch.tensor([0, 3, 4, 6]), torch.randn(2, 3)
    summed, logits = 0, []
    for rank in range(2):  # 4 rows per rank; rank 1's last row is padding
        emb = VocabEmbedding(7, 3, tp_size=2, tp_rank=rank)
        emb.weight.weight_loader(emb.weight, table)
        summed = summed + emb(ids)
        head = LMHead(7, 3, tp_size=2, tp_rank=rank)
        head.weight.weight_loader(head.weight, table)
        logits.append(head(hidden))
    torch.testing.assert_close(summed, table[ids])
    torch.testing.assert_close(torch.cat(logits, -1)[:, :7], hidden @ table.T)
    with pytest.raises(ConfigError, match="not divisible"):
        RowLinear(7, 5, tp_size=2, tp_rank=0)
