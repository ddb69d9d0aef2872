"""EAGLE-3 drafter: paged forward vs a dense reference, checkpoint layout, vocab maps, checks."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import LlamaConfig

from eyas.errors import ConfigError
from eyas.models.eagle3 import (Eagle3Drafter, build_vocab_maps, check_compatible,
                                default_aux_layer_ids, load_drafter, random_drafter_config,
                                save_drafter)
from eyas.workers.input_batch import SeqSpan, build_forward_inputs

BLOCK = 4
NUM_BLOCKS = 10
TABLES = [[7, 2, 5, 0], [3, 9, 1, 6]]  # non-contiguous, up to 16 tokens each
CKPT_KEYS = {"fc.weight", "norm.weight", "lm_head.weight", "d2t", "t2d"} | {
    f"midlayer.{k}.weight" for k in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "input_layernorm", "hidden_norm",
        "post_attention_layernorm")}


def tiny_target() -> LlamaConfig:
    return LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                       num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=128, rms_norm_eps=1e-6)


def make_drafter(draft_vocab: int = 64, seed: int = 0, **kw) -> Eagle3Drafter:
    drafter = Eagle3Drafter(random_drafter_config(tiny_target(), draft_vocab, **kw))
    drafter.init_random_(torch.Generator().manual_seed(seed), std=0.15)
    counts = torch.rand(256, generator=torch.Generator().manual_seed(seed + 1))
    drafter.set_vocab_maps(*build_vocab_maps(counts, draft_vocab))
    return drafter.eval()


# ---- dense reference: plain matmuls over unfused checkpoint tensors -------------------------
def _rms(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rope(x, pos, theta):  # x [T, h, D]
    dim = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    ang = pos.float()[:, None] * inv  # [T, D/2]
    cos, sin = torch.cat([ang.cos()] * 2, -1)[:, None], torch.cat([ang.sin()] * 2, -1)[:, None]
    x1, x2 = x.chunk(2, -1)
    return x * cos + torch.cat([-x2, x1], -1) * sin


def dense_reference(w: dict, cfg: dict, embeds, hidden):
    """One sequence at positions 0..T-1, causal. Returns (out [T, H], logits [T, Vd])."""
    eps, theta = cfg["rms_norm_eps"], cfg.get("rope_theta", 10000.0)
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    n = embeds.shape[0]
    pos = torch.arange(n)
    normed = _rms(hidden, w["midlayer.hidden_norm.weight"], eps)
    residual = normed if cfg.get("norm_before_residual") else hidden
    x = torch.cat([_rms(embeds, w["midlayer.input_layernorm.weight"], eps), normed], -1)
    q = _rope((x @ w["midlayer.self_attn.q_proj.weight"].T).view(n, heads, dim), pos, theta)
    k = _rope((x @ w["midlayer.self_attn.k_proj.weight"].T).view(n, kv_heads, dim), pos, theta)
    v = (x @ w["midlayer.self_attn.v_proj.weight"].T).view(n, kv_heads, dim)
    k = k.repeat_interleave(heads // kv_heads, 1)
    v = v.repeat_interleave(heads // kv_heads, 1)
    scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(dim)
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
    attn = torch.einsum("hqk,khd->qhd", probs, v).reshape(n, heads * dim)
    h = residual + attn @ w["midlayer.self_attn.o_proj.weight"].T
    y = _rms(h, w["midlayer.post_attention_layernorm.weight"], eps)
    y = F.silu(y @ w["midlayer.mlp.gate_proj.weight"].T) * (y @ w["midlayer.mlp.up_proj.weight"].T)
    out = h + y @ w["midlayer.mlp.down_proj.weight"].T
    return out, _rms(out, w["norm.weight"], eps) @ w["lm_head.weight"].T


def new_cache(drafter):
    shape = (NUM_BLOCKS, BLOCK, drafter.num_kv_heads, drafter.head_dim)
    return torch.zeros(shape), torch.zeros(shape)


def close(a, b, tol=1e-4):
    err = (a - b).abs().max().item()
    assert err <= tol * max(1.0, b.abs().max().item()), f"max abs diff {err:.3g}"


def random_inputs(lengths, hidden=64, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, hidden, generator=g), torch.randn(n, hidden, generator=g))
            for n in lengths]


@torch.no_grad()
def run_steps(drafter, inputs, chunks, cache):
    """Feed each sequence chunks[b][step] positions at a time, all sequences per step.
    inputs[b] = (embeds, hidden) [L, H]. Returns out [L, H] per sequence."""
    done, outs = [0] * len(inputs), [[] for _ in inputs]
    for step in range(max(len(c) for c in chunks)):
        active = [b for b in range(len(inputs)) if step < len(chunks[b])]
        spans, embeds, hidden = [], [], []
        for b in active:
            end = done[b] + chunks[b][step]
            spans.append(SeqSpan([0] * (end - done[b]), done[b], TABLES[b]))
            embeds.append(inputs[b][0][done[b]:end])
            hidden.append(inputs[b][1][done[b]:end])
            done[b] = end
        fi = build_forward_inputs(spans, BLOCK)
        out = drafter(torch.cat(embeds), torch.cat(hidden), fi.positions, fi.attn, cache)
        for i, b in enumerate(active):
            outs[b].append(out[fi.query_start[i]:fi.query_start[i + 1]])
    return [torch.cat(o) for o in outs]


# ---- paged forward vs dense ----------------------------------------------------------------
@pytest.mark.parametrize("chunks", [
    [[11], [7]],  # (a) one multi-token extend per sequence, batched
    [[5, 6], [3, 4]],  # extend on top of a cached prefix
    [[1] * 11, [1] * 7],  # (b) token by token through the cache
])
def test_paged_forward_matches_dense(chunks):
    drafter = make_drafter()
    weights = drafter.state_dict_for_save()
    inputs = random_inputs([11, 7])
    outs = run_steps(drafter, inputs, chunks, new_cache(drafter))
    for (embeds, hidden), out in zip(inputs, outs):
        ref_out, ref_logits = dense_reference(weights, drafter.config, embeds, hidden)
        close(out, ref_out)
        close(drafter.compute_logits(out), ref_logits)


@torch.no_grad()
def test_chained_draft_steps_feed_own_output():
    """After an extend from fused aux states, each step's hidden is the previous out."""
    drafter = make_drafter()
    g = torch.Generator().manual_seed(5)
    aux = [torch.randn(6, 64, generator=g) for _ in range(3)]
    embeds = torch.randn(10, 64, generator=g)
    fused = drafter.fuse_aux(aux)
    close(fused, torch.cat(aux, -1) @ drafter.state_dict_for_save()["fc.weight"].T)
    cache = new_cache(drafter)
    fi = build_forward_inputs([SeqSpan([0] * 6, 0, TABLES[0])], BLOCK)
    hidden_in = [fused]
    out = drafter(embeds[:6], fused, fi.positions, fi.attn, cache)
    last = out[-1:]
    for p in range(6, 10):
        fi = build_forward_inputs([SeqSpan([0], p, TABLES[0])], BLOCK)
        hidden_in.append(last)
        last = drafter(embeds[p:p + 1], last, fi.positions, fi.attn, cache)
    ref, _ = dense_reference(drafter.state_dict_for_save(), drafter.config, embeds,
                             torch.cat(hidden_in))
    close(last, ref[-1:])


