"""`datagen filter`: keep the rows of finished shards that pass score thresholds.

Decisions are made on the index alone (no video bytes read), in two streaming passes, so
memory does not grow with the dataset: nothing is kept per row from one index batch to the next.

1. the index's score columns are read in batches of `batch_rows` rows and every row decided, to
   count (the progress total and the result). `--dry-run` stops here, opening no shard;
2. IN's rejects are copied, then the index is read again in smaller batches (it reads more
   columns): each batch is decided again, its dropped rows become rejects rows (one rejects
   file, a row group per batch), and the rows to copy are read from their shards one row group at a
   time (the next one prefetched while this one is written), in index order, each checked
   against the sample_id the index gives it. Counts that differ from pass 1 mean the index
   changed meanwhile: the run fails.

What stays in memory: one index batch, the rows of a few row groups and one batch of rejects. The
output is built in a hidden staging directory next to OUT and renamed into place when complete:
OUT appears whole or not at all, and IN is never touched. Duplicate sample_ids are not looked
for here (that needs every id at once): `datagen validate` checks them.
"""

from __future__ import annotations

import contextlib
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
from datagen.data.dataset import (
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
from datagen.data.keep import (  # noqa: F401  (FilterCriteria, FilterError: the filter API)
    DECISION_COLUMNS,
    MISSING_CODES,
    REASONS,
    Decision,
    FilterCriteria,
    FilterError,
    decide,
    drop_details,
)
from datagen.data.schema import REJECTS, conform, table_schema

DROPPED_DIR = "_dropped"
REJECT_COLUMNS = ["sample_id", "source_uri", "clip_start", "style_id"]
# Index rows decided, and rejects rows buffered, at a time (a few MB of index columns).
# Large enough that a 1M-row dry run is not slower than reading the index whole.
BATCH_ROWS = 65_536
# Index rows, and rejects rows buffered, at a time in pass 2: it reads ten columns of the index,
# not three, and builds their rejects rows (~20 MiB more at BATCH_ROWS; a peak that a run of
# 10x the rows meets more often). Row groups split across batches are still read once.
COPY_BATCH_ROWS = 8_192


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
class _Counts:
    """Counts of decisions: pass 1's make the result, pass 2's must equal them."""

    total: int = 0
    reason_counts: np.ndarray = field(default_factory=lambda: np.zeros(len(REASONS), np.int64))

    def add(self, decision: Decision) -> None:
        self.total += len(decision.code)
        self.reason_counts += decision.reason_counts()

    @property
    def kept(self) -> int:
        return self.total - int(self.reason_counts.sum())

    def result(self, criteria: FilterCriteria) -> FilterResult:
        counts = self.reason_counts
        missing = int(counts[MISSING_CODES].sum())
        return FilterResult(
            total=self.total,
            kept=self.kept,
            dropped=self.total - self.kept - missing,
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
    `batch_rows` bounds the index rows decided at a time (and, at most COPY_BATCH_ROWS, the
    index rows copied and the rejects rows buffered)."""
    in_dir = Path(in_dir)
    if batch_rows < 1:
        raise FilterError(f"batch_rows must be >= 1, got {batch_rows}")
    if out_dir is None and not dry_run:
        raise FilterError("OUT is required unless --dry-run")
    if out_dir is not None:
        check_paths(in_dir, Path(out_dir), overwrite)
    dataset = Dataset(in_dir)
    counted = _Counts()  # pass 1: the score columns only, no shard is opened
    for index in _index_batches(dataset, DECISION_COLUMNS, batch_rows):
        counted.add(decide(index, criteria))
    result = counted.result(criteria)
    if dry_run:
        return result

    out_dir = Path(out_dir)
    staging = out_dir.parent / f".{out_dir.name}.datagen-tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        if on_start:
            on_start(result.kept + (result.total - result.kept if write_dropped else 0))
        with contextlib.ExitStack() as stack:
            version = dataset.row_version  # OUT keeps IN's row schema version
            writer = stack.enter_context(
                ShardWriter(staging, dataset.split, limits=limits, version=version)
            )
            dropped = None
            if write_dropped:
                dropped = stack.enter_context(
                    ShardWriter(
                        staging / DROPPED_DIR, dataset.split, limits=limits, version=version
                    )
                )
            rejects = stack.enter_context(
                RejectsWriter(
                    staging,
                    run_id=writer.run_id,
                    flush_every=min(batch_rows, COPY_BATCH_ROWS),
                    one_file=True,
                )
            )
            for table in iter_rejects(in_dir, batch_rows=batch_rows):  # IN's rejects first
                rejects.add_table(table)
            copied = _Counts()
            copy = _copy_pass(
                dataset, criteria, min(batch_rows, COPY_BATCH_ROWS), write_dropped, copied
            )
            for piece in prefetch(copy, depth=2):
                for table, into in ((piece.kept, writer), (piece.dropped, dropped)):
                    if table is not None and table.num_rows:
                        into.write(table)
                        if on_rows:
                            on_rows(table.num_rows)
                if piece.rejects is not None:
                    rejects.add_table(piece.rejects)
                del piece  # not held while the next one is awaited
            if (copied.total, copied.kept) != (result.total, result.kept):
                raise DatasetError(
                    f"{in_dir}: the index changed while filtering ({result.total} rows, "
                    f"{result.kept} kept when counting; {copied.total} rows, {copied.kept} kept "
                    "when copying); run the filter again once IN is no longer being written"
                )
        result.shards = writer.committed_shards
        result.dropped_rows_written = dropped.rows_written if dropped else 0
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


@dataclass
class _Piece:
    """What pass 2 hands to the writing thread: rows to copy, rows of `--rejects`, and rejects
    rows, each possibly absent."""

    kept: pa.Table | None = None
    dropped: pa.Table | None = None
    rejects: pa.Table | None = None


@dataclass
class _RowGroupRows:
    """Index rows that live in row group `group` of one shard, in index order: `local` are
    their row numbers in the row group, `keep` whether each one was kept."""

    file: pq.ParquetFile
    path: Path
    group: int
    local: list[np.ndarray] = field(default_factory=list)
    sample_id: list[pa.Array] = field(default_factory=list)
    keep: list[np.ndarray] = field(default_factory=list)

    def is_in(self, file: pq.ParquetFile, group: int) -> bool:
        return self.file is file and self.group == group


class _Shards:
    """Opens the shards pass 2 reads, again only when the index moves to another one."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset
        self.number = -1
        self.current: tuple[pq.ParquetFile, Path, np.ndarray] | None = None

    def open(self, number: int) -> tuple[pq.ParquetFile, Path, np.ndarray]:
        """The shard's file, path and first row number of each row group (then the row count)."""
        if number != self.number:
            path = self.dataset.path / self.dataset.shards[number]
            file = self.dataset.open_shard(path.name)
            self.number, self.current = number, (file, path, row_group_starts(file))
        return self.current


def _copy_pass(
    dataset: Dataset,
    criteria: FilterCriteria,
    batch_rows: int,
    write_dropped: bool,
    counts: _Counts,
) -> Iterator[_Piece]:
    """Pass 2: decide each index batch again, yield its rejects rows, and read the rows to copy
    (the kept ones, and the dropped ones with `write_dropped`) from their shards, one row group
    at a time, in index order. The rows of a row group that the index lists together are read
    with one read, even across index batches; `counts` gets every decision."""
    created_at = now_utc()  # one time for the whole filter run
    shard_names = pa.array(dataset.shards, pa.string())
    shards = _Shards(dataset)
    pending: _RowGroupRows | None = None
    columns = REJECT_COLUMNS + DECISION_COLUMNS + ["shard", "row"]
    for index in _index_batches(dataset, columns, batch_rows):
        decision = decide(index, criteria)
        counts.add(decision)
        if not decision.keep.all():
            yield _Piece(rejects=_filter_rejects(index, decision, criteria, created_at))
        wanted = np.ones(index.num_rows, bool) if write_dropped else decision.keep
        if not wanted.any():
            continue
        chosen = index.filter(pa.array(wanted))
        keep = decision.keep[wanted]
        # position in the sorted shard names
        numbers = pc.index_in(chosen["shard"], value_set=shard_names)
        if numbers.null_count:  # iter_index yields only the shards asked for; never silently
            raise DatasetError(f"{dataset.path}: index names a shard that is not in IN")
        numbers = numbers.to_numpy(zero_copy_only=False)
        rows = chosen["row"].to_numpy()
        sample_ids = chosen["sample_id"].combine_chunks()
        for lo, hi in _runs(numbers):
            file, path, starts = shards.open(int(numbers[lo]))
            if rows[lo:hi].min() < 0 or rows[lo:hi].max() >= starts[-1]:
                raise DatasetError(
                    f"{path}: index is stale (it names rows the shard does not have); "
                    "run `datagen validate`"
                )
            groups = np.searchsorted(starts, rows[lo:hi], side="right") - 1
            for group_lo, group_hi in _runs(groups):
                group = int(groups[group_lo])
                if pending is not None and not pending.is_in(file, group):
                    yield _read_rows(pending)
                    pending = None
                if pending is None:
                    pending = _RowGroupRows(file, path, group)
                span = slice(lo + group_lo, lo + group_hi)
                pending.local.append(rows[span] - starts[group])
                pending.sample_id.append(sample_ids[span])
                pending.keep.append(keep[span])
    if pending is not None:
        yield _read_rows(pending)


def _runs(values: np.ndarray) -> Iterator[tuple[int, int]]:
    """(start, stop) of each run of equal consecutive values."""
    bounds = np.r_[0, np.flatnonzero(values[1:] != values[:-1]) + 1, len(values)]
    return zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True)


def _read_rows(wanted: _RowGroupRows) -> _Piece:
    """The rows `wanted` of one row group, checked against the sample_ids the index expects,
    split into kept and dropped. A function of its own so that the whole row group is freed as
    soon as the rows are taken, not kept by a suspended generator while the next one is read."""
    local = np.concatenate(wanted.local)
    keep = np.concatenate(wanted.keep)
    # Decoded in the calling (prefetch) thread only: that thread is the overlap with writing,
    # and Arrow's pool threads would each keep freed buffers of their own.
    table = wanted.file.read_row_group(wanted.group, use_threads=False)
    # a copy only when the index leaves rows out or lists them in another order
    if not np.array_equal(local, np.arange(table.num_rows)):
        table = table.take(pa.array(local))
    expected = pa.chunked_array(wanted.sample_id, pa.string())
    if not pc.all(pc.equal(table["sample_id"], expected)).as_py():
        raise DatasetError(
            f"{wanted.path}: index is stale (sample_ids differ in row group {wanted.group}); "
            "run `datagen validate`"
        )
    if keep.all():
        return _Piece(kept=table)
    return _Piece(kept=table.filter(pa.array(keep)), dropped=table.filter(pa.array(~keep)))


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


def _filter_rejects(
    index: pa.Table,
    decision: Decision,
    criteria: FilterCriteria,
    created_at: datetime,
) -> pa.Table:
    """Rejects rows (stage 'filter') for every row the filter did not keep."""
    dropped = ~decision.keep
    rows = index.filter(pa.array(dropped))
    codes = decision.code[dropped]
    n = rows.num_rows
    reasons = pa.DictionaryArray.from_arrays(
        pa.array(codes.astype(np.int32)), pa.array(REASONS)
    ).cast(pa.string())
    table = pa.table(
        {
            "sample_id": rows["sample_id"],
            "source_uri": rows["source_uri"],
            "clip_start": rows["clip_start"],
            "style_id": rows["style_id"],
            "stage": pa.array(["filter"] * n, pa.string()),
            "reason": reasons,
            "detail": drop_details(rows, codes, criteria),
            "created_at": pa.array([created_at] * n, pa.timestamp("us", tz="UTC")),
            "datagen_version": pa.array([__version__] * n, pa.string()),
        }
    )
    return conform(table, table_schema(REJECTS))
