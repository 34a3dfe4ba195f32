"""The plan step: which samples this build makes, minus those already accounted for, written
as shard manifests (the `plan.sample` every later step reads)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from datagen.build.settings import BuildConfig
from datagen.build.workdir import ShardWork
from datagen.data.dataset import RejectsWriter, list_shards, read_index, read_rejects
from datagen.data.styles import load_style_library
from datagen.stages.plan import Plan, plan_samples, shards_of


@dataclass
class PlanResult:
    shards: list[str]
    planned: int
    skipped_committed: int
    skipped_rejected: int
    plan_rejects: int


def plan_of(config: BuildConfig) -> Plan:
    """Every sample this build's settings make, and the sources it rejects."""
    return plan_samples(
        config.source,
        load_style_library(),
        style_ids=list(config.styles) or None,
        settings=config.clip_settings(),
        clips_per_video=config.clips_per_video,
        limit=config.limit,
        seed=config.seed,
    )


def plan_build(config: BuildConfig) -> PlanResult:
    """Plan the run, drop samples already committed or rejected, write shard manifests."""
    plan = plan_of(config)
    committed, rejected = accounted_for(config.dataset_dir)
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


def accounted_for(dataset_dir: Path) -> tuple[set[str], set[str]]:
    """The sample ids the dataset already holds: (committed, rejected)."""
    if not dataset_dir.exists():
        return set(), set()
    committed = (
        set(read_index(dataset_dir, columns=["sample_id"])["sample_id"].to_pylist())
        if list_shards(dataset_dir)
        else set()
    )
    rejected = set(read_rejects(dataset_dir)["sample_id"].to_pylist())
    return committed, rejected
