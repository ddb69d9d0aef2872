"""EAGLE-3 drafter: one Llama decoder layer over [embed(next token) | fused target features].

Checkpoints use the layout SGLang and vLLM load (`LlamaForCausalLMEagle3`):

    fc.weight                    [H, 3 Ht]   3 target aux hidden states -> H
    midlayer.self_attn.{q,k,v}_proj.weight   [*, 2H]   (input is cat(embed, hidden))
    midlayer.self_attn.o_proj.weight, midlayer.mlp.{gate,up,down}_proj.weight
    midlayer.{input_layernorm,hidden_norm,post_attention_layernorm}.weight, norm.weight
    lm_head.weight               [Vd, H]     over the draft vocab
    d2t [Vd] int64               target_id = draft_id + d2t[draft_id]
    t2d [V] bool                 True for target ids that are in the draft vocab

One draft step (SGLang/vLLM `llama_eagle3`, norm_before_residual=False):

    residual = hidden
    x   = cat(input_layernorm(embeds), hidden_norm(hidden))   # [T, 2H]
    h   = attn(x) + residual                                  # paged, rope at `positions`
    out = mlp(post_attention_layernorm(h)) + h                # pre-norm; next step's `hidden`
    logits = lm_head(norm(out))                               # [T, Vd]

`hidden` is fc(cat(aux)) on the first step after the target, then the drafter's own `out`.
Aux layer id i is the residual stream entering target layer i (HF hidden_states[i]), as vLLM
reads `eagle_config.eagle_aux_hidden_state_layer_ids` (SGLang adds 1 to configured ids).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterable, Optional, Sequence, Union

import torch
from safetensors.torch import save_file
from torch import nn

from eyas.errors import ConfigError, ModelNotFoundError
from eyas.layers.attention import AttentionBatch, paged_attention
from eyas.layers.fp8 import is_fp8
from eyas.layers.linear import LMHead, QKVLinear, ReplicatedLinear, RowLinear, VocabEmbedding
from eyas.layers.norm import RMSNorm
from eyas.layers.rotary import RopeScaling, RotaryEmbedding, apply_rotary, rope_from_hf_config
from eyas.models.llama import LlamaMLP
from eyas.models.loader import iter_safetensors
from eyas.models.weights import LLAMA_PACKED_MODULES, load_one, missing_shards
from eyas.quant.apply import prepare_fp8_linears, use_fp8_linears
from eyas.quant.config import quant_config_of

ARCHITECTURE = "LlamaForCausalLMEagle3"
# vLLM's alias, and what the original EAGLE trainer writes (SGLang overrides it by flag).
ACCEPTED_ARCHITECTURES = (ARCHITECTURE, "Eagle3LlamaForCausalLM", "LlamaForCausalLM")
KVCache = tuple[torch.Tensor, torch.Tensor]  # (k, v), each [num_blocks, block_size, Hkv, D]
_REQUIRED = ("hidden_size", "intermediate_size", "num_attention_heads", "rms_norm_eps",
             "max_position_embeddings", "vocab_size")


def default_aux_layer_ids(num_layers: int) -> tuple[int, int, int]:
    """The target layers whose input residual streams feed `fc` when the config names none."""
    return (2, num_layers // 2, num_layers - 3)


@dataclass(frozen=True)
class Eagle3Arch:
    """The drafter's shape, read once from its config.json dict."""

    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    draft_vocab_size: int
    target_hidden_size: int
    rms_norm_eps: float
    max_position: int
    rope_theta: float
    rope_scaling: RopeScaling
    attention_bias: bool
    mlp_bias: bool
    norm_before_residual: bool  # vLLM option: residual = hidden_norm(hidden)
    aux_layer_ids: Optional[tuple[int, ...]]

    @classmethod
    def from_config(cls, config: dict) -> "Eagle3Arch":
        names = list(config.get("architectures") or [])
        if names and not set(names) & set(ACCEPTED_ARCHITECTURES):
            raise ConfigError(f"draft architectures {names} is not an EAGLE-3 drafter; "
                              f"expected {ARCHITECTURE!r}")
        missing = [k for k in _REQUIRED if config.get(k) is None]
        if missing:
            raise ConfigError(f"draft config.json lacks {', '.join(missing)}")
        layers = config.get("num_hidden_layers", 1)
        if layers != 1:
            raise ConfigError(f"EAGLE-3 drafter must have num_hidden_layers=1, got {layers}")
        act = config.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"draft hidden_act {act!r} is not supported (only 'silu')")
        hidden, heads = config["hidden_size"], config["num_attention_heads"]
        kv_heads = config.get("num_key_value_heads") or heads
        if heads % kv_heads:
            raise ConfigError(f"draft num_attention_heads={heads} is not a multiple of "
                              f"num_key_value_heads={kv_heads}")
        vocab = config["vocab_size"]
        draft_vocab = config.get("draft_vocab_size") or vocab
        if not 0 < draft_vocab <= vocab:
            raise ConfigError(f"draft_vocab_size={draft_vocab} must be in [1, vocab_size={vocab}]")
        eagle = config.get("eagle_config") or {}
        aux = eagle.get("eagle_aux_hidden_state_layer_ids",
                        config.get("eagle_aux_hidden_state_layer_ids"))
        if aux is not None:
            if len(aux) != 3 or not all(isinstance(i, int) for i in aux):
                raise ConfigError(f"eagle_aux_hidden_state_layer_ids must be 3 integers, "
                                  f"got {aux!r}")
            aux = tuple(aux)
        theta, scaling = rope_from_hf_config(SimpleNamespace(**config))
        bias = bool(config.get("attention_bias", False))
        return cls(hidden_size=hidden, intermediate_size=config["intermediate_size"],
                   num_heads=heads, num_kv_heads=kv_heads,
                   head_dim=config.get("head_dim") or hidden // heads,
                   vocab_size=vocab, draft_vocab_size=draft_vocab,
                   target_hidden_size=config.get("target_hidden_size") or hidden,
                   rms_norm_eps=config["rms_norm_eps"],
                   max_position=config["max_position_embeddings"], rope_theta=theta,
                   rope_scaling=scaling, attention_bias=bias,
                   mlp_bias=bool(config.get("mlp_bias", False)),
                   norm_before_residual=bool(config.get("norm_before_residual", False)),
                   aux_layer_ids=aux)


