"""What each step reads from a shard's work files to make its stage's input, and what it keeps
of the stage's output: one small function of each kind per step (datagen/build/steps.py).

A read function gets the sample's `WorkReads`, which hands out only what its step declares it
reads (anything else is a bug, raised at once), and returns the stage input, or a Reject when
the sample cannot be given to the stage. A save function gets the input and the stage's
output (and the context) and returns `Saved`, checked against what the step declares it writes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from datagen.build.settings import BuildConfig
from datagen.build.workdir import ShardWork
from datagen.core.stage import Reject
from datagen.data.styles import StyleLibrary, load_style_library
from datagen.data.video import ClipSpec, VideoError, read_clip
from datagen.stages.plan import PlannedSample, ref_frame_indices


class UndeclaredRead(RuntimeError):
    """A step read a work item its entry in build/steps.py does not declare."""


@dataclass
class StepContext:
    """What the read functions need besides the work files: the build and its style library."""

    config: BuildConfig

    @cached_property
    def library(self) -> StyleLibrary:
        return load_style_library()

    @cached_property
    def clip(self):
        return self.config.clip_settings()

    @cached_property
    def ref_indices(self) -> list[int]:
        return ref_frame_indices(self.clip.num_frames, self.config.k_refs)


class WorkReads:
    """One sample's reads of the work files, limited to the items `allowed` (`<step>.<item>`)."""

    def __init__(self, work: ShardWork, sample: PlannedSample, allowed: tuple[str, ...]):
        self.work, self._sample, self.allowed = work, sample, allowed
        self.sample_id = sample.sample_id
        self._values: dict[str, dict] = {}

    def _split(self, key: str) -> tuple[str, str]:
        if key not in self.allowed:
            raise UndeclaredRead(f"{key!r} is read but not declared (declared: {self.allowed})")
        step, item = key.split(".", 1)
        return step, item

    @property
    def sample(self) -> PlannedSample:
        self._split("plan.sample")
        return self._sample

    def video(self, key: str) -> np.ndarray:
        return self.work.video(*self._at(key))

    def image(self, key: str) -> np.ndarray:
        return self.work.image(*self._at(key))

    def images(self, key: str) -> list[np.ndarray]:
        return self.work.images(*self._at(key))

    def png_bytes(self, key: str) -> list[bytes]:
        return self.work.png_bytes(*self._at(key))

    def value(self, key: str):
        step, item = self._split(key)
        if step not in self._values:
            self._values[step] = self.work.values(step, self.sample_id)
        return self._values[step].get(item)

    def _at(self, key: str) -> tuple[str, str, str]:
        step, item = self._split(key)
        return step, self.sample_id, item


@dataclass
class Saved:
    """What a step keeps of one sample: videos, images (one or a list) and JSON values."""

    videos: dict[str, np.ndarray] = field(default_factory=dict)
    images: dict[str, np.ndarray | list[np.ndarray]] = field(default_factory=dict)
    values: dict = field(default_factory=dict)
    fps: float = 16.0

    def items(self) -> set[str]:
        return set(self.videos) | set(self.images) | set(self.values)


# --- control: decode the clip; keep its control video, the frames to stylize and their depth


def control_input(reads: WorkReads, context: StepContext):
    from datagen.stages.control import ControlInput

    sample = reads.sample
    spec = ClipSpec(sample.num_frames, sample.height, sample.width, sample.fps, sample.clip_start)
    try:
        frames = read_clip(sample.source_path, spec).frames
    except VideoError as error:
        return Reject(reads.sample_id, "decode", error.reason, error.detail)
    return ControlInput(reads.sample_id, frames, (0, *context.ref_indices))


def control_saved(given, output, context: StepContext) -> Saved:
    first, *refs = (given.frames[i] for i in given.stylize_frames)
    return Saved(
        videos={"control": output.frames},
        # depth maps of the stylize frames, whatever the control kind the pair is animated under
        images={"first": first, "refs": refs, "stylize_control": list(output.stylize_maps)},
        values={
            "sha256": output.sha256,
            "kind": output.kind,
            "stylize_control": output.stylize_control,
        },
    )


