"""`datagen review finalize`: the accepted candidates as a new SFT dataset, the rejected ones
as rejects (stage "review"); OUT appears complete or not at all."""

import os
import shutil
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from datagen.data.dataset import RejectsWriter, ShardLimits, ShardWriter
from datagen.review.journal import PENDING, DecisionJournal, ReviewError, journal_path
from datagen.review.session import open_sft_dataset, sorted_index


@dataclass
class FinalizeResult:
    total: int = 0
    accepted: int = 0
    rejected: int = 0
    pending: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    carried_rejects: int = 0  # the build's own rejects, copied from SFT_DIR as `filter` does
    unknown_decisions: int = 0  # journal entries for sample_ids the dataset does not hold
    out: str | None = None
    shards: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def check_out_dir(sft_dir: Path, out_dir: Path, overwrite: bool) -> None:
    """The refusals of `datagen filter`, for finalize's OUT."""
    from datagen.data.dataset import check_output_dir

    check_output_dir(sft_dir, out_dir, overwrite, "SFT_DIR", ReviewError)


def finalize_review(
    sft_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
    limits: ShardLimits | None = None,
    on_rows: Callable[[int], None] | None = None,
) -> FinalizeResult:
    """Write the accepted candidates of `sft_dir` to `out_dir` as an SFT dataset (review
    fields filled from the journal) and the rejected ones as rejects (stage "review"). Samples
    still pending are left out and counted. SFT_DIR is only read."""
    from datagen.data.dataset import move_into_place  # the same all-or-nothing rename as filter

    sft_dir, out_dir = Path(sft_dir), Path(out_dir)
    check_out_dir(sft_dir, out_dir, overwrite)
    dataset = open_sft_dataset(sft_dir)
    index = sorted_index(dataset)
    journal = DecisionJournal(journal_path(sft_dir))
    known = set(index["sample_id"].to_pylist())
    result = FinalizeResult(
        total=index.num_rows,
        unknown_decisions=sum(1 for sample_id in journal.latest if sample_id not in known),
    )
    reasons: Counter[str] = Counter()
    staging = out_dir.parent / f".{out_dir.name}.datagen-tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        writer = ShardWriter(staging, "sft", limits=limits, version=dataset.row_version)
        # one run id for the shards and the rejects, as `datagen filter` does
        rejects = RejectsWriter(staging, run_id=writer.run_id, flush_every=1 << 30)
        with writer, rejects:
            for _, _, table in dataset.iter_row_groups():
                accepted = _finalize_row_group(table, journal, rejects, reasons, result)
                if accepted is not None:
                    writer.write(accepted)
                if on_rows:
                    on_rows(table.num_rows)
            carried = dataset.rejects()
            rejects.add_table(carried)
            result.carried_rejects = carried.num_rows
        result.shards = writer.committed_shards
        move_into_place(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    result.reasons = dict(sorted(reasons.items()))
    result.out = str(out_dir)
    return result


def _finalize_row_group(
    table: pa.Table,
    journal: DecisionJournal,
    rejects: RejectsWriter,
    reasons: Counter[str],
    result: FinalizeResult,
) -> pa.Table | None:
    """Route one row group: rejects recorded, accepted rows returned with review fields."""
    columns = [
        "sample_id",
        "source_uri",
        "clip_start",
        "style_id",
        "review_status",
        "review_reason",
        "review_note",
        "reviewer",
        "reviewed_at",
    ]
    rows = table.select(columns).to_pylist()
    keep: list[int] = []
    review: dict[str, list] = {name: [] for name in columns[4:]}
    for position, row in enumerate(rows):
        decision = journal.latest.get(row["sample_id"])
        if decision is not None:
            verdict, reason, note = decision.verdict, decision.reason, decision.note
            reviewer, reviewed_at = decision.reviewer, decision.decided_at_datetime
        else:  # never decided here: the row's own review fields stand (pending for build-sft)
            verdict, reason = row["review_status"] or PENDING, row["review_reason"]
            note, reviewer, reviewed_at = row["review_note"], row["reviewer"], row["reviewed_at"]
        if verdict == "accepted":
            keep.append(position)
            for name, value in zip(
                columns[4:], (verdict, None, note, reviewer, reviewed_at), strict=True
            ):
                review[name].append(value)
            result.accepted += 1
        elif verdict == "rejected":
            reason = reason or "other"
            rejects.add(
                row["sample_id"],
                row["source_uri"],
                stage="review",
                reason=reason,
                detail=f"by {reviewer or 'unknown'}" + (f": {note}" if note else ""),
                clip_start=row["clip_start"],
                style_id=row["style_id"],
            )
            reasons[reason] += 1
            result.rejected += 1
        else:
            result.pending += 1
    if not keep:
        return None
    accepted = table.take(pa.array(keep, pa.int64()))
    for name, values in review.items():
        position = accepted.schema.get_field_index(name)
        column_field = accepted.schema.field(position)
        accepted = accepted.set_column(position, column_field, pa.array(values, column_field.type))
    return accepted
