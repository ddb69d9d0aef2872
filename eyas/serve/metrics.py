"""Prometheus metrics for `eyas serve`: a small thread-safe registry, the server's metrics, and an
HTTP endpoint (GET /metrics) in a daemon thread.

No client library: `Registry.render()` writes the text exposition format (version 0.0.4) itself.
Request metrics are recorded by the engine thread (which sees every output with its timing) and
the service (rejections); engine-state gauges are set by the engine thread after each step, so
the HTTP thread only ever reads values under each metric's lock, never the engine.
"""
from __future__ import annotations

import bisect
import http.server
import logging
import math
import socket
import threading
from typing import Iterable, Optional, Sequence

log = logging.getLogger("eyas.serve")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PREFIX = "eyas_"

LabelValues = tuple[str, ...]


def format_value(value: float) -> str:
    """A sample value as Prometheus writes it: integers without '.0', +Inf/-Inf/NaN spelled out."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(float(value))


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _labels(names: Sequence[str], values: Sequence[str]) -> str:
    if not names:
        return ""
    return "{" + ",".join(f'{n}="{_escape_label(v)}"' for n, v in zip(names, values)) + "}"


class Metric:
    """One metric family: a name, help text, label names, and a value per label-value tuple."""

    type_name = "untyped"

    def __init__(self, name: str, help_text: str, label_names: Sequence[str] = ()):
        self.name = name
        self.help = help_text
        self.label_names = tuple(label_names)
        self._lock = threading.Lock()

    def _key(self, labels: dict[str, str]) -> LabelValues:
        if set(labels) != set(self.label_names):
            raise ValueError(f"{self.name}: expected labels {list(self.label_names)}, got {sorted(labels)}")
        return tuple(str(labels[n]) for n in self.label_names)

    def samples(self) -> list[str]:
        """The sample lines (without HELP/TYPE), read under the lock."""
        raise NotImplementedError

    def render(self) -> str:
        head = f"# HELP {self.name} {_escape_help(self.help)}\n# TYPE {self.name} {self.type_name}\n"
        return head + "".join(line + "\n" for line in self.samples())


class _Scalar(Metric):
    """A float per label-value tuple (counters and gauges)."""

    def __init__(self, name: str, help_text: str, label_names: Sequence[str] = (),
                 initial: Iterable[LabelValues] = ()):
        super().__init__(name, help_text, label_names)
        self._values: dict[LabelValues, float] = {}
        if not self.label_names:
            self._values[()] = 0.0
        for key in initial:  # known label values start at 0, so they show before the first event
            self._values[tuple(key)] = 0.0

    def get(self, **labels: str) -> float:
        with self._lock:
            return self._values.get(self._key(labels), 0.0)

    def _add(self, amount: float, labels: dict[str, str]) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def samples(self) -> list[str]:
        with self._lock:
            items = sorted(self._values.items())
        return [f"{self.name}{_labels(self.label_names, k)} {format_value(v)}" for k, v in items]


class Counter(_Scalar):
    """A value that only goes up (names end in _total)."""

    type_name = "counter"

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        if amount < 0:
            raise ValueError(f"{self.name}: a counter cannot decrease (inc by {amount})")
        self._add(amount, labels)


class Gauge(_Scalar):
    """A value that is set to the current state."""

    type_name = "gauge"

    def set(self, value: float, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = float(value)

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        self._add(amount, labels)


class Histogram(Metric):
    """Observations counted into fixed cumulative buckets, with _sum and _count (no labels)."""

    type_name = "histogram"

    def __init__(self, name: str, help_text: str, buckets: Sequence[float]):
        super().__init__(name, help_text)
        bounds = sorted(float(b) for b in buckets if not math.isinf(b))
        if not bounds or len(set(bounds)) != len(bounds):
            raise ValueError(f"{name}: buckets must be non-empty and distinct, got {list(buckets)}")
        self.bounds = tuple(bounds) + (math.inf,)
        self._counts = [0] * len(self.bounds)  # per bucket, not cumulative
        self._sum = 0.0

    def observe(self, value: float) -> None:
        value = float(value)
        i = len(self.bounds) - 1 if math.isnan(value) else bisect.bisect_left(self.bounds, value)
        with self._lock:
            self._counts[i] += 1
            self._sum += value

    @property
    def count(self) -> int:
        with self._lock:
            return sum(self._counts)

    def samples(self) -> list[str]:
        with self._lock:
            counts, total = list(self._counts), self._sum
        lines, cumulative = [], 0
        for bound, n in zip(self.bounds, counts):
            cumulative += n
            lines.append(f'{self.name}_bucket{{le="{format_value(bound)}"}} {cumulative}')
        lines.append(f"{self.name}_sum {format_value(total)}")
        lines.append(f"{self.name}_count {cumulative}")
        return lines


class Registry:
    """Metric families by name, rendered in registration order."""

    def __init__(self):
        self._metrics: dict[str, Metric] = {}
        self._lock = threading.Lock()

    def register(self, metric: Metric) -> Metric:
        with self._lock:
            if metric.name in self._metrics:
                raise ValueError(f"metric {metric.name} is already registered")
            self._metrics[metric.name] = metric
        return metric

    def counter(self, name: str, help_text: str, label_names: Sequence[str] = (),
                initial: Iterable[LabelValues] = ()) -> Counter:
        return self.register(Counter(name, help_text, label_names, initial))

    def gauge(self, name: str, help_text: str) -> Gauge:
        return self.register(Gauge(name, help_text))

    def histogram(self, name: str, help_text: str, buckets: Sequence[float]) -> Histogram:
        return self.register(Histogram(name, help_text, buckets))

    def render(self) -> str:
        with self._lock:
            metrics = list(self._metrics.values())
        return "".join(m.render() for m in metrics)


FINISH_REASONS = ("stop", "length", "abort", "cancelled", "error")
REJECT_CODES = ("INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "UNAVAILABLE", "ALREADY_EXISTS", "INTERNAL")
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
                0.75, 1.0, 2.5, 5.0, 10.0)
E2E_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0,
               300.0, 600.0)
ACCEPT_BUCKETS = (1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0, 8.0, 10.0, 16.0)


class ServerMetrics:
    """The `eyas_*` metrics of one server. Methods are safe to call from any thread."""

    def __init__(self):
        r = self.registry = Registry()
        p = PREFIX
        self.requests = r.counter(p + "requests_total", "Generate requests that ended, by finish reason "
                                  "(cancelled: the client went away; error: the engine failed).",
                                  ("finish_reason",), [(f,) for f in FINISH_REASONS])
        self.rejected = r.counter(p + "requests_rejected_total", "Generate requests refused before "
                                  "admission, by gRPC status code.", ("code",), [(c,) for c in REJECT_CODES])
        self.prompt_tokens = r.counter(p + "prompt_tokens_total", "Prompt tokens of ended requests.")
        self.generation_tokens = r.counter(p + "generation_tokens_total", "Tokens generated.")
        self.ttft = r.histogram(p + "time_to_first_token_seconds",
                                "Seconds from admission to a request's first generated token.", TTFT_BUCKETS)
        self.tpot = r.histogram(p + "time_per_output_token_seconds", "Per request: seconds from the first "
                                "to the last token over the tokens after the first (2+ tokens).", TPOT_BUCKETS)
        self.e2e = r.histogram(p + "e2e_request_latency_seconds",
                               "Seconds from admission to a request's end.", E2E_BUCKETS)
        self.spec_drafted = r.counter(p + "spec_drafted_tokens_total", "Tokens proposed by the draft model.")
        self.spec_accepted = r.counter(p + "spec_accepted_tokens_total",
                                       "Draft tokens accepted by the target model.")
        self.accept_len = r.histogram(p + "spec_accept_length", "Per request (with a draft): tokens "
                                      "generated per target-model step.", ACCEPT_BUCKETS)
        self.steps = r.counter(p + "engine_steps_total", "Engine steps run.")
        self.kv_used = r.gauge(p + "kv_blocks_used", "KV cache blocks in use by requests.")
        self.kv_free = r.gauge(p + "kv_blocks_free", "KV cache blocks free (prefix-cached ones included).")
        self.kv_total = r.gauge(p + "kv_blocks_total", "KV cache blocks in all.")
        self.running = r.gauge(p + "requests_running", "Requests the engine is running.")
        self.waiting = r.gauge(p + "requests_waiting", "Requests queued in the engine (queue depth).")

    def record_engine_state(self, engine) -> None:
        """Set the engine gauges (call on the engine thread only: the engine is not thread-safe)."""
        total = engine.allocator.num_blocks
        free = engine.allocator.num_free_blocks
        self.kv_total.set(total)
        self.kv_free.set(free)
        self.kv_used.set(total - free)
        self.running.set(len(engine.scheduler.running))
        self.waiting.set(len(engine.scheduler.waiting))

    def render(self) -> str:
        return self.registry.render()


class RequestTimer:
    """One request's timing and token count, kept by the engine thread (monotonic seconds)."""

    def __init__(self, arrival: float):
        self.arrival = arrival
        self.first_token_at: Optional[float] = None
        self.last_token_at: Optional[float] = None
        self.num_tokens = 0

    def on_tokens(self, metrics: ServerMetrics, count: int, now: float) -> None:
        """Count `count` new tokens at `now` (the first ones observe the time to first token)."""
        if count <= 0:
            return
        if self.first_token_at is None:
            self.first_token_at = now
            metrics.ttft.observe(now - self.arrival)
        self.last_token_at = now
        self.num_tokens += count
        metrics.generation_tokens.inc(count)

    def on_end(self, metrics: ServerMetrics, finish_reason: str, now: float, prompt_tokens: int = 0,
               spec=None) -> None:
        """Record the end of the request: reason, latency, time per output token, spec stats."""
        metrics.requests.inc(finish_reason=finish_reason)
        metrics.prompt_tokens.inc(max(prompt_tokens, 0))
        metrics.e2e.observe(now - self.arrival)
        if self.num_tokens >= 2 and self.first_token_at is not None:
            metrics.tpot.observe((self.last_token_at - self.first_token_at) / (self.num_tokens - 1))
        if spec is not None:
            metrics.spec_drafted.inc(spec.drafted)
            metrics.spec_accepted.inc(spec.accepted)
            if spec.target_steps > 0:
                metrics.accept_len.observe(spec.accept_len)


