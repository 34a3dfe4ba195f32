"""The write step: a shard's rows assembled, the keep rule applied, rows and rejects
committed, then the shard's work files removed."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import pyarrow as pa

from datagen.build.plan import Accounted, accounted_for
from datagen.build.row import assemble_row
from datagen.build.settings import BuildConfig
from datagen.build.steps import steps_for
from datagen.build.workdir import ShardWork
from datagen.data.dataset import RejectsWriter, ShardLimits, ShardWriter
from datagen.data.keep import (
    DECISION_COLUMNS,
    KEPT,
    REASONS,
    FilterCriteria,
    decide,
    drop_details,
)
from datagen.data.schema import table_schema
from datagen.data.styles import load_style_library


@dataclass
class WriteReport:
    shard: str
    written: int = 0
    rejected: int = 0
    filtered: int = 0
    shards: list[str] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    reasons: dict[str, int] = field(default_factory=dict)


def keep_criteria(config: BuildConfig) -> FilterCriteria | None:
    """The build's automatic filter: CT keeps csd_score > csd_threshold (and a passing VLM
    verdict when required), the same rule as `datagen filter --csd` (data/keep.py); SFT keeps
    every candidate for human review."""
    if config.split != "ct":
        return None
    return FilterCriteria(csd=config.csd_threshold, vlm_pass=config.require_vlm_pass)


def run_write(
    work: ShardWork,
    config: BuildConfig,
    provenance: dict[str, dict],
    limits: ShardLimits | None = None,
    accounted: Accounted | None = None,
) -> WriteReport:
    """Assemble rows, apply the keep rule, commit the shard and its rejects, then remove the
    shard's work files. Samples already committed (a concurrent or earlier run) are skipped,
    never written twice: checked against `accounted`, the build's running account, or, without
    one, against the dataset read now."""
    if not work.exists():
        # An earlier attempt of this task committed the shard and removed its work files,
        # then failed (reporting to Prefect, say): its retry has nothing left to write.
        return WriteReport(work.shard)
    library = load_style_library()
    last = steps_for(config)[-1].name
    if accounted is None:
        committed, already_rejected = accounted_for(config.dataset_dir)
    else:
        committed, already_rejected = accounted.for_shard(work.shard)
    stage_rejects = work.rejects()
    samples = {s.sample_id: s for s in work.samples()}
    report = WriteReport(work.shard)
    candidates = []
    for sample in samples.values():
        if sample.sample_id in committed or sample.sample_id in already_rejected:
            continue
        if sample.sample_id in stage_rejects or not work.has(last, sample.sample_id):
            continue
        candidates.append(
            assemble_row(work, config, sample, library.get(sample.style_id), provenance)
        )
    report.scores = [row["csd_score"] for row in candidates if row["csd_score"] is not None]
    rows, filtered = _keep(candidates, keep_criteria(config))
    if rows:
        with ShardWriter(config.dataset_dir, config.split, limits=limits) as writer:
            writer.write(rows)
        report.shards = writer.committed_shards
        report.written = writer.rows_written
    reasons: Counter[str] = Counter()
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
        for row, reason, detail in filtered:
            rejects.add(
                row["sample_id"],
                row["source_uri"],
                "filter",
                reason,
                detail,
                clip_start=row["clip_start"],
                style_id=row["style_id"],
            )
            reasons[f"filter/{reason}"] += 1
            report.filtered += 1
    report.reasons = dict(reasons)
    if accounted is not None:
        accounted.add(
            committed=[row["sample_id"] for row in rows],
            rejected=[
                *(s for s in stage_rejects if s not in committed and s not in already_rejected),
                *(row["sample_id"] for row, _, _ in filtered),
            ],
            shard=work.shard,
        )
    work.remove()
    return report


def _keep(rows: list[dict], criteria: FilterCriteria | None) -> tuple[list, list]:
    """(kept rows, [(dropped row, reason, detail)]) by the keep rule."""
    if criteria is None or not rows:
        return rows, []
    schema = table_schema("ct_row")
    decisions = pa.table(
        {c: pa.array([row[c] for row in rows], schema.field(c).type) for c in DECISION_COLUMNS}
    )
    code = decide(decisions, criteria).code
    dropped = [i for i, c in enumerate(code) if c != KEPT]
    taken = decisions.take(pa.array(dropped, pa.int64()))
    details = drop_details(taken, code[dropped], criteria).to_pylist()
    kept = [row for row, c in zip(rows, code, strict=True) if c == KEPT]
    return kept, [
        (rows[i], REASONS[code[i]], detail) for i, detail in zip(dropped, details, strict=True)
    ]
