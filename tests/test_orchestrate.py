"""In-process stage runners of a build (no Ray): one batch at a time, always on one thread."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

from datagen.orchestrate import StageThread
from datagen.pipeline import LocalRunner
from datagen.stage import Resources, Stage


class ThreadRecordingStage(Stage):
    """A real Stage that doubles numbers and notes which thread ran each batch, and whether
    two batches ever overlapped."""

    name = "double"

    def __init__(self):
        super().__init__(Resources(num_cpus=0.25))
        self.threads: set[int] = set()
        self.running = 0
        self.overlapped = False

    def _load(self) -> None:
        pass

    def _process(self, batch):
        self.running += 1
        self.overlapped |= self.running > 1
        self.threads.add(threading.get_ident())
        results = [2 * x for x in batch]
        threading.Event().wait(0.001)  # give another caller the chance to overlap
        self.running -= 1
        return results


def test_batches_from_many_task_threads_run_one_at_a_time_on_one_thread():
    stage = ThreadRecordingStage()
    runner = StageThread(LocalRunner(stage), "double")
    try:
        with ThreadPoolExecutor(max_workers=6) as callers:
            results = list(
                callers.map(lambda k: list(runner.map([[k, k + 1], [k + 2]])), range(30))
            )
    finally:
        runner.shutdown()
    assert results == [[[2 * k, 2 * k + 2], [2 * k + 4]] for k in range(30)]
    assert len(stage.threads) == 1 and threading.get_ident() not in stage.threads
    assert not stage.overlapped
    assert stage.stats.batches == 60
