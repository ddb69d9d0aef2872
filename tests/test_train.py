"""Drafter training: TTT forward vs the paged drafter, loss, vocab maps, the whole pipeline on a
tiny random target (regenerate -> features -> vocab -> train -> save), resume, bad inputs."""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest
import torch

from eyas.errors import InvalidRequestError
from eyas.models.eagle3 import build_vocab_maps
from eyas.train.data import count_tokens, split_prompts
from eyas.train.ttt import (estimate_accept_length, explicit_ttt_mask, shift_left,
                            target_to_draft_index, ttt_forward, ttt_loss)
from eyas.workers.input_batch import SeqSpan, build_forward_inputs
from test_eagle3 import BLOCK, TABLES, make_drafter, new_cache


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls run far faster on one thread than on two cores shared with other jobs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def close(a, b, tol=1e-4):
    err = (a - b).abs().max().item()
    assert err <= tol * max(1.0, b.abs().max().item()), f"max abs diff {err:.3g}"


# ---- dense TTT forward vs the paged drafter ------------------------------------------------
@torch.no_grad()
def test_dense_step0_matches_paged_forward():
    """Step 0 of the dense unroll == Eagle3Drafter.forward through the paged KV cache, for two
    sequences of different lengths padded into one dense batch."""
    drafter = make_drafter()
    g = torch.Generator().manual_seed(4)
    lengths = [11, 7]
    aux = [torch.randn(n, 192, generator=g) for n in lengths]
    embeds = [torch.randn(n, 64, generator=g) for n in lengths]  # embed(x_{s+1}) at s
    dense_aux = torch.zeros(2, 11, 192)
    dense_emb = torch.zeros(2, 11, 64)
    for b, n in enumerate(lengths):
        dense_aux[b, :n], dense_emb[b, :n] = aux[b], embeds[b]
    dense = ttt_forward(drafter, dense_emb, dense_aux, num_steps=1)[0]  # [2, 11, 64]

    fi = build_forward_inputs([SeqSpan([0] * n, 0, TABLES[b]) for b, n in enumerate(lengths)],
                              BLOCK)
    hidden = drafter.fuse_aux([torch.cat(aux)])
    paged = drafter(torch.cat(embeds), hidden, fi.positions, fi.attn, new_cache(drafter))
    for b, n in enumerate(lengths):
        got = dense[b, :n]
        ref = paged[fi.query_start[b]:fi.query_start[b + 1]]
        close(got, ref)
        close(drafter.compute_logits(got), drafter.compute_logits(ref))


@torch.no_grad()
def test_dense_unroll_matches_paged_drafting_chain():
    """Step i at index s of the unroll == the engine's chain: extend positions 0..s from target
    features, then i draft steps feeding the drafter's own output (true tokens as inputs)."""
    drafter = make_drafter(seed=2)
    g = torch.Generator().manual_seed(6)
    n, steps = 9, 4
    aux = torch.randn(n, 192, generator=g)
    emb = torch.randn(n + steps, 64, generator=g)  # emb[t] = embed(x_t)
    outs = ttt_forward(drafter, emb[1:n + 1][None], aux[None], steps)
    for s in (0, 3, 5):
        cache = new_cache(drafter)
        fi = build_forward_inputs([SeqSpan([0] * (s + 1), 0, TABLES[0])], BLOCK)
        last = drafter(emb[1:s + 2], drafter.fuse_aux([aux[:s + 1]]), fi.positions, fi.attn,
                       cache)[-1:]
        close(last[0], outs[0][0, s])
        for i in range(1, steps):
            fi = build_forward_inputs([SeqSpan([0], s + i, TABLES[0])], BLOCK)
            last = drafter(emb[s + 1 + i:s + 2 + i], last, fi.positions, fi.attn, cache)
            close(last[0], outs[i][0, s])


