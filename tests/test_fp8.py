"""FP8 drafter: per-channel e4m3 round trip, `eyas quantize-draft` checkpoint layout and size,
loading (fused q/k/v and gate/up shards with their scales), closeness to the original drafter,
lossless greedy speculation, and the errors for bad checkpoints."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoConfig

from eyas import SamplingParams
from eyas.cli import main
from eyas.errors import ConfigError
from eyas.layers.fp8 import (Fp8Linear, dequantize, e4m3fn_to_fnuz, plan_matmul,
                             quantize_per_channel, quantize_per_token)
from eyas.layers.linear import QKVLinear, pack_linear_weights
from eyas.models.eagle3 import load_drafter
from eyas.quant.checkpoint import quantize_drafter
from eyas.quant.config import Fp8QuantConfig, quant_config_of
from test_eagle3 import new_cache, random_inputs, run_steps
from test_engine import PROMPTS, run_all

FN, FNUZ = torch.float8_e4m3fn, torch.float8_e4m3fnuz
QUANTIZED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ULP_REL = 2.0 ** -3  # e4m3: 3 mantissa bits, so one step is 2^-3 of the binade's lower end
# Logits through one quantized layer stack: elementwise weight error <= ULP_REL / 2 (RMS about
# ULP_REL / 2 / sqrt(3) = 3.6%), which the random matmuls average rather than add up.
LOGITS_RTOL = ULP_REL / 2


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


# ---- math ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [FN, FNUZ])
def test_round_trip_error_per_channel_under_e4m3_step(dtype):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 80, generator=g) * 10.0 ** (torch.rand(96, 1, generator=g) * 6 - 3)
    w[5] = 0.0  # an all-zero channel
    q, scale = quantize_per_channel(w, dtype)
    assert q.dtype == dtype and scale.dtype == torch.float32 and scale.shape == (96, 1)
    deq = dequantize(q, scale)
    err = (deq - w).abs()  # [out, in]
    # Round to nearest: <= half a step, 2^-4 |w|, in e4m3's normal range; below it, <= half the
    # subnormal step (smallest_normal / 8, in units of the channel's scale).
    half_subnormal = torch.finfo(dtype).smallest_normal / 8 / 2
    bound = (ULP_REL / 2) * w.abs() + half_subnormal * scale
    assert bool((err <= bound * (1 + 1e-6) + 1e-30).all())
    amax = w.abs().amax(dim=1, keepdim=True)
    live = amax.squeeze(1) > 0
    per_channel = (err.amax(dim=1, keepdim=True) / amax.clamp(min=1e-30)).squeeze(1)[live]
    assert per_channel.max().item() <= ULP_REL / 2 * (1 + 1e-6)  # under the e4m3 step 2^-3
    assert per_channel.max().item() > ULP_REL / 8  # and it is really quantized
    assert torch.equal(deq[5], torch.zeros(80))
    assert torch.allclose(deq.abs().amax(dim=1), amax.squeeze(1), rtol=1e-6)  # max kept exactly


def test_per_token_activation_scaling():
    x = torch.randn(7, 48) * torch.logspace(-2, 2, 7).unsqueeze(1)
    xq, sx = quantize_per_token(x, FN)
    assert xq.dtype == FN and sx.shape == (7, 1)
    assert torch.equal(xq.float().abs().amax(dim=1), torch.full((7,), 448.0))
    err = (xq.float() * sx - x).abs()
    assert bool((err <= ULP_REL / 2 * x.abs() + 2.0 ** -10 * sx + 1e-30).all())


def test_e4m3fn_to_fnuz_is_exact():
    q, scale = quantize_per_channel(torch.randn(32, 64), FN)
    q.view(torch.uint8)[0, 0] = 0x80  # -0 in e4m3fn, NaN bits in e4m3fnuz
    q2, scale2 = e4m3fn_to_fnuz(q, scale)
    assert q2.dtype == FNUZ
    assert torch.equal(dequantize(q2, scale2), dequantize(q, scale))


def test_plan_matmul_by_device():
    assert plan_matmul(FN, "cpu", None) == "dequant"
    assert plan_matmul(FNUZ, "cpu", None) == "dequant"
    assert plan_matmul(FN, "cuda", None) == "dequant"  # pre-sm89 GPU: weight-only
    assert plan_matmul(FN, "cuda", FN) == "scaled_mm"  # sm89+
    assert plan_matmul(FNUZ, "cuda", FNUZ) == "scaled_mm"  # MI300
    assert plan_matmul(FN, "cuda", FNUZ) == "scaled_mm"  # converted exactly on load
    with pytest.raises(ConfigError, match="re-quantize.*--dtype e4m3fn"):
        plan_matmul(FNUZ, "cuda", FN)
    with pytest.raises(ConfigError, match="not supported on device 'mps'"):
        plan_matmul(FN, "mps", None)
    with pytest.raises(ConfigError, match="EYAS_FP8_MATMUL"):
        plan_matmul(FN, "cpu", None, path="fast")


def make_fp8_qkv(seed: int = 0) -> tuple[QKVLinear, Fp8Linear]:
    """A fused q/k/v layer in fp32 and its FP8 twin, loaded shard by shard with scales."""
    g = torch.Generator().manual_seed(seed)
    ref = QKVLinear(64, 16, 4, 2)
    fp8 = Fp8Linear(QKVLinear(64, 16, 4, 2), FN)
    for shard, rows in (("q", 64), ("k", 32), ("v", 32)):
        w = torch.randn(rows, 64, generator=g) * (1 + 10 * torch.rand(rows, 1, generator=g))
        ref.weight_loader(ref.weight, w, shard)
        q, s = quantize_per_channel(w, FN)
        fp8.weight.weight_loader(fp8.weight, q, shard)
        fp8.weight_scale.weight_loader(fp8.weight_scale, s, shard)
    return ref, fp8


def test_fused_shards_load_weights_and_scales():
    ref, fp8 = make_fp8_qkv()
    deq = dequantize(fp8.weight, fp8.weight_scale)
    assert (deq - ref.weight).abs().max() <= ULP_REL / 2 * ref.weight.abs().max()
    # each row's scale is its own shard row's: max |row| maps to the e4m3 max
    assert torch.allclose(fp8.weight_scale.squeeze(1) * 448.0, ref.weight.abs().amax(dim=1))
    x = torch.randn(5, 64)
    assert rel_err(fp8(x), ref(x)) < LOGITS_RTOL


def test_scaled_mm_path_with_per_token_scales():
    """The GPU path's arithmetic (dynamic per-token activation scales), forced on the CPU."""
    ref, fp8 = make_fp8_qkv()
    x = torch.randn(6, 64) * torch.logspace(-1, 1, 6).unsqueeze(1)
    dequant_out = fp8(x)
    if fp8.prepare("scaled_mm") != "scaled_mm":
        pytest.skip("torch._scaled_mm does not run on this CPU build")
    out = fp8(x)
    assert out.shape == (6, 128)
    assert rel_err(out, ref(x)) < LOGITS_RTOL
    assert rel_err(out, dequant_out) < ULP_REL / 2  # only the activations' rounding differs
    assert fp8(x[:0]).shape == (0, 128)


