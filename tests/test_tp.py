"""Tensor-parallel Llama shards (gloo on CPU) against the same checkpoint at tp=1.

Multi-rank tests start one process per rank (forkserver); each joins a gloo group on
127.0.0.1, loads its shard, runs prefill + paged decode steps through its own local-layout KV
cache and saves logits and aux hidden states; the parent compares every rank with tp=1.
Shard-loading and config checks build ranks in-process (no group: their collectives are never
called).
"""
from __future__ import annotations

import multiprocessing as mp
import time
import traceback
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, MixtralConfig, Qwen2Config, Qwen3Config

from eyas.distributed import ParallelState, destroy_parallel, free_port, init_parallel
from eyas.errors import ConfigError
from eyas.kv.cache import allocate_kv, kv_layout_for
from eyas.layers.linear import can_pack_weights, kv_heads_per_rank, pack_linear_weights
from eyas.models.llama import LlamaForCausalLM
from eyas.models.loader import load_model
from util_models import TINY, make_hf_model, run_chunked, save_hf_model

BLOCK_SIZE = 4
NUM_BLOCKS = 16
BLOCK_TABLES = [[5, 2, 7, 12], [9, 0, 3], [11, 1]]  # 16, 12 and 8 slots, disjoint
PROMPT_LENS = (13, 9, 6)
CHUNKS = [[9, 1, 1, 1, 1], [5, 1, 1, 1, 1], [2, 1, 3]]  # prefill (chunked for seq 2), then decode
AUX_LAYERS = (0, 1)
SPAWN_TIMEOUT_S = 120.0
FAIL_ON_LAST_RANK = "fail_on_last_rank"  # a case name that makes the last rank raise
# Importable from the default sys.path (the forkserver ignores the test's; ranks then import
# this module themselves, cheaply).
FORKSERVER_PRELOAD = ["eyas.models.loader", "eyas.distributed", "eyas.kv.cache",
                      "eyas.workers.input_batch", "transformers.models.auto.modeling_auto",
                      "pytest"]
TINY_CONFIGS = {  # vocab 251: the last rank's vocab shard is padded at tp=2 and tp=4
    "qwen2_bias": Qwen2Config(**{**TINY, "vocab_size": 251}, tie_word_embeddings=False),
    "kv_replicated": LlamaConfig(**{**TINY, "vocab_size": 251, "num_key_value_heads": 1},
                                 attention_bias=True, mlp_bias=True, tie_word_embeddings=True),
    "qwen3": Qwen3Config(**TINY, head_dim=32, tie_word_embeddings=False),
}


# ---- run one model over the fixed schedule (in a rank process, or in the parent at tp=1) ----

def _prompts(vocab_size: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(7)
    return [torch.randint(0, vocab_size, (n,), generator=g).tolist() for n in PROMPT_LENS]


def _run_case(folder: str, parallel: ParallelState, pack: bool) -> dict:
    model = load_model(folder, parallel=parallel)
    if pack and can_pack_weights(torch.device("cpu"), torch.float32):
        pack_linear_weights(model)  # the engine's CPU default: RowLinear reduces packed outputs
    layout = kv_layout_for(model)
    kv = allocate_kv(layout, NUM_BLOCKS, BLOCK_SIZE, torch.float32, torch.device("cpu"))
    with torch.inference_mode():
        logits, aux = run_chunked(model, _prompts(model.vocab_size), BLOCK_TABLES, CHUNKS, kv,
                                  BLOCK_SIZE, AUX_LAYERS)
    return {"logits": logits, "aux": aux, "kv_shape": tuple(kv[0][0].shape)}


def _rank_main(rank: int, tp_size: int, port: int, cases: list[tuple[str, str, bool]],
               out_dir: str) -> None:
    """One tensor-parallel rank: join the group, run every case, save results per case."""
    torch.set_num_threads(1)
    try:
        state = init_parallel(tp_size, rank, master_port=port, timeout_s=60)
        for name, folder, pack in cases:
            if name == FAIL_ON_LAST_RANK and rank == tp_size - 1:
                raise RuntimeError("injected failure on the last rank")
            torch.save(_run_case(folder, state, pack), Path(out_dir, f"{name}.rank{rank}.pt"))
    except BaseException:
        Path(out_dir, f"error.rank{rank}.txt").write_text(traceback.format_exc())
        raise
    finally:
        destroy_parallel()


def _spawn_ranks(tp_size: int, cases: list[tuple[str, str, bool]], out_dir: Path) -> None:
    """Run _rank_main on tp_size spawned processes; fail (and kill the rest) as soon as one
    rank fails, or after SPAWN_TIMEOUT_S. No process outlives this call."""
    # forkserver: the server imports torch, transformers and eyas once; each rank is a fork of
    # it rather than a fresh interpreter (~7 CPU-s of imports each on this machine).
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(FORKSERVER_PRELOAD)
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, tp_size, port, cases, str(out_dir)),
                         name=f"tp-rank{r}", daemon=True) for r in range(tp_size)]
    try:
        for p in procs:
            p.start()
        deadline = time.monotonic() + SPAWN_TIMEOUT_S
        while any(p.is_alive() for p in procs) and time.monotonic() < deadline:
            if any(p.exitcode not in (None, 0) for p in procs):
                break  # a peer would wait on its collectives until the gloo timeout
            time.sleep(0.1)
        errors = sorted(out_dir.glob("error.rank*.txt"))
        if errors:
            pytest.fail("\n".join(f"{e.name}:\n{e.read_text()}" for e in errors))
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        if hung:
            pytest.fail(f"ranks {hung} still running after {SPAWN_TIMEOUT_S:g}s")
        codes = [p.exitcode for p in procs]
        if any(codes):
            pytest.fail(f"rank exit codes {codes}")
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join(10)