@torch.no_grad()
def test_chain_start_skips_only_unfollowed_chains():
    """Following chains s >= c gives the same outputs (and loss) as following all of them."""
    drafter = make_drafter(seed=3)
    g = torch.Generator().manual_seed(8)
    aux, emb = torch.randn(2, 10, 192, generator=g), torch.randn(2, 10, 64, generator=g)
    full = ttt_forward(drafter, emb, aux, 3)
    part = ttt_forward(drafter, emb, aux, 3, chain_start=4)
    for a, b in zip(full, part):
        assert b.shape == (2, 6, 64)
        close(b, a[:, 4:])
    resp = torch.zeros(2, 10, dtype=torch.bool)
    resp[:, 8:] = True  # prompts of 8: step i of chain s predicts x_{s+2+i}, so s >= 8-1-3
    ids = torch.randint(0, 256, (2, 10, 5), generator=g)
    lp = torch.randn(2, 10, 5, generator=g).log_softmax(-1).sort(-1, descending=True).values
    index = target_to_draft_index(drafter)
    a = ttt_loss(drafter, full, ids, lp, resp, index)
    b = ttt_loss(drafter, part, ids, lp, resp, index, chain_start=4)
    assert a.step_total == b.step_total and a.step_correct == b.step_correct
    assert abs(a.loss.item() - b.loss.item()) < 1e-5


def test_explicit_mask_worked_example():
    mask = explicit_ttt_mask(4, 2).int()
    assert mask.shape == (4, 12)
    assert mask[:, :4].tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]
    assert torch.equal(mask[:, 4:8], torch.eye(4, dtype=torch.int))
    assert torch.equal(mask[:, 8:], torch.eye(4, dtype=torch.int))


def test_shift_left():
    x = torch.arange(6).view(1, 6)
    assert shift_left(x, 2).tolist() == [[2, 3, 4, 5, 0, 0]]
    assert shift_left(x, 0) is x


# ---- loss and metrics ----------------------------------------------------------------------
def test_ttt_loss_masks_out_of_vocab_and_renormalises():
    drafter = make_drafter(draft_vocab=64)
    index = target_to_draft_index(drafter)
    drafted = drafter.map_to_target(torch.arange(64))
    assert torch.equal(index[drafted], torch.arange(64))
    assert int((index >= 0).sum()) == 64
    outside = int((index < 0).nonzero()[0])
    a, b = int(drafted[3]), int(drafted[7])
    # one sequence of 4 tokens, response = positions 2, 3 -> step 0 rows: s = 0 (x_2), 1 (x_3)
    resp = torch.tensor([[False, False, True, True]])
    ids = torch.zeros(1, 4, 3, dtype=torch.long)
    lp = torch.full((1, 4, 3), -30.0)
    ids[0, 1] = torch.tensor([a, outside, b])  # target at 1 (about x_2): top-1 drafted
    lp[0, 1] = torch.tensor([math.log(0.6), math.log(0.3), math.log(0.1)])
    ids[0, 2] = torch.tensor([outside, a, b])  # target at 2 (about x_3): top-1 not drafted
    out = torch.zeros(1, 4, 64, requires_grad=True)
    res = ttt_loss(drafter, [out], ids, lp, resp, index)
    assert res.step_rows == [1] and res.step_total == [2]
    logits = drafter.compute_logits(out[0, 0:1]).log_softmax(-1)[0]
    expect = -(0.6 / 0.7 * logits[3] + 0.1 / 0.7 * logits[7])
    assert abs(res.loss.item() - expect.item()) < 1e-5
    res.loss.backward()
    assert out.grad[0, 0].abs().sum() > 0 and out.grad[0, 1:].abs().sum() == 0


def test_estimate_accept_length():
    assert estimate_accept_length([1.0, 1.0]) == pytest.approx(6.0)
    assert estimate_accept_length([0.5]) == pytest.approx(1 + 0.5 + 0.25 + 0.125 + 0.0625 + 0.03125)
    assert estimate_accept_length([0.5, 0.0]) == pytest.approx(1.5)


# ---- draft vocabulary ----------------------------------------------------------------------
def test_vocab_maps_from_regenerated_counts():
    records = [{"split": "train", "response_ids": [5, 5, 5, 2, 9, 9]},
               {"split": "train", "response_ids": [9, 1]},
               {"split": "val", "response_ids": [7, 7, 7, 7, 7]}]
    counts = count_tokens(records, 10)
    assert counts.tolist() == [0, 1, 1, 0, 0, 3, 0, 0, 0, 3]  # val is not counted
    d2t, t2d = build_vocab_maps(counts, 3)
    targets = torch.arange(3) + d2t
    assert targets.tolist() == [1, 5, 9]  # top-3 by count, ties to the lower id, sorted
    assert t2d.nonzero().flatten().tolist() == [1, 5, 9]
    d2t, t2d = build_vocab_maps(counts, 10)  # the whole vocab: identity
    assert d2t.abs().sum() == 0 and bool(t2d.all())


