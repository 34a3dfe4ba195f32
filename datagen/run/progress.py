"""Live progress of a build, per step: what the Prefect UI and `datagen build`'s terminal show.

The shard tasks report as their steps go (build/execute.py `run_step`'s progress sink: samples
sent to the runner, finished, skipped) and as shards are written; `BuildProgress` keeps the
counts, thread-safe, and the flow's own thread publishes them to the views every few seconds
while it waits on the shards (run/prefect.py). The views:

- `PrefectView`: one progress artifact per step (`{split}-{step}-progress`: the percentage of
  the step's samples handled, and a description with done / rejected / skipped / in flight,
  throughput, ETA and the step's live pool size), plus `{split}-build-progress` (shards
  written). Progress artifacts are updated in place, so a long build adds no artifact versions.
- `TerminalView`: rich progress bars, one per step and one for the shards, while `datagen
  build` runs on a terminal (`terminal_view()`); the task runs' INFO lines stay off the screen
  meanwhile (the Prefect API still gets every log line, for the UI).
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Protocol


@dataclass(frozen=True)
class StepCounts:
    """One step's samples in a build: every planned sample ends up done, rejected (by this
    step) or skipped (done by an earlier run, or rejected by an earlier step)."""

    step: str
    total: int
    done: int = 0
    rejected: int = 0
    skipped: int = 0
    in_flight: int = 0  # sent to the step's runner and not answered yet
    actors: int = 1  # the step's pool: live actors now (1 in process)
    began: float | None = None  # when its first sample was sent
    elapsed_s: float = 0.0  # since `began`, at the snapshot

    @property
    def handled(self) -> int:
        return self.done + self.rejected + self.skipped

    @property
    def fraction(self) -> float:
        return min(self.handled / self.total, 1.0) if self.total else 1.0

    @property
    def per_second(self) -> float | None:
        """Samples this run computed per second (done or rejected: the work that costs)."""
        worked = self.done + self.rejected
        return worked / self.elapsed_s if worked and self.elapsed_s > 0 else None

    @property
    def eta_s(self) -> float | None:
        left = self.total - self.handled
        if left <= 0:
            return 0.0
        rate = self.per_second
        return left / rate if rate else None

    def describe(self) -> str:
        return (
            f"{self.done} done, {self.rejected} rejected, {self.skipped} skipped, "
            f"{self.in_flight} in flight of {self.total}; {format_rate(self.per_second)}; "
            f"ETA {format_duration(self.eta_s)}; "
            f"{self.actors} actor{'' if self.actors == 1 else 's'}"
        )


@dataclass(frozen=True)
class Snapshot:
    steps: tuple[StepCounts, ...]
    shards_total: int
    shards_written: int
    pairs_written: int
    rows_rejected: int  # rejects and filtered-out samples recorded by the shards written


class BuildProgress:
    """The counts of one build, updated from the shard tasks' threads.

    Counts are kept per (step, shard) too, so a shard task that Prefect retries starts its
    steps' counts afresh (what the failed try finished, the retry finds done: skipped) instead
    of counting those samples twice."""

    def __init__(
        self,
        steps: list[str],
        planned: int,
        shards: int,
        pool_size: Callable[[str], int] = lambda step: 1,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._lock = threading.Lock()
        self._steps = {name: StepCounts(name, planned) for name in steps}
        self._of_shard: dict[tuple[str, str], Counter] = {}
        self._shards_total = shards
        self._shards_written = self._pairs = self._rows_rejected = 0
        self._pool_size = pool_size
        self._clock = clock

    def _change(self, step: str, shard: str, **deltas: int) -> None:
        """Under the lock: add `deltas` to the step's counts and to its shard's."""
        counts = self._steps[step]
        if counts.began is None and deltas.get("in_flight", 0) > 0:
            counts = replace(counts, began=self._clock())
        self._steps[step] = replace(
            counts, **{k: getattr(counts, k) + v for k, v in deltas.items()}
        )
        self._of_shard.setdefault((step, shard), Counter()).update(deltas)

    # the progress sink of build/execute.py run_step
    def began(self, step: str, shard: str, skipped: int) -> None:
        with self._lock:
            earlier = self._of_shard.pop((step, shard), Counter())
            counts = self._steps[step]  # a retry: the failed try's counts give way
            self._steps[step] = replace(
                counts, **{k: getattr(counts, k) - v for k, v in earlier.items()}
            )
            self._change(step, shard, skipped=skipped)

    def sent(self, step: str, shard: str, samples: int) -> None:
        with self._lock:
            self._change(step, shard, in_flight=samples)

    def finished(self, step: str, shard: str, done: int, rejected: int) -> None:
        with self._lock:
            self._change(step, shard, done=done, rejected=rejected, in_flight=-(done + rejected))

    def dropped(self, step: str, shard: str, samples: int) -> None:
        """Sent and never answered: the step failed, and the shard's retry sends them again."""
        if samples:
            with self._lock:
                self._change(step, shard, in_flight=-samples)

    def shard_written(self, shard: str, written: int, rejected: int) -> None:
        """The shard's last act: its per-shard counts are not needed any more (flat memory)."""
        with self._lock:
            self._shards_written += 1
            self._pairs += written
            self._rows_rejected += rejected
            for step in self._steps:
                self._of_shard.pop((step, shard), None)

    def snapshot(self) -> Snapshot:
        now = self._clock()
        with self._lock:
            steps = tuple(
                replace(
                    counts,
                    actors=self._pool_size(counts.step),
                    elapsed_s=now - counts.began if counts.began is not None else 0.0,
                )
                for counts in self._steps.values()
            )
            return Snapshot(
                steps,
                self._shards_total,
                self._shards_written,
                self._pairs,
                self._rows_rejected,
            )


