"""The shard store: bounded Parquet shards that appear only complete, their index and rejects.

A dataset is one directory:

    part-<run>-<n>.parquet     rows (ct_row or sft_row schema), committed by an atomic rename
    _index/*.parquet           scalar columns + (shard, row) of committed rows, for fast filters
    _rejects/*.parquet         samples that were dropped, with stage and reason

Commit protocol of a shard: write `.part-….tmp-<pid>` (hidden), fsync, write its index file
atomically, then rename the shard to its final name. The shard rename is the commit point: an
index entry whose shard does not exist is ignored, and a shard without an index entry has its
index rebuilt from its scalar columns, so a crash at any point leaves a consistent dataset.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from datagen import __version__
from datagen.data.schema import (
    INDEX,
    REJECTS,
    ROW_SCHEMAS,
    SchemaError,
    check_schema,
    conform,
    row_schema,
    table_schema,
)

SHARD_PREFIX = "part-"
PARQUET_SUFFIX = ".parquet"
INDEX_DIR = "_index"
REJECTS_DIR = "_rejects"
COVERS_KEY = b"datagen.shards"  # index file metadata: JSON list of the shards it indexes

# Columns copied from a row into the index (review_status exists only in sft rows).
INDEX_ROW_COLUMNS = [
    "sample_id",
    "split",
    "source_uri",
    "clip_start",
    "style_id",
    "control_kind",
    "csd_score",
    "dino_score",
    "vlm_verdict",
    "review_status",
]


class DatasetError(Exception):
    """A path is not a usable datagen dataset (missing, empty, corrupt, mixed)."""


class DatasetLockedError(DatasetError):
    """Another run holds the dataset's writer lock."""


LOCK_FILE = ".datagen.lock"