def test_split_prompts_is_by_prompt_and_deterministic():
    ids = [str(i) for i in range(40)]
    val = split_prompts(ids, 0.1, seed=3)
    assert len(val) == 4 and val == split_prompts(ids, 0.1, seed=3)
    assert split_prompts(ids, 0.0, seed=3) == set()
    assert len(split_prompts(ids[:3], 0.01, seed=0)) == 1


# ---- the pipeline on a tiny target ---------------------------------------------------------
PROMPTS = [
    {"prompt": "Write a sentence about the sea."},
    {"prompt": "What is 12 times 7?"},
    {"prompt": "Translate 'good morning' into French."},
    {"prompt": "Give me three tips for sleeping well."},
    {"prompt": "Write a Python function that reverses a string."},
    {"prompt": "Tell me a joke about cats."},
    {"messages": [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello!"},
                  {"role": "user", "content": "How are you today?"}]},
    {"prompt": "Summarise the plot of a heist movie in two lines."},
    {"prompt": "List the planets of the solar system."},
    {"prompt": "Format 'a=1, b=2' as JSON."},
    {"messages": [{"role": "system", "content": "You are terse."},
                  {"role": "user", "content": "Why is the sky blue?"}]},
    {"prompt": "Describe a rainy afternoon."},
]


def write_prompts(path: Path, rows=PROMPTS) -> Path:
    path.write_text("".join(json.dumps({"id": f"p{i}", **r}) + "\n" for i, r in enumerate(rows)))
    return path


def tiny_config(target, prompts, out, **kw):
    from eyas.train.trainer import TrainConfig

    base = dict(target=str(target), prompts=str(prompts), out=str(out), draft_vocab=512,
                ttt_steps=3, epochs=2, lr=3e-3, batch_tokens=256, max_new_tokens=16,
                val_fraction=0.2, device="cpu", max_model_len=256, kv_cache_memory="32MiB",
                topk=20, patience=0, progress=False)
    base.update(kw)
    return TrainConfig(**base)


class Interrupt(Exception):
    pass


def test_train_pipeline_resume_and_checkpoint(tmp_path, tiny_llama_path):
    from transformers import AutoConfig

    from eyas.core import SamplingParams
    from eyas.llm import LLM
    from eyas.models.eagle3 import load_drafter
    from eyas.train.trainer import train_drafter

    prompts = write_prompts(tmp_path / "prompts.jsonl")
    out = tmp_path / "drafter"
    cfg = tiny_config(tiny_llama_path, prompts, out)

    def stop_after_first_epoch(name, **info):
        if name == "epoch_end" and info["epoch"] == 1:
            raise Interrupt()

    with pytest.raises(Interrupt):
        train_drafter(cfg, on_event=stop_after_first_epoch)
    work = out / "work"
    for stage in ("regenerate", "features", "vocab"):
        assert (work / f"{stage}.done").is_file()
    assert (work / "ckpt.pt").is_file() and not (work / "train.done").is_file()
    assert not (out / "model.safetensors").exists()

    events = []
    summary = train_drafter(cfg, on_event=lambda name, **info: events.append(
        (name, info.get("stage", info.get("epoch")))))
    assert events[:3] == [("stage_skip", "regenerate"), ("stage_skip", "features"),
                          ("stage_skip", "vocab")]
    assert ("resume", 1) in events and ("epoch_end", 2) in events
    assert ("epoch_end", 1) not in events

    # summary: sizes, losses going down, per-step accuracy, the estimate
    saved = json.loads((out / "train_summary.json").read_text())
    assert saved["prompts"] == 12 and saved["epochs_run"] == 2 and len(saved["history"]) == 2
    assert sum(saved["sequences"].values()) == 12 and saved["sequences"]["val"] >= 1
    assert saved["response_tokens"]["train"] > 0
    hist = saved["history"]
    assert hist[1]["train_loss"] < hist[0]["train_loss"]
    assert saved["val_loss"] < saved["val_loss_before_training"]
    assert len(saved["val_top1_acc_per_step"]) == 3
    assert 1.0 <= saved["est_accept_len_chain5"] <= 6.0
    assert summary["draft_vocab"] == 512

    # the checkpoint: EAGLE-3 layout, fp16, loadable, drafts in the engine
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLMEagle3"]
    assert config["draft_vocab_size"] == 512 and config["torch_dtype"] == "float16"
    target_cfg = AutoConfig.from_pretrained(tiny_llama_path)
    drafter = load_drafter(out, target_cfg)
    vocab = torch.load(work / "vocab.pt", weights_only=True)
    assert torch.equal(drafter.t2d, vocab["t2d"]) and torch.equal(drafter.d2t, vocab["d2t"])

    kw = dict(device="cpu", max_model_len=256, kv_cache_memory="32MiB")
    messages = [{"messages": [{"role": "user", "content": "Write a sentence about the sea."}]}]
    params = SamplingParams(max_tokens=12)
    spec = LLM(model=str(tiny_llama_path), draft=str(out), spec_steps=3, **kw).generate(
        messages, params, chat=True)[0]
    plain = LLM(model=str(tiny_llama_path), **kw).generate(messages, params, chat=True)[0]
    assert spec.token_ids == plain.token_ids  # greedy speculation is lossless
    assert spec.spec is not None and spec.spec.target_steps >= 1

    # a third run finds everything done; other settings are refused, naming the stage
    events.clear()
    train_drafter(cfg, on_event=lambda name, **info: events.append((name, info.get("stage"))))
    assert ("stage_skip", "train") in events
    with pytest.raises(InvalidRequestError, match="regenerate"):
        train_drafter(tiny_config(tiny_llama_path, prompts, out, max_new_tokens=8))


