"""Prometheus metrics of `eyas serve` (--metrics-port): a real server on the tiny model, real
requests (finished, aborted, cancelled, refused), then GET /metrics parsed and checked against what
the client received; the exposition format is validated; off unless a port is given."""
import logging
import math
import re
import threading
import urllib.error
import urllib.request

import pytest

from eyas.client import Client, InvalidArgument
from eyas.errors import ConfigError
from eyas.serve.background import BackgroundServer
from eyas.serve.config import ServerConfig
from eyas.serve.metrics import Histogram, Registry, format_value
from test_serve import build_engine, slow_down, tiny_config, wait_idle, wait_until

pytestmark = pytest.mark.timeout(120)

CAP = 200
PROMPTS = ["Hello, my name is", "The capital of France is", "1 2 3 4 5"]

NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
SAMPLE_RE = re.compile(rf"^({NAME})(?:\{{(.*)\}})? (\S+)$")
LABEL_RE = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"(,|$)')
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


# ------------------------------------------------------------------ parsing
def parse_labels(text: str) -> dict:
    labels, pos = {}, 0
    while pos < len(text):
        m = LABEL_RE.match(text, pos)
        assert m, f"bad labels {text!r} at {pos}"
        labels[m.group(1)] = m.group(2)
        pos = m.end()
    return labels


def parse_exposition(text: str) -> dict:
    """Validate the text format and return {family: {"help", "type", "samples": [(name, labels, value)]}}."""
    assert text.endswith("\n")
    families: dict = {}
    for line in text.splitlines():
        assert line.strip(), "no blank lines"
        if line.startswith("# HELP "):
            name, _, help_text = line[7:].partition(" ")
            assert name not in families, f"HELP for {name} twice"
            families[name] = {"help": help_text, "type": None, "samples": []}
        elif line.startswith("# TYPE "):
            name, kind = line[7:].split(" ")
            assert families.get(name, {}).get("type", "x") is None, f"TYPE for {name} must follow its HELP"
            assert kind in ("counter", "gauge", "histogram")
            families[name]["type"] = kind
        else:
            m = SAMPLE_RE.match(line)
            assert m, f"bad sample line: {line!r}"
            name, labels, value = m.group(1), parse_labels(m.group(2) or ""), float(m.group(3))
            family = name
            if name not in families:
                family = next((name[:-len(s)] for s in HISTOGRAM_SUFFIXES if name.endswith(s)), name)
                assert families.get(family, {}).get("type") == "histogram", f"{name}: no family declared"
            assert families[family]["type"] is not None, f"{name}: sample before TYPE"
            families[family]["samples"].append((name, labels, value))
    for name, fam in families.items():
        assert fam["help"] and fam["type"], name
        assert name.startswith("eyas_")
        if fam["type"] == "counter":
            assert name.endswith("_total") and all(v >= 0 for _, _, v in fam["samples"])
        if fam["type"] == "histogram":
            check_histogram(name, fam["samples"])
    return families


def check_histogram(name: str, samples: list) -> None:
    buckets = [(float(lb["le"]), v) for n, lb, v in samples if n == name + "_bucket"]
    counts = [v for n, _, v in samples if n == name + "_count"]
    assert len(counts) == 1 and [n for n, _, _ in samples if n == name + "_sum"] == [name + "_sum"]
    assert buckets and buckets[-1][0] == math.inf, f"{name}: last bucket must be le=+Inf"
    assert [b for b, _ in buckets] == sorted(b for b, _ in buckets), f"{name}: bounds not increasing"
    values = [v for _, v in buckets]
    assert values == sorted(values), f"{name}: buckets not cumulative"
    assert values[-1] == counts[0], f"{name}: +Inf bucket != _count"


class Metrics:
    """One scrape, parsed."""

    def __init__(self, text: str):
        self.text = text
        self.families = parse_exposition(text)

    def value(self, name: str, **labels) -> float:
        family = self.families[name if name in self.families else name.rsplit("_", 1)[0]]
        found = [v for n, lb, v in family["samples"] if n == name and lb == labels]
        assert len(found) == 1, f"{name}{labels}: {found}"
        return found[0]

    def count(self, histogram: str) -> float:
        return self.value(histogram + "_count")


def scrape(port: int, path: str = "/metrics") -> Metrics:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return Metrics(r.read().decode())


def wait_metrics(port: int, pred, what: str, timeout: float = 20.0) -> Metrics:
    box = {}

    def check():
        box["m"] = scrape(port)
        return pred(box["m"])

    wait_until(check, timeout, what)
    return box["m"]


def kv_idle(m: Metrics) -> bool:
    return (m.value("eyas_kv_blocks_used") == 0 and m.value("eyas_requests_running") == 0
            and m.value("eyas_requests_waiting") == 0
            and m.value("eyas_kv_blocks_free") == m.value("eyas_kv_blocks_total") > 0)


# ----------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def engine(tiny_llama_path):
    return build_engine(tiny_config(tiny_llama_path))