def format_rate(per_second: float | None) -> str:
    if not per_second:
        return "- samples/min"
    if per_second >= 1:
        return f"{per_second:.1f} samples/s"
    return f"{60 * per_second:.1f} samples/min"


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class ProgressView(Protocol):
    every_s: float  # how often it wants a fresh snapshot

    def start(self, snapshot: Snapshot) -> None: ...

    def update(self, snapshot: Snapshot) -> None: ...

    def close(self, snapshot: Snapshot) -> None: ...


class PrefectView:
    """Progress artifacts of the flow run: one per step, one for the shards written."""

    every_s = 5.0  # a handful of small API calls each time, whatever the build's size

    def __init__(self, split: str):
        self.split = split
        self._ids: dict[str, object] = {}
        self._shown: dict[str, tuple[float, str]] = {}

    def _publish(self, key: str, percent: float, description: str) -> None:
        from prefect.artifacts import create_progress_artifact, update_progress_artifact

        if self._shown.get(key) == (percent, description):
            return
        if key not in self._ids:
            self._ids[key] = create_progress_artifact(
                progress=percent, key=key, description=description
            )
        else:
            update_progress_artifact(self._ids[key], percent, description=description)
        self._shown[key] = (percent, description)

    def update(self, snapshot: Snapshot) -> None:
        shards = snapshot.shards_total
        self._publish(
            f"{self.split}-build-progress",
            100.0 * snapshot.shards_written / shards if shards else 100.0,
            f"shards written of {shards}: {snapshot.shards_written}; "
            f"{snapshot.pairs_written} pairs written, {snapshot.rows_rejected} rejected "
            "or filtered out",
        )
        for counts in snapshot.steps:
            self._publish(
                f"{self.split}-{counts.step}-progress",
                round(100.0 * counts.fraction, 1),
                f"{counts.step}: {counts.describe()}",
            )

    start = close = update


