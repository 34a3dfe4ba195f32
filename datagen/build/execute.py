"""The one step runner: a step over one shard, through whatever runner the executor gives.

It reads each pending sample's input (the step's read function), sends the inputs to the
stage runner in batches, and saves each output (the step's save function) or records the
reject. A sample rejected by one step is skipped by the later ones; rerunning a step skips what
is already done, so a retried task redoes only what is missing.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from datagen.build.settings import BuildConfig
from datagen.build.step_io import Saved, StepContext, WorkReads
from datagen.build.steps import Step
from datagen.build.workdir import ShardWork
from datagen.core.runner import StageRunner
from datagen.core.stage import Reject


@dataclass
class StepReport:
    stage: str
    shard: str
    done: int = 0
    rejected: int = 0
    skipped: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    # seconds in this step outside the stage's calls: reading inputs, saving outputs and the
    # runner's own work on this side (what orchestration costs, per step)
    overhead_s: float = 0.0


def run_step(step: Step, work: ShardWork, config: BuildConfig, runner: StageRunner) -> StepReport:
    """Run `step` over the samples of `work` that are still pending for it."""
    pending = work.pending(step.name)
    report = StepReport(step.name, work.shard, skipped=len(work.samples()) - len(pending))
    context = StepContext(config)
    reasons: Counter[str] = Counter()

    def rejected(reject: Reject) -> None:
        work.add_reject(reject)
        reasons[reject.reason] += 1
        report.rejected += 1

    reading = 0.0  # inside the runner's pull of the next batch, but this step's own work

    def inputs() -> Iterator:
        nonlocal reading
        for sample in pending:
            began = time.perf_counter()
            given = step.read(WorkReads(work, sample, step.reads), context)
            reading += time.perf_counter() - began
            if isinstance(given, Reject):
                rejected(given)
            else:
                yield given

    in_flight: dict[str, object] = {}  # sample_id -> input, until its result is saved
    started = time.perf_counter()
    waited = 0.0  # blocked on the runner: the stage computing (and, on Ray, the transfer)
    results_of = iter(runner.map(_batched(inputs(), step.batch_size(config), in_flight)))
    while True:
        asked = time.perf_counter()
        results = next(results_of, None)
        waited += time.perf_counter() - asked
        if results is None:
            break
        for result in results:
            given = in_flight.pop(result.sample_id, None)
            if isinstance(result, Reject):
                rejected(result)
                continue
            saved = step.save(given, result, context)
            _check_writes(step, saved)
            work.save(
                step.name,
                result.sample_id,
                videos=saved.videos,
                images=saved.images,
                values=saved.values,
                fps=saved.fps,
            )
            report.done += 1
    report.reasons = dict(reasons)
    report.overhead_s = round(time.perf_counter() - started - (waited - reading), 6)
    return report


def _batched(items: Iterable, size: int, in_flight: dict) -> Iterator[list]:
    batch: list = []
    for item in items:
        in_flight[item.sample_id] = item
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _check_writes(step: Step, saved: Saved) -> None:
    written = {f"{step.name}.{item}" for item in saved.items()}
    if written != set(step.writes):
        raise RuntimeError(
            f"step {step.name!r} saved {sorted(written)} but declares {sorted(step.writes)} "
            "(datagen/build/steps.py)"
        )
