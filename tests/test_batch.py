"""`eyas batch` in-process: the Results contract, bad lines recorded, refusals before work, resume."""
import json
from pathlib import Path

import pytest

from eyas.cli import main

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
ENGINE_FLAGS = ["--kv-cache-memory", "32MiB", "--max-model-len", "64", "--num-threads", "1",
                "--block-size", "4", "--max-tokens", "8", "--ignore-eos"]
GOOD = [
    {"id": "a", "prompt": "The quick brown fox jumps over the lazy dog because"},
    {"id": 2, "prompt": "Once upon a time", "max_tokens": 3},
    {"id": "c", "messages": [{"role": "user", "content": "Hi there"}]},
    {"id": "d", "prompt": "1, 2, 3, 4, 5,"},
    {"id": "e", "prompt": "def fibonacci(n):", "max_tokens": 5},
]
BAD = [  # (line, expected id, words in the error)
    ("{not json", None, "not valid JSON"),
    ({"id": "nop"}, "nop", "exactly one of"),
    ({"id": "hot", "prompt": "x", "temperature": -1}, "hot", "temperature"),
    ({"prompt": "no id here"}, None, "id"),
    ({"id": "long", "prompt": "word " * 200}, "long", "max_model_len"),  # refused by the engine
]


def write_jsonl(path, lines):
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def batch(capsys, tiny_llama_path, inp, out, *extra):
    code = main(["batch", "--input", str(inp), "--output", str(out), "--model", str(tiny_llama_path),
                 *ENGINE_FLAGS, *extra])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


@pytest.fixture(scope="module")
def reference(tiny_llama_path):
    """LLM.generate on the same engine config and per-line params: id -> record."""
    from eyas import LLM, SamplingParams
    from eyas.config import EngineConfig
    from eyas.prompts import parse_prompt_line

    cfg = EngineConfig(model=str(tiny_llama_path), kv_cache_memory="32MiB", max_model_len=64, num_threads=1,
                       block_size=4)
    llm = LLM(config=cfg)
    base = SamplingParams(max_tokens=8, ignore_eos=True)
    specs = [parse_prompt_line(x, "ref") for x in GOOD]
    reqs = [s.request() for s in specs]
    outs = llm.generate(reqs, [s.params(base) for s in specs])
    return {s.id: o.to_dict() | {"id": s.id} for s, o in zip(specs, outs)}


