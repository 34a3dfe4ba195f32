"""`datagen filter`: keep the rows of finished shards that pass score thresholds.

Decisions are made on the index alone (no video bytes read); only shards and row groups that
hold passing rows are read, one row group at a time, so memory stays bounded. The output is
built in a hidden staging directory next to OUT and renamed into place when complete: OUT
appears whole or not at all, and IN is never touched.
"""

from __future__ import annotations

import math
import os
import queue
import shutil
import threading
from collections.abc import Callable, Iterator
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
    check_output_dir,
    move_into_place,
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


# Drop reasons, in the order criteria are checked; a row's code indexes this list, -1 = kept.
REASONS = [
    "csd_missing",
    "csd_below_threshold",
    "dino_missing",
    "dino_below_threshold",
    "vlm_missing",
    "vlm_fail",
]
MISSING_CODES = [REASONS.index(r) for r in REASONS if r.endswith("_missing")]
KEPT = -1
DECISION_COLUMNS = ["csd_score", "dino_score", "vlm_verdict"]


@dataclass
class Decision:
    """Per index row: KEPT, or the index in REASONS of the first criterion that failed."""

    code: np.ndarray  # int8

    @property
    def keep(self) -> np.ndarray:
        return self.code == KEPT

    @property
    def missing(self) -> np.ndarray:
        return np.isin(self.code, MISSING_CODES)

    def counts(self) -> dict[str, int]:
        counts = np.bincount(self.code[self.code != KEPT], minlength=len(REASONS))
        return {reason: int(n) for reason, n in zip(REASONS, counts, strict=True) if n}


def _score_values(index: pa.Table, column: str) -> np.ndarray:
    """Float64 values with nulls (and stored NaNs, which are no score either) as NaN."""
    return index[column].to_numpy(zero_copy_only=False).astype(np.float64)


def decide(index: pa.Table, criteria: FilterCriteria) -> Decision:
    """Apply `criteria` to index rows, vectorised; the first failing criterion is the reason."""
    code = np.full(index.num_rows, KEPT, dtype=np.int8)

    def mark(rows: np.ndarray, reason: str) -> None:
        code[rows & (code == KEPT)] = REASONS.index(reason)

    for column, threshold, prefix in (
        ("csd_score", criteria.csd, "csd"),
        ("dino_score", criteria.dino, "dino"),
    ):
        if threshold is not None:
            values = _score_values(index, column)
            absent = np.isnan(values)
            mark(absent, f"{prefix}_missing")
            mark(~absent & ~(values > threshold), f"{prefix}_below_threshold")
    if criteria.vlm_pass:
        verdicts = index["vlm_verdict"]
        mark(pc.is_null(verdicts).to_numpy(zero_copy_only=False), "vlm_missing")
        passed = pc.fill_null(pc.equal(verdicts, "pass"), False).to_numpy(zero_copy_only=False)
        mark(~passed, "vlm_fail")
    return Decision(code)