# ---- fixtures ----

@pytest.fixture(scope="module")
def folders(tmp_path_factory, tiny_llama_path) -> dict[str, str]:
    """name -> checkpoint folder: the tiny Llama (4 heads, 2 kv heads, tied, 49k vocab) and
    the tiny configs above."""
    out = {"tiny_llama": str(tiny_llama_path)}
    for i, (name, cfg) in enumerate(TINY_CONFIGS.items()):
        hf = make_hf_model(cfg, seed=10 + i)
        out[name] = str(save_hf_model(hf, tmp_path_factory.mktemp(name)))
    return out


@pytest.fixture(scope="module")
def references(folders) -> dict[str, dict]:
    return {name: _run_case(folder, ParallelState(), pack=False)
            for name, folder in folders.items()}


def _close(ours: torch.Tensor, ref: torch.Tensor, what: str, rel: float = 1e-4) -> None:
    tol = rel * max(1.0, ref.abs().max().item())
    err = (ours - ref).abs().max().item()
    assert err <= tol, f"{what}: max abs diff {err:.3g} > {tol:.3g}"


# ---- multi-process: every rank equals tp=1 ----

@pytest.mark.parametrize("tp_size", [2, 4])
def test_tp_ranks_match_tp1(tmp_path, folders, references, tp_size):
    packed = {"tiny_llama", "qwen2_bias"}  # the others run the plain F.linear path
    cases = [(name, folder, name in packed) for name, folder in folders.items()]
    _spawn_ranks(tp_size, cases, tmp_path)
    for name in folders:
        ref = references[name]
        num_kv = TINY_CONFIGS[name].num_key_value_heads if name in TINY_CONFIGS else 2
        for rank in range(tp_size):
            got = torch.load(tmp_path / f"{name}.rank{rank}.pt")
            where = f"{name} tp={tp_size} rank {rank}"
            # local KV layout: same blocks and block size as tp=1, this rank's kv heads
            local = (NUM_BLOCKS, BLOCK_SIZE, kv_heads_per_rank(num_kv, tp_size))
            assert got["kv_shape"][:3] == local, where
            assert got["kv_shape"][3] == ref["kv_shape"][3], where
            for b in range(len(PROMPT_LENS)):
                _close(got["logits"][b], ref["logits"][b], f"{where} seq {b} logits")
                for j, layer in enumerate(AUX_LAYERS):
                    _close(got["aux"][b][j], ref["aux"][b][j], f"{where} seq {b} aux {layer}")


def test_a_failing_rank_fails_fast_and_leaves_no_process(tmp_path, folders):
    """The last rank dies before its first collective; rank 0 would wait in it (gloo timeout
    60 s): the harness reports the error and kills rank 0 at once."""
    start = time.monotonic()
    with pytest.raises(pytest.fail.Exception, match="injected failure on the last rank"):
        _spawn_ranks(2, [(FAIL_ON_LAST_RANK, folders["qwen2_bias"], False)], tmp_path)
    assert time.monotonic() - start < 45
    assert not [p for p in mp.active_children() if p.name.startswith("tp-rank")]


# ---- in-process: shard loading, config errors, the single-rank state ----

def _rows(w: torch.Tensor, index: int, size: int) -> torch.Tensor:
    return w[index * size:(index + 1) * size]


@pytest.mark.parametrize("name,tp_size", [("qwen2_bias", 2), ("kv_replicated", 2),
                                          ("kv_replicated", 4), ("qwen3", 4)])