class DatasetLock:
    """Exclusive writer lock of a dataset directory, held for a whole build run.

    An advisory `flock` on a hidden file: released by the kernel when the holder exits, so a
    killed run never leaves a stale lock. The file records who holds it, for the message the
    second run gets.
    """

    def __init__(self, dataset_dir: str | os.PathLike, purpose: str = "build"):
        self.path = Path(dataset_dir) / LOCK_FILE
        self.purpose = purpose
        self._handle = None

    def acquire(self) -> DatasetLock:
        import fcntl
        import socket

        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")  # noqa: SIM115 - held open for the lock's lifetime
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown holder"
            handle.close()
            raise DatasetLockedError(
                f"{self.path.parent} is being written by another run ({holder}); wait for it "
                "to finish or write to another output directory"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(
            f"{self.purpose} pid {os.getpid()} on {socket.gethostname()} since "
            f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}"
        )
        handle.flush()
        self._handle = handle
        return self

    def release(self) -> None:
        if self._handle is not None:
            import fcntl

            fcntl.flock(self._handle, fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None

    def __enter__(self) -> DatasetLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


@dataclass(frozen=True)
class ShardLimits:
    """Bounds of one shard and of one row group (video columns make rows large)."""

    max_rows: int = 10_000
    max_bytes: int = 512 * 2**20
    row_group_rows: int = 1_000
    row_group_bytes: int = 64 * 2**20

    def __post_init__(self) -> None:
        for name in ("max_rows", "max_bytes", "row_group_rows", "row_group_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"ShardLimits.{name} must be >= 1")


def new_run_id() -> str:
    """Sortable, collision-resistant id of one writing run: UTC time + random suffix."""
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)


def now_utc() -> datetime:
    return datetime.now(UTC)


# --- atomic files --------------------------------------------------------------------------


def temporary_path(final: Path) -> Path:
    """Hidden name in the same directory, so the final rename is atomic and readers skip it."""
    return final.with_name(f".{final.name}.tmp-{os.getpid()}-{secrets.token_hex(2)}")


# Matches every name temporary_path makes.
TEMPORARY_GLOB = ".*.tmp-*"


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit_file(tmp: Path, final: Path) -> None:
    """fsync `tmp`, rename it to `final` and fsync the directory: `final` appears complete."""
    fsync_path(tmp)
    os.replace(tmp, final)
    fsync_path(final.parent)


@contextlib.contextmanager
def atomic_file(final: Path) -> Iterator[Path]:
    """A hidden temporary path to write; committed as `final` when the block ends, deleted
    if it raises: `final` appears complete or not at all."""
    tmp = temporary_path(final)
    try:
        yield tmp
        commit_file(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_table_atomic(table: pa.Table, final: Path, **options) -> None:
    with atomic_file(final) as tmp:
        pq.write_table(table, tmp, **options)


def _is_media(field: pa.Field) -> bool:
    return pa.types.is_binary(field.type) or (
        pa.types.is_list(field.type) and pa.types.is_binary(field.type.value_type)
    )


def parquet_options(schema: pa.Schema) -> dict:
    """Writer options: media bytes (already compressed) stored plain, scalars zstd with stats."""
    scalars = [f.name for f in schema if not _is_media(f)]
    compression = {name: "zstd" for name in scalars}
    for field in schema:
        if _is_media(field):
            leaf = field.name if pa.types.is_binary(field.type) else f"{field.name}.list.element"
            compression[leaf] = "none"
    return {
        "compression": compression,
        "use_dictionary": scalars,
        "write_statistics": scalars,
        "store_schema": True,
    }


def row_sizes(table: pa.Table) -> np.ndarray:
    """Approximate bytes of each row: variable-length payloads plus 8 bytes per other value."""
    sizes = np.zeros(table.num_rows, dtype=np.int64)
    for column in table.itercolumns():
        column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
        kind = column.type
        if pa.types.is_binary(kind) or pa.types.is_string(kind):
            sizes += pc.fill_null(pc.binary_length(column), 0).to_numpy(zero_copy_only=False)
        elif pa.types.is_list(kind) and (
            pa.types.is_binary(kind.value_type) or pa.types.is_string(kind.value_type)
        ):
            values = pc.list_flatten(column)
            lengths = pc.fill_null(pc.binary_length(values), 0).to_numpy(zero_copy_only=False)
            parents = pc.list_parent_indices(column).to_numpy(zero_copy_only=False)
            sizes += np.bincount(parents, weights=lengths, minlength=len(sizes)).astype(np.int64)
        else:
            sizes += 8
    return sizes


# --- writing shards ------------------------------------------------------------------------


class ShardWriter:
    """Fills bounded shards of one split with rows; each shard appears only when complete.

    Use as a context manager: a clean exit commits the last shard and compacts this run's index;
    an exception discards only the shard being filled (committed shards stay).
    """

    def __init__(
        self,
        dataset_dir: str | os.PathLike,
        split: str,
        run_id: str | None = None,
        limits: ShardLimits | None = None,
    ):
        self.dataset_dir = Path(dataset_dir)
        self.split = split
        self.schema = row_schema(split)
        self.run_id = run_id or new_run_id()
        self.limits = limits or ShardLimits()
        self.dataset_dir.mkdir(parents=True, exist_ok=True)
        existing = list_shards(self.dataset_dir)
        if existing:  # appending (a resumed run): the dataset must hold the same split
            present = Dataset(self.dataset_dir).split
            if present != split:
                raise DatasetError(
                    f"{self.dataset_dir}: holds {present} rows; cannot add {split} rows"
                )
        (self.dataset_dir / INDEX_DIR).mkdir(exist_ok=True)
        self._options = parquet_options(self.schema)
        self._shard_number = 0
        self._writer: pq.ParquetWriter | None = None
        self._tmp: Path | None = None
        self._shard_rows = 0
        self._shard_bytes = 0
        self._shard_index: list[pa.Table] = []
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self._pending_bytes = 0
        self.committed_shards: list[str] = []
        self.rows_written = 0
        self._closed = False

    # public API

    def write(self, rows: pa.Table | pa.RecordBatch | list[dict]) -> None:
        """Add rows (a table, a record batch or a list of dicts in the row schema)."""
        if self._closed:
            raise RuntimeError("ShardWriter is closed")
        if isinstance(rows, list):
            table = pa.Table.from_pylist(rows, schema=_nullable(self.schema))
        elif isinstance(rows, pa.RecordBatch):
            table = pa.Table.from_batches([rows])
        else:
            table = rows
        table = conform(table, self.schema)
        if table.num_rows == 0:
            return
        with self._failures_leave_the_dataset_as_it_was():
            self._write_rows(table)

    def _write_rows(self, table: pa.Table) -> None:
        sizes = row_sizes(table)
        start, segment_bytes = 0, 0  # rows [start, i) are accepted but not yet buffered
        for i, size in enumerate(sizes):
            group_rows = self._pending_rows + (i - start)
            group_bytes = self._pending_bytes + segment_bytes
            if group_rows and (
                group_bytes + size > self.limits.row_group_bytes
                or group_rows >= self.limits.row_group_rows
                or self._shard_full(group_rows, group_bytes, size)
            ):
                self._buffer(table.slice(start, i - start), segment_bytes)
                start, segment_bytes = i, 0
                self._flush_row_group()
                if self._shard_full(0, 0, size):
                    self._commit_shard()
            segment_bytes += int(size)
        self._buffer(table.slice(start), segment_bytes)

    def close(self) -> list[str]:
        """Commit the last shard, compact this run's index files; return committed shard names."""
        if self._closed:
            return self.committed_shards
        with self._failures_leave_the_dataset_as_it_was():
            self._flush_row_group()
            self._commit_shard()
            self._closed = True
            compact_index(self.dataset_dir, only=self.committed_shards, name=f"run-{self.run_id}")
        return self.committed_shards

    @contextlib.contextmanager
    def _failures_leave_the_dataset_as_it_was(self):
        """A failed write (disk full, read-only, I/O error) discards the shard being filled and
        says so; shards committed before stay as they were."""
        try:
            yield
        except OSError as error:
            self.abort()
            raise DatasetError(
                f"{self.dataset_dir}: writing a shard failed ({error.strerror or error}); the "
                f"shard being written was discarded, the {len(self.committed_shards)} shard(s) "
                "this writer committed before and all earlier data are intact"
            ) from error

    def abort(self) -> None:
        """Discard the shard being filled; committed shards stay."""
        if self._writer is not None:
            with contextlib.suppress(Exception):  # the file is thrown away anyway
                self._writer.close()
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)
        self._writer, self._tmp = None, None
        self._pending.clear()
        self._closed = True

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    # internals

    def _shard_full(self, group_rows: int, group_bytes: int, next_row_bytes: int) -> bool:
        """Would the next row overflow the shard, counting the row group being built?"""
        rows = self._shard_rows + group_rows
        size = self._shard_bytes + group_bytes
        return rows >= self.limits.max_rows or (
            rows > 0 and size + next_row_bytes > self.limits.max_bytes
        )

    def _buffer(self, table: pa.Table, size: int) -> None:
        if table.num_rows:
            self._pending.append(table)
            self._pending_rows += table.num_rows
            self._pending_bytes += size

    def _flush_row_group(self) -> None:
        if not self._pending:
            self._pending_rows = self._pending_bytes = 0
            return
        table = pa.concat_tables(self._pending)
        self._pending.clear()
        if self._writer is None:
            final = self._shard_path(self._shard_number)
            self._tmp = temporary_path(final)
            self._writer = pq.ParquetWriter(self._tmp, self.schema, **self._options)
        self._writer.write_table(table, row_group_size=table.num_rows)
        index = table.select([c for c in INDEX_ROW_COLUMNS if c in table.column_names])
        if "review_status" not in index.column_names:
            index = index.append_column("review_status", pa.nulls(table.num_rows, pa.string()))
        rows = pa.array(np.arange(self._shard_rows, self._shard_rows + table.num_rows), pa.int64())
        shard = pa.array([self._shard_path(self._shard_number).name] * table.num_rows, pa.string())
        self._shard_index.append(index.append_column("shard", shard).append_column("row", rows))
        self._shard_rows += table.num_rows
        self._shard_bytes += self._pending_bytes
        self._pending_rows = self._pending_bytes = 0

    def _shard_path(self, number: int) -> Path:
        return self.dataset_dir / f"{SHARD_PREFIX}{self.run_id}-{number:05d}{PARQUET_SUFFIX}"

    def _commit_shard(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        final = self._shard_path(self._shard_number)
        index = conform(pa.concat_tables(self._shard_index), table_schema(INDEX))
        write_index_file(self.dataset_dir, index, [final.name], final.stem)
        commit_file(self._tmp, final)
        self.committed_shards.append(final.name)
        self.rows_written += self._shard_rows
        self._writer, self._tmp = None, None
        self._shard_rows = self._shard_bytes = 0
        self._shard_index = []
        self._shard_number += 1


def _nullable(schema: pa.Schema) -> pa.Schema:
    """The schema with every field nullable, so from_pylist accepts rows before conform()
    names the missing value."""
    return pa.schema([f.with_nullable(True) for f in schema], metadata=schema.metadata)


# --- index ---------------------------------------------------------------------------------


def write_index_file(dataset_dir: Path, index: pa.Table, shards: list[str], stem: str) -> Path:
    """Write an index file covering `shards` (their names go in the file's metadata)."""
    return write_index_tables(dataset_dir, [index], shards, stem)


def write_index_tables(
    dataset_dir: Path, tables: Iterable[pa.Table], shards: list[str], stem: str
) -> Path:
    """Write an index file covering `shards` from `tables` in the index schema, taken one at a
    time (each becomes a row group, so the file can be read back in batches too). The file
    appears only complete."""
    schema = table_schema(INDEX)
    metadata = dict(schema.metadata) | {COVERS_KEY: json.dumps(sorted(shards)).encode()}
    final = dataset_dir / INDEX_DIR / f"{stem}{PARQUET_SUFFIX}"
    with (
        atomic_file(final) as tmp,
        pq.ParquetWriter(tmp, schema.with_metadata(metadata), compression="zstd") as writer,
    ):
        for table in tables:
            writer.write_table(table.replace_schema_metadata(metadata))
    return final


def _index_files(dataset_dir: Path) -> list[Path]:
    folder = dataset_dir / INDEX_DIR
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob(f"*{PARQUET_SUFFIX}") if not p.name.startswith("."))


def _covered_shards(file: pq.ParquetFile, path: Path) -> list[str]:
    metadata = file.schema_arrow.metadata or {}
    if COVERS_KEY not in metadata:
        raise DatasetError(f"{path}: index file without the list of shards it covers")
    return json.loads(metadata[COVERS_KEY])


def _open_parquet(path: Path, pre_buffer: bool = True) -> pq.ParquetFile:
    """Open a Parquet file of the dataset. `pre_buffer=False` for files read in batches:
    pre-buffering keeps every column chunk read until the file is closed."""
    try:
        return pq.ParquetFile(path, pre_buffer=pre_buffer)
    except (pa.ArrowInvalid, OSError) as error:
        raise DatasetError(f"{path}: corrupt or not a Parquet file ({error})") from None


def compact_index(
    dataset_dir: str | os.PathLike, only: list[str] | None = None, name: str = "index"
) -> None:
    """Merge index files into one (all, or those covering only shards in `only`).

    The merged file is written before the old ones are deleted; a crash in between leaves
    overlapping files, which `read_index` resolves by shard. The index is streamed through in
    batches, so compacting a large index holds one batch at a time.
    """
    dataset_dir = Path(dataset_dir)
    files = []
    for path in _index_files(dataset_dir):
        covers = _covered_shards(_open_parquet(path), path)
        if only is None or set(covers) <= set(only):
            files.append((path, covers))
    if len(files) <= 1 and (only is None or not files or files[0][0].stem == name):
        return
    shards = sorted({s for _, covers in files for s in covers})
    batches = iter_index(dataset_dir, restrict_to=set(shards))
    merged = write_index_tables(dataset_dir, batches, shards, name)
    for path, _ in files:
        if path != merged:
            path.unlink(missing_ok=True)


def rebuild_shard_index(dataset_dir: Path, shard: str) -> pa.Table:
    """Index rows of one shard, read from its scalar columns."""
    path = dataset_dir / shard
    file = _open_parquet(path)
    check_schema(file.schema_arrow, set(ROW_SCHEMAS.values()), str(path))
    present = file.schema_arrow.names
    table = file.read(columns=[c for c in INDEX_ROW_COLUMNS if c in present])
    if "review_status" not in table.column_names:
        table = table.append_column("review_status", pa.nulls(table.num_rows, pa.string()))
    table = table.append_column("shard", pa.array([shard] * table.num_rows, pa.string()))
    table = table.append_column("row", pa.array(np.arange(table.num_rows), pa.int64()))
    return conform(table, table_schema(INDEX))


def _index_schema(columns: list[str] | None) -> pa.Schema:
    """The index schema, or its `columns` in schema order."""
    schema = table_schema(INDEX)
    wanted = schema.names if columns is None else [c for c in schema.names if c in columns]
    return pa.schema([schema.field(c) for c in wanted], metadata=schema.metadata)


def _check_batch_rows(batch_rows: int | None) -> None:
    if batch_rows is not None and batch_rows < 1:
        raise ValueError(f"batch_rows must be >= 1 or None, got {batch_rows}")


def _read_batches(
    file: pq.ParquetFile, columns: list[str] | None, batch_rows: int | None
) -> Iterator[pa.Table]:
    """A Parquet file's `columns` (None: all) as tables of at most `batch_rows` rows (None: the
    whole file as one table)."""
    if batch_rows is None:
        yield file.read(columns=columns)
        return
    # Decoded in the calling thread: a batch is small, and Arrow's pool threads would each keep
    # freed buffers of their own, which shows as resident memory that grows with the file.
    for batch in file.iter_batches(batch_size=batch_rows, columns=columns, use_threads=False):
        yield pa.Table.from_batches([batch])


def iter_index(
    dataset_dir: str | os.PathLike,
    restrict_to: set[str] | None = None,
    rebuild_missing: bool = True,
    columns: list[str] | None = None,
    batch_rows: int | None = 65_536,
) -> Iterator[pa.Table]:
    """The rows of `read_index`, in the same order, as non-empty tables of at most `batch_rows`
    rows (None: one table per index file or rebuilt shard), so that a reader of a large index
    holds one batch at a time.

    Reconciliation with the shards on disk: compacted files are read first (they cover the
    most shards); a file overlapping them after an interrupted compaction contributes only the
    shards not covered yet; entries of uncommitted shards are dropped; unindexed shards are
    rebuilt from their scalar columns. Every index file is opened and its schema checked when
    this is called, before the first table is produced.
    """
    _check_batch_rows(batch_rows)
    dataset_dir = Path(dataset_dir)
    present = set(list_shards(dataset_dir))
    if restrict_to is not None:
        present &= restrict_to
    candidates = []
    for path in _index_files(dataset_dir):
        file = _open_parquet(path, pre_buffer=False)
        check_schema(file.schema_arrow, INDEX, str(path))
        candidates.append((file, _covered_shards(file, path)))
    # Compacted files first: they cover the most shards.
    candidates.sort(key=lambda item: -len(item[1]))
    plan: list[tuple[pq.ParquetFile, list[str] | None]] = []  # None: every row of the file
    covered: set[str] = set()
    for file, covers in candidates:
        take = [s for s in covers if s in present and s not in covered]
        if take:
            plan.append((file, None if len(take) == len(covers) else take))
            covered.update(take)
    unindexed = sorted(present - covered) if rebuild_missing else []
    schema = _index_schema(columns)
    return _planned_index(dataset_dir, plan, unindexed, schema, batch_rows)


def _planned_index(
    dataset_dir: Path,
    plan: list[tuple[pq.ParquetFile, list[str] | None]],
    unindexed: list[str],
    schema: pa.Schema,
    batch_rows: int | None,
) -> Iterator[pa.Table]:
    wanted = schema.names
    for file, only in plan:
        read = wanted if only is None or "shard" in wanted else [*wanted, "shard"]
        keep = None if only is None else pa.array(only, pa.string())
        for table in _read_batches(file, read, batch_rows):
            if keep is not None:  # overlapping file: only the shards no other file covered
                table = table.filter(pc.is_in(table["shard"], keep))
            if table.num_rows:
                yield table.select(wanted).replace_schema_metadata(schema.metadata)
    for shard in unindexed:
        rebuilt = rebuild_shard_index(dataset_dir, shard).select(wanted)
        rebuilt = rebuilt.replace_schema_metadata(schema.metadata)
        step = batch_rows or max(rebuilt.num_rows, 1)
        for start in range(0, rebuilt.num_rows, step):
            yield rebuilt.slice(start, step)


def read_index(
    dataset_dir: str | os.PathLike,
    restrict_to: set[str] | None = None,
    rebuild_missing: bool = True,
    columns: list[str] | None = None,
) -> pa.Table:
    """The index of every committed shard (or of `restrict_to`), reconciled with the shards
    on disk: entries of uncommitted shards are dropped, unindexed shards are rebuilt.
    `columns` reads only those index columns (in schema order). Held whole in memory; use
    `iter_index` to stream a large index."""
    tables = list(iter_index(dataset_dir, restrict_to, rebuild_missing, columns, batch_rows=None))
    return pa.concat_tables(tables) if tables else _index_schema(columns).empty_table()


# --- derived datasets (filter, review finalize) --------------------------------------------


def check_output_dir(
    source: Path, out_dir: Path, overwrite: bool, label: str, error: type[Exception]
) -> None:
    """Refuse an OUT that could touch the source dataset or clobber data: OUT equal to,
    inside or containing the source, an OUT that is a file, a non-empty OUT without
    `overwrite`. `label` names the source in messages (IN, SFT_DIR)."""
    source_path, target = source.resolve(), out_dir.resolve()
    if target == source_path:
        raise error(f"OUT {out_dir} is {label}; {label} is never modified")
    if source_path in target.parents:
        raise error(f"OUT {out_dir} is inside {label} {source}; choose a directory outside it")
    if target in source_path.parents:
        raise error(f"OUT {out_dir} contains {label} {source}; choose another directory")
    if target.exists():
        if not target.is_dir():
            raise error(f"OUT {out_dir} exists and is not a directory")
        if any(target.iterdir()) and not overwrite:
            raise error(f"OUT {out_dir} is not empty; pass --overwrite to replace it")


def move_into_place(staging: Path, out_dir: Path) -> None:
    """Rename a finished staging directory to OUT (all or nothing), replacing an existing OUT
    last."""
    import shutil

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


# --- reading -------------------------------------------------------------------------------


def list_shards(dataset_dir: str | os.PathLike) -> list[str]:
    """Names of the committed shards of a dataset, sorted."""
    dataset_dir = Path(dataset_dir)
    return sorted(
        entry.name
        for entry in os.scandir(dataset_dir)
        if entry.name.startswith(SHARD_PREFIX)
        and entry.name.endswith(PARQUET_SUFFIX)
        and entry.is_file()
    )


def hidden_temporaries(dataset_dir: str | os.PathLike) -> list[Path]:
    """Leftover temporary files of interrupted writers (never visible to readers)."""
    dataset_dir = Path(dataset_dir)
    folders = [dataset_dir, dataset_dir / INDEX_DIR, dataset_dir / REJECTS_DIR]
    return sorted(p for f in folders if f.is_dir() for p in f.glob(TEMPORARY_GLOB))


def remove_hidden_temporaries(dataset_dir: str | os.PathLike) -> list[Path]:
    """Delete the temporaries that killed writers left behind; call it only while holding
    the dataset's DatasetLock (then no live writer can own one). Returns what was removed."""
    removed = hidden_temporaries(dataset_dir)
    for path in removed:
        path.unlink(missing_ok=True)
    return removed


class Dataset:
    """A dataset directory opened for reading. Schemas are checked as files are opened."""

    def __init__(self, path: str | os.PathLike, allow_empty: bool = False):
        self.path = Path(path)
        if not self.path.exists():
            raise DatasetError(f"{self.path}: no such directory")
        if not self.path.is_dir():
            raise DatasetError(
                f"{self.path}: not a directory (a dataset is a directory of "
                f"{SHARD_PREFIX}*{PARQUET_SUFFIX} shards)"
            )
        self.shards = list_shards(self.path)
        if not self.shards and not allow_empty:
            hint = [d.name for d in self.path.iterdir() if d.is_dir() and list_shards(d)]
            more = f"; did you mean {self.path / hint[0]}?" if hint else ""
            raise DatasetError(f"{self.path}: no {SHARD_PREFIX}*{PARQUET_SUFFIX} shards{more}")
        self._split: str | None = None

    def open_shard(self, shard: str) -> pq.ParquetFile:
        """Open one shard, checking that it holds rows of the dataset's split."""
        path = self.path / shard
        file = _open_parquet(path)
        name = check_schema(file.schema_arrow, set(ROW_SCHEMAS.values()), str(path))
        split = next(s for s, n in ROW_SCHEMAS.items() if n == name)
        if self._split is None:
            self._split = split
        elif split != self._split:
            raise DatasetError(
                f"{path}: holds {split} rows but the dataset's other shards hold {self._split} rows"
            )
        return file

    @property
    def split(self) -> str:
        """'ct' or 'sft', read from the first shard's schema."""
        if self._split is None:
            if not self.shards:
                raise DatasetError(f"{self.path}: empty dataset has no split")
            self.open_shard(self.shards[0])
        return self._split

    @property
    def schema(self) -> pa.Schema:
        return row_schema(self.split)

    def index(self, columns: list[str] | None = None) -> pa.Table:
        return read_index(self.path, columns=columns)

    def rejects(self) -> pa.Table:
        return read_rejects(self.path)

    def iter_row_groups(
        self, columns: list[str] | None = None
    ) -> Iterator[tuple[str, int, pa.Table]]:
        """Yield (shard, first row number, rows) one row group at a time (bounded memory)."""
        for shard in self.shards:
            file = self.open_shard(shard)
            first = 0
            for group in range(file.num_row_groups):
                table = file.read_row_group(group, columns=columns)
                yield shard, first, table
                first += table.num_rows

    def get(self, sample_id: str) -> dict | None:
        """The full row of `sample_id`, found through the index, or None."""
        index = self.index()
        hits = index.filter(pc.equal(index["sample_id"], sample_id))
        if hits.num_rows == 0:
            return None
        shard, row = hits["shard"][0].as_py(), hits["row"][0].as_py()
        file = self.open_shard(shard)
        first = 0
        for group in range(file.num_row_groups):
            size = file.metadata.row_group(group).num_rows
            if row < first + size:
                table = file.read_row_group(group)
                found = table.slice(row - first, 1).to_pylist()[0]
                if found["sample_id"] != sample_id:
                    raise DatasetError(f"{self.path}: index is stale for {shard} row {row}")
                return found
            first += size
        raise DatasetError(f"{self.path}: index points past the end of {shard}")


def row_group_starts(file: pq.ParquetFile) -> np.ndarray:
    """First row number of each row group of a Parquet file."""
    sizes = [file.metadata.row_group(g).num_rows for g in range(file.num_row_groups)]
    return np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)