@pytest.fixture(autouse=True)
def no_ray_address(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # auto executor -> in-process


def test_local_end_to_end(capsys, tmp_path, tiny_llama_path, reference):
    lines = [GOOD[0], BAD[0][0], GOOD[1], BAD[1][0], GOOD[2], BAD[2][0], "", GOOD[3], BAD[3][0], BAD[4][0], GOOD[4]]
    inp, out = write_jsonl(tmp_path / "in.jsonl", lines), tmp_path / "out.jsonl"
    code, stdout, err = batch(capsys, tiny_llama_path, inp, out, "--log-interval", "0.001")
    assert code == 0, err
    recs = read_jsonl(out)
    assert len(recs) == len(GOOD) + len(BAD)
    good = {r["id"]: r for r in recs if "error" not in r}
    assert good == reference  # every field of the Results contract, greedy text included
    errors = [r for r in recs if "error" in r]
    for (_, rid, words), rec in zip(BAD, sorted(errors, key=lambda r: r["line"])):
        assert rec["id"] == rid and rec["finish_reason"] == "error" and words in rec["error"]
        assert f"line {rec['line']}" in rec["error"]
    assert [r["line"] for r in sorted(errors, key=lambda r: r["line"])] == [2, 4, 6, 9, 10]
    summary = json.loads((tmp_path / "out.jsonl.summary.json").read_text())
    assert (summary["lines_ok"], summary["lines_failed"], summary["lines_total"]) == (5, 5, 10)
    assert summary["executor"] == "local" and summary["complete"] is True
    assert summary["completion_tokens"] == sum(len(r["token_ids"]) for r in good.values())
    assert "5 ok, 5 failed" in stdout
    assert "lines/s" in err and "tok/s" in err  # periodic progress lines (stderr is not a terminal)


def test_duplicate_ids_refused_before_any_work(capsys, tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", [{"id": 1, "prompt": "a"}, "{bad", {"id": "1", "prompt": "b"}])
    out = tmp_path / "out.jsonl"
    code, _, err = batch(capsys, "/nonexistent-model", inp, out)  # the model is never loaded
    assert code == 2
    assert "duplicate id '1'" in err and "line 3" in err and "first on line 1" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]  # no output, summary or lock file


def test_missing_input_file(capsys, tmp_path):
    code, _, err = batch(capsys, "/nonexistent-model", tmp_path / "nope.jsonl", tmp_path / "out.jsonl")
    assert code == 2 and "file not found" in err and "nope.jsonl" in err


def test_tp_ray_replicas_are_refused(capsys, tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", [GOOD[0]])
    code, _, err = batch(capsys, "/nonexistent-model", inp, tmp_path / "out.jsonl", "--tp", "2", "--replicas", "2")
    assert code == 2 and "--executor local --tp N" in err


def test_resume_skips_done_ids_and_drops_a_torn_tail(capsys, tmp_path, tiny_llama_path, reference):
    inp, out = write_jsonl(tmp_path / "in.jsonl", GOOD + [BAD[0][0]]), tmp_path / "out.jsonl"
    assert batch(capsys, tiny_llama_path, inp, out)[0] == 0
    first = out.read_bytes().splitlines(keepends=True)
    assert len(first) == 6
    # A job killed mid-write: two finished lines, then half of the third.
    out.write_bytes(b"".join(first[:2]) + first[2][: len(first[2]) // 2])
    code, stdout, err = batch(capsys, tiny_llama_path, inp, out)
    assert code == 0, err
    recs = read_jsonl(out)  # every line parses: the torn tail was truncated, not appended to
    keys = [r["id"] if r["id"] is not None else r["line"] for r in recs]
    assert sorted(map(str, keys)) == sorted(map(str, [x["id"] for x in GOOD] + [1 + len(GOOD)]))
    assert {r["id"]: r for r in recs if "error" not in r} == reference
    summary = json.loads((tmp_path / "out.jsonl.summary.json").read_text())
    assert summary["lines_skipped"] == 2 and summary["lines_ok"] + summary["lines_failed"] == 4
    assert "resuming, 2 of 6" in err
    # Everything done: a rerun starts no engine at all (the model path is not even read).
    code, stdout, _ = batch(capsys, "/nonexistent-model", inp, out)
    assert code == 0 and "0 ok, 0 failed, 6 already done" in stdout
    assert len(read_jsonl(out)) == 6


def test_draft_lines_carry_spec_stats(capsys, tmp_path, tiny_llama_path, tiny_drafter_path, reference):
    inp, out = write_jsonl(tmp_path / "in.jsonl", GOOD[:2]), tmp_path / "out.jsonl"
    code, stdout, err = batch(capsys, tiny_llama_path, inp, out, "--draft", str(tiny_drafter_path),
                              "--spec-steps", "2")
    assert code == 0, err
    recs = {r["id"]: r for r in read_jsonl(out)}
    for rid, rec in recs.items():
        spec = rec.pop("spec")
        assert spec["accept_len"] == pytest.approx(len(rec["token_ids"]) / spec["target_steps"], abs=1e-3)
        assert rec == reference[rid]  # lossless: same greedy tokens as without the draft
    summary = json.loads((tmp_path / "out.jsonl.summary.json").read_text())
    assert summary["accept_len"] >= 1.0 and "accept_len" in stdout


def test_example_config_loads_and_flags_override(tmp_path):
    from eyas.batch.cli_batch import batch_config_from_args
    from eyas.cli import build_parser, engine_config_from_args

    args = build_parser().parse_args(["batch", "--config", str(CONFIGS / "batch-smollm2.yaml"), "--input", "in.jsonl",
                                      "--output", str(tmp_path / "o.jsonl"), "--max-inflight", "7"])
    cfg, engine = batch_config_from_args(args), engine_config_from_args(args)
    assert (cfg.replicas, cfg.max_inflight, cfg.executor, cfg.chat) == (1, 7, "auto", False)
    assert engine.model == "smollm2-135m-instruct" and engine.max_num_seqs == 64


def test_python_api_local(tmp_path, tiny_llama_path, reference):
    from eyas.batch import run

    inp, out = write_jsonl(tmp_path / "in.jsonl", GOOD[:2]), tmp_path / "out.jsonl"
    summary = run(inp, out, model=str(tiny_llama_path), executor="local", max_tokens=8, ignore_eos=True,
                  kv_cache_memory="32MiB", max_model_len=64, num_threads=1, block_size=4)
    assert summary["lines_ok"] == 2 and summary["replicas"][0]["lines"] == 2
    assert {r["id"]: r for r in read_jsonl(out)} == {k: reference[k] for k in ("a", "2")}


def test_a_second_writer_on_the_same_output_is_refused(tmp_path):
    from eyas.batch.results import ResultWriter
    from eyas.errors import EyasError

    first = ResultWriter(tmp_path / "out.jsonl", lock=True)
    with pytest.raises(EyasError, match="another eyas batch is writing"):
        ResultWriter(tmp_path / "out.jsonl", lock=True)
    first.close()
    ResultWriter(tmp_path / "out.jsonl", lock=True).close()  # free again once the first ends
