"""Crash and resume: kill -9 the build at random points, rerun, and audit the output.

Each round starts `datagen build ct` (the real flow, in its own process group) on the demo
clips, kills the whole group with SIGKILL after a random delay (anywhere from start-up to
writing shards), and audits the output for consistency (no duplicate, no sample both committed
and rejected, no unreadable visible shard, index matching the shards). Every `--mid-write-every`
th kill instead lands while a file of the dataset is being written: the harness polls for the
writer's hidden temporary (shard, index or rejects file) and kills the moment one exists. When a
build has become complete it is rerun once (it must add nothing and sweep what killed writers
left), audited in full (every planned sample in exactly one shard or the rejects, no leftover
temporary) and the next kills hit a new build, so every kill lands on a build with work left. A
final run completes the last build, which is audited in full too.
With `--kill-actor`, one more run on Ray has a stage actor killed mid-run and must complete.

    python bench/crash_resume.py --kills 50
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from datagen.build.settings import BuildConfig  # noqa: E402
from datagen.data.dataset import hidden_temporaries  # noqa: E402
from datagen.data.demo_clips import SAMPLE_CLIPS, write_samples  # noqa: E402
from datagen.tools.audit import audit_build  # noqa: E402

STYLES = ("ink_wash", "watercolor")


def build_command(source: Path, out: Path, limit: int, ray: bool) -> list[str]:
    command = [
        sys.executable,
        "-m",
        "datagen.cli",
        "build",
        "ct",
        "--source",
        str(source),
        "--out",
        str(out),
        "--limit",
        str(limit),
        "--clips-per-video",
        "2",
        "--shard-size",
        "2",
        "--csd",
        "-1",
    ]
    for style in STYLES:
        command += ["--style", style]
    return command + (["--ray"] if ray else ["--no-ray"])


def environment(work: Path) -> dict:
    return os.environ | {
        "PREFECT_HOME": str(work / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "RAY_USAGE_STATS_ENABLED": "0",
        "DATAGEN_TINY_MODELS": str(work / "tiny"),
        "PREFECT_API_URL": "",
    }


def kill_group(process: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def wait_for_a_write(
    process: subprocess.Popen, dataset_dir: Path, leftovers: set[Path], timeout_s: float
) -> str | None:
    """Poll (every millisecond) until a new hidden temporary of the dataset exists, i.e. this
    run is writing a shard, index or rejects file (`leftovers` are those of earlier killed
    runs); returns its name, or None if the run ended or the time ran out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and process.poll() is None:
        new = set(hidden_temporaries(dataset_dir)) - leftovers
        if new:
            return min(new).relative_to(dataset_dir).as_posix()
        time.sleep(0.001)
    return None