# --- rejects -------------------------------------------------------------------------------


class RejectsWriter:
    """Records rejected samples; each flush writes one complete `_rejects/` file.

    With `one_file`, for writers whose whole output appears at once (the filter's staging
    directory): every flush appends a row group to one file instead, so memory holds one flush
    and the folder one file however many rows are rejected. That file appears only on a clean
    close.
    """

    def __init__(
        self,
        dataset_dir: str | os.PathLike,
        run_id: str | None = None,
        flush_every: int = 1000,
        one_file: bool = False,
    ):
        self.folder = Path(dataset_dir) / REJECTS_DIR
        self.run_id = run_id or new_run_id()
        self.flush_every = flush_every
        self.one_file = one_file
        self._rows: list[dict] = []
        self._tables: list[pa.Table] = []
        self._pending = 0
        self._number = 0
        self._stream: pq.ParquetWriter | None = None
        self._stream_path: Path | None = None
        self.count = 0

    def add(
        self,
        sample_id: str,
        source_uri: str,
        stage: str,
        reason: str,
        detail: str | None = None,
        clip_start: int | None = None,
        style_id: str | None = None,
    ) -> None:
        self._rows.append(
            {
                "sample_id": sample_id,
                "source_uri": source_uri,
                "clip_start": clip_start,
                "style_id": style_id,
                "stage": stage,
                "reason": reason,
                "detail": detail,
                "created_at": now_utc(),
                "datagen_version": __version__,
            }
        )
        self._pending += 1
        self._maybe_flush()

    def add_table(self, table: pa.Table) -> None:
        """Add rejects that are already rows of the rejects schema (e.g. copied from IN)."""
        if table.num_rows:
            self._tables.append(conform(table, table_schema(REJECTS)))
            self._pending += table.num_rows
            self._maybe_flush()

    def _maybe_flush(self) -> None:
        if self._pending >= self.flush_every:
            self.flush()

    def _final_path(self) -> Path:
        return self.folder / f"rejects-{self.run_id}-{self._number:05d}{PARQUET_SUFFIX}"

    def flush(self) -> None:
        schema = table_schema(REJECTS)
        tables = list(self._tables)
        if self._rows:
            tables.append(
                conform(pa.Table.from_pylist(self._rows, schema=_nullable(schema)), schema)
            )
        if not tables:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        table = pa.concat_tables(tables)
        if self.one_file:
            if self._stream is None:
                self._stream_path = temporary_path(self._final_path())
                self._stream = pq.ParquetWriter(self._stream_path, schema, compression="zstd")
            self._stream.write_table(table)
        else:
            write_table_atomic(table, self._final_path(), compression="zstd")
            self._number += 1
        self.count += table.num_rows
        self._rows.clear()
        self._tables.clear()
        self._pending = 0

    def close(self) -> None:
        self.flush()
        if self._stream is not None:
            self._stream.close()
            self._stream = None
            commit_file(self._stream_path, self._final_path())

    def _discard(self) -> None:
        """One file not committed: nothing of it appears."""
        if self._stream is not None:
            with contextlib.suppress(Exception):
                self._stream.close()
            self._stream = None
            self._stream_path.unlink(missing_ok=True)

    def __enter__(self) -> RejectsWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None and self.one_file:
            self._discard()
            return
        self.close()


