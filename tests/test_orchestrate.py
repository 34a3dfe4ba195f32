"""In-process stage runners of a build (no Ray): one batch of any stage at a time, always on
one thread."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

from datagen.core.stage import Resources, Stage
from datagen.run.local import ComputeThreadRunner, LocalRunner


class ThreadRecordingStage(Stage):
    """A real Stage that doubles numbers and notes which thread ran each batch, and whether
    two batches (of the stages sharing `running_in`) ever overlapped."""

    name = "double"

    def __init__(self):
        super().__init__(Resources(num_cpus=0.25))
        self.threads: set[int] = set()
        self.running_in = {"batches": 0, "overlapped": False}  # may be shared between stages

    def _load(self) -> None:
        pass

    def _process(self, batch):
        self.running_in["batches"] += 1
        self.running_in["overlapped"] |= self.running_in["batches"] > 1
        self.threads.add(threading.get_ident())
        results = [2 * x for x in batch]
        threading.Event().wait(0.001)  # give another caller the chance to overlap
        self.running_in["batches"] -= 1
        return results


def test_batches_of_all_stages_from_many_task_threads_run_one_at_a_time_on_one_thread():
    stages = [ThreadRecordingStage(), ThreadRecordingStage()]
    for stage in stages:  # one count of running batches across both stages
        stage.running_in = running = {"batches": 0, "overlapped": False}
    with ThreadPoolExecutor(max_workers=1) as compute:
        runners = [ComputeThreadRunner(LocalRunner(stage), compute) for stage in stages]
        with ThreadPoolExecutor(max_workers=6) as callers:
            results = list(
                callers.map(lambda k: list(runners[k % 2].map([[k, k + 1], [k + 2]])), range(30))
            )
        for runner in runners:
            runner.shutdown()
    assert results == [[[2 * k, 2 * k + 2], [2 * k + 4]] for k in range(30)]
    threads = stages[0].threads | stages[1].threads
    assert len(threads) == 1 and threading.get_ident() not in threads
    assert not running["overlapped"], "two stages computed at once"
    assert stages[0].stats.batches == stages[1].stats.batches == 30
