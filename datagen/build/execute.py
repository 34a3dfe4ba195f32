"""The one step runner: a step over one shard, through whatever runner the executor gives.

The driver side (`run_step`) finds the shard's samples still pending for the step and sends
them, in batches of references, to the runner with a `StepJob`; the job runs where the stage
runs (an actor, possibly on another node, or this process): it reads each sample's input from
the work files (the step's read function), calls the stage and saves each output (the step's
save function). The driver gets back one small outcome per sample, `Done` or a `Reject`, and
records the rejects; it never reads or carries media. A sample rejected by one step is skipped
by the later ones; rerunning a step skips what is already done, so a retried task redoes only
what is missing.
"""

from __future__ import annotations

import pickle
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from typing import Protocol

from datagen.build.settings import BuildConfig
from datagen.build.step_io import Saved, StepContext, WorkReads
from datagen.build.steps import STEPS, Step, step
from datagen.build.workdir import ShardWork
from datagen.core.runner import StageRunner
from datagen.core.stage import Reject
from datagen.stages.plan import PlannedSample


@dataclass
class StepReport:
    stage: str
    shard: str
    done: int = 0
    rejected: int = 0
    skipped: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    # seconds of this step outside the stage's calls: reading inputs and saving outputs (where
    # the stage runs) and the driver's own work (what orchestration costs, per step)
    overhead_s: float = 0.0
    # what the driver itself spent on the step: CPU-seconds of its thread, and bytes of the
    # references and outcomes it exchanged with the runner (what Ray ships; no media)
    driver_cpu_s: float = 0.0
    driver_bytes: int = 0


@dataclass(frozen=True)
class Done:
    """A sample the step finished and saved; its share of the batch's time outside the stage."""

    sample_id: str
    outside_s: float


@dataclass
class _Read:
    samples: list[PlannedSample]
    inputs: list
    rejects: list[Reject]
    seconds: float
    compute_s: float = 0.0


@dataclass(frozen=True)
class StepJob:
    """One step's work on batches of one shard's samples (core/runner.py BatchJob): names and
    a path, so it pickles small; it opens the shard's work files where it runs."""

    step_name: str
    work_root: str
    shard: str
    config: BuildConfig
    step_override: Step | None = None  # a step not in STEPS (tests)

    @cached_property
    def step(self) -> Step:
        return self.step_override or step(self.step_name)

    @cached_property
    def work(self) -> ShardWork:
        return ShardWork(self.work_root, self.shard)

    @cached_property
    def context(self) -> StepContext:
        return StepContext(self.config)

    def __getstate__(self) -> dict:  # the cached work and context are rebuilt where it runs
        return {name: getattr(self, name) for name in self.__dataclass_fields__}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    def read(self, batch: list[PlannedSample]) -> _Read:
        began = time.perf_counter()
        inputs, rejects = [], []
        for sample in batch:
            given = self.step.read(WorkReads(self.work, sample, self.step.reads), self.context)
            (rejects if isinstance(given, Reject) else inputs).append(given)
        return _Read(batch, inputs, rejects, time.perf_counter() - began)

    def call(self, stage: Callable[[list], list], read: _Read) -> list:
        began = time.perf_counter()
        outputs = stage(read.inputs) if read.inputs else []
        read.compute_s = time.perf_counter() - began
        return outputs

    def save(self, read: _Read, outputs: list) -> list[Done | Reject]:
        began = time.perf_counter()
        given_of = {given.sample_id: given for given in read.inputs}
        outcomes: list[Done | Reject] = list(read.rejects)
        saved_ids = []
        for result in outputs:
            if isinstance(result, Reject):
                outcomes.append(result)
                continue
            saved = self.step.save(given_of[result.sample_id], result, self.context)
            _check_writes(self.step, saved)
            self.work.save(
                self.step.name,
                result.sample_id,
                videos=saved.videos,
                images=saved.images,
                values=saved.values,
                fps=saved.fps,
            )
            saved_ids.append(result.sample_id)
        outside = read.seconds + time.perf_counter() - began
        share = outside / max(len(read.samples), 1)
        return outcomes + [Done(sample_id, share) for sample_id in saved_ids]


class ProgressSink(Protocol):
    """What a step tells the build's live progress (run/progress.py BuildProgress) as it goes."""

    def began(self, step: str, shard: str, skipped: int) -> None: ...

    def sent(self, step: str, shard: str, samples: int) -> None: ...

    def finished(self, step: str, shard: str, done: int, rejected: int) -> None: ...

    def dropped(self, step: str, shard: str, samples: int) -> None: ...


def run_step(
    step: Step,
    work: ShardWork,
    config: BuildConfig,
    runner: StageRunner,
    progress: ProgressSink | None = None,
) -> StepReport:
    """Run `step` over the samples of `work` that are still pending for it, telling
    `progress` what it skips, sends and gets back."""
    cpu_began, began = time.thread_time(), time.perf_counter()
    pending = work.pending(step.name)
    report = StepReport(step.name, work.shard, skipped=len(work.samples()) - len(pending))
    if progress:
        progress.began(step.name, work.shard, report.skipped)
    registered = step is _registered(step.name)
    job = StepJob(
        step.name, str(work.root.parent), work.shard, config, None if registered else step
    )
    reasons: Counter[str] = Counter()
    sent = len(pickle.dumps(job)) if registered else 0  # a test's own step may hold lambdas
    outside = 0.0  # reads and saves where the stage ran
    waited = 0.0  # blocked on the runner: the stage computing, reading and saving elsewhere
    unanswered = 0  # samples sent and not answered yet

    def batches() -> Iterator[list[PlannedSample]]:
        nonlocal sent, unanswered
        size = step.batch_size(config)
        for start in range(0, len(pending), size):
            batch = pending[start : start + size]
            sent += len(pickle.dumps(batch))
            unanswered += len(batch)
            if progress:
                progress.sent(step.name, work.shard, len(batch))
            yield batch

    received = 0
    outcomes_of = iter(runner.run(job, batches()))
    try:
        while True:
            asked = time.perf_counter()
            outcomes = next(outcomes_of, None)
            waited += time.perf_counter() - asked
            if outcomes is None:
                break
            received += len(pickle.dumps(outcomes))
            rejected = 0
            for outcome in outcomes:
                if isinstance(outcome, Reject):
                    work.add_reject(outcome)
                    reasons[outcome.reason] += 1
                    rejected += 1
                else:
                    outside += outcome.outside_s
            report.rejected += rejected
            report.done += len(outcomes) - rejected
            unanswered -= len(outcomes)
            if progress:
                progress.finished(step.name, work.shard, len(outcomes) - rejected, rejected)
    finally:
        if progress:  # what a failing step sent and never got back is not in flight any more
            progress.dropped(step.name, work.shard, unanswered)
    report.reasons = dict(reasons)
    driver_s = time.perf_counter() - began - waited
    report.overhead_s = round(driver_s + outside, 6)
    report.driver_cpu_s = round(time.thread_time() - cpu_began, 6)
    report.driver_bytes = sent + received
    return report


def _registered(name: str) -> Step | None:
    return next((s for s in STEPS if s.name == name), None)


def _check_writes(step: Step, saved: Saved) -> None:
    written = {f"{step.name}.{item}" for item in saved.items()}
    if written != set(step.writes):
        raise RuntimeError(
            f"step {step.name!r} saved {sorted(written)} but declares {sorted(step.writes)} "
            "(datagen/build/steps.py)"
        )