# --- describe: what the clip shows, content only (the stylize and animate prompts start with it)


def describe_input(reads: WorkReads, context: StepContext):
    from datagen.stages.describe import DescribeInput

    frames = [reads.image("control.first"), *reads.images("control.refs")]
    # the first frame and K reference frames spread over the clip: K + 1 frames over its length
    fps = context.clip.fps * (context.config.k_refs + 1) / context.clip.num_frames
    return DescribeInput(reads.sample_id, np.stack(frames), fps)


def describe_saved(given, output, context: StepContext) -> Saved:
    return Saved(values={"content": output.content, "attempts": output.attempts})


# --- stylize: the first frame and the K reference frames, under their depth maps


def stylize_input(reads: WorkReads, context: StepContext):
    from datagen.stages.stylize import StylizeInput

    return StylizeInput(
        reads.sample_id,
        [reads.image("control.first"), *reads.images("control.refs")],
        reads.images("control.stylize_control"),
        context.library.get(reads.sample.style_id),
        reads.sample.seed,
        content=reads.value("describe.content"),
    )


def stylize_saved(given, output, context: StepContext) -> Saved:
    return Saved(
        images={
            "stylized_first": output.stylized_first_frame,
            "style_refs": list(output.style_refs),
        },
        values={"prompt": output.prompt, "params": output.params},
    )


# --- animate: the raw and the stylized first frames together, under the same control video


def animate_input(reads: WorkReads, context: StepContext):
    from datagen.stages.animate import AnimateInput

    return AnimateInput(
        sample_id=reads.sample_id,
        raw_first_frame=reads.image("control.first"),
        stylized_first_frame=reads.image("stylize.stylized_first"),
        control_frames=reads.video("control.control"),
        control_sha256=reads.value("control.sha256"),
        prompt=animate_prompt(reads.value("describe.content"), context.config),
        seed=reads.sample.seed,
    )


def animate_prompt(content: str, config: BuildConfig) -> str:
    """The prompt both members are animated with: what the clip shows, then the quality words
    (content only, so it fits the raw and the stylized member alike)."""
    from datagen.stages.describe import content_first

    return content_first(content, config.animate_prompt)


def animate_saved(given, output, context: StepContext) -> Saved:
    return Saved(
        videos={"raw": output.raw_frames, "stylized": output.stylized_frames},
        values={"conditions": output.conditions},
        fps=context.clip.fps,
    )


# --- caption: the two captions of the pair (content only, and with the style)


def caption_input(reads: WorkReads, context: StepContext):
    from datagen.stages.caption import CaptionInput

    style = context.library.get(reads.sample.style_id)
    return CaptionInput(
        reads.sample_id,
        reads.video("animate.raw"),
        reads.video("animate.stylized"),
        style.name,
        style.prompt,
        fps=context.clip.fps,
    )


def caption_saved(given, output, context: StepContext) -> Saved:
    return Saved(
        values={
            "caption_ns": output.caption_ns,
            "caption_sty": output.caption_sty,
            "attempts": output.attempts,
        }
    )


# --- score: CSD style similarity to the references, DINOv2 structure similarity raw/stylized


def score_input(reads: WorkReads, context: StepContext):
    from datagen.stages.score import ScoreInput

    return ScoreInput(
        reads.sample_id,
        reads.video("animate.raw"),
        reads.video("animate.stylized"),
        reads.images("stylize.style_refs"),
    )


def score_saved(given, output, context: StepContext) -> Saved:
    return Saved(values={"csd_score": output.csd_score, "dino_score": output.dino_score})


# --- judge: the VLM's verdict on the pair (optional)


def judge_input(reads: WorkReads, context: StepContext):
    from datagen.stages.judge import JudgeInput

    return JudgeInput(
        reads.sample_id,
        reads.video("animate.raw"),
        reads.video("animate.stylized"),
        context.library.get(reads.sample.style_id).prompt,
        fps=context.clip.fps,
    )


def judge_saved(given, output, context: StepContext) -> Saved:
    return Saved(values={"verdict": output.verdict, "detail": output.detail})
