"""`eyas batch` on a real two-node Ray cluster started on 127.0.0.1 by the tests (deselect: -k "not ray").

One cluster for the module: a head with the dashboard (for `ray job submit`) and a second node
with its own `node2` resource. Jobs and actors use the shared venv, so no runtime env is needed.
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional

import pytest

from eyas.batch.results import ResultWriter

VENV_BIN = Path(sys.executable).parent
RAY = str(VENV_BIN / "ray")
EYAS = str(VENV_BIN / "eyas")
ENGINE = dict(kv_cache_memory="16MiB", max_model_len=96, num_threads=1, block_size=4, max_num_seqs=2)
ENGINE_FLAGS = ["--kv-cache-memory", "16MiB", "--max-model-len", "96", "--num-threads", "1", "--block-size", "4",
                "--max-num-seqs", "2", "--ignore-eos"]
# SHORT: both replicas busy at once. MEDIUM and LONG: one line in flight per replica and seconds of
# work, so a replica (MEDIUM, two replicas) or a job (LONG, one replica) can be stopped mid-way.
SHORT = {"lines": 24, "max_tokens": 24, "max_inflight": 2}
MEDIUM = {"lines": 24, "max_tokens": 64, "max_inflight": 1}
LONG = {"lines": 48, "max_tokens": 64, "max_inflight": 1}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sh(args, env, timeout=120, check=True, groups=None):
    """Run a command under nice. With `groups`, run it in a new session and add its process group."""
    p = subprocess.Popen(["nice", "-n", "19", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, start_new_session=groups is not None)
    if groups is not None:
        groups.add(p.pid)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
        raise RuntimeError(f"{' '.join(args)} timed out after {timeout}s:\n{out[-3000:]}\n{err[-3000:]}") from None
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({p.returncode}):\n{out[-3000:]}\n{err[-3000:]}")
    return subprocess.CompletedProcess(args, p.returncode, out, err)


def process_table() -> dict[int, tuple[int, int]]:
    """pid -> (ppid, process group), from /proc."""
    table = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
                table[int(d.name)] = (int(fields[1]), int(fields[2]))
            except (OSError, IndexError, ValueError):
                pass
    return table


def pids_of(groups: set[int]) -> set[int]:
    """Our Ray processes: those in the process groups our `ray start` calls created, and their descendants
    (workers, job drivers). `ray stop` would stop every Ray process on the machine, not just ours."""
    table = process_table()
    ours = {pid for pid, (_, pgid) in table.items() if pgid in groups}
    grew = True
    while grew:
        new = {pid for pid, (ppid, _) in table.items() if ppid in ours and pid not in ours}
        ours |= new
        grew = bool(new)
    ours.discard(os.getpid())
    return ours


@pytest.fixture(scope="module")
def ray_cluster():
    temp = tempfile.mkdtemp(prefix="ray-eyas-", dir="/tmp")  # short: socket paths stay < 107 bytes
    gcs, dash = free_port(), free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    common = ["--node-ip-address=127.0.0.1", "--num-cpus=2", "--object-store-memory=200000000",
              "--disable-usage-stats", f"--temp-dir={temp}"]
    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
    groups: set[int] = set()
    try:
        try:
            # Fixed default ports (agent 52365, client 10001) would clash between our two nodes or with
            # another cluster on this machine: give each its own.
            sh([RAY, "start", "--head", f"--port={gcs}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
                "--include-dashboard=true", f"--ray-client-server-port={free_port()}",
                f"--dashboard-agent-listen-port={free_port()}", *common], env, 180, groups=groups)
            sh([RAY, "start", f"--address=127.0.0.1:{gcs}", '--resources={"node2": 1}',
                f"--dashboard-agent-listen-port={free_port()}", *common], env, 180, groups=groups)
        except (RuntimeError, OSError) as e:
            pytest.fail(f"Ray failed to start a local cluster on this machine (is ray[default] installed in "
                        f"{VENV_BIN.parent}?): {e}")
        import ray

        os.environ["RAY_AUTH_MODE"] = "disabled"
        os.environ.pop("RAY_ADDRESS", None)
        ray.init(address=f"127.0.0.1:{gcs}", log_to_driver=False)
        deadline = time.monotonic() + 60
        while len([n for n in ray.nodes() if n["Alive"]]) < 2:
            if time.monotonic() > deadline:
                pytest.fail(f"the second Ray node never joined: {ray.nodes()}")
            time.sleep(0.5)
        node2 = next(n["NodeID"] for n in ray.nodes() if n["Alive"] and "node2" in n["Resources"])
        yield {"gcs": f"127.0.0.1:{gcs}", "dashboard": f"http://127.0.0.1:{dash}", "env": env, "node2": node2}
    finally:
        try:
            import ray

            ray.shutdown()
        except Exception:
            pass
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        stop_cluster(groups)
        shutil.rmtree(temp, ignore_errors=True)


def stop_cluster(groups: set[int]) -> None:
    """SIGTERM our Ray processes, then SIGKILL what is left after 3 s (a throwaway cluster)."""
    for sig, wait in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 5.0)):
        pids = pids_of(groups)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while pids_of(groups) and time.monotonic() < deadline:
            time.sleep(0.2)


WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel"]


def make_workload(folder: Path, tiny_llama_path, spec: dict) -> dict:
    """An input file and its LLM.generate reference (one in-process engine): id -> record."""
    from eyas import LLM, SamplingParams
    from eyas.config import EngineConfig

    lines = [{"id": f"p{i}", "prompt": f"{WORDS[i % 8]} {WORDS[(3 * i) % 8]} number {i} is"}
             for i in range(spec["lines"])]
    path = folder / "in.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    llm = LLM(config=EngineConfig(model=str(tiny_llama_path)).replace(**ENGINE))
    outs = llm.generate([x["prompt"] for x in lines], SamplingParams(max_tokens=spec["max_tokens"], ignore_eos=True))
    return {"input": path, "reference": {x["id"]: o.to_dict() | {"id": x["id"]} for x, o in zip(lines, outs)},
            **spec}


@pytest.fixture(scope="module")
def short(tmp_path_factory, tiny_llama_path):
    return make_workload(tmp_path_factory.mktemp("short"), tiny_llama_path, SHORT)


@pytest.fixture(scope="module")
def medium(tmp_path_factory, tiny_llama_path):
    return make_workload(tmp_path_factory.mktemp("medium"), tiny_llama_path, MEDIUM)


@pytest.fixture(scope="module")
def long(tmp_path_factory, tiny_llama_path):
    return make_workload(tmp_path_factory.mktemp("long"), tiny_llama_path, LONG)


def read_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def count_lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def job(cluster, *args, timeout=120, check=True):
    return sh([RAY, "job", *args[:1], "--address", cluster["dashboard"], *args[1:]], cluster["env"],
              timeout=timeout, check=check)


def submit(cluster, sid: str, entry: list[str], env: Optional[dict] = None) -> None:
    """`ray job submit`, retried while the head's job agent is still starting."""
    deadline = time.monotonic() + 90
    runtime = ["--runtime-env-json", json.dumps({"env_vars": env})] if env else []
    while True:
        p = job(cluster, "submit", "--submission-id", sid, "--no-wait", *runtime, "--", *entry, check=False)
        if p.returncode == 0:
            return
        if "No available agent" not in p.stderr + p.stdout or time.monotonic() > deadline:
            raise AssertionError(f"ray job submit failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
        time.sleep(1.0)


def job_logs(cluster, sid) -> str:
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(cluster["dashboard"]).get_job_logs(sid)


def wait_job(cluster, sid, timeout=240) -> str:
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(cluster["dashboard"])
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.get_job_status(sid)
        if status.is_terminal():
            return status.value
        time.sleep(0.5)
    client.stop_job(sid)
    raise AssertionError(f"job {sid} did not finish in {timeout}s (status {status}):\n{job_logs(cluster, sid)}")


def test_job_submit_stop_and_resubmit(ray_cluster, tiny_llama_path, long, tmp_path):
    out = tmp_path / "out.jsonl"
    entry = [EYAS, "batch", "--input", str(long["input"]), "--output", str(out), "--model", str(tiny_llama_path),
             "--log-interval", "1", "--max-tokens", str(long["max_tokens"]),
             "--max-inflight", str(long["max_inflight"]), *ENGINE_FLAGS]
    submit(ray_cluster, "eyas-a", entry, env={"EYAS_BATCH_STEP_PAUSE_S": "0.05"})  # >= 3 s a line
    deadline = time.monotonic() + 180
    while count_lines(out) < 1:
        assert time.monotonic() < deadline, job_logs(ray_cluster, "eyas-a")
        time.sleep(0.1)
    job(ray_cluster, "stop", "eyas-a", timeout=60)
    assert wait_job(ray_cluster, "eyas-a") == "STOPPED"
    first = ResultWriter(out).done  # the finished lines (a torn tail would be left out)
    assert 1 <= len(first) < long["lines"], "the job finished before it could be stopped mid-way"

    # The same command, with more lines in flight to finish sooner (greedy output does not depend on it).
    # Paced too: the periodic "lines/s" log needs lines to finish more than --log-interval apart
    # (unpaced, 47 lines took 4.3 s in finishing bursts on a fast machine and none was logged).
    submit(ray_cluster, "eyas-b", entry + ["--max-num-seqs", "8", "--max-inflight", "16"],
           env={"EYAS_BATCH_STEP_PAUSE_S": "0.05"})
    state = wait_job(ray_cluster, "eyas-b")
    logs = job_logs(ray_cluster, "eyas-b")
    assert state == "SUCCEEDED", logs
    recs = read_records(out)
    assert sorted(r["id"] for r in recs) == sorted(long["reference"])  # the union: every id exactly once
    assert {r["id"]: r for r in recs} == long["reference"]  # greedy text equals LLM.generate
    summary = json.loads(Path(str(out) + ".summary.json").read_text())
    assert summary["executor"] == "ray" and summary["complete"] and summary["lines_skipped"] >= len(first)
    assert "resuming" in logs and "lines/s" in logs and "tok/s" in logs


def run_ray(cluster, tiny_llama_path, work: dict, out: Path, **kw):
    from eyas.batch import run

    return run(str(work["input"]), str(out), model=str(tiny_llama_path), ray_address=cluster["gcs"],
               executor="ray", max_inflight=work["max_inflight"], max_tokens=work["max_tokens"], ignore_eos=True,
               log_interval=1.0, **ENGINE, **kw)


def test_two_replicas_share_work_across_both_nodes(ray_cluster, tiny_llama_path, short, tmp_path):
    out = tmp_path / "out.jsonl"
    summary = run_ray(ray_cluster, tiny_llama_path, short, out, replicas=2)
    recs = read_records(out)
    assert len(recs) == short["lines"] and {r["id"]: r for r in recs} == short["reference"]  # = one replica
    reps = summary["replicas"]
    assert len(reps) == 2 and all(r["lines"] > 0 for r in reps), reps  # both got work
    assert sum(r["lines"] for r in reps) == short["lines"]
    nodes = {r["node_id"] for r in reps}
    assert len(nodes) == 2 and ray_cluster["node2"] in nodes, reps  # one replica per node


def test_killed_replica_lines_are_redispatched(ray_cluster, tiny_llama_path, medium, tmp_path):
    import ray

    out = tmp_path / "out.jsonl"
    killed = []
    before = set(ray.util.list_named_actors())  # replicas of earlier runs that may linger

    def killer():
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            names = sorted(n for n in ray.util.list_named_actors() if n.startswith("eyas-replica-") and n not in before)
            if len(names) == 2 and count_lines(out) >= 2:
                ray.kill(ray.get_actor(names[1]), no_restart=True)
                killed.append(names[1])
                return
            time.sleep(0.05)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    summary = run_ray(ray_cluster, tiny_llama_path, medium, out, replicas=2)
    t.join(5)
    assert killed, "the replica was never killed"
    recs = read_records(out)
    assert sorted(r["id"] for r in recs) == sorted(medium["reference"])  # every id exactly once
    assert {r["id"]: r for r in recs} == medium["reference"]
    reps = summary["replicas"]
    assert [r["alive"] for r in reps] == [True, False], reps
    assert reps[1].get("failure"), reps
    assert summary["redispatched"] > 0 and summary["lines_failed"] == 0, summary
