"""Prefect orchestration of a build: coarse tasks per (shard, stage), models in Ray actors.

Prefect orchestrates (tasks, retries, artifacts for the UI); Ray executes (one actor pool per
stage, each actor loading its model once per run). Tasks pass shard names, never tensors or
bytes: each task reads and writes the shard's work directory (datagen/build/workdir.py). Shards flow
through the stages concurrently, so shard 2 is being controlled while shard 1 is animated.
"""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import os
import time
import uuid
from collections import Counter, deque
from dataclasses import asdict
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE

from datagen.build.pipeline import (
    STAGE_FUNCTIONS,
    BuildConfig,
    LocalRunner,
    check_key_blocks,
    collect_provenance,
    plan_build,
    run_write,
    stage_factories,
)
from datagen.build.workdir import ShardWork, remove_leftovers
from datagen.core.native_heap import arrow_on_native_heap
from datagen.core.stage import Resources
from datagen.data.dataset import DatasetLock, remove_hidden_temporaries

# Runners of the builds running in this process, by run key. Tasks run in threads of the flow
# process, so they reach the actor pools here instead of receiving them as parameters.
_RUNNERS: dict[str, dict[str, Any]] = {}


class StageThread:
    """A LocalRunner shared by concurrent task threads; its batches run on `compute`, the one
    thread that runs every in-process stage's batches of a build.

    A Stage is not thread-safe, so its batches go one at a time (as a Ray actor serialises its
    calls), and always on the same thread: Prefect runs tasks on a growing pool of threads, and
    each new thread that calls into torch gets its own OpenMP team and allocator caches, so a
    long build's memory crept up with every thread that ever ran a stage. The stages also take
    turns with each other: in one process, two models computing at once are no faster than one
    after the other (they share the same cores or GPU), and their working memory adds up, so
    the process's peak depended on which stages happened to overlap, and a longer run met
    worse overlaps (`bench/memory.py`). Reading and writing the work files stays on the task
    threads, overlapping the compute.
    """

    def __init__(self, runner: LocalRunner, compute: concurrent.futures.ThreadPoolExecutor):
        self.runner = runner
        self._compute = compute

    def _one(self, batch: list) -> list:
        (result,) = self.runner.map([batch])
        return result

    def map(self, batches):
        for batch in batches:
            yield self._compute.submit(self._one, batch).result()

    def models(self) -> dict:
        return self.runner.models()

    def params(self) -> dict:
        return self.runner.params()

    def stats(self) -> list:
        return self.runner.stats()

    def shutdown(self) -> None:
        self.runner.shutdown()


def local_resources(declared: Resources, stages: int, cpus: float, gpus: float) -> Resources:
    """Fit a stage's declared resources on a small local Ray: without GPUs, none are asked
    for; CPUs are shared out so every stage's actor can start (Ray schedules by logical
    resources, and five actors asking one CPU each never all start on two cores)."""
    num_gpus = declared.num_gpus if gpus >= 1 else 0.0
    num_cpus = min(declared.num_cpus, max(cpus / (stages + 1), 0.05))
    return Resources(num_gpus=num_gpus, num_cpus=round(num_cpus, 2))


def prefect_api_url() -> str:
    """The Prefect API this process talks to, without credentials. Without PREFECT_API_URL
    that is the temporary server `datagen build` runs the flow on, which only this process
    knows of."""
    from prefect import get_client

    from datagen.core.api_keys import without_credentials

    with get_client(sync_client=True) as client:
        return without_credentials(str(client.api_url))