@pytest.fixture(scope="module")
def server(engine):
    srv = BackgroundServer(engine, ServerConfig(port=0, max_tokens_cap=CAP, metrics_port=0)).start()
    yield srv
    srv.stop(grace=0)


@pytest.fixture(scope="module")
def client(server):
    with Client(server.address, timeout=60) as c:
        yield c


@pytest.fixture
def slow_engine(engine, monkeypatch):
    slow_down(engine, monkeypatch, 0.01)
    yield engine
    wait_idle(engine)


def first_new_token_index(ids: list) -> int:
    """The smallest k >= 1 whose token did not occur before (stopping on it gives k + 1 tokens); 0: none."""
    return next((k for k in range(1, len(ids)) if ids[k] not in ids[:k]), 0)


# -------------------------------------------------------------------- tests
def test_registry_renders_the_text_format():
    r = Registry()
    c = r.counter("eyas_x_total", 'help with \\ and\nnewline', ("k",), [("a",)])
    c.inc(2, k='q"\\\n')
    g = r.gauge("eyas_g", "a gauge")
    g.set(1.5)
    h = r.histogram("eyas_h", "a histogram", [1, 0.5])
    for v in (0.5, 0.7, 3.0):
        h.observe(v)
    text = r.render()
    assert '# HELP eyas_x_total help with \\\\ and\\nnewline\n# TYPE eyas_x_total counter\n' in text
    assert 'eyas_x_total{k="a"} 0\n' in text and 'eyas_x_total{k="q\\"\\\\\\n"} 2\n' in text
    assert "eyas_g 1.5\n" in text
    assert ('eyas_h_bucket{le="0.5"} 1\neyas_h_bucket{le="1"} 2\neyas_h_bucket{le="+Inf"} 3\n'
            'eyas_h_sum 4.2\neyas_h_count 3\n') in text
    m = Metrics(text)
    assert m.value("eyas_x_total", k='q\\"\\\\\\n') == 2 and m.count("eyas_h") == 3
    with pytest.raises(ValueError):
        c.inc(-1, k="a")
    with pytest.raises(ValueError):
        c.inc(1)  # the label is missing
    with pytest.raises(ValueError):
        r.gauge("eyas_g", "twice")
    with pytest.raises(ValueError):
        Histogram("eyas_bad", "no buckets", [])
    assert [format_value(v) for v in (3.0, 0.25, math.inf, float("nan"))] == ["3", "0.25", "+Inf", "NaN"]


def test_config_and_flag():
    from eyas.cli import build_parser
    from eyas.serve.cli_serve import server_config_from_args

    assert ServerConfig().metrics_port is None  # off by default
    assert ServerConfig(metrics_port=0).metrics_port == 0
    for bad in (-1, 70000, "9100"):
        with pytest.raises(ConfigError, match="metrics_port"):
            ServerConfig(metrics_port=bad)
    with pytest.raises(ConfigError, match="metrics_port must differ"):
        ServerConfig(port=9000, metrics_port=9000)
    args = build_parser().parse_args(["serve", "--model", "m", "--metrics-port", "9100"])
    assert server_config_from_args(args).metrics_port == 9100
    assert server_config_from_args(build_parser().parse_args(["serve", "--model", "m"])).metrics_port is None


def test_metrics_match_what_clients_received(server, client, slow_engine):
    port = server.server.metrics_port
    assert port and port != server.port
    before = scrape(port)
    assert before.value("eyas_kv_blocks_total") == slow_engine.allocator.num_blocks
    # finished: three by length, then one by a stop token that first occurs after the first token
    finals = [client.generate(p, max_tokens=6, ignore_eos=True) for p in PROMPTS]
    prompt, ids = next((p, r.token_ids) for p, r in zip(PROMPTS, finals) if first_new_token_index(r.token_ids))
    k = first_new_token_index(ids)
    finals.append(list(client.stream(prompt, max_tokens=6, ignore_eos=True, stop_token_ids=[ids[k]]))[-1])
    assert [f.finish_reason for f in finals] == ["length", "length", "length", "stop"]
    assert finals[-1].usage.completion_tokens == k + 1 >= 2
    # aborted by id while running: meanwhile the gauges show it in the engine
    got = []
    t = threading.Thread(target=lambda: got.extend(
        client.stream(PROMPTS[1], max_tokens=CAP, ignore_eos=True, request_id="to-abort")))
    t.start()
    wait_until(lambda: len(got) >= 2, what="first deltas")
    busy = wait_metrics(port, lambda m: m.value("eyas_kv_blocks_used") > 0, "KV blocks in use")
    assert busy.value("eyas_requests_running") + busy.value("eyas_requests_waiting") == 1
    assert client.abort("to-abort") is True
    t.join(20)
    assert not t.is_alive() and got[-1].finish_reason == "abort"
    finals.append(got[-1])
    # refused: one by the admission checks, one by the engine's prompt-length check
    for bad in (dict(prompt=""), dict(prompt="hello " * 400)):
        with pytest.raises(InvalidArgument):
            client.generate(**bad)
    wait_idle(slow_engine)

    m = wait_metrics(port, kv_idle, "idle KV gauges")
    all_usage = [f.usage for f in finals]
    delta = lambda name, **lb: m.value(name, **lb) - before.value(name, **lb)  # noqa: E731
    assert delta("eyas_requests_total", finish_reason="length") == 3
    assert delta("eyas_requests_total", finish_reason="stop") == 1
    assert delta("eyas_requests_total", finish_reason="abort") == 1
    assert delta("eyas_requests_total", finish_reason="cancelled") == 0
    assert delta("eyas_requests_rejected_total", code="INVALID_ARGUMENT") == 2
    assert delta("eyas_generation_tokens_total") == sum(u.completion_tokens for u in all_usage)
    assert delta("eyas_prompt_tokens_total") == sum(u.prompt_tokens for u in all_usage)
    ended = len(all_usage)
    assert all(u.completion_tokens >= 2 for u in all_usage)  # so each has a time per output token
    for hist in ("eyas_time_to_first_token_seconds", "eyas_time_per_output_token_seconds",
                 "eyas_e2e_request_latency_seconds"):
        assert m.count(hist) - before.count(hist) == ended, hist
        assert m.value(hist + "_sum") > before.value(hist + "_sum")
    assert m.value("eyas_engine_steps_total") > before.value("eyas_engine_steps_total")
    assert m.value("eyas_spec_drafted_tokens_total") == 0 and m.count("eyas_spec_accept_length") == 0


