"""A build's live progress (datagen/run/progress.py): the counts per step, what the terminal
bars and the publisher show."""

from __future__ import annotations

import io
import logging

from datagen.run.progress import (
    BuildProgress,
    ProgressPublisher,
    TerminalView,
    format_duration,
    terminal_view,
)


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_counts_per_step_add_up_to_the_plan_with_rate_and_eta():
    clock = Clock()
    progress = BuildProgress(["control", "animate"], planned=8, shards=2, clock=clock)
    progress.began("control", "shard-00000", skipped=1)  # done by an earlier run
    progress.sent("control", "shard-00000", 3)
    clock.now += 10
    progress.finished("control", "shard-00000", done=2, rejected=1)
    control = progress.snapshot().steps[0]
    assert (control.done, control.rejected, control.skipped, control.in_flight) == (2, 1, 1, 0)
    assert control.handled == 4 and control.fraction == 0.5
    assert control.per_second == 0.3  # 3 samples computed in 10 s (the skipped one cost nothing)
    assert round(control.eta_s, 3) == round(4 / 0.3, 3)
    animate = progress.snapshot().steps[1]
    assert animate.per_second is None and animate.eta_s is None  # nothing sent yet: no guess
    assert "2 done, 1 rejected, 1 skipped, 0 in flight of 8" in control.describe()


def test_a_retried_shard_counts_its_samples_once():
    progress = BuildProgress(["animate"], planned=4, shards=1)
    progress.began("animate", "shard-00000", skipped=0)
    progress.sent("animate", "shard-00000", 4)
    progress.finished("animate", "shard-00000", done=3, rejected=0)
    progress.dropped("animate", "shard-00000", 1)  # the step failed on its last sample
    assert progress.snapshot().steps[0].in_flight == 0
    # Prefect retries the shard: the three finished ones are skipped, the fourth redone
    progress.began("animate", "shard-00000", skipped=3)
    progress.sent("animate", "shard-00000", 1)
    progress.finished("animate", "shard-00000", done=1, rejected=0)
    animate = progress.snapshot().steps[0]
    assert (animate.done, animate.skipped, animate.handled, animate.fraction) == (1, 3, 4, 1.0)
    progress.shard_written("shard-00000", written=4, rejected=0)
    snapshot = progress.snapshot()
    assert (snapshot.shards_written, snapshot.pairs_written) == (1, 4)
    assert progress._of_shard == {}  # a written shard's counts are let go: flat memory


def test_pool_sizes_are_read_live():
    sizes = {"animate": 4}
    progress = BuildProgress(["animate"], planned=1, shards=1, pool_size=sizes.__getitem__)
    assert progress.snapshot().steps[0].actors == 4
    sizes["animate"] = 3  # a node lost
    assert progress.snapshot().steps[0].actors == 3


def test_terminal_bars_show_each_step_and_the_shards():
    from rich.console import Console

    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=200, color_system=None)
    progress = BuildProgress(["control", "animate"], planned=4, shards=2)
    view = TerminalView(console)
    view.start(progress.snapshot())
    for shard in ("shard-00000", "shard-00001"):
        for name in ("control", "animate"):
            progress.began(name, shard, skipped=0)
            progress.sent(name, shard, 2)
            progress.finished(name, shard, done=2 if name == "control" else 1, rejected=0)
    view.update(progress.snapshot())
    progress.shard_written("shard-00000", written=1, rejected=1)
    view.close(progress.snapshot())
    text = out.getvalue()
    last = text[text.rindex("control") :]  # the final frame
    assert "4/4" in last and "4 done" in last and "0 rejected" in last
    assert "2/4" in last and "2 in flight" in last  # animate: two answered of four sent
    assert "1/2" in last and "1 pairs written" in last  # shards
    assert "ETA" in last and "1 actor" in last and "samples/" in last


def test_under_the_bars_task_logs_stay_off_the_terminal_and_flow_logs_do_not():
    from prefect.logging.handlers import PrefectConsoleHandler

    out = io.StringIO()
    handler = PrefectConsoleHandler(stream=out)
    root = logging.getLogger()
    root.addHandler(handler)
    levels = {
        name: logging.getLogger(name).level for name in ("prefect.task_runs", "prefect.flow_runs")
    }
    for name in levels:  # as in a flow run's process (the "prefect" logger at INFO)
        logging.getLogger(name).setLevel(logging.INFO)
    try:
        with terminal_view(force=True):
            logging.getLogger("prefect.task_runs").info("shard-00000: 2 done")
            logging.getLogger("prefect.task_runs").warning("a shard is retried")
            logging.getLogger("prefect.flow_runs").info("Finished in state Completed()")
        logging.getLogger("prefect.task_runs").info("after the build")
    finally:
        root.removeHandler(handler)
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
    text = out.getvalue()
    assert "2 done" not in text
    assert "a shard is retried" in text and "Finished in state" in text
    assert "after the build" in text


def test_publisher_calls_each_view_as_often_as_it_asks_and_survives_a_failing_one():
    clock = Clock()
    seen: list[tuple[str, str]] = []

    class View:
        def __init__(self, name, every_s):
            self.name, self.every_s = name, every_s

        def start(self, snapshot):
            seen.append((self.name, "start"))

        def update(self, snapshot):
            seen.append((self.name, "update"))

        def close(self, snapshot):
            seen.append((self.name, "close"))

    class Broken(View):
        def update(self, snapshot):
            raise ConnectionError("the Prefect API is away")

    progress = BuildProgress(["animate"], planned=1, shards=1, clock=clock)
    publisher = ProgressPublisher(
        progress, [View("fast", 0.5), View("slow", 5.0), Broken("broken", 0.5)], clock=clock
    )
    assert publisher.due_in() == 0.5
    for _ in range(10):
        clock.now += 0.5
        publisher.publish_due()
    publisher.close()
    assert seen.count(("fast", "update")) == 10
    assert seen.count(("slow", "update")) == 1
    assert seen[-3:] == [("fast", "close"), ("slow", "close"), ("broken", "close")]


def test_terminal_view_only_on_a_terminal():
    from datagen.run import progress

    with terminal_view():  # pytest's stderr is not a terminal
        assert progress._EXTRA_VIEWS == []
    with terminal_view(force=True):
        assert [type(v) for v in progress._EXTRA_VIEWS] == [TerminalView]
    assert progress._EXTRA_VIEWS == []


def test_durations_read_as_clock_times():
    assert [format_duration(s) for s in (None, 5, 65, 3725)] == ["-", "0:05", "1:05", "1:02:05"]
