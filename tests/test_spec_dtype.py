"""spec_dtype: the drafter in its own dtype beside the target's (bf16 beside an fp32 target on a
CPU with native bf16). Verification stays in the target's dtype, so output is unchanged."""
import pytest
import torch

from eyas import SamplingParams
from eyas.config import SpecConfig
from eyas.engine import resolve_draft_dtype
from eyas.errors import ConfigError
from eyas.layers.linear import can_pack_weights, linear
from test_engine import PROMPTS, run_all

PARAMS = SamplingParams(max_tokens=16, ignore_eos=True)
CPU = torch.device("cpu")


def test_resolve_draft_dtype():
    bf16_native = can_pack_weights(CPU, torch.bfloat16)
    assert resolve_draft_dtype("auto", torch.float32, CPU) == (torch.bfloat16 if bf16_native else torch.float32)
    assert resolve_draft_dtype("auto", torch.bfloat16, CPU) == torch.bfloat16
    assert resolve_draft_dtype("auto", torch.float16, torch.device("cuda")) == torch.float16
    assert resolve_draft_dtype("float32", torch.bfloat16, CPU) == torch.float32
    assert resolve_draft_dtype("bf16", torch.float32, CPU) == torch.bfloat16
    with pytest.raises(ConfigError, match="spec_dtype"):
        SpecConfig(dtype="int8")


@pytest.mark.parametrize("spec", [{"spec_steps": 3, "spec_policy": "fixed"},
                                  {"spec_steps": 3, "spec_topk": 2, "spec_draft_tokens": 4,
                                   "spec_policy": "fixed"},
                                  {"spec_steps": 3}])  # adaptive
def test_bf16_drafter_beside_fp32_target_is_lossless(tiny_engine_factory, tiny_drafter_path, spec):
    plain = run_all(tiny_engine_factory(), PROMPTS, PARAMS)
    engine = tiny_engine_factory(draft=str(tiny_drafter_path), spec_dtype="bfloat16", **spec)
    assert engine.dtype == torch.float32 and engine.model.lm_head.weight.dtype == torch.float32
    assert engine.drafter.fc.weight.dtype == torch.bfloat16
    assert engine.spec.proposer.kv_cache[0].dtype == torch.bfloat16
    assert run_all(engine, PROMPTS, PARAMS, stagger=2) == plain
    # sampled requests too: the drafts' q stay fp32 distributions over the target vocab
    sampled = SamplingParams(max_tokens=16, ignore_eos=True, temperature=0.8, seed=5)
    outs = run_all(engine, PROMPTS[:2], sampled)
    assert sorted(outs) == ["0", "1"] and all(len(t) == 16 for t in outs.values())


def test_bf16_drafter_proposes_what_fp32_does(tiny_engine_factory, tiny_drafter_path):
    """The same checkpoint in bf16 and fp32 scores the same inputs alike: the argmax draft token
    agrees at nearly every row and the logits stay close."""
    engines = {dt: tiny_engine_factory(draft=str(tiny_drafter_path), spec_dtype=dt)
               for dt in ("float32", "bfloat16")}
    gen = torch.Generator().manual_seed(0)
    h = engines["float32"].drafter.target_hidden_size
    aux = [torch.randn(64, h, generator=gen) for _ in range(3)]  # [T, Ht] x 3, fp32 like the target's
    logits = {}
    for dt, engine in engines.items():
        drafter = engine.drafter
        fused = drafter.fuse_aux(aux)  # [T, H] in the drafter's dtype
        assert fused.dtype == drafter.dtype
        logits[dt] = drafter.compute_logits(fused)  # [T, Vd] fp32 (norm + head, no attention)
        assert logits[dt].dtype == torch.float32
    a, b = logits["float32"], logits["bfloat16"]
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.9
    assert torch.nn.functional.cosine_similarity(a, b, dim=-1).min() > 0.99


@pytest.mark.skipif(not can_pack_weights(CPU, torch.bfloat16), reason="no native bf16 in this CPU's oneDNN")
def test_packed_bf16_linear_matches_plain():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(96, 64, generator=gen).to(torch.bfloat16)  # [out, in]
    packed = torch.ops.mkldnn._reorder_linear_weight(w, 16)
    for rows in (1, 5, 40):
        x = torch.randn(rows, 64, generator=gen).to(torch.bfloat16)
        torch.testing.assert_close(linear(x, w, None, packed), torch.nn.functional.linear(x, w),
                                   rtol=1.6e-2, atol=1e-2)
