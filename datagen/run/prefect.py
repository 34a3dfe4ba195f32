"""Prefect orchestration of a build: one task per shard (every step, then the write), models
in the runners, live progress per step in the UI's artifacts (run/progress.py).

Prefect orchestrates (tasks, retries, artifacts for the UI); the executor runs the stages (Ray
actor pools, or this process: datagen/run/executors.py), each loading its model once per run.
Tasks pass shard names, never tensors or bytes: each task reads and writes the shard's work
directory (datagen/build/workdir.py). Shards flow through the steps concurrently, so shard 2
is being controlled while shard 1 is animated.
"""

from __future__ import annotations

import contextlib
import queue
import time
import uuid
from dataclasses import asdict
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from datagen.build.execute import run_step
from datagen.build.plan import Accounted, plan_build
from datagen.build.row import collect_provenance
from datagen.build.settings import BuildConfig
from datagen.build.steps import step, steps_for
from datagen.build.workdir import ShardWork, remove_leftovers
from datagen.build.write import run_write
from datagen.core.api_keys import resolve_api_key
from datagen.core.native_heap import arrow_on_native_heap
from datagen.data.dataset import DatasetLock, remove_hidden_temporaries
from datagen.run.executors import shards_in_flight, stage_runners
from datagen.run.progress import BuildProgress, ProgressPublisher, build_views
from datagen.run.report import publish_artifacts, runner_stats, summarize_build

# Runners of the builds running in this process, by run key. Tasks run in threads of the flow
# process, so they reach the actor pools here instead of receiving them as parameters.
_RUNNERS: dict[str, dict[str, Any]] = {}
# The live progress of each build (run/progress.py), by run key.
_PROGRESS: dict[str, BuildProgress] = {}
# The shards each build has written, with their reports, by run key: a retried task skips them.
_FINISHED: dict[str, dict[str, dict]] = {}
# The running account of what each build's dataset holds (build/plan.py Accounted), by run key.
_ACCOUNTED: dict[str, Accounted] = {}


def check_key_blocks(config: BuildConfig) -> None:
    """Read each Prefect Secret block the build names, once, in this process, and drop the
    value: a missing or unreadable block fails the build before any work (with
    ApiKeyUnavailableError naming the block and the Prefect API asked), not in a stage actor
    after the plan. The stages read their keys again where they send the requests."""
    needs: dict[str, list[str]] = {}
    for stage, block in config.key_blocks().items():
        needs.setdefault(block, []).append(stage)
    for block, stages in needs.items():
        resolve_api_key(None, block, " and ".join(stages))


@task(name="plan", task_run_name="plan", retries=1, retry_delay_seconds=5, cache_policy=NO_CACHE)
def plan_task(config: BuildConfig, run_key: str) -> dict:
    _ACCOUNTED[run_key] = Accounted(config.dataset_dir)
    result = plan_build(config, _ACCOUNTED[run_key])
    get_run_logger().info(
        "planned %d samples in %d shards (%d already committed, %d already rejected, "
        "%d sources or clips rejected)",
        result.planned,
        len(result.shards),
        result.skipped_committed,
        result.skipped_rejected,
        result.plan_rejects,
    )
    return asdict(result)


# At most this many shard task runs per build: a build of more shards gives each task run a
# group of consecutive shards, so the task runs a Prefect server keeps stay bounded however
# many samples a build has (thousands of task runs strain it: PrefectHQ/prefect #8770, #18883).
MAX_SHARD_TASK_RUNS = 1000


