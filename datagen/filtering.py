"""`datagen filter`: keep the rows of finished shards that pass score thresholds.

Decisions are made on the index alone (no video bytes read); only shards and row groups that
hold passing rows are read, one row group at a time, so memory stays bounded. The output is
built in a hidden staging directory next to OUT and renamed into place when complete: OUT
appears whole or not at all, and IN is never touched.
"""

from __future__ import annotations

import math
import os
import shutil
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from datagen import __version__
from datagen.schema import REJECTS, conform, table_schema
from datagen.store import (
    Dataset,
    DatasetError,
    RejectsWriter,
    ShardLimits,
    ShardWriter,
    now_utc,
    row_group_starts,
)

DROPPED_DIR = "_dropped"


class FilterError(Exception):
    """The filter was asked something it must refuse (bad paths, bad thresholds)."""


@dataclass(frozen=True)
class FilterCriteria:
    """A row is kept when every given criterion holds. Scores compare strictly (`>`), as in
    the paper's `csd_score > 0.5`; a row whose needed score is null is counted as missing."""

    csd: float | None = None
    dino: float | None = None
    vlm_pass: bool = False

    def __post_init__(self) -> None:
        for name in ("csd", "dino"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and -1.0 <= value <= 1.0):
                raise FilterError(f"--{name} threshold must be in [-1, 1], got {value}")
        if self.csd is None and self.dino is None and not self.vlm_pass:
            raise FilterError("nothing to filter on: give --csd, --dino and/or --vlm-pass")

    def describe(self) -> str:
        parts = []
        if self.csd is not None:
            parts.append(f"csd_score > {self.csd:g}")
        if self.dino is not None:
            parts.append(f"dino_score > {self.dino:g}")
        if self.vlm_pass:
            parts.append("vlm_verdict == 'pass'")
        return " and ".join(parts)


@dataclass
class Decision:
    """Per index row: keep, or the reason code and detail of the drop."""

    keep: np.ndarray  # bool
    missing: np.ndarray  # bool: a needed score is null
    reason: np.ndarray  # object: reason code or None
    detail: np.ndarray  # object: human-readable detail or None


def decide(index: pa.Table, criteria: FilterCriteria) -> Decision:
    """Apply `criteria` to index rows; the first failing criterion names the drop reason."""
    n = index.num_rows
    keep = np.ones(n, dtype=bool)
    missing = np.zeros(n, dtype=bool)
    reason = np.full(n, None, dtype=object)
    detail = np.full(n, None, dtype=object)

    def apply(fails: np.ndarray, absent: np.ndarray, code: str, explain) -> None:
        undecided = reason == None  # noqa: E711 - elementwise on an object array
        newly_missing = absent & undecided
        newly_failed = fails & ~absent & undecided
        reason[newly_missing] = code.split("_")[0] + "_missing"
        detail[newly_missing] = f"{code.split('_')[0]} score is null"
        reason[newly_failed] = code
        for i in np.flatnonzero(newly_failed):
            detail[i] = explain(i)
        missing[newly_missing] = True
        keep[newly_missing | newly_failed] = False

    for column, threshold, code in (
        ("csd_score", criteria.csd, "csd_below_threshold"),
        ("dino_score", criteria.dino, "dino_below_threshold"),
    ):
        if threshold is None:
            continue
        values = index[column].to_numpy(zero_copy_only=False).astype(np.float64)
        absent = np.isnan(values)  # nulls come out as NaN; a stored NaN is no score either
        fails = ~(values > threshold)

        def explain(i, values=values, column=column, threshold=threshold):
            return f"{column}={values[i]:.4f} <= {threshold:g}"

        apply(fails, absent, code, explain)
    if criteria.vlm_pass:
        verdicts = index["vlm_verdict"]
        absent = pc.is_null(verdicts).to_numpy(zero_copy_only=False)
        fails = ~pc.fill_null(pc.equal(verdicts, "pass"), False).to_numpy(zero_copy_only=False)
        verdict_values = verdicts.to_pylist()
        apply(fails, absent, "vlm_fail", lambda i: f"vlm_verdict={verdict_values[i]!r}")
    return Decision(keep, missing, reason, detail)


@dataclass
class FilterResult:
    total: int
    kept: int
    dropped: int
    missing: int
    reasons: dict[str, int] = field(default_factory=dict)
    criteria: str = ""
    out: str | None = None
    shards: list[str] = field(default_factory=list)
    dropped_rows_written: int = 0

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def check_paths(in_dir: Path, out_dir: Path, overwrite: bool) -> None:
    """Refuse outputs that could touch IN or clobber existing data."""
    source, target = in_dir.resolve(), out_dir.resolve()
    if target == source:
        raise FilterError(f"OUT {out_dir} is IN; the filter never modifies its input")
    if source in target.parents:
        raise FilterError(f"OUT {out_dir} is inside IN {in_dir}; choose a directory outside it")
    if target in source.parents:
        raise FilterError(f"OUT {out_dir} contains IN {in_dir}; choose another directory")
    if target.exists():
        if not target.is_dir():
            raise FilterError(f"OUT {out_dir} exists and is not a directory")
        if any(target.iterdir()) and not overwrite:
            raise FilterError(f"OUT {out_dir} is not empty; pass --overwrite to replace it")