class Eagle3Attention(nn.Module):
    """Llama attention whose q/k/v read the 2H-wide cat(embed, hidden)."""

    def __init__(self, arch: Eagle3Arch, dtype: torch.dtype):
        super().__init__()
        self.num_heads, self.head_dim = arch.num_heads, arch.head_dim
        self.scale = arch.head_dim ** -0.5
        self.qk_size = (arch.num_heads + arch.num_kv_heads) * arch.head_dim
        self.qkv_proj = QKVLinear(2 * arch.hidden_size, arch.head_dim, arch.num_heads,
                                  arch.num_kv_heads, bias=arch.attention_bias, dtype=dtype)
        self.o_proj = RowLinear(arch.num_heads * arch.head_dim, arch.hidden_size,
                                bias=arch.attention_bias, dtype=dtype)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attn: AttentionBatch, kv_cache: KVCache) -> torch.Tensor:  # [T, 2H] -> [T, H]
        num_tokens, dim = x.shape[0], self.head_dim
        qkv = self.qkv_proj(x)  # [T, (Hq + 2 Hkv) * D]
        qk = apply_rotary(qkv[:, :self.qk_size].view(num_tokens, -1, dim), cos, sin)
        q, k = qk[:, :self.num_heads], qk[:, self.num_heads:]  # [T, Hq, D], [T, Hkv, D]
        v = qkv[:, self.qk_size:].view(num_tokens, -1, dim)  # [T, Hkv, D]
        out = paged_attention(q, k, v, kv_cache[0], kv_cache[1], attn, self.scale)
        return self.o_proj(out.reshape(num_tokens, -1))