def iter_rejects(
    dataset_dir: str | os.PathLike, batch_rows: int | None = 65_536
) -> Iterator[pa.Table]:
    """The rows of `read_rejects`, in the same order (files by name), as non-empty tables of at
    most `batch_rows` rows (None: one table per file). Every file is opened and its schema
    checked when this is called, before the first table is produced."""
    _check_batch_rows(batch_rows)
    folder = Path(dataset_dir) / REJECTS_DIR
    paths = sorted(folder.glob(f"*{PARQUET_SUFFIX}")) if folder.is_dir() else []
    files = []
    for path in paths:
        if path.name.startswith("."):
            continue
        file = _open_parquet(path, pre_buffer=False)
        check_schema(file.schema_arrow, REJECTS, str(path))
        files.append(file)
    return _rejects_batches(files, batch_rows)


def _rejects_batches(files: list[pq.ParquetFile], batch_rows: int | None) -> Iterator[pa.Table]:
    metadata = table_schema(REJECTS).metadata
    for file in files:
        for table in _read_batches(file, None, batch_rows):
            if table.num_rows:
                yield table.replace_schema_metadata(metadata)


def read_rejects(dataset_dir: str | os.PathLike) -> pa.Table:
    """Every rejects row of a dataset, held whole in memory (`iter_rejects` streams them)."""
    tables = list(iter_rejects(dataset_dir, batch_rows=None))
    return pa.concat_tables(tables) if tables else table_schema(REJECTS).empty_table()


def iter_tables(tables: Iterable[pa.Table]) -> Iterator[pa.RecordBatch]:
    for table in tables:
        yield from table.to_batches()


__all__ = [
    "Dataset",
    "DatasetError",
    "RejectsWriter",
    "SchemaError",
    "ShardLimits",
    "ShardWriter",
    "compact_index",
    "iter_index",
    "iter_rejects",
    "list_shards",
    "read_index",
    "read_rejects",
    "remove_hidden_temporaries",
    "row_group_starts",
]