# ---- checkpoint -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fp8_drafter_path(tmp_path_factory, tiny_drafter_path) -> Path:
    return quantize_drafter(tiny_drafter_path, tmp_path_factory.mktemp("fp8") / "drafter").out


def tensors_of(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def layer_bytes(tensors: dict[str, torch.Tensor], with_scales: bool) -> int:
    names = [n for n in tensors if n.endswith(".weight") and n.split(".")[-2] in QUANTIZED]
    names += [f"{n}_scale" for n in names] if with_scales else []
    return sum(tensors[n].numel() * tensors[n].element_size() for n in names)


def test_checkpoint_layout(tiny_drafter_path, fp8_drafter_path):
    src, out = tensors_of(tiny_drafter_path), tensors_of(fp8_drafter_path)
    scales = {n for n in out if n.endswith(".weight_scale")}
    assert set(out) == set(src) | scales and len(scales) == len(QUANTIZED)
    for name, t in src.items():
        layer = name.split(".")[-2] if name.endswith(".weight") else None
        if layer in QUANTIZED:
            assert out[name].dtype == FN and out[name].shape == t.shape
            scale = out[f"{name}_scale"]
            assert scale.dtype == torch.float32 and scale.shape == (t.shape[0], 1)
        else:  # fc, lm_head, norms, d2t, t2d: untouched
            assert out[name].dtype == t.dtype and torch.equal(out[name], t), name
    src_cfg = json.loads((tiny_drafter_path / "config.json").read_text())
    cfg = json.loads((fp8_drafter_path / "config.json").read_text())
    assert cfg.pop("quantization_config") == {
        "quant_method": "fp8", "weight_granularity": "channel", "activation_scheme": "dynamic",
        "fp8_dtype": "e4m3fn", "ignored_layers": ["fc", "lm_head"]}
    assert cfg == src_cfg


@pytest.mark.parametrize("src_dtype, min_drop", [(torch.float32, 0.70), (torch.float16, 0.40)])
def test_checkpoint_size_drop_for_quantized_layers(tmp_path, tiny_drafter_path, src_dtype,
                                                   min_drop):
    src = tmp_path / "src"
    shutil.copytree(tiny_drafter_path, src)
    tensors = {k: v.to(src_dtype) if v.is_floating_point() else v
               for k, v in tensors_of(tiny_drafter_path).items()}
    save_file(tensors, str(src / "model.safetensors"))
    report = quantize_drafter(src, tmp_path / "out")
    before = layer_bytes(tensors, with_scales=False)
    after = layer_bytes(tensors_of(report.out), with_scales=True)
    assert (report.layer_bytes_before, report.layer_bytes_after) == (before, after)
    assert 1 - after / before >= min_drop >= 0.40
    size = lambda f: (f / "model.safetensors").stat().st_size  # noqa: E731
    assert size(src) - size(report.out) >= 0.9 * (before - after)  # the file shrinks as much


# ---- loading ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def target_config(tiny_llama_path):
    return AutoConfig.from_pretrained(tiny_llama_path)


def drafter_outputs(folder: Path, target_config) -> tuple[torch.Tensor, torch.Tensor]:
    """Two sequences through the paged drafter: (midlayer update out - hidden [18, H], logits
    [18, Vd]). The update is where the FP8 layers' error shows undiluted by the residual."""
    drafter = load_drafter(folder, target_config)
    pack_linear_weights(drafter)  # as the engine does on CPU: FP8 layers must stay unpacked
    inputs = random_inputs([11, 7], hidden=drafter.hidden_size)
    out = torch.cat(run_steps(drafter, inputs, [[5, 6], [3, 4]], new_cache(drafter)))
    hidden = torch.cat([h for _, h in inputs])
    return out - hidden, drafter.compute_logits(out)


def test_loaded_fp8_drafter_close_to_original(tiny_drafter_path, fp8_drafter_path, target_config):
    drafter = load_drafter(fp8_drafter_path, target_config)
    fp8_layers = {n for n, m in drafter.named_modules() if isinstance(m, Fp8Linear)}
    assert fp8_layers == {"midlayer.self_attn.qkv_proj", "midlayer.self_attn.o_proj",
                          "midlayer.mlp.gate_up_proj", "midlayer.mlp.down_proj"}
    assert all(m.path == "dequant" for n, m in drafter.named_modules() if n in fp8_layers)
    ref_update, ref_logits = drafter_outputs(tiny_drafter_path, target_config)
    update, logits = drafter_outputs(fp8_drafter_path, target_config)
    assert 0 < rel_err(update, ref_update) < LOGITS_RTOL
    assert 0 < rel_err(logits, ref_logits) < LOGITS_RTOL
    assert (logits.argmax(-1) == ref_logits.argmax(-1)).float().mean() >= 0.8


def test_fp8_drafter_greedy_is_lossless(tiny_engine_factory, fp8_drafter_path):
    params = SamplingParams(max_tokens=20, ignore_eos=True)
    plain_engine = tiny_engine_factory(num_threads=1, enable_prefix_caching=False)
    plain = run_all(plain_engine, PROMPTS, params)
    engine = tiny_engine_factory(num_threads=1, draft=str(fp8_drafter_path), spec_steps=3)
    assert any(isinstance(m, Fp8Linear) for m in engine.drafter.modules())
    assert run_all(engine, PROMPTS, params, stagger=2) == plain


def test_quantize_all_layers_e4m3fnuz(tmp_path, tiny_drafter_path, target_config):
    """fc and lm_head quantized too (--skip ''), in the MI300 format, still run on the CPU."""
    out = quantize_drafter(tiny_drafter_path, tmp_path / "all", dtype="e4m3fnuz", skip=()).out
    cfg = quant_config_of(json.loads((out / "config.json").read_text()))
    assert cfg == Fp8QuantConfig(fp8_dtype="e4m3fnuz", ignored_layers=())
    drafter = load_drafter(out, target_config)
    assert isinstance(drafter.fc, Fp8Linear) and isinstance(drafter.lm_head, Fp8Linear)
    assert drafter.lm_head.weight.dtype == FNUZ
    aux = [torch.randn(5, drafter.target_hidden_size) for _ in range(3)]
    ref = load_drafter(tiny_drafter_path, target_config)
    assert 0 < rel_err(drafter.fuse_aux(aux), ref.fuse_aux(aux)) < LOGITS_RTOL  # fc alone
    (update, logits), (ref_update, ref_logits) = (drafter_outputs(f, target_config)
                                                  for f in (out, tiny_drafter_path))
    assert 0 < rel_err(update, ref_update) < 2 * LOGITS_RTOL  # fc quantized too
    assert 0 < rel_err(logits, ref_logits) < 2 * LOGITS_RTOL  # lm_head too


# ---- errors ------------------------------------------------------------------------------------
def edited_copy(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    tensors = tensors_of(dst)
    edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"))
    return dst


def test_missing_scale_is_an_error(tmp_path, fp8_drafter_path, target_config):
    bad = edited_copy(fp8_drafter_path, tmp_path / "bad",
                      lambda t: t.pop("midlayer.self_attn.k_proj.weight_scale"))
    with pytest.raises(ConfigError, match=r"missing 1 weight.*qkv_proj\.weight_scale\[k\]"):
        load_drafter(bad, target_config)


@pytest.mark.parametrize("shape", [(64,), (64, 2), (63, 1), (1,)])
def test_misshaped_scale_is_an_error(tmp_path, fp8_drafter_path, target_config, shape):
    name = "midlayer.mlp.up_proj.weight_scale"
    bad = edited_copy(fp8_drafter_path, tmp_path / "bad",
                      lambda t: t.__setitem__(name, torch.ones(shape)))
    rows = tensors_of(fp8_drafter_path)[name].shape[0]
    with pytest.raises(ConfigError, match=rf"{name}: weight_scale has shape .*\[{rows}, 1\]"):
        load_drafter(bad, target_config)


def test_bad_scale_values_and_weight_dtype_are_errors(tmp_path, fp8_drafter_path, target_config):
    name = "midlayer.self_attn.o_proj.weight"
    neg = edited_copy(fp8_drafter_path, tmp_path / "neg",
                      lambda t: t[f"{name}_scale"].mul_(-1))
    with pytest.raises(ConfigError, match="negative or non-finite"):
        load_drafter(neg, target_config)
    wide = edited_copy(fp8_drafter_path, tmp_path / "wide",
                       lambda t: t.__setitem__(name, t[name].float()))
    with pytest.raises(ConfigError, match=rf"{name}: expected a float8 weight \(e4m3fn"):
        load_drafter(wide, target_config)


def test_fp8_weights_without_quantization_config(tmp_path, fp8_drafter_path, target_config):
    bad = tmp_path / "bad"
    shutil.copytree(fp8_drafter_path, bad)
    cfg = json.loads((bad / "config.json").read_text())
    del cfg["quantization_config"]
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="is float8, but config.json's quantization_config"):
        load_drafter(bad, target_config)


@pytest.mark.parametrize("qc, match", [
    ({"quant_method": "gptq"}, "quant_method 'gptq' is not supported"),
    ({"quant_method": "fp8", "weight_granularity": "tensor"}, "weight_granularity 'tensor'"),
    ({"quant_method": "fp8", "activation_scheme": "static"}, "activation_scheme 'static'"),
    ({"quant_method": "fp8", "fp8_dtype": "e5m2"}, "fp8_dtype 'e5m2'"),
    ({"quant_method": "fp8", "ignored_layers": ["q_proj"]}, "ignores only some of q_proj"),
])
def test_unsupported_quantization_config(tmp_path, fp8_drafter_path, target_config, qc, match):
    bad = tmp_path / "bad"
    shutil.copytree(fp8_drafter_path, bad)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "quantization_config": qc}))
    with pytest.raises(ConfigError, match=match):
        load_drafter(bad, target_config)