def test_eval_drafter_reports_accept_length(tmp_path, tiny_llama_path, tiny_drafter_path):
    from eyas.train.evaluate import evaluate_drafter, format_table

    prompts = write_prompts(tmp_path / "eval.jsonl", PROMPTS[:3])
    report = evaluate_drafter(str(tiny_llama_path), str(tiny_drafter_path), str(prompts),
                              max_tokens=6, chains=(1, 2), temperatures=(0.0, 0.7),
                              device="cpu", progress=False, max_model_len=256,
                              kv_cache_memory="32MiB")
    assert [(r["k"], r["temperature"]) for r in report["results"]] == [
        (1, 0.0), (1, 0.7), (2, 0.0), (2, 0.7)]
    for r in report["results"]:
        assert 1.0 <= r["accept_len"] <= r["k"] + 1
        assert 0 < r["tokens"] <= 18
    assert [(r["k"], r["topk"], r["temperature"]) for r in report["tree_results"]] == [
        (5, 4, 0.0), (5, 4, 0.7)]
    for r in report["tree_results"]:
        assert 1.0 <= r["accept_len"] <= r["k"] + 1
    table = format_table(report)
    assert "| 2 |" in table and "tree depth 5, topk 4" in table


# ---- bad inputs ----------------------------------------------------------------------------
@pytest.mark.parametrize("content, match", [
    (None, "not found"),
    ("", "no prompts"),
    ("\n\n", "no prompts"),
    ('{"id": 1, "prompt": "ok"}\n{"id": 2, "prompt": \n', "line 2"),
    ('{"id": 1}\n', "line 1"),
    ('{"id": 1, "prompt": "a"}\n{"id": 1, "prompt": "b"}\n', "duplicate"),
])
def test_bad_prompt_file_errors_before_any_work(tmp_path, tiny_llama_path, content, match):
    from eyas.train.trainer import train_drafter

    path = tmp_path / "prompts.jsonl"
    if content is not None:
        path.write_text(content)
    out = tmp_path / "out"
    with pytest.raises(InvalidRequestError, match=match):
        train_drafter(tiny_config(tiny_llama_path, path, out))
    assert not out.exists()


def test_bad_options_are_refused(tmp_path):
    from eyas.train.trainer import TrainConfig

    with pytest.raises(InvalidRequestError, match="ttt_steps"):
        TrainConfig(target="t", prompts="p", out="o", ttt_steps=0)
    with pytest.raises(InvalidRequestError, match="val_fraction"):
        TrainConfig(target="t", prompts="p", out="o", val_fraction=1.0)
    with pytest.raises(InvalidRequestError, match="train_dtype"):
        TrainConfig(target="t", prompts="p", out="o", train_dtype="float16")
    with pytest.raises(InvalidRequestError, match="init-drafter"):
        TrainConfig(target="t", prompts="p", out="o", init_vocab="reselect")
    with pytest.raises(InvalidRequestError, match="init_vocab"):
        TrainConfig(target="t", prompts="p", out="o", init_drafter="d", init_vocab="all")


