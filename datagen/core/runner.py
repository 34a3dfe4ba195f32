"""What an executor hands the build for each stage: the runner contract.

A runner maps batches of stage inputs to batches of results (an output or a Reject per input,
in order) wherever the stage runs: in this process (datagen/run/local.py) or in Ray actors
(datagen/run/ray.py). The build's steps talk to runners only through this contract, so a step
does not know which engine runs it.

A build's steps give the runner a `BatchJob` and batches of *references* (planned samples):
the job reads each sample's inputs from the work store, the stage computes, the job saves the
outputs there, all where the stage runs. So an actor on another node reads and writes the work
files itself and the driver ships no media (ARCHITECTURE.md: the data plane). The runner knows
nothing of what the job reads or writes; it only calls the job's three parts around the stage.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

from datagen.core.stage import ModelRef, StageStats


class BatchJob(Protocol):
    """A step's work on one batch of references, run where the stage is (must pickle small)."""

    def read(self, batch: list) -> Any:
        """Load the batch's inputs (from the work store)."""
        ...

    def call(self, stage: Callable[[list], list], read: Any) -> Any:
        """Run the stage on what `read` loaded."""
        ...

    def save(self, read: Any, outputs: Any) -> list:
        """Store the outputs (in the work store); one small outcome per reference."""
        ...


def run_inline(job: BatchJob, stage: Callable[[list], list], batch: list) -> list:
    """A job's three parts on one batch, here and now (what an actor does with it)."""
    read = job.read(batch)
    return job.save(read, job.call(stage, read))


class StageRunner(Protocol):
    def map(self, batches: Iterable[list]) -> Iterator[list]:
        """One result list per batch of stage inputs (the order is the runner's)."""
        ...

    def run(self, job: BatchJob, batches: Iterable[list]) -> Iterator[list]:
        """`job` over each batch of references where the stage runs: one outcome list per
        batch, as the batches complete. What passes through the runner is the references
        and the outcomes, never media."""
        ...

    def models(self) -> dict[str, ModelRef]:
        """Role -> the model that produced the stage's outputs (recorded in every row)."""
        ...

    def params(self) -> dict:
        """The settings that shaped the stage's outputs (recorded in the rows' params)."""
        ...

    def stats(self) -> list[StageStats]:
        """The counters of every copy of the stage (one per actor)."""
        ...

    def shutdown(self) -> None:
        """Release the stage's models; the runner is not used again."""
        ...
