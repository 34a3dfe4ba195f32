"""One dataset row from a sample's work files, with its provenance: every model (id and
revision) and every setting that shaped it."""

from __future__ import annotations

import json
from dataclasses import asdict

import numpy as np

from datagen import __version__
from datagen.build.settings import BuildConfig
from datagen.build.step_io import WorkReads
from datagen.build.steps import FIRST, PLAN_WRITES, RAW, STYLIZED
from datagen.build.workdir import ShardWork
from datagen.core.runner import StageRunner
from datagen.data.dataset import now_utc
from datagen.data.schema import SFT_REVIEW_PENDING
from datagen.data.styles import Style
from datagen.data.video import encode_mp4
from datagen.stages.plan import PlannedSample, file_source_id

# What a row is made of, beyond what the judge step adds when it runs.
ROW_READS = (
    *PLAN_WRITES,
    FIRST,
    RAW,
    STYLIZED,
    "control.kind",
    "control.sha256",
    "describe.content",
    "describe.attempts",
    "stylize.stylized_first",
    "stylize.style_refs",
    "stylize.prompt",
    "stylize.params",
    "animate.conditions",
    "caption.caption_ns",
    "caption.caption_sty",
    "caption.attempts",
    "score.csd_score",
    "score.dino_score",
)
JUDGE_READS = ("judge.verdict", "judge.detail")


def row_reads(config: BuildConfig) -> tuple[str, ...]:
    return ROW_READS + (JUDGE_READS if config.vlm_judge else ())


def assemble_row(
    work: ShardWork,
    config: BuildConfig,
    sample: PlannedSample,
    style: Style,
    provenance: dict[str, dict],
) -> dict:
    reads = WorkReads(work, sample, row_reads(config))
    raw, stylized = reads.video(RAW), reads.video(STYLIZED)
    judged = config.vlm_judge
    params = {
        "clip": {"source_start": sample.clip_start, **asdict(config.clip_settings())},
        "control": {
            "kind": reads.value("control.kind"),
            **provenance.get("control", {}).get("params", {}),
        },
        "describe": {
            "content": reads.value("describe.content"),
            "attempts": reads.value("describe.attempts"),
        },
        "stylize": {
            "prompt": reads.value("stylize.prompt"),
            **(reads.value("stylize.params") or {}),
        },
        "animate": reads.value("animate.conditions"),
        "caption": {"attempts": reads.value("caption.attempts")},
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
        "sample_id": sample.sample_id,
        "split": config.split,
        "source_uri": sample.source_uri,
        # a shard planned before samples had ids (an interrupted older build): the file name
        "source_id": sample.source_id or file_source_id(sample.source_path),
        "licence": sample.licence,
        "clip_start": sample.clip_start,
        "num_frames": int(raw.shape[0]),
        "fps": float(sample.fps),
        "height": int(raw.shape[1]),
        "width": int(raw.shape[2]),
        "style_id": style.id,
        "style_prompt": style.prompt,
        "style_refs": reads.png_bytes("stylize.style_refs"),
        "raw_first_frame": reads.png_bytes(FIRST)[0],
        "stylized_first_frame": reads.png_bytes("stylize.stylized_first")[0],
        "raw_video": encode_mp4(raw, sample.fps, crf=config.crf),
        "stylized_video": encode_mp4(stylized, sample.fps, crf=config.crf),
        "control_kind": reads.value("control.kind"),
        "control_sha256": reads.value("control.sha256"),
        "caption_ns": reads.value("caption.caption_ns"),
        "caption_sty": reads.value("caption.caption_sty"),
        "csd_score": _finite(reads.value("score.csd_score")),
        "dino_score": _finite(reads.value("score.dino_score")),
        "vlm_verdict": reads.value("judge.verdict") if judged else None,
        "vlm_detail": reads.value("judge.detail") if judged else None,
        "seed": sample.seed,
        "models": [(key, {"id": ref["id"], "revision": ref["revision"]}) for key, ref in models],
        "params": json.dumps(params, sort_keys=True, default=str),
        "created_at": now_utc(),
        "datagen_version": __version__,
    }
    if config.split == "sft":
        row |= SFT_REVIEW_PENDING
    return row


def _finite(value: float | None) -> float | None:
    return None if value is None or not np.isfinite(value) else float(value)


def collect_provenance(runners: dict[str, StageRunner]) -> dict[str, dict]:
    """step -> {"models": {role: {"id", "revision"}}, "params": {...}} for every row."""
    provenance = {}
    for name, runner in runners.items():
        models = {
            role: {"id": ref.id, "revision": ref.revision} for role, ref in runner.models().items()
        }
        params = runner.params()
        provenance[name] = {"models": models, "params": json.loads(json.dumps(params, default=str))}
    return provenance
