"""THE pipeline: the method's steps in order, each naming the stage that runs it, what it
reads from the shard's work files and what it writes there.

    plan -> control -> describe -> stylize -> animate -> caption -> score [-> judge] -> write

`plan` (datagen/build/plan.py) writes each shard's manifest; each step then runs the samples
still pending through its stage (built by stage_configs.StageFactory) with the one step runner
(datagen/build/execute.py); `write` (datagen/build/write.py) assembles the rows, applies the
keep rule and commits. Reads and writes are named `<step>.<item>`; a step reads only what an
earlier one wrote (tests/test_steps.py checks it, WorkReads enforces it while running). Steps
do not know which executor runs them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from datagen.build import stage_configs, step_io
from datagen.build.settings import BuildConfig


@dataclass(frozen=True)
class Step:
    name: str
    stage: str  # "module:Class", imported only where the stage is built (it pulls in torch)
    config: Callable[[BuildConfig], Any]  # the stage's config from the build's settings
    read: Callable  # (WorkReads, context) -> the stage's input, or a Reject
    save: Callable  # (input, output, context) -> step_io.Saved: what the work files keep
    reads: tuple[str, ...]
    writes: tuple[str, ...]
    batch_size: Callable[[BuildConfig], int] = lambda config: config.batch_size
    enabled: Callable[[BuildConfig], bool] = lambda config: True


PLAN_WRITES = ("plan.sample",)  # the shard manifest: each sample's clip, style and seed
FIRST, REFS = "control.first", "control.refs"  # the raw first frame and K reference frames
RAW, STYLIZED = "animate.raw", "animate.stylized"  # the pair

STEPS = (
    Step("control", "datagen.stages.control:ControlStage", stage_configs.control,
         step_io.control_input, step_io.control_saved, reads=PLAN_WRITES,
         writes=("control.control", FIRST, REFS, "control.stylize_control", "control.sha256",
                 "control.kind")),
    Step("describe", "datagen.stages.describe:DescribeStage", stage_configs.describe,
         step_io.describe_input, step_io.describe_saved, reads=(FIRST, REFS),
         writes=("describe.content", "describe.attempts")),
    Step("stylize", "datagen.stages.stylize:StylizeStage", stage_configs.stylize,
         step_io.stylize_input, step_io.stylize_saved,
         reads=("plan.sample", FIRST, REFS, "control.stylize_control", "describe.content"),
         writes=("stylize.stylized_first", "stylize.style_refs", "stylize.prompt",
                 "stylize.params")),
    # one pair per call keeps peak memory at one pair; the pair itself is one batched call
    Step("animate", "datagen.stages.animate:AnimateStage", stage_configs.animate,
         step_io.animate_input, step_io.animate_saved,
         reads=("plan.sample", FIRST, "stylize.stylized_first", "control.control",
                "control.sha256", "describe.content"),
         writes=(RAW, STYLIZED, "animate.conditions"), batch_size=lambda config: 1),
    Step("caption", "datagen.stages.caption:CaptionStage", stage_configs.caption,
         step_io.caption_input, step_io.caption_saved, reads=("plan.sample", RAW, STYLIZED),
         writes=("caption.caption_ns", "caption.caption_sty", "caption.attempts")),
    Step("score", "datagen.stages.score:ScoreStage", stage_configs.score,
         step_io.score_input, step_io.score_saved, reads=(RAW, STYLIZED, "stylize.style_refs"),
         writes=("score.csd_score", "score.dino_score")),
    Step("judge", "datagen.stages.judge:JudgeStage", stage_configs.judge,
         step_io.judge_input, step_io.judge_saved, reads=("plan.sample", RAW, STYLIZED),
         writes=("judge.verdict", "judge.detail"), enabled=lambda config: config.vlm_judge),
)  # fmt: skip


def steps_for(config: BuildConfig) -> tuple[Step, ...]:
    """The steps this build runs, in order."""
    return tuple(step for step in STEPS if step.enabled(config))


def step(name: str) -> Step:
    return next(s for s in STEPS if s.name == name)
