#!/usr/bin/env python3
"""`make demo` and `make stop`: the embedded default, end to end, on one machine.

    python scripts/demo.py demo     # everything below, then a build-ct/local run and a filter
    python scripts/demo.py up       # only: local Prefect server + process worker + work pools
    python scripts/demo.py status
    python scripts/demo.py stop     # stop exactly what `up` started, by PID

`demo` builds the tiny models (`datagen models tiny`), makes the demo clips (`datagen samples`),
starts a Prefect server (SQLite, 127.0.0.1) and a process worker in the background, creates the
`datagen-local` work pool, deploys prefect.yaml's `build-ct/local` and `build-sft/local`, runs
`build-ct/local` with `--watch`, re-filters its output with `datagen filter` at the run's median
CSD score (or $DATAGEN_DEMO_CSD), and prints where the shards and the UI are.

Everything lives under one directory, `.demo/` in the repository (`--dir` to move it):
`prefect/` (PREFECT_HOME: the SQLite database), `logs/`, `run/*.json` (PID files), `clips/`,
`out/` (the build-ct/local output) and `filtered/`. A second `up` or `demo` reuses the server
and the worker that still run (PID alive, same start time, `/api/health` answers); only one
server ever uses the database (two processes sharing it get "database is locked").
`stop` signals only the processes named in the PID files and their descendants (a worker's flow
runs and the Ray processes they started); never `pkill` or `ray stop`, which would hit other
users' processes too.

The port is 4200 unless `--port` or $DATAGEN_DEMO_PORT says otherwise; a port held by anything
but the demo's own server is an error. Uses the Python it runs under: run it with the venv's.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DIR = REPO / ".demo"
DEFAULT_PORT = 4200
LOCAL_POOL = "datagen-local"
WORKER_NAME = "datagen-demo-worker"
DEMO_DEPLOYMENT = "build-ct/local"
BIN = Path(sys.executable).parent  # prefect and datagen come from the same environment


class DemoError(RuntimeError):
    """Something the user has to act on: printed as one message, exit status 1."""


STARTED = time.monotonic()


def say(message: str) -> None:
    elapsed = time.monotonic() - STARTED
    print(f"[demo {elapsed // 60:.0f}:{elapsed % 60:04.1f}] {message}", flush=True)


# --- processes -----------------------------------------------------------------------------


def _process(record: dict | None):
    """The live process a PID file names, or None (gone, or the PID now belongs to another
    process: the start time must match too)."""
    import psutil

    if not record:
        return None
    try:
        process = psutil.Process(record["pid"])
        if abs(process.create_time() - record["create_time"]) > 0.01:
            return None
        if process.status() == psutil.STATUS_ZOMBIE:
            return None
        return process
    except (psutil.NoSuchProcess, psutil.AccessDenied, KeyError):
        return None


def _spawn(command: list[str], env: dict, log: Path, cwd: Path) -> dict:
    """Start `command` in the background in its own session, output appended to `log`."""
    import psutil

    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as output:
        output.write(f"\n=== {time.strftime('%F %T')} {' '.join(command)}\n".encode())
        output.flush()
        process = subprocess.Popen(
            command,
            env=env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C in the terminal does not reach it
        )
    return {
        "pid": process.pid,
        "create_time": psutil.Process(process.pid).create_time(),
        "command": command,
        "log": str(log),
    }


def terminate(processes: list, grace: float = 20.0) -> list[int]:
    """SIGTERM, then SIGKILL whatever is left after `grace` seconds; the PIDs signalled."""
    import psutil

    alive = []
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.terminate()
            alive.append(process)
    _, left = psutil.wait_procs(alive, timeout=grace)
    for process in left:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    psutil.wait_procs(left, timeout=5)
    return [p.pid for p in alive]


# --- the stack -----------------------------------------------------------------------------


@dataclass
class Stack:
    """The demo's server and worker, with their state under `root`."""

    root: Path = DEFAULT_DIR
    port: int = DEFAULT_PORT
    extra_env: dict = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api_url(self) -> str:
        return f"{self.url}/api"

    @property
    def run_dir(self) -> Path:
        return self.root / "run"

    @property
    def log_dir(self) -> Path:
        return self.root / "logs"

    def env(self) -> dict:
        """The environment of the server, the worker and every CLI call: this demo's Prefect
        home and API only (inherited PREFECT_* settings, a Prefect Cloud key or a cluster
        RAY_ADDRESS would point the embedded default elsewhere)."""
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("PREFECT_") and k != "RAY_ADDRESS"
        }
        env |= {
            "PREFECT_HOME": str(self.root / "prefect"),
            "PREFECT_API_URL": self.api_url,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_WORKER_QUERY_SECONDS": "2",  # pick up a new run within 2 s, not 10
            "RAY_USAGE_STATS_ENABLED": "0",
            "PWD": str(REPO),  # prefect.yaml's pull step: runs start in this checkout
            "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        }
        return env | self.extra_env

    # PID files -----------------------------------------------------------------------------

    def _record(self, name: str) -> dict | None:
        path = self.run_dir / f"{name}.json"
        try:
            return json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def _save(self, name: str, record: dict) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        temporary = self.run_dir / f".{name}.json.tmp"
        temporary.write_text(json.dumps(record, indent=2))
        temporary.replace(self.run_dir / f"{name}.json")

    def _forget(self, name: str) -> None:
        (self.run_dir / f"{name}.json").unlink(missing_ok=True)

    def running(self, name: str):
        """(record, process) of `name` ("server" or "worker") if it still runs."""
        record = self._record(name)
        return record, _process(record)

    # server --------------------------------------------------------------------------------

    def healthy(self, port: int | None = None) -> bool:
        url = f"http://127.0.0.1:{port or self.port}/api/health"
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return response.status == 200 and response.read().strip() == b"true"
        except (OSError, urllib.error.URLError):
            return False

    def ensure_server(self, timeout: float = 120.0) -> None:
        record, process = self.running("server")
        if process:
            if record["port"] != self.port:
                raise DemoError(
                    f"the demo's Prefect server already runs on port {record['port']} "
                    f"(PID {record['pid']}); use that port (DATAGEN_DEMO_PORT={record['port']}) "
                    "or `make stop` first"
                )
            self._wait_healthy(process, timeout)
            say(f"Prefect server already running: {self.url} (PID {record['pid']})")
            return
        if record:
            self._forget("server")  # stale: the process is gone
        self._check_port_free()
        command = [
            str(BIN / "prefect"),
            "server",
            "start",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--analytics-off",
        ]
        record = _spawn(command, self.env(), self.log_dir / "server.log", self.root)
        record["port"] = self.port
        self._save("server", record)
        say(f"starting Prefect server on {self.url} (PID {record['pid']}) ...")
        self._wait_healthy(_process(record), timeout)
        say(f"Prefect server up: {self.url}")

    def _check_port_free(self) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            # as uvicorn binds: connections of a stopped server in TIME_WAIT do not count
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(("127.0.0.1", self.port))
                return
            except OSError:
                pass
        what = (
            "a Prefect server that this demo did not start" if self.healthy() else "another program"
        )
        raise DemoError(
            f"port {self.port} is taken by {what}; pick a free port with "
            f"DATAGEN_DEMO_PORT=<port> (e.g. DATAGEN_DEMO_PORT={self.port + 1} make demo)"
        )

    def _wait_healthy(self, process, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.healthy():
                return
            if process is None or not process.is_running():
                raise DemoError(
                    f"the Prefect server exited; its log ({self.log_dir / 'server.log'}) "
                    f"ends with:\n{tail(self.log_dir / 'server.log')}"
                )
            time.sleep(0.5)
        raise DemoError(
            f"the Prefect server did not answer {self.api_url}/health within {timeout:.0f} s; "
            f"see {self.log_dir / 'server.log'}"
        )

    # work pools and worker -----------------------------------------------------------------

    def prefect(self, *args: str, check: bool = True, capture: bool = True, **kwargs):
        """A Prefect CLI call against this demo's server."""
        result = subprocess.run(
            [str(BIN / "prefect"), *args],
            env=self.env(),
            cwd=REPO,
            text=True,
            capture_output=capture,
            **kwargs,
        )
        if check and result.returncode:
            output = (result.stdout or "") + (result.stderr or "") if capture else ""
            raise DemoError(f"`prefect {' '.join(args)}` failed ({result.returncode}):\n{output}")
        return result

    def ensure_pool(self, pool: str = LOCAL_POOL) -> None:
        try:
            self.api("GET", f"/work_pools/{pool}")
        except urllib.error.HTTPError as error:
            if error.code != 404:
                raise
            # the CLI, not the API: it fills in the process worker's base job template
            self.prefect("work-pool", "create", pool, "--type", "process")
            say(f"created work pool {pool} (process)")

    def ensure_worker(self, timeout: float = 90.0) -> None:
        record, process = self.running("worker")
        if process and record.get("port") == self.port:
            say(f"worker already running: pool {LOCAL_POOL} (PID {record['pid']})")
            return
        if process:  # it talks to a server that is gone
            terminate([process, *process.children(recursive=True)])
        if record:
            self._forget("worker")
        command = [
            str(BIN / "prefect"),
            "worker",
            "start",
            "--pool",
            LOCAL_POOL,
            "--type",
            "process",
            "--name",
            WORKER_NAME,
            "--limit",
            "1",  # one build at a time on a small machine
        ]
        record = _spawn(command, self.env(), self.log_dir / "worker.log", self.root)
        record["port"] = self.port
        self._save("worker", record)
        say(f"starting process worker on pool {LOCAL_POOL} (PID {record['pid']}) ...")
        self._wait_worker(_process(record), timeout)
        say("worker online")

    def _wait_worker(self, process, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process is None or not process.is_running():
                raise DemoError(
                    f"the worker exited; its log ends with:\n{tail(self.log_dir / 'worker.log')}"
                )
            if any(w.get("name") == WORKER_NAME for w in self.workers()):
                return
            time.sleep(1)
        raise DemoError(f"the worker did not come online; see {self.log_dir / 'worker.log'}")

    def api(self, method: str, path: str, body: dict | None = None):
        request = urllib.request.Request(
            f"{self.api_url}{path}",
            data=None if body is None else json.dumps(body).encode(),
            method=method,
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read() or b"null")

    def workers(self) -> list[dict]:
        try:
            return self.api("POST", f"/work_pools/{LOCAL_POOL}/workers/filter", {})
        except (OSError, urllib.error.URLError, ValueError):
            return []

    def up(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.ensure_server()
        self.ensure_pool()
        self.ensure_worker()

    # deployments ---------------------------------------------------------------------------

    def deploy(self, *names: str, env: dict | None = None) -> None:
        """`prefect deploy` of prefect.yaml's deployments `names` (all of them when none)."""
        selection = [a for name in names for a in ("--name", name)] or ["--all"]
        command = [str(BIN / "prefect"), "deploy", "--no-prompt", *selection]
        run(command, env=self.env() | (env or {}), cwd=REPO)

    def run_deployment(
        self, deployment: str, params: dict | None = None, echo: bool = True, timeout: int = 1200
    ) -> FlowRun:
        """`prefect deployment run NAME --watch` (exit 0 on Completed, 1 on Failed or when
        the run takes longer than `timeout` seconds)."""
        args = ["deployment", "run", deployment, "--watch", "--watch-timeout", str(timeout)]
        if params:
            args += ["--params", json.dumps(params)]
        say("$ prefect " + " ".join(args))
        process = subprocess.Popen(
            [str(BIN / "prefect"), *args],
            env=self.env(),
            cwd=REPO,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        lines, run_id = [], ""
        for line in process.stdout:
            lines.append(line)
            if echo:
                print(line, end="", flush=True)
            if "UUID:" in line and not run_id:
                run_id = line.split("UUID:", 1)[1].strip()
                say(f"follow it in the UI: {self.url}/runs/flow-run/{run_id}")
                say(f"flow and task logs: {self.log_dir / 'worker.log'}")
        return FlowRun(run_id, process.wait(), "".join(lines))

    # stop ----------------------------------------------------------------------------------

    def stop(self) -> list[int]:
        """Stop the worker (with its flow runs and their Ray processes), then the server."""
        stopped = []
        for name in ("worker", "server"):
            record, process = self.running(name)
            if process:
                family = [process, *process.children(recursive=True)]
                pids = terminate(family)
                say(f"stopped {name} (PID {record['pid']}; {len(pids)} process(es))")
                stopped += pids
            elif record:
                say(f"{name} (PID {record['pid']}) was not running any more")
            self._forget(name)
        if not stopped:
            say("nothing was running")
        return stopped

    def status(self) -> dict:
        state = {}
        for name in ("server", "worker"):
            record, process = self.running(name)
            state[name] = {"pid": record["pid"], "port": record["port"]} if process else None
        state["healthy"] = bool(state["server"]) and self.healthy()
        return state


@dataclass
class FlowRun:
    id: str
    returncode: int
    output: str


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


# --- the demo ------------------------------------------------------------------------------


def run(command: list[str], log: Path | None = None, **kwargs) -> subprocess.CompletedProcess:
    """Run a command, its output to the terminal or appended to `log`; fail on non-zero."""
    say("$ " + " ".join(str(c) for c in command) + (f"   (output: {log})" if log else ""))
    if log:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as output:
            result = subprocess.run(command, stdout=output, stderr=subprocess.STDOUT, **kwargs)
    else:
        result = subprocess.run(command, **kwargs)
    if result.returncode:
        detail = f"; {log} ends with:\n{tail(log)}" if log else ""
        if isinstance(result.stderr, str) and result.stderr.strip():
            detail = f":\n{result.stderr.strip()}"
        raise DemoError(f"`{' '.join(str(c) for c in command)}` exited {result.returncode}{detail}")
    return result


def make_clips(folder: Path, env: dict, log: Path) -> None:
    if folder.is_dir():
        say(f"demo clips already in {folder}")
        return
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    run([str(BIN / "datagen"), "samples", str(staging)], log=log, env=env)
    staging.rename(folder)
    say(f"demo clips written to {folder}")


def csd_threshold(dataset: Path, env: dict) -> float:
    """The median CSD score of the run: the tiny twins score ~0.96 with little spread, so a
    fixed cut would keep all or nothing; the median keeps the better half."""
    result = subprocess.run(
        [str(BIN / "datagen"), "inspect", "--json", str(dataset)],
        env=env,
        text=True,
        capture_output=True,
        check=True,
    )
    return float(json.loads(result.stdout)["scores"]["csd_score"]["median"])


def demo(stack: Stack) -> None:
    env = stack.env()
    setup_log = stack.log_dir / "setup.log"
    run([str(BIN / "datagen"), "models", "tiny"], log=setup_log, env=env)
    clips, out, filtered = stack.root / "clips", stack.root / "out", stack.root / "filtered"
    make_clips(clips, env, setup_log)
    stack.up()
    # The local deployments only: the cluster ones need a Ray cluster (and RAY_ADDRESS).
    stack.deploy(DEMO_DEPLOYMENT, "build-sft/local")
    # prefect.yaml's build-ct/local reads .demo/clips and writes .demo/out in the repository;
    # a demo somewhere else (--dir) points the run at its own directory.
    params = {} if stack.root == DEFAULT_DIR else {"source": str(clips), "out": str(out)}
    flow_run = stack.run_deployment(DEMO_DEPLOYMENT, params)
    if flow_run.returncode:
        raise DemoError(
            f"{DEMO_DEPLOYMENT} did not complete (exit {flow_run.returncode}); see "
            f"{stack.url}/runs/flow-run/{flow_run.id} and {stack.log_dir / 'worker.log'}"
        )

    dataset = out / "ct"
    if os.environ.get("DATAGEN_DEMO_CSD"):
        threshold, why = float(os.environ["DATAGEN_DEMO_CSD"]), "$DATAGEN_DEMO_CSD"
    else:
        threshold, why = csd_threshold(dataset, env), "the run's median"
    result = run(
        [
            str(BIN / "datagen"),
            "filter",
            "--csd",
            repr(threshold),
            "--overwrite",
            "--json",
            str(dataset),
            str(filtered / "ct"),
        ],
        env=env,
        text=True,
        capture_output=True,
    )
    report = json.loads(result.stdout)
    elapsed = time.monotonic() - STARTED
    print(
        f"""
Demo done in {elapsed // 60:.0f} min {elapsed % 60:.0f} s.
  shards      {dataset}  ({report["total"]} pairs; `datagen inspect {dataset}`)
  filtered    {filtered / "ct"}  (kept {report["kept"]}, dropped {report["dropped"]}: \
csd_score > {threshold:.5f}, {why})
  Prefect UI  {stack.url}   this run: {stack.url}/runs/flow-run/{flow_run.id}
  logs        {stack.log_dir}/server.log, worker.log
  more        prefect deployment run build-ct/local --watch   (with PREFECT_API_URL={stack.api_url})
  stop        make stop   (the server and worker keep running until then)
""",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["demo", "up", "status", "stop"])
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="state directory")
    parser.add_argument(
        "--port",
        type=int,
        default=int(os.environ.get("DATAGEN_DEMO_PORT") or DEFAULT_PORT),
        help="server port (default $DATAGEN_DEMO_PORT or 4200)",
    )
    args = parser.parse_args(argv)
    stack = Stack(args.dir.resolve(), args.port)
    try:
        if args.command == "demo":
            demo(stack)
        elif args.command == "up":
            stack.up()
            say(f"UI: {stack.url}   API: {stack.api_url}")
        elif args.command == "status":
            print(json.dumps(stack.status(), indent=2))
        else:
            stack.stop()
    except DemoError as error:
        print(f"[demo] error: {error}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        say("interrupted; the server and worker keep running (`make stop` stops them)")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