class TerminalView:
    """Rich progress bars on stderr: a bar per step (done, rejected, in flight, rate, ETA, pool
    size) and one for the shards written."""

    every_s = 0.5

    def __init__(self, console=None):
        from rich.console import Console

        self.console = console or Console(stderr=True)
        self._bars = None
        self._tasks: dict[str, int] = {}

    def start(self, snapshot: Snapshot) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        self._bars = Progress(
            TextColumn("{task.description:>8}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[detail]}"),
            console=self.console,
            refresh_per_second=4,
        )
        for counts in snapshot.steps:
            self._tasks[counts.step] = self._bars.add_task(
                counts.step, total=counts.total, detail=""
            )
        self._tasks["write"] = self._bars.add_task("shards", total=snapshot.shards_total, detail="")
        self._bars.start()
        self.update(snapshot)

    def update(self, snapshot: Snapshot) -> None:
        if self._bars is None:
            return
        for counts in snapshot.steps:
            self._bars.update(
                self._tasks[counts.step],
                completed=counts.handled,
                detail=(
                    f"{counts.done} done  {counts.rejected} rejected  {counts.in_flight} in "
                    f"flight  {format_rate(counts.per_second)}  "
                    f"ETA {format_duration(counts.eta_s)}  "
                    f"{counts.actors} actor{'' if counts.actors == 1 else 's'}"
                ),
            )
        self._bars.update(
            self._tasks["write"],
            completed=snapshot.shards_written,
            detail=f"{snapshot.pairs_written} pairs written  {snapshot.rows_rejected} rejected",
        )

    def close(self, snapshot: Snapshot) -> None:
        if self._bars is None:
            return
        self.update(snapshot)
        self._bars.stop()
        self._bars = None


class ProgressPublisher:
    """Gives each view a fresh snapshot as often as it asks, from the thread that calls it (the
    flow's: Prefect's client and the terminal are used from one thread only)."""

    def __init__(
        self,
        progress: BuildProgress,
        views: list[ProgressView],
        clock: Callable[[], float] = time.monotonic,
    ):
        self.progress, self.views, self._clock = progress, views, clock
        snapshot = progress.snapshot()
        for view in views:
            self._show(view.start, snapshot)
        self._due = {id(view): clock() + view.every_s for view in views}

    def due_in(self) -> float:
        """Seconds until a view wants its next snapshot."""
        return max(min(self._due.values(), default=60.0) - self._clock(), 0.0)

    def publish_due(self) -> None:
        now = self._clock()
        due = [view for view in self.views if self._due[id(view)] <= now]
        if not due:
            return
        snapshot = self.progress.snapshot()
        for view in due:
            self._show(view.update, snapshot)
            self._due[id(view)] = now + view.every_s

    def close(self) -> None:
        """Every view's last, final snapshot."""
        snapshot = self.progress.snapshot()
        for view in self.views:
            self._show(view.close, snapshot)

    @staticmethod
    def _show(call: Callable[[Snapshot], None], snapshot: Snapshot) -> None:
        """Progress is the window, not the work: a view that fails (the Prefect API away for
        a moment) is logged and the build goes on."""
        try:
            call(snapshot)
        except Exception as error:  # noqa: BLE001 - any view failure, reported, not raised
            logging.getLogger(__name__).warning("progress view failed: %r", error)


class _TaskLogsOffScreen(logging.Filter):
    """Keeps the task runs' INFO lines off the terminal (they still reach the Prefect API:
    its handler is another one); their warnings and errors, and the flow run's lines, pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or not record.name.startswith("prefect.task_runs")


@contextlib.contextmanager
def _task_logs_off_screen() -> Iterator[None]:
    from prefect.logging.handlers import PrefectConsoleHandler

    loggers = (logging.getLogger(), *logging.Logger.manager.loggerDict.values())
    handlers = {
        handler
        for logger in loggers
        for handler in getattr(logger, "handlers", ())
        if isinstance(handler, PrefectConsoleHandler)
    }
    quiet = _TaskLogsOffScreen()
    for handler in handlers:
        handler.addFilter(quiet)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(quiet)


# Views that the builds of this process show besides the Prefect one (`terminal_view`).
_EXTRA_VIEWS: list[ProgressView] = []


@contextlib.contextmanager
def terminal_view(console=None, force: bool = False) -> Iterator[None]:
    """While inside, builds in this process also draw their progress bars on the terminal:
    when stderr is a terminal (or `force`), as `datagen build` asks."""
    if not (force or sys.stderr.isatty()):
        yield
        return
    view = TerminalView(console)
    _EXTRA_VIEWS.append(view)
    try:
        with _task_logs_off_screen():
            yield
    finally:
        _EXTRA_VIEWS.remove(view)


def build_views(split: str) -> list[ProgressView]:
    return [PrefectView(split), *_EXTRA_VIEWS]
