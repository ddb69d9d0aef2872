"""`eyas bench`: end to end on the tiny random model (nospec, chain, adaptive and the hf peer),
the records' contract, the four output files, fixed-length prompts and clear errors for bad flags."""
import json

import pytest

from eyas.bench import BenchConfig, run_bench
from eyas.bench.prompts import build_prompt_ids
from eyas.bench.settings import parse_int_list
from eyas.cli import main
from eyas.config import EngineConfig
from eyas.errors import EyasError, InvalidRequestError

REQUIRED = {"mode", "concurrency", "output_tok_s", "speedup_vs_nospec", "accept_len", "tpot_ms", "ttft_ms",
            "num_prompts", "input_len", "output_len", "wall_s"}
IN_LEN, OUT_LEN, PROMPTS = 40, 6, 3
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module", autouse=True)
def restore_torch_threads():
    """The bench engines run single-threaded (tiny matmuls stall on a shared 2-core machine with
    two OpenMP threads); give the rest of the suite its thread count back."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def tiny_config(model, draft=None, **kw) -> EngineConfig:
    kw = {"block_size": 4, "kv_cache_memory": "32MiB", "max_model_len": 128, "eager": True, "num_threads": 1, **kw}
    return EngineConfig(model=str(model)).replace(draft=str(draft) if draft else None, **kw)


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory, tiny_llama_path, tiny_drafter_path):
    out = tmp_path_factory.mktemp("bench")
    records = run_bench(tiny_config(tiny_llama_path, tiny_drafter_path, spec_steps=3),
                        BenchConfig(modes=("nospec", "chain", "adaptive"), concurrency=(1, 2), input_len=IN_LEN,
                                    output_len=OUT_LEN, num_prompts=PROMPTS, peers=("hf",), warmup=1),
                        out_dir=out, progress=False)
    return out, records


def test_writes_all_outputs(bench_run):
    out, records = bench_run
    assert json.loads((out / "results.json").read_text()) == records
    assert (out / "results.png").read_bytes()[:8] == PNG_MAGIC
    table = (out / "results.md").read_text()
    assert table.startswith("| mode | concurrency | output tok/s | speedup vs nospec")
    assert len(table.strip().splitlines()) == 2 + len(records)
    meta = json.loads((out / "meta.json").read_text())
    assert {"date", "machine", "versions", "command", "engine_config", "bench_config"} <= set(meta)
    assert meta["versions"]["eyas"] and meta["versions"]["torch"] and meta["machine"]["cpu"]
    assert meta["bench_config"]["modes"] == ["nospec", "chain", "adaptive"]


def test_records_contract(bench_run):
    _, records = bench_run
    assert [(r["mode"], r["concurrency"]) for r in records] == [
        (m, c) for m in ("nospec", "chain", "adaptive", "hf") for c in (1, 2)]
    for r in records:
        assert REQUIRED <= set(r), r
        assert r["num_prompts"] == PROMPTS and r["input_len"] == IN_LEN and r["output_len"] == OUT_LEN
        assert r["output_tokens"] == PROMPTS * OUT_LEN  # exactly N tokens per request
        assert r["output_tok_s"] > 0 and r["wall_s"] > 0
        assert r["ttft_ms"] > 0 and r["tpot_ms"] > 0
        assert r["steady_tok_s"] > 0
        assert r["speedup_vs_nospec"] == pytest.approx(r["output_tok_s"] / next(
            b["output_tok_s"] for b in records if b["mode"] == "nospec" and b["concurrency"] == r["concurrency"]),
            abs=1e-3)
        if r["mode"] in ("nospec", "hf"):
            assert r["accept_len"] == 1.0
        else:
            assert 1.0 <= r["accept_len"] <= 4.0  # at most K + 1 = 4 tokens per target step
            assert r["spec_steps"] == 3 and r["spec_topk"] == 1
    nospec = [r for r in records if r["mode"] == "nospec"]
    assert all(r["speedup_vs_nospec"] == 1.0 and r["steady_speedup_vs_nospec"] == 1.0 for r in nospec)
    assert [r["spec_policy"] for r in records if r["mode"] in ("chain", "adaptive")] == \
        ["fixed", "fixed", "adaptive", "adaptive"]
    for r in records:  # what the adaptive controller chose, per level: {k: steps}
        if r["mode"] == "adaptive":
            assert set(r["draft_choices"]) <= {"0", "1", "2", "3"} and sum(r["draft_choices"].values()) > 0
        else:
            assert "draft_choices" not in r


def test_prompts_have_exact_length_and_are_stable(tiny_llama_path):
    from eyas.hub import load_tokenizer

    tok = load_tokenizer(tiny_llama_path)
    for length in (1, 7, 40, 300):
        ids = build_prompt_ids(tok, 50, length)  # 50 > the eval set: multi-turn lines included
        assert all(len(x) == length for x in ids)
        assert ids == build_prompt_ids(tok, 50, length)
    long = build_prompt_ids(tok, 1, 300)[0]
    assert tok.decode(long).rstrip().endswith("assistant")  # the generation prompt survives padding


@pytest.mark.parametrize("kw, field, message", [
    (dict(modes=("nospec", "beam")), "modes", "unknown mode 'beam'"),
    (dict(modes=()), "modes", "at least one"),
    (dict(concurrency=(1, 0)), "concurrency", ">= 1"),
    (dict(concurrency=(4, 4)), "concurrency", "twice"),
    (dict(input_len=0), "input_len", ">= 1"),
    (dict(output_len=-3), "output_len", ">= 1"),
    (dict(num_prompts=0), "num_prompts", ">= 1"),
    (dict(temperature=-1.0), "temperature", ">= 0"),
    (dict(peers=("vllm",)), "peer", "unknown peer"),
])
def test_bad_settings(kw, field, message):
    with pytest.raises(InvalidRequestError) as e:
        BenchConfig(**kw)
    assert e.value.field == field and message in str(e.value)


def test_bad_concurrency_text():
    assert parse_int_list("concurrency", "1, 4,8") == (1, 4, 8)
    with pytest.raises(InvalidRequestError, match="concurrency: expected comma-separated integers"):
        parse_int_list("concurrency", "1,x")


def test_spec_modes_need_a_draft(tmp_path, tiny_llama_path):
    with pytest.raises(InvalidRequestError, match="'chain' needs a drafter"):
        run_bench(tiny_config(tiny_llama_path), modes=("nospec", "chain"), out_dir=tmp_path)


def test_lengths_must_fit_max_model_len(tmp_path, tiny_llama_path):
    with pytest.raises(InvalidRequestError, match="exceeds max_model_len=128"):  # from the config, early
        run_bench(tiny_config(tiny_llama_path), input_len=100, output_len=29, out_dir=tmp_path)
    with pytest.raises(InvalidRequestError, match="exceeds max_model_len=512"):  # from the built engine
        run_bench(tiny_config(tiny_llama_path, max_model_len=None), input_len=500, output_len=13,
                  concurrency=(1,), out_dir=tmp_path)


def test_cli_nospec_only_without_draft(capsys, caplog, tmp_path, tiny_llama_path):
    code = main(["bench", "--model", str(tiny_llama_path), "--concurrency", "1,2", "--input-len", "16",
                 "--output-len", "4", "--num-prompts", "2", "--warmup", "0", "--out", str(tmp_path),
                 "--block-size", "4", "--kv-cache-memory", "32MiB", "--max-model-len", "64", "--eager",
                 "--num-threads", "1"])
    out = capsys.readouterr()
    assert code == 0
    assert "only nospec runs" in caplog.text
    records = json.loads((tmp_path / "results.json").read_text())
    assert [(r["mode"], r["concurrency"]) for r in records] == [("nospec", 1), ("nospec", 2)]
    assert "| nospec | 2 |" in out.out and str(tmp_path) in out.err
    assert all((tmp_path / f).is_file() for f in ("results.json", "results.md", "results.png", "meta.json"))


@pytest.mark.parametrize("argv, message", [
    (["--modes", "nospec,bogus"], "unknown mode 'bogus'"),
    (["--concurrency", "0,4"], "concurrency"),
    (["--modes", "tree"], "needs a drafter"),
    (["--input-len", "0"], "input_len"),
])
def test_cli_bad_flags(capsys, tmp_path, tiny_llama_path, argv, message):
    code = main(["bench", "--model", str(tiny_llama_path), "--out", str(tmp_path), *argv])
    assert code == 2
    assert message in capsys.readouterr().err


def test_eyas_error_is_base(tmp_path):
    assert issubclass(InvalidRequestError, EyasError)


class FakeEngine:
    """One token per running request per step; records the most requests ever in flight."""

    class scheduler:
        num_preemptions = 0

    def __init__(self, cap: int = 10**9):
        self.cap = cap  # finish requests after this many tokens (an early stop)
        self.running: dict[str, list] = {}
        self.max_in_flight = 0
        self.order: list[str] = []

    def add_request(self, rid, prompt, params, prompt_token_ids):
        self.running[rid] = [min(params.max_tokens, self.cap), []]
        self.order.append(rid)
        self.max_in_flight = max(self.max_in_flight, len(self.running))

    def has_unfinished(self):
        return bool(self.running)

    def step(self):
        from eyas.core import RequestOutput

        outs = []
        for rid, (n, toks) in list(self.running.items()):
            toks.append(len(toks))
            done = len(toks) == n
            outs.append(RequestOutput(rid, "", list(toks), done, "length" if done else None, 1,
                                      token_ids_delta=[toks[-1]]))
            if done:
                del self.running[rid]
        return outs


@pytest.mark.parametrize("concurrency", [1, 3, 8])
def test_closed_loop_keeps_concurrency_in_flight(concurrency):
    from eyas.bench.runner import run_closed_loop

    engine = FakeEngine()
    timings, wall = run_closed_loop(engine, [[1, 2]] * 7, concurrency, output_len=4, tag="t", progress=False)
    assert engine.max_in_flight == min(concurrency, 7)
    assert engine.order == [f"t{i}" for i in range(7)]
    assert len(timings) == 7 and wall > 0
    for t in timings:
        assert t.submit <= t.first_token <= t.finish and t.output_tokens == t.target_steps == 4


def test_closed_loop_refuses_short_requests():
    from eyas.bench.runner import run_closed_loop

    engine = FakeEngine(cap=4)
    with pytest.raises(EyasError, match="after 4 of 5 tokens"):
        run_closed_loop(engine, [[1]], 1, output_len=5, progress=False)


def test_partial_results_survive_an_interrupt(monkeypatch, tmp_path, tiny_llama_path):
    import eyas.bench.runner as runner

    real, calls = runner.run_level, []

    def interrupted(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(runner, "run_level", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_bench(tiny_config(tiny_llama_path), concurrency=(1, 2), input_len=8, output_len=3, num_prompts=2,
                  warmup=0, out_dir=tmp_path, progress=False)
    records = json.loads((tmp_path / "results.json").read_text())
    assert [(r["mode"], r["concurrency"]) for r in records] == [("nospec", 1)]
    assert "| nospec | 1 |" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "meta.json").is_file()


def test_mode_engine_configs():
    from eyas.bench.modes import engine_config_for

    base = EngineConfig(max_num_seqs=8).replace(draft="d", spec_steps=4, spec_policy="adaptive")
    assert engine_config_for("nospec", base, 64).spec.draft is None
    assert engine_config_for("nospec", base, 64).max_num_seqs == 64
    assert engine_config_for("nospec", base, 2).max_num_seqs == 8
    chain = engine_config_for("chain", base, 4).spec
    assert (chain.draft, chain.steps, chain.topk, chain.policy) == ("d", 4, 1, "fixed")
    tree = engine_config_for("tree", base, 4).spec
    assert (tree.steps, tree.topk, tree.draft_tokens, tree.policy) == (4, 4, 8, "fixed")
    tree = engine_config_for("tree", base.replace(spec_topk=2, spec_draft_tokens=6), 4).spec
    assert (tree.topk, tree.draft_tokens) == (2, 6)
    assert engine_config_for("adaptive", base.replace(spec_policy="fixed"), 4).spec.policy == "adaptive"


def test_prewarm_prompts_are_the_levels_shapes_but_never_timed_prompts():
    from eyas.bench.suite import _plan

    bench = BenchConfig(concurrency=(1, 4), warmup=2, input_len=8, output_len=8)
    ids = [[i] * 8 for i in range(2 * (32 + 32) + 2)]
    levels, warmup, prewarm = _plan(bench, ids)
    # the default: two waves, at least 32 requests a level
    assert [len(levels[c]) for c in (1, 4)] == [len(prewarm[c]) for c in (1, 4)] == [32, 32]
    timed = {tuple(p) for ps in levels.values() for p in ps}
    assert not timed & {tuple(p) for ps in prewarm.values() for p in ps}  # no prefix-cache head start
    assert not timed & {tuple(p) for p in warmup}
    assert _plan(BenchConfig(concurrency=(1, 4), prewarm=False), ids)[2] == {}


def test_rounds_interleave_the_modes_on_fresh_prompts(monkeypatch, tmp_path, tiny_llama_path, tiny_drafter_path):
    import eyas.bench.runner as runner

    real, calls = runner.run_level, []

    def recording(engine, mode, prompts, concurrency, *a, **kw):
        calls.append((mode, concurrency, [tuple(p) for p in prompts], id(engine)))
        return real(engine, mode, prompts, concurrency, *a, **kw)

    monkeypatch.setattr(runner, "run_level", recording)
    records = run_bench(tiny_config(tiny_llama_path, tiny_drafter_path, spec_steps=2),
                        BenchConfig(modes=("nospec", "chain"), concurrency=(1, 2), input_len=IN_LEN,
                                    output_len=OUT_LEN, num_prompts=2, warmup=0, rounds=3),
                        out_dir=tmp_path, progress=False)
    # per level: round 1 in order, round 2 reversed, round 3 in order; one engine per mode throughout
    assert [(m, c) for m, c, _, _ in calls] == [
        (m, c) for c in (1, 2) for m in ("nospec", "chain", "chain", "nospec", "nospec", "chain")]
    engines = {m: {e for mm, _, _, e in calls if mm == m} for m in ("nospec", "chain")}
    assert all(len(e) == 1 for e in engines.values()) and engines["nospec"] != engines["chain"]
    for c in (1, 2):
        rounds = [p for m, cc, p, _ in calls if cc == c and m == "nospec"]
        assert rounds == [p for m, cc, p, _ in calls if cc == c and m == "chain"]  # same prompts per round
        assert len({q for p in rounds for q in p}) == 3 * 2  # each round its own prompts
    assert [(r["mode"], r["concurrency"]) for r in records] == [
        ("nospec", 1), ("chain", 1), ("nospec", 2), ("chain", 2)]
    for r in records:
        assert r["rounds"] == 3 and len(r["round_tok_s"]) == 3
        assert r["num_prompts"] == 6 and r["output_tokens"] == 6 * OUT_LEN
        # the level's rate is all its tokens over the rounds' summed wall time
        assert r["output_tok_s"] == pytest.approx(r["output_tokens"] / r["wall_s"], rel=1e-3)
    assert json.loads((tmp_path / "results.json").read_text()) == records


def test_merged_rounds_sum_the_draft_choices():
    from eyas.bench.metrics import LevelResult, merge_rounds

    rounds = [LevelResult("adaptive", 1, (), 1.0, {"draft_choices": {"0": 3, "4": 5}}),
              LevelResult("adaptive", 1, (), 2.0, {"draft_choices": {"2": 1, "4": 2}})]
    merged = merge_rounds(rounds)
    assert merged.extra["draft_choices"] == {"0": 3, "2": 1, "4": 7}
    assert list(merged.extra["draft_choices"]) == ["0", "2", "4"]


def test_steady_rate_leaves_out_the_drain():
    """Two slots, four 10-token requests. Lockstep (every request 1 s): both rates are 20 tok/s.
    Staggered (1 s and 2 s requests): the last 2 s of the level run one request only, so the wall
    rate reads 40 tokens / 4 s, while a server that kept two in flight would deliver 2 x 10 tokens
    per mean latency 1.5 s."""
    from eyas.bench.metrics import LevelResult, RequestTiming, level_record
    from eyas.bench.report import fill_speedups

    def req(start, end):
        return RequestTiming(submit=start, first_token=start + 0.1, finish=end, output_tokens=10, target_steps=10)

    lockstep = LevelResult("nospec", 2, (req(0, 1), req(0, 1), req(1, 2), req(1, 2)), 2.0)
    staggered = LevelResult("adaptive", 2, (req(0, 1), req(0, 2), req(1, 2), req(2, 4)), 4.0)
    records = [level_record(lockstep, 8, 10), level_record(staggered, 8, 10)]
    fill_speedups(records)
    base, spec = records
    assert base["output_tok_s"] == pytest.approx(20.0) and base["steady_tok_s"] == pytest.approx(20.0)
    assert spec["output_tok_s"] == pytest.approx(10.0)
    assert spec["steady_tok_s"] == pytest.approx(2 * 10 / 1.5, rel=1e-4)
    assert spec["speedup_vs_nospec"] == pytest.approx(0.5, abs=1e-3)
    assert spec["steady_speedup_vs_nospec"] == pytest.approx(2 * 10 / 1.5 / 20, abs=1e-3)
    # fewer requests than slots: the rate of the requests there were, not of empty slots
    alone = level_record(LevelResult("nospec", 4, (req(0, 2),), 2.0), 8, 10)
    assert alone["steady_tok_s"] == pytest.approx(5.0)


def test_rounds_must_be_positive():
    with pytest.raises(InvalidRequestError, match="rounds"):
        BenchConfig(rounds=0)


def test_spec_step_breakdown_script_times_both_halves(tmp_path, capsys, tiny_llama_path, tiny_drafter_path):
    from util_scripts import load_script

    module = load_script("bench/spec_step_breakdown.py")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"id": "a", "prompt": "Name a colour."}\n{"id": "b", "prompt": "Count to three."}\n')
    assert module.main(["--model", str(tiny_llama_path), "--draft", str(tiny_drafter_path),
                        "--prompt-file", str(prompts), "--prompts", "2", "--max-tokens", "6"]) == 0
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines()[2:]]
    assert [r[0].strip() for r in rows] == list(module.SETTINGS)
    for label, propose, verify, steps, accept, tok_s in rows:
        assert float(tok_s) > 0 and 1.0 <= float(accept) <= 6
        if label.strip() == "plain":
            assert propose.strip() == "-" and float(accept) == 1.0 and int(steps) == 12  # 2 x 6 tokens
        else:
            assert float(propose) > 0 and float(verify) > 0 and int(steps) <= 12


def test_paired_steps_script_steps_the_engines_in_turn(tmp_path, capsys, tiny_llama_path, tiny_drafter_path):
    import json

    from util_scripts import load_script

    module = load_script("bench/paired_steps.py")
    out = tmp_path / "steps.json"
    assert module.main(["--model", str(tiny_llama_path), "--draft", str(tiny_drafter_path),
                        "--modes", "nospec,adaptive-plain,adaptive", "--concurrency", "2", "--requests", "3",
                        "--input-len", "8", "--output-len", "6", "--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines[1:]] == ["nospec", "adaptive-plain", "adaptive"]
    got = json.loads(out.read_text())
    for mode in ("nospec", "adaptive-plain", "adaptive"):
        assert len(got["times"][mode]) == len(got["steps"][mode]) > 0
    # a drafter engine held at plain steps schedules exactly what the plain engine does
    assert [kind for kind, _ in got["steps"]["adaptive-plain"]] == [kind for kind, _ in got["steps"]["nospec"]]
    assert {key for _, key in got["steps"]["adaptive-plain"]} == {0}
    assert {key for _, key in got["steps"]["nospec"]} == {None}
    with pytest.raises(module.ConfigError, match="unknown mode 'fast'"):
        module.main(["--model", str(tiny_llama_path), "--modes", "nospec,fast"])
    with pytest.raises(module.ConfigError, match="each mode once"):
        module.main(["--model", str(tiny_llama_path), "--modes", "nospec,nospec"])
    for bad, match in (("adaptive:nope=1", "not a ControllerConfig setting"), ("chain:min_gain=0.1", "only adaptive"),
                       ("adaptive:min_gain=x", "not a number"), ("adaptive:min_gain=2", "min_gain must be")):
        with pytest.raises(module.ConfigError, match=match):
            module.main(["--model", str(tiny_llama_path), "--modes", f"nospec,{bad}"])


def test_paired_steps_modes_may_set_the_controller(tiny_llama_path, tiny_drafter_path):
    from util_scripts import load_script

    module = load_script("bench/paired_steps.py")
    assert module.controller_settings("adaptive:level_steps=0+min_gain=0.05+noise_margin=False") == \
        ("adaptive", {"level_steps": 0, "min_gain": 0.05, "noise_margin": False})
    base = module.EngineConfig(model=str(tiny_llama_path)).replace(draft=str(tiny_drafter_path))
    engine = module.build("adaptive:level_steps=0+min_gain=0.05", base, 2)
    cfg = engine.spec.controller.config
    assert (cfg.level_steps, cfg.min_gain) == (0, 0.05)
    assert cfg.max_tokens == module.build("adaptive", base, 2).spec.controller.config.max_tokens


def test_batch_invariance_script_finds_no_difference_in_fp32(capsys, tmp_path, tiny_llama_path, tiny_drafter_path):
    from util_scripts import load_script

    module = load_script("bench/batch_invariance.py")
    assert module.first_differences([[1, 2, 3], [4, 5], [6]], [[1, 2, 3], [4, 7], [8]]) == {1: 1, 2: 0}
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"id": "a", "prompt": "Name a colour."}\n{"id": "b", "prompt": "Count to three."}\n'
                       '{"id": "c", "prompt": "Say hello."}\n')
    assert module.main(["--model", str(tiny_llama_path), "--draft", str(tiny_drafter_path), "--dtype", "float32",
                        "--prompt-file", str(prompts), "--prompts", "3", "--max-tokens", "8"]) == 0
    lines = capsys.readouterr().out.splitlines()[1:]
    assert [line.split(":")[0] for line in lines] == list(module.MODES)
    assert all(": 0 of 3 requests differ" in line for line in lines)
    with pytest.raises(SystemExit):
        module.main(["--modes", "plain-alone,fast"])
