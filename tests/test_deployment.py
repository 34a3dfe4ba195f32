"""prefect.yaml end to end: a real local Prefect server and process worker (started the way
`make demo` starts them, from scripts/demo.py), `prefect deploy --all`, a build-ct/local run
with `--watch` on local Ray, then `datagen validate` and `datagen filter` on its output, and
every process the run started stopped afterwards, by PID."""

from __future__ import annotations

import json
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import psutil
import pytest
from helpers import load_demo

from datagen.data.dataset import Dataset
from datagen.data.demo_clips import SAMPLE_CLIPS, write_samples

REPO = Path(__file__).resolve().parent.parent
DATAGEN = Path(sys.executable).parent / "datagen"
RAY_ADDRESS = "ray://ray-head.example:10001"
ENTRYPOINTS = {
    "build-ct": "flows/build_ct.py:build_ct",
    "build-sft": "flows/build_sft.py:build_sft",
}


demo = load_demo()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def processes_of(home: Path) -> dict[int, str]:
    """pid -> name of every process with this stack's PREFECT_HOME in its environment: the
    server, the worker, its flow runs and the Ray processes they start (they inherit it)."""
    found = {}
    for process in psutil.process_iter(["name"]):
        try:
            if process.environ().get("PREFECT_HOME") == str(home):
                found[process.pid] = process.info["name"]
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return found


class Sampler(threading.Thread):
    """Records the stack's processes every second while a run goes on."""

    def __init__(self, home: Path):
        super().__init__(daemon=True)
        self.home, self.seen, self.done = home, {}, threading.Event()

    def run(self) -> None:
        while not self.done.wait(1.0):
            self.seen |= processes_of(self.home)


@pytest.fixture
def stack():
    # A short root: Ray's unix sockets live under RAY_TMPDIR (limit ~107 bytes).
    root = Path(tempfile.mkdtemp(prefix="dg-", dir="/tmp"))
    stack = demo.Stack(root, free_port(), extra_env={"RAY_TMPDIR": str(root / "ray")})
    try:
        yield stack
    finally:
        stack.stop()  # a no-op when the test stopped it already
        shutil.rmtree(root, ignore_errors=True)


def datagen(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(DATAGEN), *args], text=True, capture_output=True, timeout=300)


@pytest.mark.slow
def test_build_ct_local_deployment_runs_on_a_local_server_and_worker(stack):
    root = stack.root
    clips = root / "clips"
    write_samples(clips, SAMPLE_CLIPS[:3])

    stack.up()
    server, worker = stack.running("server")[1], stack.running("worker")[1]
    assert server and worker and stack.healthy()
    stack.up()  # a second `up` reuses both
    assert stack.running("server")[1].pid == server.pid
    assert stack.running("worker")[1].pid == worker.pid
    with pytest.raises(demo.DemoError, match=f"already runs on port {stack.port}"):
        demo.Stack(root, free_port()).ensure_server()

    # every deployment of prefect.yaml deploys; RAY_ADDRESS is read when deploying
    stack.ensure_pool("datagen-cluster")
    stack.deploy(env={"RAY_ADDRESS": RAY_ADDRESS})
    deployments = {
        f"{flow}/{name}": stack.api("GET", f"/deployments/name/{flow}/{name}")
        for flow in ("build-ct", "build-sft")
        for name in ("local", "cluster")
    }
    for key, deployment in deployments.items():
        flow, name = key.split("/")
        assert deployment["entrypoint"] == ENTRYPOINTS[flow]
        assert deployment["work_pool_name"] == f"datagen-{name}"
        (step,) = deployment["pull_steps"]
        assert step["prefect.deployments.steps.set_working_directory"]["directory"] == str(REPO)
    local, cluster = deployments["build-ct/local"], deployments["build-ct/cluster"]
    assert local["parameters"]["profile"] == "tiny" and local["parameters"]["use_ray"] is True
    assert len(local["parameters"]["styles"]) >= 2
    assert cluster["parameters"]["profile"] == "production"
    assert cluster["job_variables"]["env"]["RAY_ADDRESS"] == RAY_ADDRESS
    assert "csd_threshold" not in deployments["build-sft/local"]["parameters"]

    # the local deployment on a smaller input: 3 samples in 2 shards, models in Ray actors
    out = root / "out"
    sampler = Sampler(stack.root / "prefect")
    sampler.start()
    try:
        flow_run = stack.run_deployment(
            "build-ct/local",
            {"source": str(clips), "out": str(out), "limit": 3, "shard_size": 2},
            echo=False,
            timeout=420,
        )
    finally:
        sampler.done.set()
        sampler.join()
    log = demo.tail(stack.log_dir / "worker.log", 60)
    assert flow_run.returncode == 0, f"{flow_run.output[-3000:]}\n--- worker log:\n{log}"
    assert "Completed" in flow_run.output
    state = stack.api("GET", f"/flow_runs/{flow_run.id}")
    assert state["state"]["type"] == "COMPLETED"
    tasks = stack.api("POST", "/task_runs/filter", {"flow_runs": {"id": {"any_": [flow_run.id]}}})
    names = sorted(t["name"] for t in tasks)
    assert names == ["plan", "shard-00000", "shard-00001"], names  # one task run per shard
    assert all(t["state"]["type"] == "COMPLETED" for t in tasks)
    artifacts = stack.api(
        "POST", "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [flow_run.id]}}}
    )
    by_key = {a["key"]: a for a in artifacts}
    assert {"ct-build-summary", "ct-build-preview", "ct-build-progress"} <= set(by_key)
    assert by_key["ct-build-progress"]["data"] == 100
    assert by_key["ct-animate-progress"]["data"] == 100  # each step's, at its final count
    assert by_key["ct-animate-progress"]["description"].startswith("animate: 3 done, 0 rejected")
    assert any("raylet" in name for name in sampler.seen.values()), "the run used local Ray"

    # the output: valid pairs, and `datagen filter` cuts them
    dataset = out / "ct"
    validated = datagen("validate", str(dataset))
    assert validated.returncode == 0, validated.stdout + validated.stderr
    assert "3 rows in 2 shards: OK" in validated.stdout
    scores = Dataset(dataset).index(columns=["csd_score"])["csd_score"].to_pylist()
    threshold = statistics.median(scores)
    filtered = datagen(
        "filter", "--csd", repr(threshold), "--json", str(dataset), str(root / "filtered")
    )
    assert filtered.returncode == 0, filtered.stderr
    result = json.loads(filtered.stdout)
    assert result["total"] == 3
    assert result["kept"] == sum(s > threshold for s in scores)
    assert result["kept"] + result["dropped"] + result["missing"] == 3
    assert datagen("validate", str(root / "filtered")).returncode == 0

    # stop: the server, the worker and everything they started are gone
    stopped = stack.stop()
    assert server.pid in stopped and worker.pid in stopped
    assert not server.is_running() and not worker.is_running()
    left = processes_of(stack.root / "prefect")
    assert not left, f"still running after stop: {left} (seen during the run: {sampler.seen})"
    assert not (stack.run_dir / "server.json").exists()
    assert stack.status() == {"server": None, "worker": None, "healthy": False}


def test_a_port_taken_by_another_program_is_refused(tmp_path):
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        stack = demo.Stack(tmp_path, port)
        with pytest.raises(demo.DemoError, match=f"port {port} is taken by another program"):
            stack.ensure_server()
    assert not (tmp_path / "run" / "server.json").exists()
    assert stack.stop() == []