def shard_groups(shards: list[str], most: int = MAX_SHARD_TASK_RUNS) -> list[list[str]]:
    """Consecutive groups of shards, at most `most` of them, as even as the count allows."""
    size = max(1, -(-len(shards) // most))
    return [shards[start : start + size] for start in range(0, len(shards), size)]


def group_name(shards: list[str]) -> str:
    """shard-00007 for one shard; shard-00000..shard-00003 for a group."""
    return shards[0] if len(shards) == 1 else f"{shards[0]}..{shards[-1]}"


@task(
    name="shard",
    retries=2,
    retry_delay_seconds=[5, 30],
    cache_policy=NO_CACHE,
    task_run_name="{name}",
)
def shard_task(
    name: str, shards: list[str], config: BuildConfig, provenance: dict, run_key: str
) -> dict:
    """Shards through every step, then written: one task run per shard (or group of shards,
    MAX_SHARD_TASK_RUNS), however many samples it holds. A retry redoes only what is missing:
    a shard this task already wrote is not gone through again, and each step skips the
    samples it finished (build/workdir.py), so a retried shard never animates a sample twice."""
    runners, progress = _RUNNERS[run_key], _PROGRESS[run_key]
    finished = _FINISHED[run_key]  # shard -> its reports, across this task's retries
    logger = get_run_logger()
    for shard in shards:
        if shard in finished:
            continue
        work = ShardWork(config.work_root, shard)
        steps = []
        for step_name, runner in runners.items():
            report = run_step(step(step_name), work, config, runner, progress)
            steps.append(asdict(report))
            logger.info(
                "%s %s: %d done, %d rejected, %d already done or rejected earlier",
                step_name,
                shard,
                report.done,
                report.rejected,
                report.skipped,
            )
        written = run_write(work, config, provenance, accounted=_ACCOUNTED[run_key])
        progress.shard_written(shard, written.written, written.rejected + written.filtered)
        logger.info(
            "write %s: %d rows, %d rejected, %d filtered out",
            shard,
            written.written,
            written.rejected,
            written.filtered,
        )
        finished[shard] = {"steps": steps, "write": asdict(written)}
    return {shard: finished[shard] for shard in shards}


def pool_size(runner) -> int:
    """A step's live actors (a Ray pool shrinks when a node is lost); 1 in process; 0 when
    the run started none (nothing left to do)."""
    if runner is None:
        return 0
    actors = getattr(runner, "actors", None)
    return 1 if actors is None else len(actors)


def run_build(config: BuildConfig, use_ray: bool = True) -> dict:
    """The body of the build-ct and build-sft flows (see flows/)."""
    arrow_on_native_heap()  # bounds the native heap too (a deployment's flow skips our CLI)
    check_key_blocks(config)  # a missing Secret block fails here, before any work
    with DatasetLock(config.dataset_dir, purpose=f"build-{config.split}"):
        # Holding the lock, every hidden temporary belongs to a writer that was killed.
        leftovers = remove_hidden_temporaries(config.dataset_dir)
        leftovers += remove_leftovers(config.work_root)
        if leftovers:
            get_run_logger().info(
                "removed %d temporary file(s) of an interrupted run", len(leftovers)
            )
        return _run_build_locked(config, use_ray)


def _run_build_locked(config: BuildConfig, use_ray: bool) -> dict:
    started = time.perf_counter()
    run_key = uuid.uuid4().hex
    try:
        return _run_planned_build(config, use_ray, run_key, started)
    finally:
        _ACCOUNTED.pop(run_key, None)


def _run_planned_build(config: BuildConfig, use_ray: bool, run_key: str, started: float) -> dict:
    logger = get_run_logger()
    plan = plan_task(config, run_key)
    shards = plan["shards"]
    if not shards:
        logger.info("nothing to do: every planned sample is committed or rejected")
    stage_names = [s.name for s in steps_for(config)]
    stage_reports: list[dict] = []
    write_reports: list[dict] = []
    failed: list[str] = []
    # a rerun of a finished build has nothing to do: start no actors, load no models
    runners_context = stage_runners(config, use_ray) if shards else contextlib.nullcontext({})
    with runners_context as runners:
        startup = time.perf_counter() - started  # plan + actors started + models loaded
        progress = BuildProgress(
            stage_names, plan["to_build"], len(shards), lambda name: pool_size(runners.get(name))
        )
        _RUNNERS[run_key], _PROGRESS[run_key], _FINISHED[run_key] = runners, progress, {}
        publisher = ProgressPublisher(progress, build_views(config.split))
        try:
            provenance = collect_provenance(runners)
            # A bounded window of shards in flight keeps memory flat however many shards a
            # run has, while the shards in it overlap in the steps (shard 2 is controlled
            # while shard 1 is animated), enough to keep the largest pool busy.
            finished: queue.SimpleQueue = queue.SimpleQueue()
            running: dict = {}  # future -> its group of shards

            def collect_one() -> None:
                """Wait for a shard task to end (publishing progress meanwhile); record it."""
                while True:
                    try:
                        future = finished.get(timeout=publisher.due_in())
                        break
                    except queue.Empty:
                        publisher.publish_due()
                group = running.pop(future)
                future.result(raise_on_failure=False)  # its reports are in _FINISHED
                written = _FINISHED[run_key]
                failed.extend(shard for shard in group if shard not in written)  # a rerun
                publisher.publish_due()  # resumes them: their finished work is kept

            for group in shard_groups(shards):
                # the window follows the pools as they are resized (run/resize.py)
                if len(running) >= shards_in_flight(config, runners):
                    collect_one()
                future = shard_task.submit(group_name(group), group, config, provenance, run_key)
                running[future] = group
                future.add_done_callback(finished.put)
            while running:
                collect_one()
            stats = {name: runner_stats(runner) for name, runner in runners.items()}
            for shard in shards:  # in shard order, whatever order they finished in
                if shard in _FINISHED[run_key]:
                    stage_reports.extend(_FINISHED[run_key][shard]["steps"])
                    write_reports.append(_FINISHED[run_key][shard]["write"])
        finally:
            publisher.close()
            _RUNNERS.pop(run_key, None)
            _PROGRESS.pop(run_key, None)
            _FINISHED.pop(run_key, None)
    summary = summarize_build(
        config, plan, stage_reports, write_reports, stats, time.perf_counter() - started
    )
    summary["failed_shards"] = failed
    summary["startup_s"] = round(startup, 2)
    publish_artifacts(config, summary, write_reports)
    if failed:
        raise RuntimeError(
            f"{len(failed)} shard(s) failed after retries: {failed}; their "
            "finished work is kept, rerun with the same parameters to resume"
        )
    return summary
