"""Audit a build's output against its plan: nothing lost, nothing duplicated, nothing partial.

After a complete run (however many crashes and reruns it took), every planned sample must be
in exactly one committed shard or in the rejects; no shard may be unreadable or half written;
the index must match the shards. Used by the crash/resume harness and its tests.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import pyarrow.parquet as pq

from datagen.build.plan import plan_of
from datagen.build.settings import BuildConfig
from datagen.data.dataset import hidden_temporaries, list_shards, read_index, read_rejects


@dataclass
class AuditReport:
    planned: int = 0
    committed: int = 0
    rejected: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def audit_build(config: BuildConfig, complete: bool = True) -> AuditReport:
    """Check the dataset of `config` against its plan. With `complete=False` (after a crash,
    before the rerun) only consistency is checked, not that every sample is accounted for."""
    plan = plan_of(config, writable=False)  # audit may run beside a build: it only reads
    planned = {s.sample_id for s in plan.samples} | {r.sample_id for _, r in plan.rejects}
    report = AuditReport(planned=len(planned))
    directory = config.dataset_dir
    if not directory.exists():
        if complete and planned:
            report.problems.append(f"{directory} does not exist")
        return report

    shard_ids: list[str] = []
    for shard in list_shards(directory):
        try:
            table = pq.read_table(directory / shard, columns=["sample_id"])
        except Exception as error:  # any failure to read a visible shard is the problem
            report.problems.append(f"visible shard {shard} is unreadable: {error}")
            continue
        ids = table["sample_id"].to_pylist()
        shard_ids += ids
        entries = read_index(directory, restrict_to={shard}, rebuild_missing=False)
        indexed = [e["sample_id"] for e in sorted(entries.to_pylist(), key=lambda e: e["row"])]
        if indexed != ids:
            report.problems.append(f"index does not match {shard}")
    rejects = read_rejects(directory)["sample_id"].to_pylist()
    report.committed, report.rejected = len(shard_ids), len(set(rejects))

    duplicated = [i for i, n in Counter(shard_ids).items() if n > 1]
    if duplicated:
        report.problems.append(f"{len(duplicated)} sample(s) committed twice: {duplicated[:5]}")
    twice = [i for i, n in Counter(rejects).items() if n > 1]
    if twice:
        report.problems.append(f"{len(twice)} sample(s) rejected twice: {twice[:5]}")
    both = set(shard_ids) & set(rejects)
    if both:
        report.problems.append(
            f"{len(both)} sample(s) both committed and rejected: {sorted(both)[:5]}"
        )
    unknown = (set(shard_ids) | set(rejects)) - planned
    if unknown:
        report.problems.append(f"{len(unknown)} sample(s) that were never planned")
    if complete:
        missing = planned - set(shard_ids) - set(rejects)
        if missing:
            report.problems.append(f"{len(missing)} planned sample(s) lost: {sorted(missing)[:5]}")
        # a complete run sweeps what killed writers left (hidden, but disk space all the same)
        leftovers = hidden_temporaries(directory)
        if leftovers:
            report.problems.append(f"{len(leftovers)} leftover temporary file(s): {leftovers[:3]}")
    return report
