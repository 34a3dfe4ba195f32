"""What an executor hands the build for each stage: the runner contract.

A runner maps batches of stage inputs to batches of results (an output or a Reject per input,
in order) wherever the stage runs: in this process (datagen/run/local.py) or in Ray actors
(datagen/run/ray.py). The build's steps talk to runners only through this contract, so a step
does not know which engine runs it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Protocol

from datagen.core.stage import ModelRef, StageStats


class StageRunner(Protocol):
    def map(self, batches: Iterable[list]) -> Iterator[list]:
        """One result list per batch, in the batches' order."""
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