class _Handler(http.server.BaseHTTPRequestHandler):
    server: "_HTTPServer"

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        if self.path.split("?", 1)[0] != "/metrics":
            self._send(404, "text/plain; charset=utf-8", b"not found: try /metrics\n")
            return
        self._send(200, CONTENT_TYPE, self.server.metrics.render().encode())

    def _send(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:  # noqa: A002
        log.debug("metrics http: " + format, *args)


class _HTTPServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], metrics: ServerMetrics):
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.metrics = metrics
        super().__init__(address, _Handler)


class MetricsHTTPServer:
    """GET /metrics on `host:port` (port 0: any free one) from a daemon thread."""

    def __init__(self, metrics: ServerMetrics, host: str, port: int):
        self.metrics = metrics
        self.host = host.strip("[]")
        self.requested_port = port
        self.port: Optional[int] = None
        self._httpd: Optional[_HTTPServer] = None
        self._thread: Optional[threading.Thread] = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def start(self) -> int:
        """Bind and serve; returns the bound port. Raises OSError when the port is taken."""
        self._httpd = _HTTPServer((self.host, self.requested_port), self.metrics)
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="eyas-metrics", daemon=True)
        self._thread.start()
        return self.port

    def stop(self) -> None:
        if self._httpd is None:
            return
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5.0)
        self._httpd = None
