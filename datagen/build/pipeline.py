"""The build pipeline as plain functions, one per (shard, stage): what the Prefect tasks call.

    plan -> control -> describe -> stylize -> animate -> caption -> score [-> judge] -> write

Each stage function reads the shard's work directory (datagen/build/workdir.py), runs the
samples that are still pending through a stage runner (a local Stage, or a Ray actor pool with
the same `map` interface), and writes each sample's output or reject back. A sample rejected by
one stage is skipped by the later ones and lands in the dataset's rejects at the write step.
Rerunning any step skips what is already done; rerunning the whole build skips committed and
rejected samples.
"""

from __future__ import annotations

import importlib
import json
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from datagen import __version__
from datagen.build.settings import (  # noqa: F401  (BuildConfig and its error are the build's API)
    BuildConfig,
    BuildConfigError,
    vlm_server,
)
from datagen.build.workdir import ShardWork
from datagen.core.api_keys import resolve_api_key
from datagen.core.stage import Reject, Stage
from datagen.data.dataset import (
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
from datagen.data.styles import load_style_library
from datagen.data.video import ClipSpec, VideoError, encode_mp4, read_clip
from datagen.stages.plan import (
    ClipSettings,
    PlannedSample,
    plan_samples,
    ref_frame_indices,
    shards_of,
)

STAGES = ("control", "describe", "stylize", "animate", "caption", "score", "judge")


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


def stage_config(name: str, c: BuildConfig) -> Any:
    """The config of stage `name` for this build (each validates itself on construction,
    raising ValueError): the build's settings for that stage, the stage's defaults for the
    rest (see BuildConfig.stage_settings)."""
    tiny = c.tiny_dir
    settings = c.stage_settings(name)
    if name == "control":
        from datagen.stages.control import ControlConfig

        return ControlConfig(kind=c.control_kind, profile=c.profile, tiny_dir=tiny, **settings)
    if name == "stylize":
        from datagen.stages.stylize import StylizeConfig

        return StylizeConfig(
            backend=c.stylize_backend,
            profile=c.profile,
            tiny_dir=tiny,
            num_style_refs=c.k_refs,
            steps=c.default("stylize_steps"),
            resolution=c.default("stylize_resolution"),
            url=c.stylize_url,
            api_key_block=c.stylize_api_key_block,
            **settings,
        )
    if name == "animate":
        from datagen.stages.animate import AnimateConfig

        clip = c.clip_settings()
        return AnimateConfig(
            profile=c.profile,
            tiny_dir=tiny,
            num_frames=clip.num_frames,
            height=clip.height,
            width=clip.width,
            steps=c.default("animate_steps"),
            **settings,
        )
    if name in ("describe", "caption", "judge"):
        backend: dict[str, Any] = {
            "backend": c.caption_backend,
            "profile": c.profile,
            "tiny_dir": tiny,
            "max_pixels": c.default("vlm_max_pixels"),
            **settings,
        }
        if c.caption_backend == "openai":
            backend |= vlm_server(c) | {"api_key_block": c.vlm_api_key_block}
        if name == "describe":
            from datagen.stages.describe import DescribeConfig

            return DescribeConfig(
                **backend,
                max_new_tokens=c.default("describe_max_new_tokens"),
                accept_truncated=c.default("vlm_accept_truncated"),
            )
        if name == "caption":
            from datagen.stages.caption import CaptionConfig

            return CaptionConfig(
                **backend,
                max_new_tokens=c.default("caption_max_new_tokens"),
                accept_truncated=c.default("vlm_accept_truncated"),
            )
        from datagen.stages.judge import JudgeConfig

        return JudgeConfig(**backend)
    if name == "score":
        from datagen.stages.score import ScoreConfig

        return ScoreConfig(profile=c.profile, tiny_dir=tiny, **settings)
    raise KeyError(f"unknown stage {name!r}; known: {STAGES}")


def stage_config_problems(config: BuildConfig) -> list[str]:
    """Each stage's own complaint about the settings it takes (a bad scale, say)."""
    problems = []
    for name in stage_factories(config):
        try:
            stage_config(name, config)
        except ValueError as error:
            message = re.sub(r"^\w+Config: ", "", str(error))
            for setting, field in config.setting_names(name).items():  # the user's names
                message = re.sub(rf"\b{field}\b", setting, message)
            problems.append(f"{name}: {message}")
    return problems


# Where each stage's class lives (imported when a stage is built: its module pulls in torch).
STAGE_CLASSES = {
    "control": "datagen.stages.control:ControlStage",
    "describe": "datagen.stages.describe:DescribeStage",
    "stylize": "datagen.stages.stylize:StylizeStage",
    "animate": "datagen.stages.animate:AnimateStage",
    "caption": "datagen.stages.caption:CaptionStage",
    "score": "datagen.stages.score:ScoreStage",
    "judge": "datagen.stages.judge:JudgeStage",
}


@dataclass(frozen=True)
class _StageFactory:
    name: str
    config: BuildConfig

    def __call__(self) -> Stage:
        module, class_name = STAGE_CLASSES[self.name].split(":")
        stage_class = getattr(importlib.import_module(module), class_name)
        return stage_class(stage_config(self.name, self.config))


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
    """Decode each clip, make its control video; keep the first and reference frames and the
    depth maps the stylize step conditions them on (depth whatever the control kind)."""
    from datagen.stages.control import ControlInput

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
            yield ControlInput(sample.sample_id, clips[sample.sample_id], (0, *refs))

    def save(output) -> None:
        frames = clips.pop(output.sample_id)
        work.save(
            "control",
            output.sample_id,
            videos={"control": output.frames},
            images={
                "first": frames[0],
                "refs": [frames[i] for i in refs],
                "stylize_control": list(output.stylize_maps),
            },
            values={
                "sha256": output.sha256,
                "kind": output.kind,
                "stylize_control": output.stylize_control,
            },
        )

    return _run(work, "control", runner, _batched(inputs(), config.batch_size), save, report)


def run_describe(work: ShardWork, config: BuildConfig, runner: StageRunner) -> StageReport:
    """Say what each clip shows, content only, from its raw first and reference frames: the
    stylize and animate prompts start with it."""
    from datagen.stages.describe import DescribeInput

    pending = work.pending("describe")
    report = StageReport("describe", work.shard, skipped=len(work.samples()) - len(pending))
    clip = config.clip_settings()
    # first frame + K reference frames spread over the clip: K + 1 frames over its duration
    fps = clip.fps * (config.k_refs + 1) / clip.num_frames

    def inputs() -> Iterator[DescribeInput]:
        for sample in pending:
            frames = [work.image("control", sample.sample_id, "first")]
            frames += work.images("control", sample.sample_id, "refs")
            yield DescribeInput(sample.sample_id, np.stack(frames), fps)

    def save(output) -> None:
        work.save(
            "describe",
            output.sample_id,
            values={"content": output.content, "attempts": output.attempts},
        )

    return _run(work, "describe", runner, _batched(inputs(), config.batch_size), save, report)


def run_stylize(work: ShardWork, config: BuildConfig, runner: StageRunner) -> StageReport:
    """Stylize the first frame and the K reference frames under their depth maps (made by the
    control stage for these frames, whatever the control kind the pair is animated under)."""
    from datagen.stages.stylize import StylizeInput

    library = load_style_library()
    pending = work.pending("stylize")
    report = StageReport("stylize", work.shard, skipped=len(work.samples()) - len(pending))

    def inputs() -> Iterator[StylizeInput]:
        for sample in pending:
            frames = [work.image("control", sample.sample_id, "first")]
            frames += work.images("control", sample.sample_id, "refs")
            yield StylizeInput(
                sample.sample_id,
                frames,
                work.images("control", sample.sample_id, "stylize_control"),
                library.get(sample.style_id),
                sample.seed,
                content=work.values("describe", sample.sample_id)["content"],
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
    from datagen.stages.animate import AnimateInput

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
                prompt=animate_prompt(work.values("describe", sample.sample_id)["content"], config),
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
    from datagen.stages.caption import CaptionInput

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
    from datagen.stages.score import ScoreInput

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
    from datagen.stages.judge import JudgeInput

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


def animate_prompt(content: str, config: BuildConfig) -> str:
    """The prompt both members are animated with: what the clip shows, then the quality words
    (content only, so it fits the raw and the stylized member alike)."""
    from datagen.stages.describe import content_first

    return content_first(content, config.animate_prompt)


STAGE_FUNCTIONS = {
    "control": run_control,
    "describe": run_describe,
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
        "describe": work.values("describe", sid),
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