def test_bf16_autocast_choice_and_loss_close_to_fp32():
    from eyas.train.trainer import use_bf16_autocast

    cpu = torch.device("cpu")
    assert use_bf16_autocast("bfloat16", cpu) and not use_bf16_autocast("float32", cpu)
    assert use_bf16_autocast("auto", torch.device("cuda"))
    drafter = make_drafter(draft_vocab=64)
    index = target_to_draft_index(drafter)
    g = torch.Generator().manual_seed(0)
    n, hidden = 12, 64  # the tiny target of test_eagle3
    embeds = torch.randn(2, n, hidden, generator=g)
    aux = torch.randn(2, n, 3 * hidden, generator=g)
    ids = drafter.map_to_target(torch.randint(0, 64, (2, n, 4), generator=g))
    lp = torch.randn(2, n, 4, generator=g).log_softmax(-1)
    resp = torch.ones(2, n, dtype=torch.bool)
    losses = []
    for bf16 in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            outs = ttt_forward(drafter, embeds, aux, 3)
            res = ttt_loss(drafter, outs, ids, lp, resp, index)
        assert res.loss.dtype == torch.float32
        losses.append(res.loss.item())
    assert abs(losses[0] - losses[1]) < 0.02 * abs(losses[0])


def test_cli_parsers():
    from eyas.train.cli_train import add_train_parser, config_from_args
    from eyas.train.evaluate import add_eval_parser

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    add_train_parser(sub)
    add_eval_parser(sub)
    args = parser.parse_args(["train-drafter", "--target", "m", "--prompts", "p.jsonl", "--out",
                              "d", "--draft-vocab", "16384", "--ttt-steps", "5",
                              "--aux-layers", "1,4,7", "--samples-per-prompt", "3"])
    cfg = config_from_args(args)
    assert callable(args.func)
    assert (cfg.draft_vocab, cfg.ttt_steps, cfg.aux_layers, cfg.samples_per_prompt) == (
        16384, 5, (1, 4, 7), 3)
    assert cfg.max_new_tokens == 256 and cfg.temperature == 0.0 and cfg.val_fraction == 0.05
    with pytest.raises(SystemExit):
        parser.parse_args(["train-drafter", "--target", "m", "--prompts", "p", "--out", "d",
                           "--aux-layers", "1,2"])
    args = parser.parse_args(["eval-drafter", "--target", "m", "--draft", "d", "--prompts", "p",
                              "--chains", "1,3"])
    assert args.chains == [1, 3] and args.temperatures == [0.0, 0.7] and callable(args.func)


# ---- shipped prompt sets -------------------------------------------------------------------
def test_prompt_sets_are_valid_large_and_disjoint():
    from eyas.prompts import read_prompt_file

    root = Path(__file__).resolve().parents[1] / "data" / "prompts"
    train = read_prompt_file(root / "train.jsonl")
    held = read_prompt_file(root / "eval.jsonl")
    assert len(train) >= 1000 and len(held) >= 40
    assert sum(s.messages is not None for s in train) >= 50

    def user_texts(specs):
        out = set()
        for s in specs:
            if s.prompt is not None:
                out.add(s.prompt.strip().lower())
            for m in s.messages or []:
                if m["role"] == "user":
                    out.add(m["content"].strip().lower())
        return out
    assert not user_texts(train) & user_texts(held)
    topics = read_prompt_file(root / "topics.jsonl")
    assert len(topics) >= 1000 and not user_texts(topics) & user_texts(held)
    selfs = read_prompt_file(root / "self.jsonl")
    assert len(selfs) >= 1000 and not user_texts(selfs) & user_texts(held)
    selfs1 = read_prompt_file(root / "self-1.jsonl")  # the second round excludes the first
    assert len(selfs1) >= 1000 and not user_texts(selfs1) & (user_texts(held) | user_texts(selfs))

    rows = _load_prompt_script("make_prompts").build(seed=0)
    shipped = [json.loads(line) for line in (root / "train.jsonl").read_text().splitlines()]
    assert rows == shipped  # the file is what the script makes


def test_topic_prompts_one_subject_each_and_deterministic():
    module = _load_prompt_script("make_topic_prompts")
    words = ["gardeners", "lighthouses", "friendship", "volcanoes", "submarines"]
    rows = module.build(words, 4, seed=3)
    assert rows == module.build(words, 4, seed=3) and len(rows) == 4
    texts = [r.get("prompt") or r["messages"][-1]["content"] for r in rows]
    subjects = [next(w for w in words if w in t) for t in texts]
    assert len(set(subjects)) == 4  # every prompt has a subject of its own


def _load_prompt_script(name: str):
    from util_scripts import load_script

    return load_script(f"data/prompts/{name}.py")


