"""The build pipeline as plain functions, one per (shard, stage): what the Prefect tasks call.

    plan -> control -> stylize -> animate -> caption -> score [-> judge] -> write

Each stage function reads the shard's work directory (datagen/workdir.py), runs the samples that
are still pending through a stage runner (a local Stage, or a Ray actor pool with the same
`map` interface), and writes each sample's output or reject back. A sample rejected by one stage
is skipped by the later ones and lands in the dataset's rejects at the write step. Rerunning any
step skips what is already done; rerunning the whole build skips committed and rejected samples.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from datagen import __version__
from datagen.api_keys import check_key_source, resolve_api_key
from datagen.plan import ClipSettings, PlannedSample, plan_samples, ref_frame_indices, shards_of
from datagen.stage import Reject, Stage
from datagen.store import (
    Dataset,
    DatasetError,
    RejectsWriter,
    ShardLimits,
    ShardWriter,
    list_shards,
    now_utc,
    read_index,
    read_rejects,
)
from datagen.styles import load_style_library
from datagen.video import ClipSpec, VideoError, encode_mp4, read_clip
from datagen.workdir import ShardWork

STAGES = ("control", "stylize", "animate", "caption", "score", "judge")
CAPTION_BACKENDS = ("transformers", "openai")  # datagen/vlm.py
STYLIZE_BACKENDS = ("sdxl", "http")  # datagen/stylize.py
DEFAULT_ANIMATE_PROMPT = (
    "a high quality video with smooth, natural motion, consistent subjects and stable details"
)
# What the embedded `tiny` profile runs at: random-weight twins, seconds per sample on a CPU.
PROFILE_DEFAULTS = {
    "tiny": {
        "num_frames": 9,
        "height": 64,
        "width": 64,
        "fps": 8.0,
        "stylize_steps": 2,
        "animate_steps": 2,
        "stylize_resolution": 64,
        "caption_max_new_tokens": 24,
        # the VLM sees the 64x64 frames at most doubled, not upscaled to production's size
        "vlm_max_pixels": 112 * 112,
    },
    "production": {
        "num_frames": 81,
        "height": 480,
        "width": 832,
        "fps": 16.0,
        "stylize_steps": 30,
        "animate_steps": 50,
        "stylize_resolution": 1024,
        "caption_max_new_tokens": 160,
        "vlm_max_pixels": 448 * 448,
    },
}


class BuildConfigError(ValueError):
    """Bad build parameters: raised before any work starts."""


@dataclass(frozen=True)
class BuildConfig:
    """Every parameter of a build run, validated up front."""

    source: str
    out: str
    split: str = "ct"
    styles: tuple[str, ...] = ()
    limit: int | None = None
    clips_per_video: int = 1
    shard_size: int = 8
    profile: str = "tiny"
    tiny_dir: str | None = None
    seed: int = 0
    k_refs: int = 3
    control_kind: str = "depth"
    csd_threshold: float = 0.5
    vlm_judge: bool = False
    require_vlm_pass: bool = False
    num_frames: int | None = None
    height: int | None = None
    width: int | None = None
    fps: float | None = None
    stylize_steps: int | None = None
    animate_steps: int | None = None
    batch_size: int = 2
    crf: int = 18
    animate_prompt: str = DEFAULT_ANIMATE_PROMPT
    caption_backend: str = "transformers"
    caption_base_url: str | None = None
    caption_model: str | None = None
    stylize_backend: str = "sdxl"
    stylize_url: str | None = None
    # Prefect Secret blocks holding API keys, by NAME (never the key): the VLM server's for
    # caption and judge (caption_backend "openai"), the image-edit service's (stylize_backend
    # "http"). The stage that sends the requests reads its block when it loads.
    vlm_api_key_block: str | None = None
    stylize_api_key_block: str | None = None
    stage_timeout_s: float = 3600.0  # a stage call slower than this is hung: its samples reject
    shards_in_flight: int = 2  # shards between plan and write at once (bounds memory)

    def __post_init__(self) -> None:
        problems = []
        if self.split not in ("ct", "sft"):
            problems.append(f"split must be 'ct' or 'sft', got {self.split!r}")
        if self.profile not in PROFILE_DEFAULTS:
            problems.append(
                f"profile must be one of {sorted(PROFILE_DEFAULTS)}, got {self.profile!r}"
            )
        if not Path(self.source).exists():
            problems.append(f"source {self.source} does not exist")
        if self.limit is not None and self.limit < 0:
            problems.append(f"limit must be >= 0, got {self.limit}")
        for name in ("clips_per_video", "shard_size", "batch_size", "shards_in_flight"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 1 <= self.k_refs <= 16:  # a pair carries K >= 1 style references
            problems.append(f"k_refs must be in [1, 16], got {self.k_refs}")
        if not -1.0 <= self.csd_threshold <= 1.0:
            problems.append(f"csd_threshold must be in [-1, 1], got {self.csd_threshold}")
        if self.require_vlm_pass and not self.vlm_judge:
            problems.append("require_vlm_pass needs vlm_judge")
        if not self.stage_timeout_s > 0:
            problems.append(f"stage_timeout_s must be > 0, got {self.stage_timeout_s}")
        if not 0 <= self.crf <= 51:
            problems.append(f"crf must be in [0, 51], got {self.crf}")
        problems += self._backend_problems()
        if self.profile in PROFILE_DEFAULTS:
            settings = self.clip_settings()
            if (settings.num_frames - 1) % 4:
                problems.append(
                    f"num_frames must be 4k+1 for the animate model, got {settings.num_frames}"
                )
            if settings.height % 16 or settings.width % 16:
                problems.append("height and width must be multiples of 16")
        try:
            load_style_library().select(list(self.styles))
        except ValueError as error:
            problems.append(str(error))
        problems += _check_writable(Path(self.out))
        if problems:
            raise BuildConfigError("invalid build parameters: " + "; ".join(problems))

    def _backend_problems(self) -> list[str]:
        """The caption and stylize backends with their URLs and key blocks. A setting for a
        backend this build does not use is refused rather than silently ignored."""
        problems = []
        for field_name in ("vlm_api_key_block", "stylize_api_key_block"):
            try:  # its messages never echo the value: a key pasted here stays out of logs
                check_key_source(None, getattr(self, field_name), block_field=field_name)
            except ValueError as error:
                problems.append(str(error))
        if self.caption_backend not in CAPTION_BACKENDS:
            problems.append(
                f"caption_backend must be one of {CAPTION_BACKENDS}, got {self.caption_backend!r}"
            )
        elif self.caption_backend == "openai":
            from datagen.vlm import VLMConfig

            try:  # the stage's own checks of the server URL and model name
                VLMConfig(**_vlm_server(self), api_key_env=None)
            except ValueError as error:
                problems.append(f"caption: {error}")
        else:
            problems += _unused(
                self,
                "caption_backend",
                "'openai' (a VLM server)",
                ("caption_base_url", "caption_model", "vlm_api_key_block"),
            )
        if self.stylize_backend not in STYLIZE_BACKENDS:
            problems.append(
                f"stylize_backend must be one of {STYLIZE_BACKENDS}, got {self.stylize_backend!r}"
            )
        elif self.stylize_backend == "http":
            from datagen.stylize import StylizeConfig

            if self.stylize_url is None:
                problems.append("stylize_backend 'http' needs stylize_url (the image-edit API)")
            else:
                try:  # the stage's own checks of the URL
                    StylizeConfig(backend="http", url=self.stylize_url, api_key_env=None)
                except ValueError as error:
                    problems.append(f"stylize_url: {error}".replace("StylizeConfig: ", ""))
        else:
            problems += _unused(
                self,
                "stylize_backend",
                "'http' (an image-edit API)",
                ("stylize_url", "stylize_api_key_block"),
            )
        return problems

    def key_blocks(self) -> dict[str, str]:
        """stage -> the Prefect Secret block it reads its API key from, for this run's stages
        that read one."""
        blocks = {}
        if self.vlm_api_key_block is not None:
            blocks["caption"] = self.vlm_api_key_block
            if self.vlm_judge:
                blocks["judge"] = self.vlm_api_key_block
        if self.stylize_api_key_block is not None:
            blocks["stylize"] = self.stylize_api_key_block
        return blocks

    def default(self, name: str) -> Any:
        value = getattr(self, name)
        return PROFILE_DEFAULTS[self.profile][name] if value is None else value

    def clip_settings(self) -> ClipSettings:
        return ClipSettings(
            self.default("num_frames"),
            self.default("height"),
            self.default("width"),
            float(self.default("fps")),
        )

    @property
    def dataset_dir(self) -> Path:
        return Path(self.out) / self.split

    @property
    def work_root(self) -> Path:
        """Work files of this exact build (same parameters -> same folder -> resume).

        Fields that cannot change the output (WORK_KEY_EXCLUDED) stay out of the key, so a
        build resumes whichever block holds its key, and work folders of builds interrupted
        before those fields existed keep their names.
        """
        fields = {k: v for k, v in asdict(self).items() if k not in WORK_KEY_EXCLUDED}
        key = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()
        return Path(self.out) / "_work" / f"{self.split}-{key[:12]}"


# BuildConfig fields that do not change a build's output, left out of its work_root key.
# (stage_timeout_s and shards_in_flight do not either, but they were in the key before this
# set existed; leaving them out now would orphan the work of interrupted builds.)
WORK_KEY_EXCLUDED = frozenset({"vlm_api_key_block", "stylize_api_key_block"})


def _unused(config: BuildConfig, backend: str, used_with: str, names: tuple[str, ...]) -> list:
    """A problem per setting in `names` that is set although `backend` is not `used_with`."""
    return [
        f"{name} is only used with {backend} {used_with}, and {backend} is "
        f"{getattr(config, backend)!r}"
        for name in names
        if getattr(config, name) is not None
    ]


def _vlm_server(config: BuildConfig) -> dict[str, Any]:
    """The openai-backend settings of caption and judge (VLMConfig's defaults where unset)."""
    server: dict[str, Any] = {"backend": "openai"}
    if config.caption_base_url is not None:
        server["base_url"] = config.caption_base_url
    if config.caption_model is not None:
        server["model"] = config.caption_model
    return server


def check_key_blocks(config: BuildConfig) -> None:
    """Read each Prefect Secret block the build names, once, in this process, and drop the
    value: a missing or unreadable block fails the build before any work (with
    ApiKeyUnavailableError naming the block and the Prefect API asked), not in a stage actor
    after the plan. The stages read their keys again where they send the requests."""
    needs: dict[str, list[str]] = {}
    for stage, block in config.key_blocks().items():
        needs.setdefault(block, []).append(stage)
    for block, stages in needs.items():
        resolve_api_key(None, block, " and ".join(stages))


def _check_writable(out: Path) -> list[str]:
    existing = out
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        return [f"out {out}: {existing} is not a directory"]
    if not os.access(existing, os.W_OK | os.X_OK):
        return [f"out {out}: {existing} is not writable"]
    return []


# --- stage runners -------------------------------------------------------------------------


class StageRunner(Protocol):
    def map(self, batches: Iterable[list]) -> Iterator[list]: ...
    def models(self) -> dict: ...
    def params(self) -> dict: ...


class LocalRunner:
    """Runs a stage in this process (no Ray): the same `map` interface as a StagePool."""

    def __init__(self, stage: Stage):
        self.stage = stage
        stage.setup()

    def map(self, batches: Iterable[list]) -> Iterator[list]:
        for batch in batches:
            yield self.stage(batch)

    def models(self) -> dict:
        return self.stage.models()

    def params(self) -> dict:
        return self.stage.params()

    def stats(self) -> list:
        return [self.stage.stats]

    def shutdown(self) -> None:
        self.stage.teardown()


def stage_factories(config: BuildConfig) -> dict[str, Callable[[], Stage]]:
    """How to build each stage of this run (picklable: Ray actors call them)."""
    return {
        name: _StageFactory(name, config) for name in STAGES if name != "judge" or config.vlm_judge
    }


@dataclass(frozen=True)
class _StageFactory:
    name: str
    config: BuildConfig

    def __call__(self) -> Stage:
        c = self.config
        tiny = c.tiny_dir
        if self.name == "control":
            from datagen.control import ControlConfig, ControlStage

            return ControlStage(
                ControlConfig(kind=c.control_kind, profile=c.profile, tiny_dir=tiny)
            )
        if self.name == "stylize":
            from datagen.stylize import StylizeConfig, StylizeStage

            return StylizeStage(
                StylizeConfig(
                    backend=c.stylize_backend,
                    profile=c.profile,
                    tiny_dir=tiny,
                    num_style_refs=c.k_refs,
                    steps=c.default("stylize_steps"),
                    resolution=PROFILE_DEFAULTS[c.profile]["stylize_resolution"],
                    url=c.stylize_url,
                    api_key_block=c.stylize_api_key_block,
                )
            )
        if self.name == "animate":
            from datagen.animate import AnimateConfig, AnimateStage

            settings = c.clip_settings()
            return AnimateStage(
                AnimateConfig(
                    profile=c.profile,
                    tiny_dir=tiny,
                    num_frames=settings.num_frames,
                    height=settings.height,
                    width=settings.width,
                    steps=c.default("animate_steps"),
                )
            )
        if self.name in ("caption", "judge"):
            backend: dict[str, Any] = {
                "backend": c.caption_backend,
                "profile": c.profile,
                "tiny_dir": tiny,
                "max_pixels": PROFILE_DEFAULTS[c.profile]["vlm_max_pixels"],
            }
            if c.caption_backend == "openai":
                backend |= _vlm_server(c) | {"api_key_block": c.vlm_api_key_block}
            if self.name == "caption":
                from datagen.caption import CaptionConfig, CaptionStage

                return CaptionStage(
                    CaptionConfig(
                        **backend,
                        max_new_tokens=PROFILE_DEFAULTS[c.profile]["caption_max_new_tokens"],
                        # random-weight twins never end a sentence (see CaptionConfig)
                        accept_truncated=c.profile == "tiny",
                    )
                )
            from datagen.judge import JudgeConfig, JudgeStage

            return JudgeStage(JudgeConfig(**backend))
        from datagen.score import ScoreConfig, ScoreStage

        return ScoreStage(ScoreConfig(profile=c.profile, tiny_dir=tiny))


# --- plan ----------------------------------------------------------------------------------


@dataclass
class PlanResult:
    shards: list[str]
    planned: int
    skipped_committed: int
    skipped_rejected: int
    plan_rejects: int


def plan_build(config: BuildConfig) -> PlanResult:
    """Plan the run, drop samples already committed or rejected, write shard manifests."""
    library = load_style_library()
    plan = plan_samples(
        config.source,
        library,
        style_ids=list(config.styles) or None,
        settings=config.clip_settings(),
        clips_per_video=config.clips_per_video,
        limit=config.limit,
        seed=config.seed,
    )
    committed, rejected = _accounted_for(config.dataset_dir)
    todo = [s for s in plan.samples if s.sample_id not in committed | rejected]
    new_rejects = [(uri, r) for uri, r in plan.rejects if r.sample_id not in rejected]
    if new_rejects:
        with RejectsWriter(config.dataset_dir) as writer:
            for uri, reject in new_rejects:
                writer.add(reject.sample_id, uri, reject.stage, reject.reason, reject.detail)
    shards = []
    for number, group in enumerate(shards_of(todo, config.shard_size)):
        name = f"shard-{number:05d}"
        ShardWork(config.work_root, name).write_manifest(group)
        shards.append(name)
    return PlanResult(
        shards=shards,
        planned=len(plan.samples),
        skipped_committed=sum(s.sample_id in committed for s in plan.samples),
        skipped_rejected=sum(s.sample_id in rejected for s in plan.samples),
        plan_rejects=len(new_rejects),
    )


def _accounted_for(dataset_dir: Path) -> tuple[set[str], set[str]]:
    if not dataset_dir.exists():
        return set(), set()
    committed = (
        set(read_index(dataset_dir, columns=["sample_id"])["sample_id"].to_pylist())
        if list_shards(dataset_dir)
        else set()
    )
    rejected = set(read_rejects(dataset_dir)["sample_id"].to_pylist())
    return committed, rejected


# --- stages --------------------------------------------------------------------------------


@dataclass
class StageReport:
    stage: str
    shard: str
    done: int = 0
    rejected: int = 0
    skipped: int = 0
    reasons: dict[str, int] = field(default_factory=dict)


def _batched(items: Iterable, size: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _run(
    work: ShardWork,
    stage: str,
    runner: StageRunner,
    batches: Iterable[list],
    save: Callable[[Any], None],
    report: StageReport,
) -> StageReport:
    reasons: Counter[str] = Counter()
    for results in runner.map(batches):
        for result in results:
            if isinstance(result, Reject):
                work.add_reject(result)
                reasons[result.reason] += 1
                report.rejected += 1
            else:
                save(result)
                report.done += 1
    report.reasons = dict(reasons)
    return report


def run_control(work: ShardWork, config: BuildConfig, runner: StageRunner) -> StageReport:
    """Decode each clip, make its control video; keep the first and reference frames."""
    from datagen.control import ControlInput

    pending = work.pending("control")
    report = StageReport("control", work.shard, skipped=len(work.samples()) - len(pending))
    clips: dict[str, np.ndarray] = {}
    refs = ref_frame_indices(config.clip_settings().num_frames, config.k_refs)

    def inputs() -> Iterator[ControlInput]:
        for sample in pending:
            spec = ClipSpec(
                sample.num_frames, sample.height, sample.width, sample.fps, sample.clip_start
            )
            try:
                clips[sample.sample_id] = read_clip(sample.source_path, spec).frames
            except VideoError as error:
                work.add_reject(Reject(sample.sample_id, "decode", error.reason, error.detail))
                report.rejected += 1
                continue
            yield ControlInput(sample.sample_id, clips[sample.sample_id])

    def save(output) -> None:
        frames = clips.pop(output.sample_id)
        work.save(
            "control",
            output.sample_id,
            videos={"control": output.frames},
            images={"first": frames[0], "refs": [frames[i] for i in refs]},
            values={"sha256": output.sha256, "kind": output.kind},
        )

    return _run(work, "control", runner, _batched(inputs(), config.batch_size), save, report)


def run_stylize(work: ShardWork, config: BuildConfig, runner: StageRunner) -> StageReport:
    """Stylize the first frame and the K reference frames under their depth maps."""
    from datagen.stylize import StylizeInput

    library = load_style_library()
    refs = ref_frame_indices(config.clip_settings().num_frames, config.k_refs)
    pending = work.pending("stylize")
    report = StageReport("stylize", work.shard, skipped=len(work.samples()) - len(pending))

    def inputs() -> Iterator[StylizeInput]:
        for sample in pending:
            control = work.video("control", sample.sample_id, "control")
            frames = [work.image("control", sample.sample_id, "first")]
            frames += work.images("control", sample.sample_id, "refs")
            yield StylizeInput(
                sample.sample_id,
                frames,
                [control[0]] + [control[i] for i in refs],
                library.get(sample.style_id),
                sample.seed,
            )

    def save(output) -> None:
        work.save(
            "stylize",
            output.sample_id,
            images={
                "stylized_first": output.stylized_first_frame,
                "style_refs": list(output.style_refs),
            },
            values={"prompt": output.prompt, "params": output.params},
        )

    return _run(work, "stylize", runner, _batched(inputs(), config.batch_size), save, report)


def run_animate(work: ShardWork, config: BuildConfig, runner: StageRunner) -> StageReport:
    """Animate the raw and the stylized first frames together under the same control video."""
    from datagen.animate import AnimateInput

    pending = work.pending("animate")
    report = StageReport("animate", work.shard, skipped=len(work.samples()) - len(pending))
    fps = config.clip_settings().fps

    def inputs() -> Iterator[AnimateInput]:
        for sample in pending:
            yield AnimateInput(
                sample_id=sample.sample_id,
                raw_first_frame=work.image("control", sample.sample_id, "first"),
                stylized_first_frame=work.image("stylize", sample.sample_id, "stylized_first"),
                control_frames=work.video("control", sample.sample_id, "control"),
                control_sha256=work.values("control", sample.sample_id)["sha256"],
                prompt=config.animate_prompt,
                seed=sample.seed,
            )

    def save(output) -> None:
        work.save(
            "animate",
            output.sample_id,
            videos={"raw": output.raw_frames, "stylized": output.stylized_frames},
            values={"conditions": output.conditions},
            fps=fps,
        )

    # one pair per call keeps peak memory at one pair; the pair itself is one batched call
    return _run(work, "animate", runner, _batched(inputs(), 1), save, report)


def run_caption(work: ShardWork, config: BuildConfig, runner: StageRunner) -> StageReport:
    from datagen.caption import CaptionInput

    library = load_style_library()
    pending = work.pending("caption")
    report = StageReport("caption", work.shard, skipped=len(work.samples()) - len(pending))
    fps = config.clip_settings().fps

    def inputs() -> Iterator[CaptionInput]:
        for sample in pending:
            style = library.get(sample.style_id)
            yield CaptionInput(
                sample.sample_id,
                work.video("animate", sample.sample_id, "raw"),
                work.video("animate", sample.sample_id, "stylized"),
                style.name,
                style.prompt,
                fps=fps,
            )

    def save(output) -> None:
        work.save(
            "caption",
            output.sample_id,
            values={
                "caption_ns": output.caption_ns,
                "caption_sty": output.caption_sty,
                "attempts": output.attempts,
            },
        )

    return _run(work, "caption", runner, _batched(inputs(), config.batch_size), save, report)


def run_score(work: ShardWork, config: BuildConfig, runner: StageRunner) -> StageReport:
    from datagen.score import ScoreInput

    pending = work.pending("score")
    report = StageReport("score", work.shard, skipped=len(work.samples()) - len(pending))

    def inputs() -> Iterator[ScoreInput]:
        for sample in pending:
            yield ScoreInput(
                sample.sample_id,
                work.video("animate", sample.sample_id, "raw"),
                work.video("animate", sample.sample_id, "stylized"),
                work.images("stylize", sample.sample_id, "style_refs"),
            )

    def save(output) -> None:
        work.save(
            "score",
            output.sample_id,
            values={"csd_score": output.csd_score, "dino_score": output.dino_score},
        )

    return _run(work, "score", runner, _batched(inputs(), config.batch_size), save, report)


def run_judge(work: ShardWork, config: BuildConfig, runner: StageRunner) -> StageReport:
    from datagen.judge import JudgeInput

    library = load_style_library()
    pending = work.pending("judge")
    report = StageReport("judge", work.shard, skipped=len(work.samples()) - len(pending))
    fps = config.clip_settings().fps

    def inputs() -> Iterator[JudgeInput]:
        for sample in pending:
            yield JudgeInput(
                sample.sample_id,
                work.video("animate", sample.sample_id, "raw"),
                work.video("animate", sample.sample_id, "stylized"),
                library.get(sample.style_id).prompt,
                fps=fps,
            )

    def save(output) -> None:
        work.save(
            "judge", output.sample_id, values={"verdict": output.verdict, "detail": output.detail}
        )

    return _run(work, "judge", runner, _batched(inputs(), config.batch_size), save, report)


STAGE_FUNCTIONS = {
    "control": run_control,
    "stylize": run_stylize,
    "animate": run_animate,
    "caption": run_caption,
    "score": run_score,
    "judge": run_judge,
}


# --- write ---------------------------------------------------------------------------------


@dataclass
class WriteReport:
    shard: str
    written: int = 0
    rejected: int = 0
    filtered: int = 0
    shards: list[str] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    reasons: dict[str, int] = field(default_factory=dict)


def run_write(
    work: ShardWork,
    config: BuildConfig,
    provenance: dict[str, dict],
    limits: ShardLimits | None = None,
) -> WriteReport:
    """Assemble rows, apply the CT auto-filter, commit the shard and its rejects, then remove
    the shard's work files. Samples already committed (a concurrent or earlier run) are
    skipped, never written twice."""
    if not work.exists():
        # An earlier attempt of this task committed the shard and removed its work files,
        # then failed (reporting to Prefect, say): its retry has nothing left to write.
        return WriteReport(work.shard)
    library = load_style_library()
    settings = config.clip_settings()
    last = "judge" if config.vlm_judge else "score"
    committed, already_rejected = _accounted_for(config.dataset_dir)
    stage_rejects = work.rejects()
    report = WriteReport(work.shard)
    rows, filtered = [], []
    for sample in work.samples():
        if sample.sample_id in committed or sample.sample_id in already_rejected:
            continue
        if sample.sample_id in stage_rejects or not work.has(last, sample.sample_id):
            continue
        row = _assemble_row(
            work, config, sample, library.get(sample.style_id), settings, provenance
        )
        verdict = _auto_filter(row, config)
        if verdict is None:
            rows.append(row)
        else:
            filtered.append((sample, verdict))
        if row["csd_score"] is not None:
            report.scores.append(row["csd_score"])
    reasons: Counter[str] = Counter()
    if rows:
        with ShardWriter(config.dataset_dir, config.split, limits=limits) as writer:
            writer.write(rows)
        report.shards = writer.committed_shards
        report.written = writer.rows_written
    samples = {s.sample_id: s for s in work.samples()}
    with RejectsWriter(config.dataset_dir) as rejects:
        for sample_id, reject in stage_rejects.items():
            if sample_id in committed or sample_id in already_rejected:
                continue
            sample = samples[sample_id]
            rejects.add(
                sample_id,
                sample.source_uri,
                reject.stage,
                reject.reason,
                reject.detail,
                clip_start=sample.clip_start,
                style_id=sample.style_id,
            )
            reasons[f"{reject.stage}/{reject.reason}"] += 1
            report.rejected += 1
        for sample, (reason, detail) in filtered:
            rejects.add(
                sample.sample_id,
                sample.source_uri,
                "filter",
                reason,
                detail,
                clip_start=sample.clip_start,
                style_id=sample.style_id,
            )
            reasons[f"filter/{reason}"] += 1
            report.filtered += 1
    report.reasons = dict(reasons)
    work.remove()
    return report


def _auto_filter(row: dict, config: BuildConfig) -> tuple[str, str] | None:
    """CT keeps csd_score > threshold (and a passing VLM verdict when required); SFT keeps
    every candidate for human review."""
    if config.split != "ct":
        return None
    score = row["csd_score"]
    if score is None or not np.isfinite(score):
        return "csd_missing", "csd_score is null"
    if not score > config.csd_threshold:
        return "csd_below_threshold", f"csd_score={score:.4f} <= {config.csd_threshold:g}"
    if config.require_vlm_pass and row["vlm_verdict"] != "pass":
        return "vlm_fail", f"vlm_verdict={row['vlm_verdict']!r}"
    return None


def _assemble_row(
    work: ShardWork,
    config: BuildConfig,
    sample: PlannedSample,
    style,
    settings: ClipSettings,
    provenance: dict[str, dict],
) -> dict:
    sid = sample.sample_id
    raw = work.video("animate", sid, "raw")
    stylized = work.video("animate", sid, "stylized")
    stylize_values = work.values("stylize", sid)
    caption = work.values("caption", sid)
    scores = work.values("score", sid)
    judge = work.values("judge", sid) if config.vlm_judge else {}
    control = work.values("control", sid)
    params = {
        "clip": {"source_start": sample.clip_start, **asdict(settings)},
        "control": {"kind": control["kind"], **provenance.get("control", {}).get("params", {})},
        "stylize": {"prompt": stylize_values["prompt"], **stylize_values.get("params", {})},
        "animate": work.values("animate", sid)["conditions"],
        "caption": {"attempts": caption["attempts"]},
        "build": {
            "profile": config.profile,
            "seed": config.seed,
            "k_refs": config.k_refs,
            "csd_threshold": config.csd_threshold,
            "crf": config.crf,
            "animate_prompt": config.animate_prompt,
        },
    }
    models = [
        (f"{stage}.{role}", ref)
        for stage, entry in provenance.items()
        for role, ref in entry.get("models", {}).items()
    ]
    row = {
        "sample_id": sid,
        "split": config.split,
        "source_uri": sample.source_uri,
        "clip_start": sample.clip_start,
        "num_frames": int(raw.shape[0]),
        "fps": float(sample.fps),
        "height": int(raw.shape[1]),
        "width": int(raw.shape[2]),
        "style_id": style.id,
        "style_prompt": style.prompt,
        "style_refs": work.png_bytes("stylize", sid, "style_refs"),
        "raw_first_frame": work.png_bytes("control", sid, "first")[0],
        "stylized_first_frame": work.png_bytes("stylize", sid, "stylized_first")[0],
        "raw_video": encode_mp4(raw, sample.fps, crf=config.crf),
        "stylized_video": encode_mp4(stylized, sample.fps, crf=config.crf),
        "control_kind": control["kind"],
        "control_sha256": control["sha256"],
        "caption_ns": caption["caption_ns"],
        "caption_sty": caption["caption_sty"],
        "csd_score": _finite(scores.get("csd_score")),
        "dino_score": _finite(scores.get("dino_score")),
        "vlm_verdict": judge.get("verdict"),
        "vlm_detail": judge.get("detail"),
        "seed": sample.seed,
        "models": [(key, {"id": ref["id"], "revision": ref["revision"]}) for key, ref in models],
        "params": json.dumps(params, sort_keys=True, default=str),
        "created_at": now_utc(),
        "datagen_version": __version__,
    }
    if config.split == "sft":
        row |= {
            "review_status": "pending",
            "review_reason": None,
            "review_note": None,
            "reviewer": None,
            "reviewed_at": None,
        }
    return row


def _finite(value: float | None) -> float | None:
    return None if value is None or not np.isfinite(value) else float(value)


def collect_provenance(runners: dict[str, StageRunner]) -> dict[str, dict]:
    """stage -> {"models": {role: {"id", "revision"}}, "params": {...}} for every row."""
    provenance = {}
    for name, runner in runners.items():
        models = {
            role: {"id": ref.id, "revision": ref.revision} for role, ref in runner.models().items()
        }
        params = runner.params()
        provenance[name] = {"models": models, "params": json.loads(json.dumps(params, default=str))}
    return provenance


def dataset_after(config: BuildConfig) -> Dataset | None:
    try:
        return Dataset(config.dataset_dir)
    except DatasetError:
        return None