@contextlib.contextmanager
def stage_runners(config: BuildConfig, use_ray: bool):
    """Start one runner per stage (Ray actor pools, or in-process stages) and stop them.

    A stage whose API key is in a Prefect Secret block reads the block in its actor, when it
    loads: its actors get PREFECT_API_URL, the API this flow uses (nothing secret: Prefect
    Cloud's PREFECT_API_KEY must already be in the Ray workers' environment).
    """
    factories = stage_factories(config)
    blocks = config.key_blocks()
    runners: dict[str, Any] = {}
    compute = None
    started_ray = False
    try:
        if use_ray:
            import ray

            from datagen.run.ray import StagePool, init_ray

            started_ray = not ray.is_initialized()
            init_ray()
            total = ray.cluster_resources()
            cluster = bool(os.environ.get("RAY_ADDRESS"))
            prefect_env = {"PREFECT_API_URL": prefect_api_url()} if blocks else None
            for name, factory in factories.items():
                declared = factory().resources
                resources = (
                    declared
                    if cluster
                    else local_resources(
                        declared, len(factories), total.get("CPU", 1), total.get("GPU", 0)
                    )
                )
                runners[name] = StagePool(
                    factory,
                    resources,
                    size=1,
                    torch_threads=None if cluster else 1,
                    call_timeout_s=config.stage_timeout_s,
                    name=name,
                    env=prefect_env if name in blocks else None,
                )
        else:
            compute = concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="datagen-compute"
            )
            for name, factory in factories.items():
                runners[name] = StageThread(LocalRunner(factory()), compute)
        yield runners
    finally:
        if compute is not None:
            compute.shutdown(wait=True)  # no batch runs on while its stage tears down
        for runner in runners.values():
            with contextlib.suppress(Exception):
                runner.shutdown()
        if started_ray:  # a Ray this run started (or connected to) ends with it
            from datagen.run.ray import shutdown_ray

            shutdown_ray()


@task(name="plan", retries=1, retry_delay_seconds=5, cache_policy=NO_CACHE)
def plan_task(config: BuildConfig) -> dict:
    result = plan_build(config)
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
    report = STAGE_FUNCTIONS[stage](ShardWork(config.work_root, shard), config, runner)
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
def write_task(shard: str, config: BuildConfig, provenance: dict) -> dict:
    report = run_write(ShardWork(config.work_root, shard), config, provenance)
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
    logger = get_run_logger()
    started = time.perf_counter()
    plan = plan_task(config)
    shards = plan["shards"]
    progress = create_progress_artifact(
        progress=0.0 if shards else 100.0,
        key=f"{config.split}-build-progress",
        description=f"shards written of {len(shards)}",
    )
    if not shards:
        logger.info("nothing to do: every planned sample is committed or rejected")
    run_key = uuid.uuid4().hex
    stage_names = list(stage_factories(config))
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
                if len(in_flight) >= config.shards_in_flight:
                    collect_oldest()
                previous = None
                futures = []
                for stage in stage_names:
                    previous = stage_task.submit(
                        stage, shard, config, run_key, wait_for=[previous] if previous else None
                    )
                    futures.append(previous)
                final = write_task.submit(shard, config, provenance, wait_for=[previous])
                in_flight.append((shard, futures, final))
            while in_flight:
                collect_oldest()
            stats = {name: _runner_stats(runner) for name, runner in runners.items()}
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


def _runner_stats(runner) -> dict:
    stats = runner.stats()
    return {
        "loads": sum(s.loads for s in stats),
        "load_s": sum(s.load_seconds for s in stats),
        "compute_s": sum(s.compute_seconds for s in stats),
        "samples": sum(s.samples for s in stats),
    }


def summarize_build(
    config: BuildConfig,
    plan: dict,
    stage_reports: list[dict],
    write_reports: list[dict],
    stats: dict,
    wall: float,
) -> dict:
    per_stage: dict[str, Counter] = {}
    for report in stage_reports:
        counts = per_stage.setdefault(report["stage"], Counter())
        counts["done"] += report["done"]
        counts["rejected"] += report["rejected"]
    reasons: Counter[str] = Counter()
    for report in write_reports:
        reasons.update(report["reasons"])
    scores = [s for report in write_reports for s in report["scores"]]
    return {
        "split": config.split,
        "out": str(config.dataset_dir),
        "profile": config.profile,
        "planned": plan["planned"],
        "already_committed": plan["skipped_committed"],
        "already_rejected": plan["skipped_rejected"],
        "source_rejects": plan["plan_rejects"],
        "written": sum(r["written"] for r in write_reports),
        "rejected": sum(r["rejected"] for r in write_reports),
        "filtered": sum(r["filtered"] for r in write_reports),
        "stages": {name: dict(counts) for name, counts in per_stage.items()},
        "rejects_by_reason": dict(reasons.most_common()),
        "csd_scores": scores,
        "model_loads": {k: v["loads"] for k, v in stats.items()},
        "stage_compute_s": {k: round(v["compute_s"], 3) for k, v in stats.items()},
        "wall_s": round(wall, 2),
    }


