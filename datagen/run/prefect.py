"""Prefect orchestration of a build: coarse tasks per (shard, step), models in the runners.

Prefect orchestrates (tasks, retries, artifacts for the UI); the executor runs the stages (Ray
actor pools, or this process: datagen/run/executors.py), each loading its model once per run.
Tasks pass shard names, never tensors or bytes: each task reads and writes the shard's work
directory (datagen/build/workdir.py). Shards flow through the steps concurrently, so shard 2
is being controlled while shard 1 is animated.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections import deque
from dataclasses import asdict
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
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
from datagen.run.report import publish_artifacts, runner_stats, summarize_build

# Runners of the builds running in this process, by run key. Tasks run in threads of the flow
# process, so they reach the actor pools here instead of receiving them as parameters.
_RUNNERS: dict[str, dict[str, Any]] = {}
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


@task(name="plan", retries=1, retry_delay_seconds=5, cache_policy=NO_CACHE)
def plan_task(config: BuildConfig, run_key: str) -> dict:
    _ACCOUNTED[run_key] = Accounted(config.dataset_dir)
    result = plan_build(config, _ACCOUNTED[run_key])
    get_run_logger().info(
        "planned %d samples in %d shards (%d already committed, %d already rejected, "
        "%d sources rejected)",
        result.planned,
        len(result.shards),
        result.skipped_committed,
        result.skipped_rejected,
        result.plan_rejects,
    )
    return asdict(result)


@task(
    name="stage",
    retries=2,
    retry_delay_seconds=[5, 30],
    cache_policy=NO_CACHE,
    task_run_name="{stage}-{shard}",
)
def stage_task(stage: str, shard: str, config: BuildConfig, run_key: str) -> dict:
    """Run one stage over one shard's pending samples (a retry redoes only what is missing)."""
    runner = _RUNNERS[run_key][stage]
    report = run_step(step(stage), ShardWork(config.work_root, shard), config, runner)
    get_run_logger().info(
        "%s %s: %d done, %d rejected, %d already done",
        stage,
        shard,
        report.done,
        report.rejected,
        report.skipped,
    )
    return asdict(report)


@task(
    name="write",
    retries=2,
    retry_delay_seconds=[5, 30],
    cache_policy=NO_CACHE,
    task_run_name="write-{shard}",
)
def write_task(shard: str, config: BuildConfig, provenance: dict, run_key: str) -> dict:
    work = ShardWork(config.work_root, shard)
    report = run_write(work, config, provenance, accounted=_ACCOUNTED[run_key])
    get_run_logger().info(
        "write %s: %d rows, %d rejected, %d filtered out",
        shard,
        report.written,
        report.rejected,
        report.filtered,
    )
    return asdict(report)


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
    progress = create_progress_artifact(
        progress=0.0 if shards else 100.0,
        key=f"{config.split}-build-progress",
        description=f"shards written of {len(shards)}",
    )
    if not shards:
        logger.info("nothing to do: every planned sample is committed or rejected")
    stage_names = [s.name for s in steps_for(config)]
    stage_reports: list[dict] = []
    write_reports: list[dict] = []
    # a rerun of a finished build has nothing to do: start no actors, load no models
    runners_context = stage_runners(config, use_ray) if shards else contextlib.nullcontext({})
    with runners_context as runners:
        startup = time.perf_counter() - started  # plan + actors started + models loaded
        _RUNNERS[run_key] = runners
        try:
            provenance = collect_provenance(runners)
            failed: list[str] = []
            window = shards_in_flight(config, runners)
            in_flight: deque = deque()
            done = 0

            def collect_oldest() -> None:
                nonlocal done
                shard, futures, final = in_flight.popleft()
                outcome = final.result(raise_on_failure=False)
                if isinstance(outcome, BaseException):
                    failed.append(shard)  # its finished work stays; a rerun resumes it
                else:
                    write_reports.append(outcome)
                for future in futures:
                    report = future.result(raise_on_failure=False)
                    if isinstance(report, dict):
                        stage_reports.append(report)
                done += 1
                update_progress_artifact(progress, 100.0 * done / len(shards))

            for shard in shards:
                # A bounded window of shards in flight keeps memory flat however many shards
                # a run has, while still overlapping stages of neighbouring shards.
                if len(in_flight) >= window:
                    collect_oldest()
                previous = None
                futures = []
                for stage in stage_names:
                    previous = stage_task.submit(
                        stage, shard, config, run_key, wait_for=[previous] if previous else None
                    )
                    futures.append(previous)
                final = write_task.submit(shard, config, provenance, run_key, wait_for=[previous])
                in_flight.append((shard, futures, final))
            while in_flight:
                collect_oldest()
            stats = {name: runner_stats(runner) for name, runner in runners.items()}
        finally:
            _RUNNERS.pop(run_key, None)
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