def drop_details(index: pa.Table, decision: Decision, criteria: FilterCriteria) -> pa.Array:
    """Human-readable detail of each dropped row (e.g. 'csd_score=0.4213 <= 0.5'), vectorised."""
    dropped = index.filter(pa.array(~decision.keep))
    codes = decision.code[~decision.keep]
    detail = pa.nulls(dropped.num_rows, pa.string())
    for column, threshold, prefix in (
        ("csd_score", criteria.csd, "csd"),
        ("dino_score", criteria.dino, "dino"),
    ):
        if threshold is None:
            continue
        shown = pc.cast(pc.round(pc.cast(dropped[column], pa.float64()), 4), pa.string())
        below = pc.binary_join_element_wise(f"{column}=", shown, f" <= {threshold:g}", "")
        detail = pc.if_else(
            pa.array(codes == REASONS.index(f"{prefix}_below_threshold")), below, detail
        )
        detail = pc.if_else(
            pa.array(codes == REASONS.index(f"{prefix}_missing")),
            pa.scalar(f"{column} is null"),
            detail,
        )
    verdict = pc.binary_join_element_wise(
        "vlm_verdict=", pc.fill_null(dropped["vlm_verdict"], "null"), ""
    )
    detail = pc.if_else(pa.array(codes == REASONS.index("vlm_fail")), verdict, detail)
    detail = pc.if_else(
        pa.array(codes == REASONS.index("vlm_missing")), pa.scalar("vlm_verdict is null"), detail
    )
    return detail


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
    check_output_dir(in_dir, out_dir, overwrite, "IN", FilterError)


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
    # A dry run needs the score columns only; a real run needs where each row lives too.
    index = dataset.index(columns=DECISION_COLUMNS if dry_run else None)
    decision = decide(index, criteria)
    keep, missing = decision.keep, decision.missing
    result = FilterResult(
        total=index.num_rows,
        kept=int(keep.sum()),
        dropped=int((~keep & ~missing).sum()),
        missing=int(missing.sum()),
        reasons=decision.counts(),
        criteria=criteria.describe(),
    )
    if dry_run:
        return result
    kept_ids = index["sample_id"].filter(pa.array(keep))
    duplicates = len(kept_ids) - pc.count_distinct(kept_ids).as_py()
    if duplicates:
        raise DatasetError(
            f"{in_dir}: {duplicates} duplicate sample_id(s) among the kept rows; "
            f"run `datagen validate {in_dir}`"
        )

    out_dir = Path(out_dir)
    staging = out_dir.parent / f".{out_dir.name}.datagen-tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        if on_start:
            on_start(result.kept + (index.num_rows - result.kept if write_dropped else 0))
        with ShardWriter(staging, dataset.split, limits=limits) as writer:
            _copy_rows(dataset, index, keep, writer, on_rows)
        result.shards = writer.committed_shards
        if write_dropped:
            with ShardWriter(staging / DROPPED_DIR, dataset.split, limits=limits) as dropped:
                _copy_rows(dataset, index, ~keep, dropped, on_rows)
            result.dropped_rows_written = dropped.rows_written
        with RejectsWriter(staging, run_id=writer.run_id, flush_every=1 << 30) as rejects:
            rejects.add_table(dataset.rejects())
            rejects.add_table(_filter_rejects(index, decision, criteria))
        move_into_place(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    result.out = str(out_dir)
    return result


def _selected_row_groups(
    dataset: Dataset, index: pa.Table, selected: np.ndarray
) -> Iterator[pa.Table]:
    """The selected index rows, read from their shards one row group at a time, in order."""
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
            local = rows[in_group] - starts[group]
            # every row of the group passes: no copy
            picked = table if len(local) == table.num_rows else table.take(pa.array(local))
            expected = sample_ids.take(pa.array(in_group))
            if not pc.all(pc.equal(picked["sample_id"], expected)).as_py():
                raise DatasetError(
                    f"{dataset.path / shards[lo]}: index is stale (sample_ids "
                    f"differ in row group {group}); run `datagen validate`"
                )
            yield picked


def _copy_rows(
    dataset: Dataset,
    index: pa.Table,
    selected: np.ndarray,
    writer: ShardWriter,
    on_rows: Callable[[int], None] | None,
) -> None:
    """Copy the selected rows into `writer`. A reader thread fetches the next row group while
    this thread writes the current one (both release the GIL); the queue bounds memory to a
    few row groups."""
    for picked in prefetch(_selected_row_groups(dataset, index, selected), depth=2):
        writer.write(picked)
        if on_rows:
            on_rows(picked.num_rows)


def prefetch(items: Iterator, depth: int) -> Iterator:
    """Iterate `items` in a background thread, at most `depth` ahead; re-raise its errors."""
    done = object()
    slots: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        slots.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            slots.put(done)
        except BaseException as error:  # handed to the consumer, raised there
            slots.put(error)

    thread = threading.Thread(target=produce, name="datagen-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = slots.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()


def _filter_rejects(index: pa.Table, decision: Decision, criteria: FilterCriteria) -> pa.Table:
    """Rejects rows (stage 'filter') for every row the filter did not keep."""
    dropped = ~decision.keep
    rows = index.filter(pa.array(dropped))
    n = rows.num_rows
    reasons = pa.DictionaryArray.from_arrays(
        pa.array(decision.code[dropped].astype(np.int32)), pa.array(REASONS)
    ).cast(pa.string())
    table = pa.table(
        {
            "sample_id": rows["sample_id"],
            "source_uri": rows["source_uri"],
            "clip_start": rows["clip_start"],
            "style_id": rows["style_id"],
            "stage": pa.array(["filter"] * n, pa.string()),
            "reason": reasons,
            "detail": drop_details(index, decision, criteria),
            "created_at": pa.array([now_utc()] * n, pa.timestamp("us", tz="UTC")),
            "datagen_version": pa.array([__version__] * n, pa.string()),
        }
    )
    return conform(table, table_schema(REJECTS))
