"""The list of steps (datagen/build/steps.py): in the method's order, every item a step reads
written by an earlier step, and the declarations held to while the steps run."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest

from datagen.build.execute import run_step
from datagen.build.row import row_reads
from datagen.build.settings import BuildConfig
from datagen.build.step_io import Saved, UndeclaredRead, WorkReads
from datagen.build.steps import PLAN_WRITES, STEPS, step, steps_for
from datagen.build.workdir import ShardWork
from datagen.core.runner import run_inline
from datagen.stages.plan import PlannedSample


def unmet_reads(steps, final_reads) -> list[str]:
    """`step: item` for each item read before any step wrote it (the write step last)."""
    written, unmet = set(PLAN_WRITES), []
    for each in steps:
        unmet += [f"{each.name}: {item}" for item in each.reads if item not in written]
        written |= set(each.writes)
    return unmet + [f"write: {item}" for item in final_reads if item not in written]


@pytest.fixture
def config(tmp_path):
    (tmp_path / "clips").mkdir()
    return BuildConfig(source=str(tmp_path / "clips"), out=str(tmp_path / "out"))


def test_the_steps_follow_the_method():
    assert [s.name for s in STEPS] == [
        "control", "describe", "stylize", "animate", "caption", "score", "judge",
    ]  # fmt: skip


@pytest.mark.parametrize("judge", [False, True])
def test_every_read_has_an_earlier_writer(config, judge):
    config = dataclasses.replace(config, vlm_judge=judge)
    steps = steps_for(config)
    assert ("judge" in [s.name for s in steps]) is judge
    assert unmet_reads(steps, row_reads(config)) == []


def test_a_step_moved_before_its_input_is_found(config):
    steps = list(steps_for(config))
    steps.insert(2, steps.pop(steps.index(step("animate"))))  # animate before stylize
    assert unmet_reads(steps, row_reads(config)) == ["animate: stylize.stylized_first"]


def test_each_item_has_one_writer():
    items = [item for s in STEPS for item in s.writes]
    assert len(items) == len(set(items))
    assert all(item.startswith(f"{s.name}.") for s in STEPS for item in s.writes)


def sample(sample_id: str = "s1") -> PlannedSample:
    return PlannedSample(sample_id, "file:///a.mp4", "/a.mp4", 0, 5, 16.0, 8, 8, "ink_wash", 3)


def test_a_read_the_step_did_not_declare_is_refused(tmp_path):
    work = ShardWork(tmp_path, "shard-00000")
    work.save("describe", "s1", values={"content": "a dog"})
    reads = WorkReads(work, sample(), ("describe.content",))
    assert reads.value("describe.content") == "a dog"
    with pytest.raises(UndeclaredRead, match="control.first"):
        reads.image("control.first")
    with pytest.raises(UndeclaredRead, match="plan.sample"):
        reads.sample  # noqa: B018 - the property is the read


class _Echo:
    """A runner returning each input as its output (the step's save function decides)."""

    def run(self, job, batches):
        for batch in batches:
            yield run_inline(job, list, batch)


def test_a_save_that_differs_from_the_declared_writes_fails(tmp_path, config):
    work = ShardWork(tmp_path, "shard-00000")
    work.write_manifest([sample()])
    work.save("describe", "s1", values={"content": "a dog", "attempts": 1})
    work.save("control", "s1", images={"first": np.zeros((8, 8, 3), np.uint8), "refs": []})
    honest = step("describe")
    lying = dataclasses.replace(
        honest,
        name="describe_again",
        read=lambda reads, context: dataclasses.make_dataclass("In", ["sample_id"])("s1"),
        save=lambda given, output, context: Saved(values={"content": "x"}),
        writes=("describe_again.content", "describe_again.attempts"),
    )
    with pytest.raises(RuntimeError, match="declares"):
        run_step(lying, work, config, _Echo())
    assert not work.has("describe_again", "s1")


class _Slow:
    """A runner whose 'stage' takes 0.3 s per batch."""

    @staticmethod
    def stage(batch):
        time.sleep(0.3)
        return list(batch)

    def run(self, job, batches):
        for batch in batches:
            yield run_inline(job, self.stage, batch)


def test_a_steps_overhead_counts_its_own_work_and_not_the_stage(tmp_path, config):
    work = ShardWork(tmp_path, "shard-00000")
    work.write_manifest([sample("s1"), sample("s2")])

    def slow_read(reads, context):
        time.sleep(0.05)  # reading inputs: the step's own work, though the runner pulls it
        return dataclasses.make_dataclass("In", ["sample_id"])(reads.sample_id)

    timed = dataclasses.replace(
        step("describe"),
        name="timed",
        reads=(),
        read=slow_read,
        save=lambda given, output, context: Saved(values={"content": "x"}),
        writes=("timed.content",),
        batch_size=lambda config: 1,
    )
    report = run_step(timed, work, config, _Slow())
    assert report.done == 2
    assert 0.1 <= report.overhead_s < 0.3, report.overhead_s  # two reads, none of the 0.6 s
