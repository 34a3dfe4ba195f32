"""`datagen filter`: keep the rows of finished shards that pass score thresholds.

Decisions are made on the index alone (no video bytes read), in three streaming passes, so
memory does not grow with the dataset beyond a few dozen bytes per copied row:

1. the index is read in batches of `batch_rows` rows, only the columns that decide and locate a
   row; each batch is decided and counted, and only the copied rows' locators are kept (shard
   number, row number and sample_id, about 25 bytes a row: they find the rows in pass 2 and
   check for duplicates and a stale index). `--dry-run` stops here, reading only the scores;
2. the copied rows are read from their shards one row group at a time (the next one
   prefetched), in shard and row order, and written to the output shards;
3. IN's rejects are copied, then the index is read again in batches to write one rejects row
   per dropped row, flushed every `batch_rows` rows (so OUT may get several rejects files).

What stays in memory besides the locators: one index batch, a few row groups and one rejects
flush. The output is built in a hidden staging directory next to OUT and renamed into place
when complete: OUT appears whole or not at all, and IN is never touched.
"""

from __future__ import annotations

import math
import os
import queue
import shutil
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from datagen import __version__
from datagen.schema import REJECTS, conform, table_schema
from datagen.store import (
    Dataset,
    DatasetError,
    RejectsWriter,
    ShardLimits,
    ShardWriter,
    check_output_dir,
    iter_index,
    iter_rejects,
    move_into_place,
    now_utc,
    row_group_starts,
)

DROPPED_DIR = "_dropped"
# Index rows decided, and rejects rows buffered, at a time (a few MB of index columns).
# Large enough that a 1M-row dry run is not slower than reading the index whole.
BATCH_ROWS = 65_536


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
LOCATOR_COLUMNS = ["sample_id", "shard", "row"]
REJECT_COLUMNS = ["sample_id", "source_uri", "clip_start", "style_id"]


@dataclass
class Decision:
    """Per index row: KEPT, or the index in REASONS of the first criterion that failed."""

    code: np.ndarray  # int8

    @property
    def keep(self) -> np.ndarray:
        return self.code == KEPT

    def reason_counts(self) -> np.ndarray:
        """How many rows each reason dropped, indexed like REASONS."""
        return np.bincount(self.code[self.code != KEPT], minlength=len(REASONS))


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


@dataclass
class _Locators:
    """Where selected rows live: `shard` indexes the dataset's sorted shard names, `row` is the
    row number in that shard; `sample_id` is what the index says the row holds."""

    shard: np.ndarray  # int32
    row: np.ndarray  # int64
    sample_id: pa.ChunkedArray

    @classmethod
    def gather(cls, parts: list[tuple[np.ndarray, np.ndarray, pa.Array]]) -> _Locators:
        if not parts:
            return cls(
                np.empty(0, np.int32), np.empty(0, np.int64), pa.chunked_array([], pa.string())
            )
        shards, rows, ids = zip(*parts, strict=True)
        return cls(np.concatenate(shards), np.concatenate(rows), pa.chunked_array(ids))

    def __len__(self) -> int:
        return len(self.row)