class Eagle3Midlayer(nn.Module):
    def __init__(self, arch: Eagle3Arch, dtype: torch.dtype):
        super().__init__()
        self.norm_before_residual = arch.norm_before_residual
        self.self_attn = Eagle3Attention(arch, dtype)
        self.mlp = LlamaMLP(arch, dtype)  # reads hidden_size, intermediate_size, mlp_bias
        self.input_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, dtype)
        self.hidden_norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, dtype)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, dtype)

    def forward(self, embeds: torch.Tensor, hidden: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor, attn: AttentionBatch, kv_cache: KVCache) -> torch.Tensor:
        normed = self.hidden_norm(hidden)  # [T, H]
        residual = normed if self.norm_before_residual else hidden
        x = torch.cat([self.input_layernorm(embeds), normed], dim=-1)  # [T, 2H]
        h = residual + self.self_attn(x, cos, sin, attn, kv_cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class Eagle3Drafter(nn.Module):
    packed_modules_mapping = LLAMA_PACKED_MODULES

    def __init__(self, config: dict, dtype: torch.dtype = torch.float32,
                 max_position: Optional[int] = None):
        """max_position: rope table rows, at least the config's (pass the target's length)."""
        super().__init__()
        arch = Eagle3Arch.from_config(config)
        self.config, self.arch, self.dtype = dict(config), arch, dtype
        self.hidden_size, self.num_kv_heads = arch.hidden_size, arch.num_kv_heads
        self.head_dim, self.num_layers = arch.head_dim, 1
        self.vocab_size, self.draft_vocab_size = arch.vocab_size, arch.draft_vocab_size
        self.target_hidden_size = arch.target_hidden_size
        self.aux_layer_ids = arch.aux_layer_ids
        # The target's embedding serves when widths agree; otherwise the drafter owns one.
        self.uses_target_embedding = arch.target_hidden_size == arch.hidden_size
        self.checkpoint_has_embed_tokens = False
        self.needs_target_lm_head = False  # set when a checkpoint omits lm_head (Vd == V)
        if not self.uses_target_embedding:
            self.embed_tokens = VocabEmbedding(arch.vocab_size, arch.hidden_size, dtype)
        self.fc = ReplicatedLinear(3 * arch.target_hidden_size, arch.hidden_size, dtype=dtype)
        self.midlayer = Eagle3Midlayer(arch, dtype)
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, dtype)
        self.lm_head = LMHead(arch.draft_vocab_size, arch.hidden_size, dtype)
        self.rotary_emb = RotaryEmbedding(arch.head_dim, max(arch.max_position, max_position or 0),
                                          arch.rope_theta, arch.rope_scaling, dtype)
        self.register_buffer("d2t", torch.zeros(arch.draft_vocab_size, dtype=torch.long))
        t2d = torch.zeros(arch.vocab_size, dtype=torch.bool)
        t2d[:arch.draft_vocab_size] = True
        self.register_buffer("t2d", t2d)  # with d2t = 0: draft id i is target id i
        self.quant_config = quant_config_of(config)  # FP8 drafter (eyas quantize-draft)
        if self.quant_config is not None:
            use_fp8_linears(self, self.quant_config)

    # ---- compute -------------------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:  # [T] -> [T, H]
        """The drafter's own embedding; only when uses_target_embedding is False."""
        if self.uses_target_embedding:
            raise ConfigError("this drafter takes its token embeddings from the target")
        return self.embed_tokens(input_ids)

    def fuse_aux(self, aux: Sequence[torch.Tensor]) -> torch.Tensor:
        """3 target aux hidden states, each [T, Ht] (the target's dtype) -> fc(cat) [T, H] (ours)."""
        return self.fc(torch.cat(list(aux), dim=-1).to(self.dtype))

    def forward(self, embeds: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor,
                attn: AttentionBatch, kv_cache: KVCache) -> torch.Tensor:
        """embeds [T, H] (of each position's next token), hidden [T, H] -> out [T, H] pre-norm.

        Writes this step's K/V into kv_cache at attn.slot_mapping. The target's embeddings come
        in its dtype, which may differ from ours (spec_dtype); hidden is ours already (fuse_aux's
        output or our own previous out).
        """
        cos, sin = self.rotary_emb(positions)  # [T, 1, D] each
        return self.midlayer(embeds.to(self.dtype), hidden, cos, sin, attn, kv_cache)

    def compute_logits(self, out: torch.Tensor) -> torch.Tensor:  # [S, H] -> [S, Vd] fp32
        if self.needs_target_lm_head:
            raise ConfigError("drafter checkpoint has no lm_head: call use_target_lm_head first")
        return self.lm_head(self.norm(out)).float()

    def map_to_target(self, draft_ids: torch.Tensor) -> torch.Tensor:  # [...] -> [...] target ids
        return draft_ids + self.d2t[draft_ids]

    def aux_layers_for(self, num_target_layers: int) -> tuple[int, ...]:
        """Configured aux layer ids, else the default for a target of that depth."""
        return self.aux_layer_ids or default_aux_layer_ids(num_target_layers)

    def use_target_lm_head(self, weight: torch.Tensor) -> None:
        """Share the target's [V, H] head, for checkpoints without lm_head (Vd == V)."""
        if tuple(weight.shape) != tuple(self.lm_head.weight.shape):
            raise ConfigError(f"target lm_head {tuple(weight.shape)} does not fit the drafter's "
                              f"{tuple(self.lm_head.weight.shape)}")
        if weight.dtype != self.dtype:  # a drafter in another dtype than its target's (spec_dtype)
            weight = weight.detach().to(self.dtype)
        self.lm_head.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(
            weight, requires_grad=False)
        self.needs_target_lm_head = False

    # ---- weights -------------------------------------------------------------------------
    @torch.no_grad()
    def init_random_(self, generator: Optional[torch.Generator] = None, std: float = 0.02) -> None:
        """Random init (tests, training from scratch): N(0, std) matrices, norms near 1."""
        for name, p in self.named_parameters():
            noise = torch.randn(p.shape, generator=generator).to(p)
            p.copy_(1.0 + 0.1 * noise if "norm" in name else std * noise)

    @torch.no_grad()
    def set_vocab_maps(self, d2t: Optional[torch.Tensor], t2d: Optional[torch.Tensor]) -> None:
        """Install d2t/t2d, deriving a missing one from the other; identity if both are None
        and draft_vocab_size == vocab_size."""
        vd, v = self.draft_vocab_size, self.vocab_size
        if d2t is None and t2d is None:
            if vd != v:
                raise ConfigError(f"drafter checkpoint has neither d2t nor t2d, but its "
                                  f"draft_vocab_size={vd} != vocab_size={v}")
            d2t = torch.zeros(vd, dtype=torch.long)
        if t2d is not None:
            t2d = t2d.to(device="cpu", dtype=torch.bool).reshape(-1)
            if t2d.shape[0] != v:
                raise ConfigError(f"t2d has {t2d.shape[0]} entries, expected vocab_size={v}")
            if d2t is None:
                if int(t2d.sum()) != vd:
                    raise ConfigError(f"t2d marks {int(t2d.sum())} tokens, expected "
                                      f"draft_vocab_size={vd}")
                d2t = t2d.nonzero().flatten() - torch.arange(vd)
        d2t = d2t.to(device="cpu", dtype=torch.long).reshape(-1)
        if d2t.shape[0] != vd:
            raise ConfigError(f"d2t has {d2t.shape[0]} entries, expected draft_vocab_size={vd}")
        targets = torch.arange(vd) + d2t
        if targets.min() < 0 or targets.max() >= v or targets.unique().numel() != vd:
            raise ConfigError(f"d2t does not map the draft vocab onto distinct target ids < {v}")
        derived = torch.zeros(v, dtype=torch.bool)
        derived[targets] = True
        if t2d is not None and not torch.equal(t2d, derived):
            raise ConfigError("d2t and t2d disagree on which target tokens are drafted")
        self.d2t.copy_(d2t)
        self.t2d.copy_(derived)

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy checkpoint tensors (SGLang/vLLM names, optional `model.` prefix, vLLM's
        `layers.0.` for `midlayer.`) into our fused parameters and vocab maps."""
        params = dict(self.named_parameters())
        loaded: set[tuple[str, object]] = set()
        maps: dict[str, torch.Tensor] = {}
        unexpected: list[str] = []
        for raw, tensor in weights:
            name = raw[len("model."):] if raw.startswith("model.") else raw
            if name.startswith("layers.0."):
                name = "midlayer." + name[len("layers.0."):]
            if name.endswith("rotary_emb.inv_freq"):
                continue
            if name in ("d2t", "t2d"):
                maps[name] = tensor
                continue
            if name == "embed_tokens.weight":
                self.checkpoint_has_embed_tokens = True
                if self.uses_target_embedding:
                    continue  # the target's embedding is used
            key = load_one(params, name, tensor, self.packed_modules_mapping, f"drafter weight {raw}")
            if key is None:
                unexpected.append(raw)
            elif is_fp8(tensor) and not is_fp8(params[key[0]]):
                raise ConfigError(f"drafter weight {raw} is float8, but config.json's "
                                  f"quantization_config does not quantize its layer")
            else:
                loaded.add(key)
        if unexpected:
            raise ConfigError(f"drafter checkpoint has weights an EAGLE-3 drafter does not know: "
                              f"{', '.join(unexpected[:20])}")
        missing = missing_shards(params, self.packed_modules_mapping, loaded)
        if missing == ["lm_head.weight"] and self.draft_vocab_size == self.vocab_size:
            self.needs_target_lm_head = True  # shares the target's head
        elif missing:
            raise ConfigError(f"drafter checkpoint is missing {len(missing)} weight(s): "
                              f"{', '.join(missing[:20])}")
        self.set_vocab_maps(maps.get("d2t"), maps.get("t2d"))

    def state_dict_for_save(self) -> dict[str, torch.Tensor]:
        """Unfused checkpoint tensors under SGLang/vLLM names, plus d2t and t2d."""
        attn, mlp = self.midlayer.self_attn, self.midlayer.mlp
        out: dict[str, torch.Tensor] = {}
        for name, p in self.named_parameters():
            if name.startswith("midlayer.self_attn.qkv_proj."):
                kind = name.rsplit(".", 1)[1]  # weight | bias
                for shard, (offset, size, _) in attn.qkv_proj.shards.items():
                    out[f"midlayer.self_attn.{shard}_proj.{kind}"] = p.narrow(0, offset, size)
            elif name.startswith("midlayer.mlp.gate_up_proj."):
                kind = name.rsplit(".", 1)[1]
                inter = mlp.gate_up_proj.local_sizes[0]
                out[f"midlayer.mlp.gate_proj.{kind}"] = p.narrow(0, 0, inter)
                out[f"midlayer.mlp.up_proj.{kind}"] = p.narrow(0, inter, inter)
            else:
                out[name] = p
        out["d2t"], out["t2d"] = self.d2t, self.t2d
        return {k: v.detach().contiguous() for k, v in out.items()}


# ---- folders ---------------------------------------------------------------------------------
def _target_dims(target_config: Any) -> tuple[int, int, int, Optional[int]]:
    """(vocab, hidden, num_layers, max_position) of an HF config or one of our models."""
    num_layers = getattr(target_config, "num_hidden_layers", None)
    if num_layers is None:
        num_layers = getattr(target_config, "num_layers")
    return (target_config.vocab_size, target_config.hidden_size, num_layers,
            getattr(target_config, "max_position_embeddings", None))


def check_compatible(config: dict, target_config: Any) -> tuple[int, ...]:
    """Raise ConfigError unless the drafter config fits the target; returns the aux layer ids."""
    arch = Eagle3Arch.from_config(config)
    vocab, hidden, num_layers, _ = _target_dims(target_config)
    if arch.vocab_size != vocab:
        raise ConfigError(f"drafter vocab_size={arch.vocab_size} does not match the target's "
                          f"vocab_size={vocab}")
    if arch.target_hidden_size != hidden:
        raise ConfigError(f"drafter target_hidden_size={arch.target_hidden_size} does not match "
                          f"the target's hidden_size={hidden}")
    aux = arch.aux_layer_ids or default_aux_layer_ids(num_layers)
    bad = [i for i in aux if not 0 <= i < num_layers]
    if bad:
        where = "eagle_aux_hidden_state_layer_ids" if arch.aux_layer_ids else "default aux layers"
        raise ConfigError(f"drafter {where} {list(aux)}: layer id(s) {bad} out of range "
                          f"[0, {num_layers}) for a {num_layers}-layer target")
    return aux


def load_drafter(folder: Union[str, Path], target_config: Any,
                 dtype: torch.dtype = torch.float32,
                 device: Union[str, torch.device] = "cpu") -> Eagle3Drafter:
    """Build the EAGLE-3 drafter in `folder` for a target, check they fit, load its weights."""
    folder = Path(folder)
    path = folder / "config.json"
    if not path.is_file():
        raise ModelNotFoundError(f"no config.json in drafter folder {folder}")
    config = json.loads(path.read_text())
    check_compatible(config, target_config)
    max_position = _target_dims(target_config)[3]
    with torch.device(device):
        drafter = Eagle3Drafter(config, dtype=dtype, max_position=max_position)
    drafter.load_weights(iter_safetensors(folder))
    if drafter.quant_config is not None:
        prepare_fp8_linears(drafter)  # scaled_mm on fp8 GPUs, else dequantize
    drafter.eval()
    drafter.requires_grad_(False)
    return drafter


def save_drafter(drafter: Eagle3Drafter, folder: Union[str, Path],
                 extra_config: Optional[dict] = None,
                 dtype: torch.dtype = torch.float16) -> Path:
    """Write config.json + model.safetensors in the layout SGLang and vLLM load."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    arch = drafter.arch
    config = dict(drafter.config)
    config.setdefault("model_type", "llama")
    config.update(architectures=[ARCHITECTURE], num_hidden_layers=1,
                  hidden_size=arch.hidden_size, vocab_size=arch.vocab_size,
                  draft_vocab_size=arch.draft_vocab_size, head_dim=arch.head_dim,
                  num_key_value_heads=arch.num_kv_heads,
                  torch_dtype=str(dtype).removeprefix("torch."))
    if arch.target_hidden_size != arch.hidden_size:
        config["target_hidden_size"] = arch.target_hidden_size
    if arch.aux_layer_ids is not None:
        config["eagle_config"] = {**(config.get("eagle_config") or {}),
                                  "eagle_aux_hidden_state_layer_ids": list(arch.aux_layer_ids)}
    config.update(extra_config or {})
    tensors = {k: (v.to(dtype) if v.is_floating_point() else v).cpu()
               for k, v in drafter.state_dict_for_save().items()}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return folder