def filter_dataset(
    in_dir: str | os.PathLike,
    out_dir: str | os.PathLike | None,
    criteria: FilterCriteria,
    *,
    dry_run: bool = False,
    overwrite: bool = False,
    write_dropped: bool = False,
    limits: ShardLimits | None = None,
    on_rows: Callable[[int], None] | None = None,
    on_start: Callable[[int], None] | None = None,
) -> FilterResult:
    """Filter dataset IN into OUT (see module docstring). With `dry_run`, only count."""
    in_dir = Path(in_dir)
    if out_dir is None and not dry_run:
        raise FilterError("OUT is required unless --dry-run")
    if out_dir is not None:
        check_paths(in_dir, Path(out_dir), overwrite)
    dataset = Dataset(in_dir)
    index = dataset.index()
    duplicates = index.num_rows - pc.count_distinct(index["sample_id"]).as_py()
    if duplicates:
        raise DatasetError(
            f"{in_dir}: {duplicates} duplicate sample_id(s) in the index; "
            f"run `datagen validate {in_dir}`"
        )
    decision = decide(index, criteria)
    reasons = Counter(r for r in decision.reason if r is not None)
    result = FilterResult(
        total=index.num_rows,
        kept=int(decision.keep.sum()),
        dropped=int((~decision.keep & ~decision.missing).sum()),
        missing=int(decision.missing.sum()),
        reasons=dict(reasons),
        criteria=criteria.describe(),
    )
    if dry_run:
        return result

    out_dir = Path(out_dir)
    staging = out_dir.parent / f".{out_dir.name}.datagen-tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        if on_start:
            on_start(result.kept + (index.num_rows - result.kept if write_dropped else 0))
        with ShardWriter(staging, dataset.split, limits=limits) as writer:
            _copy_rows(dataset, index, decision.keep, writer, on_rows)
        result.shards = writer.committed_shards
        if write_dropped:
            with ShardWriter(staging / DROPPED_DIR, dataset.split, limits=limits) as dropped:
                _copy_rows(dataset, index, ~decision.keep, dropped, on_rows)
            result.dropped_rows_written = dropped.rows_written
        with RejectsWriter(staging, run_id=writer.run_id, flush_every=1 << 30) as rejects:
            rejects.add_table(dataset.rejects())
            rejects.add_table(_filter_rejects(index, decision))
        _move_into_place(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    result.out = str(out_dir)
    return result


def _copy_rows(
    dataset: Dataset,
    index: pa.Table,
    selected: np.ndarray,
    writer: ShardWriter,
    on_rows: Callable[[int], None] | None,
) -> None:
    """Copy the selected index rows from their shards, one row group at a time."""
    chosen = index.filter(pa.array(selected))
    if chosen.num_rows == 0:
        return
    order = pc.sort_indices(chosen, sort_keys=[("shard", "ascending"), ("row", "ascending")])
    chosen = chosen.take(order)
    shards = chosen["shard"].to_numpy(zero_copy_only=False)
    rows = chosen["row"].to_numpy()
    sample_ids = chosen["sample_id"]
    boundaries = np.flatnonzero(shards[1:] != shards[:-1]) + 1
    for lo, hi in zip(np.r_[0, boundaries], np.r_[boundaries, len(shards)], strict=True):
        file = dataset.open_shard(shards[lo])
        starts = row_group_starts(file)
        groups = np.searchsorted(starts, rows[lo:hi], side="right") - 1
        for group in np.unique(groups):
            in_group = np.flatnonzero(groups == group) + lo
            table = file.read_row_group(int(group))
            picked = table.take(pa.array(rows[in_group] - starts[group]))
            expected = sample_ids.take(pa.array(in_group))
            if not pc.all(pc.equal(picked["sample_id"], expected)).as_py():
                raise DatasetError(
                    f"{dataset.path / shards[lo]}: index is stale (sample_ids "
                    f"differ in row group {group}); run `datagen validate`"
                )
            writer.write(picked)
            if on_rows:
                on_rows(picked.num_rows)


def _filter_rejects(index: pa.Table, decision: Decision) -> pa.Table:
    """Rejects rows (stage 'filter') for every row the filter did not keep."""
    dropped = ~decision.keep
    rows = index.filter(pa.array(dropped))
    n = rows.num_rows
    table = pa.table(
        {
            "sample_id": rows["sample_id"],
            "source_uri": rows["source_uri"],
            "clip_start": rows["clip_start"],
            "style_id": rows["style_id"],
            "stage": pa.array(["filter"] * n, pa.string()),
            "reason": pa.array(decision.reason[dropped].tolist(), pa.string()),
            "detail": pa.array(decision.detail[dropped].tolist(), pa.string()),
            "created_at": pa.array([now_utc()] * n, pa.timestamp("us", tz="UTC")),
            "datagen_version": pa.array([__version__] * n, pa.string()),
        }
    )
    return conform(table, table_schema(REJECTS))


def _move_into_place(staging: Path, out_dir: Path) -> None:
    """Rename the finished staging directory to OUT, replacing an existing OUT last."""
    if out_dir.exists():
        if not any(out_dir.iterdir()):
            out_dir.rmdir()
        else:
            retired = out_dir.parent / f".{out_dir.name}.datagen-old-{os.getpid()}"
            os.replace(out_dir, retired)
            os.replace(staging, out_dir)
            shutil.rmtree(retired)
            return
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    os.replace(staging, out_dir)