def test_self_prompts_prefix_and_filter(smollm2_path):
    from transformers import AutoTokenizer

    module = _load_prompt_script("make_self_prompts")
    prefix = module.user_turn_prefix(AutoTokenizer.from_pretrained(str(smollm2_path)))
    assert prefix.endswith("<|im_start|>user\n") and prefix.startswith("<|im_start|>system\n")
    seen, banned = set(), {"convert 5 kilometres into miles."}
    ask = "Can you suggest a few good books about the history of science?"
    assert module.keep_request(ask, "stop", seen, banned)
    assert not module.keep_request(ask.upper(), "stop", seen, banned)  # same first 48 chars
    assert not module.keep_request("Explain tides to me, please, in a few sentences", "length",
                                   seen, banned)  # never closed its turn
    assert not module.keep_request("Hi!", "stop", seen, banned)  # too short
    assert not module.keep_request("Convert 5 kilometres into miles.", "stop", seen, banned)
    long_banned = {module.eval_key("Write a JavaScript function that checks whether a list is empty.")}
    assert not module.keep_request("Write a JavaScript function that checks if n is prime.", "stop", set(),
                                   long_banned)  # an eval prompt's first 36 characters
    assert not module.keep_request("<|im_start|>assistant\nSure, here it is.", "stop", seen, banned)
    assert not module.keep_request("What is the tallest mountain in Europe?", "stop", seen, banned,
                                   max_chars=30)  # longer than --max-chars
    assert len(seen) == 1


def test_self_prompts_script_writes_prompt_file(tmp_path, tiny_llama_path, monkeypatch):
    """End to end on the tiny random model (which never closes a turn, so the filter is widened to
    every non-empty sample): a valid prompt file with one line per kept sample, and the same file
    again for the same seed."""
    from eyas.prompts import read_prompt_file

    module = _load_prompt_script("make_self_prompts")
    monkeypatch.setattr(module, "keep_request", lambda text, *a: bool(text.strip()))
    outs = []
    for run in range(2):
        out = tmp_path / f"self{run}.jsonl"
        assert module.main(["--model", str(tiny_llama_path), "--out", str(out), "--num", "5",
                            "--max-tokens", "6", "--max-num-seqs", "5",
                            "--exclude", str(Path(module.__file__).parent / "self.jsonl")]) == 0
        outs.append(out.read_text())
    with pytest.raises(InvalidRequestError, match="file not found"):  # before any sampling
        module.main(["--model", str(tiny_llama_path), "--out", str(tmp_path / "x.jsonl"),
                     "--exclude", str(tmp_path / "missing.jsonl")])
    specs = read_prompt_file(tmp_path / "self0.jsonl")
    assert [s.id for s in specs] == [f"self-0-{i:05d}" for i in range(len(specs))]
    assert len(specs) >= 4 and outs[0] == outs[1]


def test_self_prompts_with_openers(tmp_path, tiny_llama_path, monkeypatch):
    """--openers: every kept request starts with one of OPENERS (the model writes the rest), and
    the file's ids say so."""
    from eyas.prompts import read_prompt_file

    module = _load_prompt_script("make_self_prompts")
    monkeypatch.setattr(module, "keep_request", lambda text, *a: bool(text.strip()))
    out = tmp_path / "ask.jsonl"
    assert module.main(["--model", str(tiny_llama_path), "--out", str(out), "--num", "6",
                        "--max-tokens", "4", "--max-num-seqs", "6", "--openers", "--seed", "3"]) == 0
    specs = read_prompt_file(out)
    assert [s.id for s in specs] == [f"ask-3-{i:05d}" for i in range(6)]
    starts = [next((o for o in module.OPENERS if s.prompt.startswith(o)), None) for s in specs]
    assert None not in starts and len(set(starts)) > 1
    assert all(len(s.prompt) > len(o) for s, o in zip(specs, starts))  # the model added words
    forms = tmp_path / "forms.jsonl"
    assert module.main(["--model", str(tiny_llama_path), "--out", str(forms), "--num", "6",
                        "--max-tokens", "4", "--max-num-seqs", "6", "--openers", "forms"]) == 0
    texts = [s.prompt for s in read_prompt_file(forms)]
    assert len(texts) == 6 and all(t.startswith(module.OPENERS_FORMS) for t in texts)
    with pytest.raises(SystemExit):
        module.main(["--out", str(tmp_path / "x.jsonl"), "--openers", "nosuchset"])