# ---- checkpoints ---------------------------------------------------------------------------
def test_save_load_round_trip(tmp_path):
    target = tiny_target()
    drafter = make_drafter(aux_layer_ids=[1, 2, 3])
    save_drafter(drafter, tmp_path / "fp32", dtype=torch.float32)
    config = json.loads((tmp_path / "fp32" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLMEagle3"]
    assert config["num_hidden_layers"] == 1 and config["draft_vocab_size"] == 64
    assert config["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [1, 2, 3]
    with safe_open(str(tmp_path / "fp32" / "model.safetensors"), "pt") as f:
        assert set(f.keys()) == CKPT_KEYS
        assert f.get_tensor("midlayer.self_attn.q_proj.weight").shape == (64, 128)
        assert f.get_tensor("fc.weight").shape == (64, 192)
        assert f.get_tensor("d2t").dtype == torch.int64
        assert f.get_tensor("t2d").dtype == torch.bool

    loaded = load_drafter(tmp_path / "fp32", target)
    assert loaded.aux_layer_ids == (1, 2, 3) and loaded.aux_layers_for(4) == (1, 2, 3)
    inputs = random_inputs([9])
    a = run_steps(drafter, inputs, [[9]], new_cache(drafter))[0]
    b = run_steps(loaded, inputs, [[9]], new_cache(loaded))[0]
    assert torch.equal(a, b)
    assert torch.equal(drafter.compute_logits(a), loaded.compute_logits(b))
    assert torch.equal(loaded.d2t, drafter.d2t) and torch.equal(loaded.t2d, drafter.t2d)

    save_drafter(drafter, tmp_path / "fp16")  # shipping default
    with safe_open(str(tmp_path / "fp16" / "model.safetensors"), "pt") as f:
        assert f.get_tensor("fc.weight").dtype == torch.float16
    assert json.loads((tmp_path / "fp16" / "config.json").read_text())["torch_dtype"] == "float16"
    c = run_steps(load_drafter(tmp_path / "fp16", target), inputs, [[9]], new_cache(loaded))[0]
    close(c, a, tol=1e-2)


def _hand_checkpoint(folder: Path, cfg: dict, prefix: str = "", vocab_maps: bool = True,
                     lm_head: bool = True, extra: dict | None = None) -> dict:
    """Raw safetensors with the exact SGLang/vLLM names; returns the tensors (unprefixed)."""
    g = torch.Generator().manual_seed(11)
    hidden, inter, vd, v = 64, 128, cfg["draft_vocab_size"], cfg["vocab_size"]
    kv = cfg["num_key_value_heads"] * cfg["head_dim"]
    shapes = {"fc.weight": (hidden, 3 * hidden),
              "midlayer.self_attn.q_proj.weight": (hidden, 2 * hidden),
              "midlayer.self_attn.k_proj.weight": (kv, 2 * hidden),
              "midlayer.self_attn.v_proj.weight": (kv, 2 * hidden),
              "midlayer.self_attn.o_proj.weight": (hidden, hidden),
              "midlayer.mlp.gate_proj.weight": (inter, hidden),
              "midlayer.mlp.up_proj.weight": (inter, hidden),
              "midlayer.mlp.down_proj.weight": (hidden, inter),
              "lm_head.weight": (vd, hidden)}
    w = {k: 0.15 * torch.randn(s, generator=g) for k, s in shapes.items()}
    for k in ("input_layernorm", "hidden_norm", "post_attention_layernorm"):
        w[f"midlayer.{k}.weight"] = 1 + 0.1 * torch.randn(hidden, generator=g)
    w["norm.weight"] = 1 + 0.1 * torch.randn(hidden, generator=g)
    if vocab_maps:
        ids = torch.randperm(v, generator=g)[:vd].sort().values
        w["d2t"] = ids - torch.arange(vd)
        w["t2d"] = torch.zeros(v, dtype=torch.bool)
        w["t2d"][ids] = True
    if not lm_head:
        del w["lm_head.weight"]
    folder.mkdir()
    tensors = {(k if k == "lm_head.weight" else prefix + k): t for k, t in w.items()}
    save_file({**tensors, **(extra or {})}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(cfg))
    return w


def test_norm_before_residual_option():
    """vLLM's norm_before_residual: the residual is hidden_norm(hidden)."""
    cfg = {**random_drafter_config(tiny_target(), 64), "norm_before_residual": True}
    drafter = Eagle3Drafter(cfg)
    drafter.init_random_(torch.Generator().manual_seed(0), std=0.15)
    inputs = random_inputs([6])
    out = run_steps(drafter, inputs, [[6]], new_cache(drafter))[0]
    close(out, dense_reference(drafter.state_dict_for_save(), cfg, *inputs[0])[0])


def test_narrower_drafter_owns_its_embedding(tmp_path):
    """hidden_size < target_hidden_size: fc is [H, 3 Ht] and embed_tokens is the drafter's."""
    cfg = {**random_drafter_config(tiny_target(), 64), "hidden_size": 32,
           "intermediate_size": 64, "head_dim": 8, "target_hidden_size": 64}
    drafter = Eagle3Drafter(cfg)
    drafter.init_random_(torch.Generator().manual_seed(0), std=0.15)
    assert not drafter.uses_target_embedding
    save_drafter(drafter, tmp_path / "d", dtype=torch.float32)
    assert json.loads((tmp_path / "d" / "config.json").read_text())["target_hidden_size"] == 64
    loaded = load_drafter(tmp_path / "d", tiny_target())
    assert loaded.checkpoint_has_embed_tokens
    assert loaded.state_dict_for_save()["fc.weight"].shape == (32, 192)
    ids = torch.tensor([1, 5, 9])
    assert torch.equal(loaded.embed(ids), drafter.embed(ids))
    hidden = loaded.fuse_aux([torch.randn(3, 64) for _ in range(3)])
    fi = build_forward_inputs([SeqSpan([0] * 3, 0, TABLES[0])], BLOCK)
    out = loaded(loaded.embed(ids), hidden, fi.positions, fi.attn, new_cache(loaded))
    close(out, dense_reference(loaded.state_dict_for_save(), cfg, loaded.embed(ids), hidden)[0])
    with pytest.raises(ConfigError, match="embed"):
        make_drafter().embed(ids)


def test_load_hand_written_checkpoint(tmp_path):
    cfg = random_drafter_config(tiny_target(), draft_vocab_size=48)
    w = _hand_checkpoint(tmp_path / "d", cfg)
    drafter = load_drafter(tmp_path / "d", tiny_target())
    assert drafter.aux_layer_ids is None and drafter.aux_layers_for(4) == default_aux_layer_ids(4)
    assert not drafter.checkpoint_has_embed_tokens
    inputs = random_inputs([10])
    out = run_steps(drafter, inputs, [[4, 1, 5]], new_cache(drafter))[0]
    ref_out, ref_logits = dense_reference(w, cfg, *inputs[0])
    close(out, ref_out)
    close(drafter.compute_logits(out), ref_logits)
    assert torch.equal(drafter.map_to_target(torch.arange(48)), torch.arange(48) + w["d2t"])
    for k, t in drafter.state_dict_for_save().items():
        assert torch.equal(t, w[k]), k


def test_model_prefix_embed_tokens_and_full_vocab_defaults(tmp_path):
    """`model.` prefixed keys, an embed_tokens to ignore, no d2t/t2d and no lm_head."""
    cfg = random_drafter_config(tiny_target())  # draft vocab = vocab
    embed = torch.zeros(256, 64)
    w = _hand_checkpoint(tmp_path / "d", cfg, prefix="model.", vocab_maps=False, lm_head=False,
                         extra={"model.embed_tokens.weight": embed})
    drafter = load_drafter(tmp_path / "d", tiny_target())
    assert drafter.checkpoint_has_embed_tokens and drafter.needs_target_lm_head
    assert torch.equal(drafter.map_to_target(torch.arange(256)), torch.arange(256))
    assert bool(drafter.t2d.all())
    out = torch.randn(3, 64)
    with pytest.raises(ConfigError, match="lm_head"):
        drafter.compute_logits(out)
    head = torch.randn(256, 64)
    drafter.use_target_lm_head(head)
    w["lm_head.weight"] = head
    inputs = random_inputs([5])
    out = run_steps(drafter, inputs, [[5]], new_cache(drafter))[0]
    _, ref_logits = dense_reference(w, cfg, *inputs[0])
    close(drafter.compute_logits(out), ref_logits)


def test_missing_vocab_maps_with_smaller_draft_vocab_is_an_error(tmp_path):
    cfg = random_drafter_config(tiny_target(), draft_vocab_size=32)
    _hand_checkpoint(tmp_path / "d", cfg, vocab_maps=False)
    with pytest.raises(ConfigError, match="neither d2t nor t2d"):
        load_drafter(tmp_path / "d", tiny_target())


def test_missing_and_unknown_weights_are_errors(tmp_path):
    cfg = random_drafter_config(tiny_target(), draft_vocab_size=32)
    _hand_checkpoint(tmp_path / "a", cfg, lm_head=False)
    with pytest.raises(ConfigError, match="missing .*lm_head.weight"):
        load_drafter(tmp_path / "a", tiny_target())
    _hand_checkpoint(tmp_path / "b", cfg, extra={"midlayer.extra.weight": torch.zeros(2)})
    with pytest.raises(ConfigError, match="midlayer.extra.weight"):
        load_drafter(tmp_path / "b", tiny_target())


# ---- vocab maps ----------------------------------------------------------------------------
def test_build_vocab_maps_picks_top_tokens():
    counts = torch.zeros(256)
    chosen = torch.tensor([3, 17, 40, 41, 99, 200, 201, 255])
    counts[chosen] = torch.arange(8, dtype=torch.float32) + 10
    counts[5] = 1  # frequent, but not frequent enough
    d2t, t2d = build_vocab_maps(counts, 8)
    assert d2t.dtype == torch.int64 and d2t.shape == (8,) and t2d.dtype == torch.bool
    assert torch.equal(torch.arange(8) + d2t, chosen)
    assert torch.equal(t2d.nonzero().flatten(), chosen)

    drafter = make_drafter(draft_vocab=8)
    drafter.set_vocab_maps(d2t, t2d)
    assert torch.equal(drafter.map_to_target(torch.arange(8)), chosen)
    assert torch.equal(drafter.map_to_target(torch.tensor([[7, 0]])), torch.tensor([[255, 3]]))
    assert torch.equal(drafter.t2d, t2d)

    # ties go to the lower id; t2d alone determines d2t
    d2t, t2d = build_vocab_maps(torch.ones(10), 3)
    assert torch.equal(d2t, torch.zeros(3, dtype=torch.long))
    drafter = make_drafter(draft_vocab=8)
    _, t2d = build_vocab_maps(counts, 8)
    drafter.set_vocab_maps(None, t2d)
    assert torch.equal(drafter.map_to_target(torch.arange(8)), chosen)


# ---- incompatible drafters -----------------------------------------------------------------
@pytest.mark.parametrize("change, message", [
    (dict(vocab_size=300, draft_vocab_size=64), "vocab_size=300 does not match .*256"),
    (dict(target_hidden_size=96), "target_hidden_size=96 does not match .*hidden_size=64"),
    (dict(eagle_config={"eagle_aux_hidden_state_layer_ids": [1, 2, 4]}), r"\[4\] out of range"),
    (dict(eagle_config={"eagle_aux_hidden_state_layer_ids": [1, 2]}), "must be 3 integers"),
    (dict(num_hidden_layers=2), "num_hidden_layers=1, got 2"),
    (dict(architectures=["MixtralForCausalLM"]), "not an EAGLE-3 drafter"),
])
def test_incompatible_drafter_is_a_config_error(tmp_path, change, message):
    cfg = {**random_drafter_config(tiny_target(), draft_vocab_size=64), **change}
    with pytest.raises(ConfigError, match=message):
        check_compatible(cfg, tiny_target())
    folder = tmp_path / "d"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(cfg))
    save_file({"fc.weight": torch.zeros(1)}, str(folder / "model.safetensors"))
    with pytest.raises(ConfigError, match=message):
        load_drafter(folder, tiny_target())


def test_default_aux_layers_must_fit_a_shallow_target():
    shallow = tiny_target()
    shallow.num_hidden_layers = 2
    with pytest.raises(ConfigError, match="default aux layers"):
        check_compatible(random_drafter_config(shallow), shallow)