def test_cancel_counts_and_frees_blocks(server, client, slow_engine):
    port = server.server.metrics_port
    before = scrape(port)
    stream = client.stream(PROMPTS[1], max_tokens=CAP, ignore_eos=True)
    received = 0
    for i, d in enumerate(stream):
        received += len(d.token_ids)
        if i == 2:
            break
    stream.close()
    m = wait_metrics(port, lambda m: kv_idle(m) and m.value("eyas_requests_total", finish_reason="cancelled")
                     == before.value("eyas_requests_total", finish_reason="cancelled") + 1, "cancel counted")
    assert m.value("eyas_generation_tokens_total") - before.value("eyas_generation_tokens_total") >= received
    assert m.count("eyas_e2e_request_latency_seconds") == before.count("eyas_e2e_request_latency_seconds") + 1


def test_other_paths_are_404(server):
    for path in ("/", "/metricsx", "/health"):
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(f"http://127.0.0.1:{server.server.metrics_port}{path}", timeout=10)
        assert e.value.code == 404
    assert scrape(server.server.metrics_port, "/metrics?x=1").value("eyas_kv_blocks_total") > 0


def test_metrics_off_by_default_logged_when_on_and_port_freed_on_stop(engine, caplog):
    srv = BackgroundServer(engine, ServerConfig(port=0)).start()
    try:
        assert srv.server.metrics_port is None and srv.server._metrics_http is None
    finally:
        srv.stop(grace=0)
    with caplog.at_level(logging.INFO, logger="eyas.serve"):
        srv = BackgroundServer(engine, ServerConfig(port=0, metrics_port=0)).start()
    port = srv.server.metrics_port
    assert f"metrics on http://127.0.0.1:{port}/metrics" in caplog.messages
    assert scrape(port).value("eyas_requests_total", finish_reason="stop") == 0
    srv.stop(grace=0)
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5)


def test_metrics_port_in_use_is_a_clear_error(engine, server):
    srv = BackgroundServer(engine, ServerConfig(port=0, metrics_port=server.server.metrics_port))
    with pytest.raises(ConfigError, match="could not serve metrics"):
        srv.start()


def test_spec_metrics(tiny_llama_path, tiny_drafter_path):
    spec_engine = build_engine(tiny_config(tiny_llama_path, draft=str(tiny_drafter_path), spec_steps=3))
    srv = BackgroundServer(spec_engine, ServerConfig(port=0, metrics_port=0)).start()
    try:
        with Client(srv.address, timeout=60) as c:
            finals = [list(c.stream(p, max_tokens=8, ignore_eos=True))[-1] for p in PROMPTS]
        wait_idle(spec_engine)
        m = wait_metrics(srv.server.metrics_port, kv_idle, "idle KV gauges")
        assert m.value("eyas_spec_drafted_tokens_total") == sum(f.spec.drafted for f in finals) > 0
        assert m.value("eyas_spec_accepted_tokens_total") == sum(f.spec.accepted for f in finals)
        assert m.count("eyas_spec_accept_length") == len(finals) == m.value("eyas_requests_total", finish_reason="length")
        assert m.value("eyas_spec_accept_length_sum") == pytest.approx(sum(f.spec.accept_len for f in finals))
        assert m.value("eyas_generation_tokens_total") == 8 * len(finals)
    finally:
        srv.stop(grace=0)
