"""`eyas serve` as a real process: starts on a free port, answers, exits cleanly on SIGTERM."""
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from eyas.client import Client

pytestmark = pytest.mark.timeout(180)


def eyas_cmd(*args):
    return [sys.executable, "-m", "eyas.cli", *args]


def read_lines(stream, out: queue.Queue) -> None:
    for line in stream:
        out.put(line)
    out.put(None)


def wait_for_line(lines: queue.Queue, pattern: str, timeout: float, seen: list) -> re.Match:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            break
        if line is None:
            break
        seen.append(line)
        m = re.search(pattern, line)
        if m:
            return m
    raise AssertionError(f"no line matching {pattern!r} within {timeout}s; output:\n{''.join(seen)}")


def test_eyas_serve_starts_answers_and_stops_on_sigterm(tiny_llama_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("EYAS_API_KEY", None)
    proc = subprocess.Popen(
        eyas_cmd("serve", "--model", str(tiny_llama_path), "--port", "0", "--max-model-len", "256",
                 "--block-size", "4", "--kv-cache-memory", "16MiB", "--num-threads", "1", "--grace-period", "5"),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=read_lines, args=(proc.stderr, lines), daemon=True).start()
    seen: list = []
    try:
        m = wait_for_line(lines, r"serving on (127\.0\.0\.1):(\d+)", 120, seen)
        address = f"{m.group(1)}:{m.group(2)}"
        with Client(address, timeout=30) as c:
            assert c.health() == "SERVING"
            r = c.generate("Hello", max_tokens=4, ignore_eos=True)
            assert len(r.token_ids) == 4 and r.finish_reason == "length"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        wait_for_line(lines, r"stopped", 10, seen)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_eyas_serve_refuses_bad_server_config(tmp_path, capsys):
    from eyas.cli import main

    # checked before the model loads, so a bad flag fails fast
    assert main(["serve", "--model", str(tmp_path / "no-model"), "--tls-cert", str(tmp_path / "missing.pem"),
                 "--tls-key", str(tmp_path / "missing.key")]) == 2
    assert "tls_cert: file not found" in capsys.readouterr().err
    assert main(["serve", "--model", str(tmp_path / "no-model"), "--max-pending", "0"]) == 2
    assert "max_pending must be >= 1" in capsys.readouterr().err


def test_serve_flags_override_yaml_and_env(tmp_path, monkeypatch):
    from eyas.cli import build_parser
    from eyas.serve.cli_serve import server_config_from_args

    cfg = tmp_path / "c.yaml"
    cfg.write_text("engine:\n  model: m\nserver:\n  port: 6000\n  max_pending: 3\n  api_key: from-yaml\n")
    monkeypatch.setenv("EYAS_API_KEY", "from-env")
    args = build_parser().parse_args(["serve", "--config", str(cfg), "--port", "7000"])
    s = server_config_from_args(args)
    assert (s.port, s.max_pending, s.api_key, s.host) == (7000, 3, "from-env", "127.0.0.1")
    args = build_parser().parse_args(["serve", "--config", str(cfg), "--api-key", "from-flag"])
    assert server_config_from_args(args).api_key == "from-flag"