def histogram(values: list[float], low: float = -1.0, high: float = 1.0, bins: int = 10) -> list:
    """(bin label, count) over [low, high]."""
    width = (high - low) / bins
    counts = [0] * bins
    for value in values:
        counts[min(bins - 1, max(0, int((value - low) / width)))] += 1
    return [
        (f"{low + i * width:+.1f}..{low + (i + 1) * width:+.1f}", c) for i, c in enumerate(counts)
    ]


def summary_markdown(summary: dict) -> str:
    lines = [
        f"# {summary['split'].upper()} build: {summary['written']} pairs written",
        "",
        f"Output: `{summary['out']}` (profile `{summary['profile']}`), "
        f"wall time {summary['wall_s']} s.",
        "",
        "| planned | already committed | already rejected | sources rejected | written "
        "| rejected | filtered out |",
        "|---|---|---|---|---|---|---|",
        f"| {summary['planned']} | {summary['already_committed']} | "
        f"{summary['already_rejected']} | {summary['source_rejects']} | "
        f"{summary['written']} | {summary['rejected']} | {summary['filtered']} |",
        "",
        "## Stages",
        "",
        "| stage | done | rejected | pass rate | model loads | compute s |",
        "|---|---|---|---|---|---|",
    ]
    for stage, counts in summary["stages"].items():
        done, rejected = counts.get("done", 0), counts.get("rejected", 0)
        rate = f"{100 * done / (done + rejected):.0f}%" if done + rejected else "-"
        lines.append(
            f"| {stage} | {done} | {rejected} | {rate} | "
            f"{summary['model_loads'].get(stage, '-')} | "
            f"{summary['stage_compute_s'].get(stage, '-')} |"
        )
    lines += ["", "## Rejects by reason", ""]
    if summary["rejects_by_reason"]:
        lines += ["| stage/reason | count |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in summary["rejects_by_reason"].items()]
    else:
        lines.append("None.")
    lines += ["", "## CSD score histogram", "", "```"]
    for label, count in histogram(summary["csd_scores"]):
        lines.append(f"{label}  {'#' * count} {count}")
    lines += ["```"]
    return "\n".join(lines)


def preview_markdown(config: BuildConfig, limit: int = 4) -> str:
    """Raw and stylized first frames side by side for a few written samples."""
    from datagen.data.dataset import Dataset, DatasetError

    try:
        dataset = Dataset(config.dataset_dir)
    except DatasetError:
        return "No rows written yet."
    lines = [
        "| sample | style | raw first frame | stylized first frame | csd |",
        "|---|---|---|---|---|",
    ]
    columns = ["sample_id", "style_id", "raw_first_frame", "stylized_first_frame", "csd_score"]
    shown = 0
    for _, _, table in dataset.iter_row_groups(columns=columns):
        for row in table.to_pylist():
            raw = base64.b64encode(row["raw_first_frame"]).decode()
            sty = base64.b64encode(row["stylized_first_frame"]).decode()
            score = "-" if row["csd_score"] is None else f"{row['csd_score']:.3f}"
            lines.append(
                f"| `{row['sample_id'][:12]}` | {row['style_id']} | "
                f"![raw](data:image/png;base64,{raw}) | "
                f"![stylized](data:image/png;base64,{sty}) | {score} |"
            )
            shown += 1
            if shown >= limit:
                return "\n".join(lines)
    return "\n".join(lines)


def publish_artifacts(config: BuildConfig, summary: dict, write_reports: list[dict]) -> None:
    key = f"{config.split}-build"
    create_markdown_artifact(
        summary_markdown(summary),
        key=f"{key}-summary",
        description="counts per stage, pass rates, rejects, scores",
    )
    create_table_artifact(
        [{"stage": s, **c} for s, c in summary["stages"].items()],
        key=f"{key}-stages",
        description="samples done and rejected per stage",
    )
    create_markdown_artifact(
        preview_markdown(config),
        key=f"{key}-preview",
        description="raw and stylized first frames side by side",
    )
