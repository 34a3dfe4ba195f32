"""The in-process executor: each step's stage runs in this process (no Ray).

`LocalRunner` runs a stage's batches where it is called; `ComputeThreadRunner` is what a
build's concurrent Prefect task threads share: every stage's batches on one compute thread.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Iterable, Iterator

from datagen.core.runner import BatchJob, run_inline
from datagen.core.stage import Stage


class LocalRunner:
    """Runs a stage in this process: the runner contract (core/runner.py), as a Ray StagePool."""

    def __init__(self, stage: Stage):
        self.stage = stage
        stage.setup()

    def map(self, batches: Iterable[list]) -> Iterator[list]:
        for batch in batches:
            yield self.stage(batch)

    def run(self, job: BatchJob, batches: Iterable[list]) -> Iterator[list]:
        for batch in batches:
            yield run_inline(job, self.stage, batch)

    def models(self) -> dict:
        return self.stage.models()

    def params(self) -> dict:
        return self.stage.params()

    def stats(self) -> list:
        return [self.stage.stats]

    def shutdown(self) -> None:
        self.stage.teardown()


class ComputeThreadRunner:
    """A LocalRunner shared by concurrent task threads, whose batches all run on `compute`: the
    one thread that runs every in-process stage's batches of a build.

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

    def map(self, batches: Iterable[list]) -> Iterator[list]:
        for batch in batches:
            yield self._compute.submit(self._one, batch).result()

    def run(self, job: BatchJob, batches: Iterable[list]) -> Iterator[list]:
        """The job's reads and saves on the calling task thread, its stage call on the
        compute thread: one shard's files are read and written while another's batch runs."""
        for batch in batches:
            read = job.read(batch)
            outputs = self._compute.submit(job.call, self.runner.stage, read).result()
            yield job.save(read, outputs)

    def models(self) -> dict:
        return self.runner.models()

    def params(self) -> dict:
        return self.runner.params()

    def stats(self) -> list:
        return self.runner.stats()

    def shutdown(self) -> None:
        self.runner.shutdown()


def build_in_process(config, runners: dict) -> tuple:
    """A whole build in this process, one shard after another through every step, without
    Prefect (what tests and benchmarks run): (plan, step reports, write reports)."""
    from datagen.build.execute import run_step
    from datagen.build.plan import plan_build
    from datagen.build.row import collect_provenance
    from datagen.build.steps import step
    from datagen.build.workdir import ShardWork
    from datagen.build.write import run_write

    plan = plan_build(config)
    provenance = collect_provenance(runners)
    step_reports, write_reports = [], []
    for shard in plan.shards:
        work = ShardWork(config.work_root, shard)
        for name, runner in runners.items():
            step_reports.append(run_step(step(name), work, config, runner))
        write_reports.append(run_write(work, config, provenance))
    return plan, step_reports, write_reports