@dataclass
class _Scan:
    """What pass 1 learns from the index: counts, and the locators of the rows to copy."""

    total: int = 0
    reason_counts: np.ndarray = field(default_factory=lambda: np.zeros(len(REASONS), np.int64))
    kept: list[tuple[np.ndarray, np.ndarray, pa.Array]] = field(default_factory=list)
    dropped: list[tuple[np.ndarray, np.ndarray, pa.Array]] = field(default_factory=list)

    def result(self, criteria: FilterCriteria) -> FilterResult:
        counts = self.reason_counts
        missing = int(counts[MISSING_CODES].sum())
        kept = self.total - int(counts.sum())
        return FilterResult(
            total=self.total,
            kept=kept,
            dropped=self.total - kept - missing,
            missing=missing,
            reasons={r: int(n) for r, n in zip(REASONS, counts, strict=True) if n},
            criteria=criteria.describe(),
        )


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
    batch_rows: int = BATCH_ROWS,
) -> FilterResult:
    """Filter dataset IN into OUT (see module docstring). With `dry_run`, only count.
    `batch_rows` bounds the index rows decided, and the rejects rows buffered, at a time."""
    in_dir = Path(in_dir)
    if batch_rows < 1:
        raise FilterError(f"batch_rows must be >= 1, got {batch_rows}")
    if out_dir is None and not dry_run:
        raise FilterError("OUT is required unless --dry-run")
    if out_dir is not None:
        check_paths(in_dir, Path(out_dir), overwrite)
    dataset = Dataset(in_dir)
    if dry_run:  # the score columns only: no shard is opened
        scan = _scan_index(dataset, criteria, batch_rows, locate=False, keep_dropped=False)
        return scan.result(criteria)
    scan = _scan_index(dataset, criteria, batch_rows, locate=True, keep_dropped=write_dropped)
    result = scan.result(criteria)
    kept = _Locators.gather(scan.kept)
    scan.kept.clear()
    duplicates = len(kept) - pc.count_distinct(kept.sample_id).as_py()
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
            on_start(result.kept + (result.total - result.kept if write_dropped else 0))
        with ShardWriter(staging, dataset.split, limits=limits) as writer:
            _copy_rows(dataset, kept, writer, on_rows)
        result.shards = writer.committed_shards
        if write_dropped:
            dropped_rows = _Locators.gather(scan.dropped)
            scan.dropped.clear()
            with ShardWriter(staging / DROPPED_DIR, dataset.split, limits=limits) as dropped:
                _copy_rows(dataset, dropped_rows, dropped, on_rows)
            result.dropped_rows_written = dropped.rows_written
        with RejectsWriter(staging, run_id=writer.run_id, flush_every=batch_rows) as rejects:
            for table in iter_rejects(in_dir, batch_rows=batch_rows):
                rejects.add_table(table)
            written = _write_filter_rejects(dataset, criteria, batch_rows, rejects)
        if written != result.total - result.kept:
            raise DatasetError(
                f"{in_dir}: the index changed while filtering ({result.total - result.kept} "
                f"rows dropped when deciding, {written} when writing rejects); run the filter "
                "again once IN is no longer being written"
            )
        move_into_place(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    result.out = str(out_dir)
    return result


def _index_batches(dataset: Dataset, columns: list[str], batch_rows: int) -> Iterator[pa.Table]:
    """The index of the shards present when IN was opened, in batches; every pass reads the
    same rows in the same order."""
    return iter_index(
        dataset.path, restrict_to=set(dataset.shards), columns=columns, batch_rows=batch_rows
    )


def _scan_index(
    dataset: Dataset,
    criteria: FilterCriteria,
    batch_rows: int,
    *,
    locate: bool,
    keep_dropped: bool,
) -> _Scan:
    """Pass 1: decide every index row, batch by batch; count, and keep the locators of the kept
    rows (and of the dropped ones with `keep_dropped`) when `locate`."""
    scan = _Scan()
    shard_names = pa.array(dataset.shards, pa.string())
    columns = DECISION_COLUMNS + (LOCATOR_COLUMNS if locate else [])
    for index in _index_batches(dataset, columns, batch_rows):
        decision = decide(index, criteria)
        scan.total += index.num_rows
        scan.reason_counts += decision.reason_counts()
        if not locate:
            continue
        # position in the sorted shard names: sorting by it sorts by shard name
        shard = pc.index_in(index["shard"], value_set=shard_names)
        if shard.null_count:  # iter_index yields only the shards asked for; never silently
            raise DatasetError(f"{dataset.path}: index names a shard that is not in IN")
        shard = shard.to_numpy(zero_copy_only=False).astype(np.int32)
        row = index["row"].to_numpy()
        keep = decision.keep
        for wanted, parts in ((keep, scan.kept), (~keep, scan.dropped if keep_dropped else None)):
            if parts is not None and wanted.any():
                chosen = pa.array(wanted)
                parts.append(
                    (shard[wanted], row[wanted], index["sample_id"].filter(chosen).combine_chunks())
                )
    return scan


def _selected_row_groups(dataset: Dataset, selected: _Locators) -> Iterator[pa.Table]:
    """The selected rows, read from their shards one row group at a time, in shard and row
    order. Nothing of a row group is held once it is yielded (see `_pick`)."""
    if len(selected) == 0:
        return
    order = np.lexsort((selected.row, selected.shard))
    shards = selected.shard[order]
    rows = selected.row[order]
    sample_ids = selected.sample_id.take(pa.array(order))
    boundaries = np.flatnonzero(shards[1:] != shards[:-1]) + 1
    for lo, hi in zip(np.r_[0, boundaries], np.r_[boundaries, len(shards)], strict=True):
        shard = dataset.shards[shards[lo]]
        file = dataset.open_shard(shard)
        starts = row_group_starts(file)
        groups = np.searchsorted(starts, rows[lo:hi], side="right") - 1
        for group in np.unique(groups):
            in_group = np.flatnonzero(groups == group) + lo
            yield _pick(
                file,
                int(group),
                rows[in_group] - starts[group],
                sample_ids.take(pa.array(in_group)),
                dataset.path / shard,
            )


def _pick(
    file: pq.ParquetFile, group: int, local: np.ndarray, expected: pa.ChunkedArray, path: Path
) -> pa.Table:
    """Rows `local` of row group `group`, checked against the sample_ids the index expects.
    A function of its own so that the whole row group is freed as soon as the rows are taken,
    not kept by a suspended generator while the next one is read."""
    # Decoded in the calling (prefetch) thread only: that thread is the overlap with writing,
    # and Arrow's pool threads would each keep freed buffers of their own.
    table = file.read_row_group(group, use_threads=False)
    # every row of the group passes: no copy
    picked = table if len(local) == table.num_rows else table.take(pa.array(local))
    if not pc.all(pc.equal(picked["sample_id"], expected)).as_py():
        raise DatasetError(
            f"{path}: index is stale (sample_ids differ in row group {group}); "
            "run `datagen validate`"
        )
    return picked


def _copy_rows(
    dataset: Dataset,
    selected: _Locators,
    writer: ShardWriter,
    on_rows: Callable[[int], None] | None,
) -> None:
    """Pass 2: copy the selected rows into `writer`. A reader thread fetches the next row group
    while this thread writes the current one (both release the GIL); the queue bounds memory to
    a few row groups."""
    for picked in prefetch(_selected_row_groups(dataset, selected), depth=2):
        writer.write(picked)
        if on_rows:
            on_rows(picked.num_rows)
        del picked  # not held while the next one is awaited


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
                del item  # not held while the next one is produced
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
            del item  # not held while the next one is awaited
    finally:
        stop.set()
        thread.join()


def _write_filter_rejects(
    dataset: Dataset, criteria: FilterCriteria, batch_rows: int, rejects: RejectsWriter
) -> int:
    """Pass 3: one rejects row per dropped index row, batch by batch; returns how many."""
    created_at = now_utc()  # one time for the whole filter run
    written = 0
    for index in _index_batches(dataset, REJECT_COLUMNS + DECISION_COLUMNS, batch_rows):
        table = _filter_rejects(index, decide(index, criteria), criteria, created_at)
        rejects.add_table(table)
        written += table.num_rows
    return written


def _filter_rejects(
    index: pa.Table,
    decision: Decision,
    criteria: FilterCriteria,
    created_at: datetime,
) -> pa.Table:
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
            "created_at": pa.array([created_at] * n, pa.timestamp("us", tz="UTC")),
            "datagen_version": pa.array([__version__] * n, pa.string()),
        }
    )
    return conform(table, table_schema(REJECTS))