def test_features_captured_while_regenerating_match_a_second_pass(tmp_path, tiny_llama_path):
    """The regenerating engine's own aux rows and logits give the same records as a separate
    teacher-forced features pass over the same responses (the last, never-fed position is zero)."""
    from eyas.prompts import read_prompt_file
    from eyas.train import data

    specs = read_prompt_file(write_prompts(tmp_path / "prompts.jsonl"))
    aux = (0, 1, 1)
    opts = data.RegenOptions(max_new_tokens=12, samples_per_prompt=2, device="cpu", max_model_len=256,
                             kv_cache_memory="32MiB", max_num_seqs=4)  # 4 at a time: requests come and go
    work = tmp_path / "work"
    work.mkdir()
    capture = data.CaptureOptions(aux_layer_ids=aux, feature_dir=str(work / "features"), topk=8,
                                  shard_bytes=40_000)  # several shards
    stats = data.regenerate(str(tiny_llama_path), specs, {"p3"}, work / "responses.jsonl", opts,
                            progress=False, capture=capture)
    lines = data.read_jsonl(work / "responses.jsonl")
    assert len(lines) == 24 and stats["response_tokens"] == sum(len(r["response_ids"]) for r in lines)
    shards = data.list_shards(work / "features", "train") + data.list_shards(work / "features", "val")
    assert len(shards) > 2 and {"train", "val"} == {p.name.split("-")[0] for p in shards}
    captured = {(r["id"], r["sample"]): r for p in shards for r in data.load_shard(p)}
    assert set(captured) == {(r["id"], r["sample"]) for r in lines}
    index = data.shard_lengths(work / "features")
    assert sorted(index) == sorted(p.name for p in shards)

    second = tmp_path / "second"
    data.capture_features(str(tiny_llama_path), work / "responses.jsonl", second,
                          data.FeatureOptions(aux_layer_ids=aux, topk=8, device="cpu"), progress=False)
    reference = {(r["id"], r["sample"]): r for p in second.glob("*.pt") for r in data.load_shard(p)}
    for key, ref in reference.items():
        got = captured[key]
        assert torch.equal(got["input_ids"], ref["input_ids"]) and got["prompt_len"] == ref["prompt_len"]
        n = len(ref["input_ids"])
        assert got["aux"].shape == ref["aux"].shape
        assert torch.allclose(got["aux"][:n - 1].float(), ref["aux"][:n - 1].float(), atol=2e-2, rtol=1e-2)
        assert not got["aux"][n - 1].any()
        assert torch.equal(got["topk_ids"][:, 0], ref["topk_ids"][:, 0])  # the argmax, at least
        assert torch.allclose(got["topk_logprobs"].float(), ref["topk_logprobs"].float(), atol=2e-2)


def test_fine_tuning_starts_from_the_given_drafter(tmp_path, tiny_llama_path, tiny_drafter_path):
    from transformers import AutoConfig

    from eyas.models.eagle3 import load_drafter
    from eyas.train.trainer import train_drafter

    prompts = write_prompts(tmp_path / "prompts.jsonl", PROMPTS[:6])
    target = AutoConfig.from_pretrained(tiny_llama_path)
    base = load_drafter(tiny_drafter_path, target)
    # a vanishing learning rate: the result is the starting drafter (up to fp16 rounding)
    out = tmp_path / "still"
    summary = train_drafter(tiny_config(tiny_llama_path, prompts, out, epochs=1, lr=1e-12,
                                        init_drafter=str(tiny_drafter_path)))
    assert summary["draft_vocab"] == base.draft_vocab_size != 512  # the drafter's, not --draft-vocab
    assert summary["init_drafter"] == str(tiny_drafter_path)
    still = load_drafter(out, target)
    assert torch.equal(still.d2t, base.d2t) and torch.equal(still.t2d, base.t2d)
    for (name, a), (_, b) in zip(base.named_parameters(), still.named_parameters()):
        assert torch.allclose(a, b, atol=1e-3), name
    # a real learning rate moves it, and the loss goes down from the drafter's own
    moved = train_drafter(tiny_config(tiny_llama_path, prompts, tmp_path / "moved", epochs=2,
                                      init_drafter=str(tiny_drafter_path)))
    assert moved["val_loss"] < moved["val_loss_before_training"]
    tuned = load_drafter(tmp_path / "moved", target)
    assert not torch.allclose(tuned.fc.weight, base.fc.weight, atol=1e-3)


