"""The plan step: which samples this build makes, minus those already accounted for, written
as shard manifests (the `plan.sample` every later step reads)."""

from __future__ import annotations

import threading
from collections.abc import Container
from dataclasses import dataclass
from pathlib import Path

from datagen.build.settings import BuildConfig
from datagen.build.workdir import ShardWork
from datagen.core.files import DigestCache
from datagen.data.dataset import RejectsWriter, list_shards, read_index, read_rejects
from datagen.data.styles import load_style_library
from datagen.stages.plan import Plan, plan_samples, shards_of

DIGESTS_FILE = "source-digests.jsonl"  # (path, size, mtime) -> SHA-256, for every build here


@dataclass
class PlanResult:
    shards: list[str]
    planned: int
    skipped_committed: int
    skipped_rejected: int
    plan_rejects: int
    to_build: int = 0  # the samples in the shards: what the steps have to do


def plan_of(config: BuildConfig, known: Container[str] = (), writable: bool = True) -> Plan:
    """Every sample this build's settings make, and the sources and clips it rejects (`known`:
    sample ids accounted for already, whose clips are not checked again). Source digests are
    remembered in the output's work folder (`writable`: this caller holds the dataset's
    lock and may add to them)."""
    return plan_samples(
        config.source,
        load_style_library(),
        style_ids=list(config.styles) or None,
        settings=config.clip_settings(),
        clips_per_video=config.clips_per_video,
        limit=config.limit,
        seed=config.seed,
        clean=config.clean_settings(),
        known=known,
        digest_of=DigestCache(Path(config.out) / "_work" / DIGESTS_FILE, writable=writable),
    )


def plan_build(config: BuildConfig, accounted: Accounted | None = None) -> PlanResult:
    """Plan the run, drop samples already committed or rejected, write shard manifests."""
    accounted = accounted or Accounted(config.dataset_dir)
    committed, rejected = accounted.committed, accounted.rejected
    known = _Either(committed, rejected)  # not `committed | rejected` per sample: a copy each
    plan = plan_of(config, known=known)
    todo = [s for s in plan.samples if s.sample_id not in known]
    new_rejects = [(uri, r) for uri, r in plan.rejects if r.sample_id not in known]
    if new_rejects:
        with RejectsWriter(config.dataset_dir) as writer:
            for uri, reject in new_rejects:
                writer.add(reject.sample_id, uri, reject.stage, reject.reason, reject.detail)
        accounted.add(rejected=[reject.sample_id for _, reject in new_rejects])
    shards = []
    for number, group in enumerate(shards_of(todo, config.shard_size)):
        name = f"shard-{number:05d}"
        ShardWork(config.work_root, name).write_manifest(group)
        shards.append(name)
    return PlanResult(
        shards=shards,
        # a clip rejected by its checks is a planned sample (a rerun plans it as one, and
        # finds it rejected: stages/plan.py `known`)
        planned=len(plan.samples) + plan.clips_rejected,
        skipped_committed=sum(s.sample_id in committed for s in plan.samples),
        skipped_rejected=sum(s.sample_id in rejected for s in plan.samples),
        plan_rejects=len(new_rejects),
        to_build=len(todo),
    )


@dataclass(frozen=True)
class _Either:
    """In either of two sets, without building their union."""

    first: set
    second: set

    def __contains__(self, item) -> bool:
        return item in self.first or item in self.second


class Accounted:
    """The sample ids a dataset holds, read once per build and kept up to date by the build's
    own writes.

    The build holds the dataset's lock, so no other writer adds ids meanwhile: each shard's
    write checks its samples here rather than reading every committed and rejected id again
    (which made a long build quadratic in its shards). The retry of a shard whose write
    stopped part-way checks against the dataset itself, once.
    """

    def __init__(self, dataset_dir: Path):
        self.dataset_dir = dataset_dir
        self.committed, self.rejected = accounted_for(dataset_dir)
        self._interrupted: set[str] = set()  # shards whose write began and did not finish
        self._lock = threading.Lock()  # write tasks of neighbouring shards run concurrently

    def for_shard(self, shard: str) -> tuple[set[str], set[str]]:
        """(committed, rejected) to check `shard`'s samples against, as its write begins."""
        with self._lock:
            interrupted = shard in self._interrupted
            self._interrupted.add(shard)
        if interrupted:  # some of its rows or rejects may be in the dataset already
            return accounted_for(self.dataset_dir)
        return self.committed, self.rejected

    def add(self, committed=(), rejected=(), shard: str | None = None) -> None:
        """Ids this build wrote; with `shard`, that shard's write is complete."""
        with self._lock:
            self.committed.update(committed)
            self.rejected.update(rejected)
            self._interrupted.discard(shard)


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