def test_double_quantization_is_an_error(tmp_path, fp8_drafter_path):
    with pytest.raises(ConfigError, match="already quantized"):
        quantize_drafter(fp8_drafter_path, tmp_path / "again")
    assert not (tmp_path / "again").exists()


def test_output_folder_rules(tmp_path, tiny_drafter_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(ConfigError, match="not empty; pass --overwrite"):
        quantize_drafter(tiny_drafter_path, out)
    assert quantize_drafter(tiny_drafter_path, out, overwrite=True).out == out
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert quantize_drafter(tiny_drafter_path, tmp_path / "empty-ok").out.is_dir()
    with pytest.raises(ConfigError, match="would replace the drafter"):
        quantize_drafter(tiny_drafter_path, tiny_drafter_path.parent, overwrite=True)
    assert (tiny_drafter_path / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp left


@pytest.mark.parametrize("skip, match", [
    (("fc", "embed_tokens"), "cannot skip embed_tokens"),
    (("q_proj", "k_proj"), "skip all of them or none"),
    (("gate_proj",), "skip all of them or none"),
])
def test_bad_skip_lists(tmp_path, tiny_drafter_path, skip, match):
    with pytest.raises(ConfigError, match=match):
        quantize_drafter(tiny_drafter_path, tmp_path / "out", skip=skip)


# ---- CLI -------------------------------------------------------------------------------------
def test_cli_quantize_draft(tmp_path, tiny_drafter_path, capsys):
    out = tmp_path / "cli"
    argv = ["quantize-draft", "--draft", str(tiny_drafter_path), "--out", str(out)]
    assert main(argv) == 2
    assert "--fp8" in capsys.readouterr().err
    assert main(argv + ["--fp8", "--skip", "lm_head"]) == 0
    printed = capsys.readouterr().out
    assert "quantized 8 layers to FP8" in printed and str(out) in printed
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.get_tensor("fc.weight").dtype == FN
        assert f.get_tensor("lm_head.weight").dtype == torch.float32
    assert main(argv + ["--fp8"]) == 2  # non-empty output folder
    assert "--overwrite" in capsys.readouterr().err
    assert main(["quantize-draft", "--draft", str(out), "--out", str(tmp_path / "b"), "--fp8"]) == 2
    assert "already quantized" in capsys.readouterr().err


# ---- the shipped drafter (slow; run by the lead once the drafter ships) ------------------------
@pytest.mark.slow
def test_fp8_shipped_drafter_accept_len(tmp_path):
    """SmolLM2's shipped drafter vs its FP8 copy: greedy chain K=5 on the first 12 evaluation
    prompts, max 64 tokens: accept length within 3% and greedy tokens identical to the target."""
    from eyas.hub import resolve_model
    from eyas.llm import LLM
    from eyas.train.data import load_prompts
    from eyas.train.evaluate import evaluate_drafter

    draft = resolve_model("smollm2-135m-instruct-eagle3")
    target = "smollm2-135m-instruct"
    prompts = str(Path(__file__).parents[1] / "data" / "prompts" / "eval.jsonl")
    fp8 = quantize_drafter(draft, tmp_path / "fp8").out
    kw = dict(max_tokens=64, chains=(5,), temperatures=(0.0,), max_prompts=12, trees=(),
              progress=False, device="cpu")
    orig_len = evaluate_drafter(target, str(draft), prompts, **kw)["results"][0]["accept_len"]
    fp8_len = evaluate_drafter(target, str(fp8), prompts, **kw)["results"][0]["accept_len"]
    print(f"accept length K=5 greedy: original {orig_len:.3f}, fp8 {fp8_len:.3f}")
    assert abs(fp8_len - orig_len) <= 0.03 * orig_len

    requests = [s.request() for s in load_prompts(prompts, 12)]
    params = SamplingParams(max_tokens=64)
    tokens = [[o.token_ids for o in LLM(model=target, device="cpu", **extra).generate(
        requests, params, chat=True)] for extra in ({}, {"draft": str(fp8), "spec_steps": 5})]
    assert tokens[0] == tokens[1]