def test_fine_tuning_can_widen_and_reselect_the_vocabulary(tmp_path, tiny_llama_path,
                                                           tiny_drafter_path):
    """--init-vocab reselect + a wider --intermediate-size: the saved drafter has this run's
    vocabulary and the wider MLP, and (at a vanishing learning rate) the old drafter's weights
    wherever they carry over."""
    from transformers import AutoConfig

    from eyas.models.eagle3 import load_drafter
    from eyas.train.trainer import train_drafter

    prompts = write_prompts(tmp_path / "prompts.jsonl", PROMPTS[:6])
    target = AutoConfig.from_pretrained(tiny_llama_path)
    base = load_drafter(tiny_drafter_path, target)
    old = base.arch.intermediate_size
    out = tmp_path / "wide"
    summary = train_drafter(tiny_config(tiny_llama_path, prompts, out, epochs=1, lr=1e-12,
                                        init_drafter=str(tiny_drafter_path), init_vocab="reselect",
                                        draft_vocab=300, intermediate_size=old + 32))
    wide = load_drafter(out, target)
    assert wide.draft_vocab_size == summary["draft_vocab"] == 300
    assert wide.arch.intermediate_size == old + 32
    carried = summary["carried_over"]
    assert carried["new_mlp_units"] == 32
    shared = base.t2d & wide.t2d
    assert carried["vocab_rows_kept"] == int(shared.sum()) > 0
    down = wide.midlayer.mlp.down_proj.weight
    assert torch.allclose(down[:, :old], base.midlayer.mlp.down_proj.weight, atol=1e-3)
    assert down[:, old:].abs().max() == 0
    rows = {d is wide: d.lm_head.weight[(torch.cumsum(d.t2d.long(), 0) - 1)[shared.nonzero().flatten()]]
            for d in (base, wide)}  # rows of the shared target ids, in target-id order
    assert torch.allclose(rows[True], rows[False], atol=1e-3)


def test_fine_tuning_refuses_a_drafter_of_other_aux_layers(tmp_path, tiny_llama_path, tiny_drafter_path):
    from eyas.train.trainer import train_drafter

    prompts = write_prompts(tmp_path / "prompts.jsonl", PROMPTS[:4])
    cfg = tiny_config(tiny_llama_path, prompts, tmp_path / "o", init_drafter=str(tiny_drafter_path),
                      aux_layers=(1, 1, 1))
    with pytest.raises(InvalidRequestError, match="aux layers"):
        train_drafter(cfg)


def test_capture_resumes_without_losing_or_duplicating_records(tmp_path, tiny_llama_path):
    """A crash can leave a shard never recorded, or a recorded shard whose lines never landed:
    a resumed run drops both and regenerates those requests, so every line has exactly one
    feature record."""
    from eyas.prompts import read_prompt_file
    from eyas.train import data

    specs = read_prompt_file(write_prompts(tmp_path / "prompts.jsonl"))
    opts = data.RegenOptions(max_new_tokens=8, device="cpu", max_model_len=256, kv_cache_memory="32MiB",
                             max_num_seqs=4)
    work = tmp_path / "work"
    work.mkdir()
    responses, features = work / "responses.jsonl", work / "features"
    capture = data.CaptureOptions(aux_layer_ids=(0, 1, 1), feature_dir=str(features), topk=4,
                                  shard_bytes=20_000)
    data.regenerate(str(tiny_llama_path), specs, set(), responses, opts, progress=False, capture=capture)
    lines = responses.read_text().splitlines(keepends=True)
    keys = json.loads((features / "shards.json").read_text())
    last = max(keys)  # the newest shard: pretend its lines never landed
    responses.write_text("".join(lines[:len(lines) - len(keys[last])]))
    torch.save([], features / "train-c00077.pt")  # and a shard written but never recorded
    data.regenerate(str(tiny_llama_path), specs, set(), responses, opts, progress=False, capture=capture)
    done = [(r["id"], r["sample"]) for r in data.read_jsonl(responses)]
    assert sorted(done) == sorted((s.id, 0) for s in specs)  # every prompt once
    assert not (features / "train-c00077.pt").exists()
    captured = [(r["id"], r["sample"]) for p in data.list_shards(features, "train") for r in data.load_shard(p)]
    assert sorted(captured) == sorted(done)  # one record per line, none twice
    assert sorted(json.loads((features / "index.json").read_text())) == \
        sorted(p.name for p in data.list_shards(features, "train"))