def run_harness(
    kills: int,
    work: Path,
    seed: int = 0,
    limit: int = 6,
    max_delay_s: float = 40.0,
    kill_actor: bool = False,
    mid_write_every: int = 3,
    log=print,
) -> dict:
    """Run crash/resume rounds until `kills` kills have landed on a live build; return counts
    and the final audit (raises on a problem). A round whose build finished before its kill
    came is counted apart, never as a kill; after 3 x `kills` rounds the harness gives up
    (raises). Every `mid_write_every`-th round is aimed at a file being written (0: none).
    With `kill_actor`, a stage actor of a Ray build is killed mid-run, and not finding one
    busy to kill is a failure."""
    rng = random.Random(seed)
    source = work / "sources"
    write_samples(source, SAMPLE_CLIPS[:3])
    env = environment(work)
    cycle = 0

    def cycle_config(number: int) -> BuildConfig:
        return BuildConfig(
            source=str(source),
            out=str(work / f"out-{number}"),
            limit=limit,
            clips_per_video=2,
            shard_size=2,
            csd_threshold=-1.0,
            styles=STYLES,
        )

    config = cycle_config(cycle)
    landed, finished_early, completed_cycles, mid_write = 0, 0, 0, 0
    for round_number in itertools.count():
        if landed == kills:
            break
        if round_number == 3 * kills:
            raise AssertionError(
                f"only {landed} of {kills} kills landed on a live build in {round_number} rounds "
                f"({finished_early} builds finished before their kill): lower max_delay_s"
            )
        aimed = mid_write_every > 0 and round_number % mid_write_every == mid_write_every - 1
        delay = rng.uniform(1.0, max_delay_s)
        out = Path(config.out)
        leftovers = set(hidden_temporaries(config.dataset_dir))
        started = time.monotonic()
        process = subprocess.Popen(
            build_command(source, out, limit, ray=False),
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        writing = None
        if aimed:
            writing = wait_for_a_write(process, config.dataset_dir, leftovers, timeout_s=300)
        else:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=delay)
        if process.poll() is None:
            kill_group(process)
            landed += 1
            mid_write += writing is not None
        else:
            finished_early += 1  # the build finished before the kill came: no kill point
        when = f"{time.monotonic() - started:5.1f} s" + (f" writing {writing}" if writing else "")
        audit = audit_build(config, complete=False)
        if not audit.ok:
            raise AssertionError(f"after kill {round_number} at {when}: {audit.problems}")
        log(
            f"round {round_number + 1}, {landed}/{kills} kills landed, at {when} "
            f"(build {cycle}): consistent "
            f"({audit.committed} committed, {audit.rejected} rejected so far)"
        )
        if audit.committed + audit.rejected == audit.planned:
            # this build is complete: a rerun must add nothing and sweep what killed writers
            # left; check it fully, then let the next kills hit a new one
            run_to_completion(source, config, limit, env)
            complete = audit_build(config, complete=True)
            if not complete.ok:
                raise AssertionError(f"build {cycle} complete but: {complete.problems}")
            completed_cycles += 1
            cycle += 1
            config = cycle_config(cycle)
    if kill_actor:
        kill_an_actor_mid_run(source, Path(config.out), limit, env, log)
    run_to_completion(source, config, limit, env)
    audit = audit_build(config, complete=True)
    if not audit.ok:
        raise AssertionError(f"after the final run: {audit.problems}")
    log(
        f"final: {audit.planned} planned = {audit.committed} committed + {audit.rejected} "
        f"rejected; {landed} kills landed on a live build and were survived ({mid_write} while "
        f"a file was being written) over {completed_cycles + 1} builds ({finished_early} runs "
        "finished before their kill, not counted)"
    )
    return {
        "kills": landed,
        "mid_write_kills": mid_write,
        "finished_before_kill": finished_early,
        "builds": completed_cycles + 1,
        "planned": audit.planned,
        "committed": audit.committed,
        "rejected": audit.rejected,
    }


def run_to_completion(source: Path, config: BuildConfig, limit: int, env: dict) -> None:
    with tempfile.TemporaryFile() as log_file:  # a file, never an unread pipe
        final = subprocess.run(
            build_command(source, Path(config.out), limit, ray=False),
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
        if final.returncode != 0:
            log_file.seek(0)
            tail = log_file.read().decode(errors="replace")[-2000:]
            raise AssertionError(f"the run to completion failed: {tail}")


def kill_an_actor_mid_run(source: Path, out: Path, limit: int, env: dict, log) -> None:
    """Start a Ray build, SIGKILL one stage actor while it works; the run must complete."""
    import psutil

    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "kill-actor-run.log"
    with open(log_path, "wb") as log_file:  # a file, never an unread pipe
        process = subprocess.Popen(
            build_command(source, out, limit, ray=True),
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    victim = None
    deadline = time.monotonic() + 300
    while victim is None and time.monotonic() < deadline and process.poll() is None:
        time.sleep(1.0)
        for child in psutil.Process(process.pid).children(recursive=True):
            try:
                if "StageActor" in " ".join(child.cmdline()) and child.cpu_percent(0.2) > 5:
                    victim = child
                    break
            except psutil.Error:
                continue
    if victim is None:
        kill_group(process)
        raise AssertionError("found no busy stage actor to kill within 300 s: nothing was tested")
    victim.kill()
    log(f"killed stage actor pid {victim.pid} mid-run")
    try:
        code = process.wait(timeout=900)
    finally:
        kill_group(process)
    if code != 0:
        tail = log_path.read_text(errors="replace")[-3000:]
        raise AssertionError(f"the Ray run with a killed actor exited {code}:\n{tail}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--kills", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit", type=int, default=6)
    parser.add_argument("--max-delay", type=float, default=40.0)
    parser.add_argument("--kill-actor", action="store_true")
    parser.add_argument(
        "--mid-write-every",
        type=int,
        default=3,
        help="every Nth kill lands while a shard, index or rejects file is being written (0: none)",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="datagen-crash-") as folder:
        started = time.perf_counter()
        result = run_harness(
            args.kills,
            Path(folder),
            seed=args.seed,
            limit=args.limit,
            max_delay_s=args.max_delay,
            kill_actor=args.kill_actor,
            mid_write_every=args.mid_write_every,
        )
        print(f"{result} in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