def test_rank_shards_are_checkpoint_slices(name, tp_size):
    cfg = TINY_CONFIGS[name]
    sd = make_hf_model(cfg).state_dict()
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    hq, hkv, inter = heads // tp_size, kv_heads_per_rank(kv_heads, tp_size), 128 // tp_size
    vocab_rows = -(-cfg.vocab_size // tp_size)
    for rank in range(tp_size):
        model = LlamaForCausalLM(cfg, parallel=ParallelState(tp_size, rank))
        model.load_weights(sd.items())
        params = dict(model.named_parameters())
        assert (model.num_kv_heads, model.head_dim, model.num_layers) == (hkv, dim, 2)
        kv_index = rank if kv_heads >= tp_size else rank * kv_heads // tp_size
        qkv_kinds = ("weight", "bias") if name in ("qwen2_bias", "kv_replicated") else ("weight",)
        for i in range(2):
            pre = f"model.layers.{i}."
            for kind in qkv_kinds:
                want = torch.cat([_rows(sd[f"{pre}self_attn.q_proj.{kind}"], rank, hq * dim),
                                  _rows(sd[f"{pre}self_attn.k_proj.{kind}"], kv_index, hkv * dim),
                                  _rows(sd[f"{pre}self_attn.v_proj.{kind}"], kv_index, hkv * dim)])
                assert torch.equal(params[f"{pre}self_attn.qkv_proj.{kind}"], want), (rank, kind)
            o = sd[f"{pre}self_attn.o_proj.weight"]
            assert torch.equal(params[f"{pre}self_attn.o_proj.weight"],
                               o[:, rank * hq * dim:(rank + 1) * hq * dim])
            gate_up = torch.cat([_rows(sd[f"{pre}mlp.gate_proj.weight"], rank, inter),
                                 _rows(sd[f"{pre}mlp.up_proj.weight"], rank, inter)])
            assert torch.equal(params[f"{pre}mlp.gate_up_proj.weight"], gate_up)
            down = sd[f"{pre}mlp.down_proj.weight"]
            assert torch.equal(params[f"{pre}mlp.down_proj.weight"],
                               down[:, rank * inter:(rank + 1) * inter])
            if name == "kv_replicated":  # row-parallel biases: whole, added by rank 0 only
                attn, mlp = model.model.layers[i].self_attn, model.model.layers[i].mlp
                assert torch.equal(attn.o_proj.bias, sd[f"{pre}self_attn.o_proj.bias"])
                assert attn.o_proj.add_bias == mlp.down_proj.add_bias == (rank == 0)
        for ckpt, param in (("model.embed_tokens.weight", model.model.embed_tokens.weight),
                            ("lm_head.weight", model.lm_head.weight)):
            full = sd[ckpt] if ckpt in sd else sd["model.embed_tokens.weight"]
            shard = full[rank * vocab_rows:(rank + 1) * vocab_rows]
            assert param.shape[0] == vocab_rows
            assert torch.equal(param[:shard.shape[0]], shard)
            assert not param[shard.shape[0]:].any()  # padding rows past vocab_size are zero
        if cfg.tie_word_embeddings:
            assert model.lm_head.weight is model.model.embed_tokens.weight
        assert torch.equal(params["model.norm.weight"], sd["model.norm.weight"])


def test_heads_not_divisible_by_tp_is_a_config_error(tmp_path):
    bad = [
        (dict(num_attention_heads=4, num_key_value_heads=2), 3, "num_attention_heads=4"),
        (dict(num_attention_heads=6, num_key_value_heads=3, hidden_size=96), 2,
         "num_key_value_heads=3"),
        (dict(num_attention_heads=8, num_key_value_heads=2, head_dim=8, intermediate_size=100),
         8, "intermediate_size=100"),
    ]
    for overrides, tp_size, what in bad:
        cfg = LlamaConfig(**{**TINY, **overrides})
        with pytest.raises(ConfigError, match=f"tensor parallelism: {what}.*tp_size={tp_size}"):
            LlamaForCausalLM(cfg, parallel=ParallelState(tp_size, 0))

    moe = MixtralConfig(**TINY, num_local_experts=4, num_experts_per_tok=2)
    moe.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError, match="MixtralForCausalLM does not support tensor parallel"):
        load_model(tmp_path, parallel=ParallelState(2, 1))


def test_single_rank_state_is_the_identity(monkeypatch):
    state = init_parallel(1, 0)
    assert state == ParallelState() and not state.is_parallel and state.reduce is None
    x = torch.randn(3, 5)
    assert state.all_reduce(x) is x and state.gather_vocab(x, 5) is x
    assert not torch.distributed.is_initialized()
    with pytest.raises(ConfigError, match="rank 2 of tp_size=2"):
        ParallelState(2, 2)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with pytest.raises(ConfigError, match="MASTER_PORT"):
        init_parallel(2, 0)


def test_rendezvous_port_in_use_is_a_config_error():
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ConfigError, match=f"rank 0 of 2 could not join .*:{port}"):
            init_parallel(2, 0, master_port=port, timeout_s=5)
    assert not torch.distributed.is_initialized()