def build_vocab_maps(token_counts: torch.Tensor,
                     draft_vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The draft_vocab_size most frequent target tokens (ties: lower id), in target-id order.

    Returns d2t [Vd] int64 (d2t[i] = target_id_i - i) and t2d [V] bool.
    e.g. counts [5, 0, 9, 1], Vd 2 -> ids [0, 2], d2t [0, 1], t2d [T, F, T, F]
    """
    counts = token_counts.reshape(-1).cpu()
    vocab = counts.shape[0]
    if not 0 < draft_vocab_size <= vocab:
        raise ConfigError(f"draft_vocab_size={draft_vocab_size} must be in [1, {vocab}]")
    order = torch.sort(counts, descending=True, stable=True).indices
    ids = order[:draft_vocab_size].sort().values  # [Vd]
    t2d = torch.zeros(vocab, dtype=torch.bool)
    t2d[ids] = True
    return ids - torch.arange(draft_vocab_size), t2d


def random_drafter_config(target_hf_config: Any, draft_vocab_size: Optional[int] = None,
                          intermediate_size: Optional[int] = None,
                          aux_layer_ids: Optional[Sequence[int]] = None) -> dict:
    """A drafter config.json dict shaped for a target (heads, rope, vocab from the target)."""
    t = target_hf_config
    vocab, hidden = t.vocab_size, t.hidden_size
    heads = t.num_attention_heads
    theta, scaling = rope_from_hf_config(t)
    rope = dict(getattr(t, "rope_parameters", None) or getattr(t, "rope_scaling", None) or {})
    rope.pop("rope_theta", None)
    config = {
        "architectures": [ARCHITECTURE], "model_type": "llama", "num_hidden_layers": 1,
        "hidden_size": hidden, "target_hidden_size": hidden,
        "intermediate_size": intermediate_size or t.intermediate_size,
        "num_attention_heads": heads,
        "num_key_value_heads": getattr(t, "num_key_value_heads", None) or heads,
        "head_dim": getattr(t, "head_dim", None) or hidden // heads,
        "hidden_act": "silu", "rms_norm_eps": t.rms_norm_eps,
        "max_position_embeddings": t.max_position_embeddings,
        "rope_theta": theta,
        "rope_scaling": rope if scaling.rope_type != "default" else None,
        "vocab_size": vocab, "draft_vocab_size": draft_vocab_size or vocab,
        "tie_word_embeddings": False,
    }
    if aux_layer_ids is not None:
        config["eagle_config"] = {"eagle_aux_hidden_state_layer_ids": list(aux_layer_ids)}
    return config
