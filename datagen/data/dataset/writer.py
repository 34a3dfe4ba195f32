"""Writing rows into bounded shards that appear only complete, with their index files."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from datagen.core.files import commit_file, temporary_path
from datagen.data.dataset.index import INDEX_ROW_COLUMNS, compact_index, write_index_file
from datagen.data.dataset.layout import (
    INDEX_DIR,
    PARQUET_SUFFIX,
    SHARD_PREFIX,
    DatasetError,
    list_shards,
    new_run_id,
)
from datagen.data.dataset.parquet import nullable_schema, parquet_options, row_sizes
from datagen.data.dataset.reader import Dataset
from datagen.data.schema import INDEX, conform, row_schema, table_schema

# Row fields later schema versions added: left out of the rows of a dataset begun earlier.
LATER_FIELDS = frozenset({"source_id", "licence"})  # v2


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
        version: int | None = None,
    ):
        """`version`: the row schema version of a new dataset (default: the current one); a
        dataset that has shards already keeps its own (rows given with fields of a later
        version, like v2's source_id on a v1 dataset, are written without them)."""
        self.dataset_dir = Path(dataset_dir)
        self.split = split
        self.run_id = run_id or new_run_id()
        self.limits = limits or ShardLimits()
        self.dataset_dir.mkdir(parents=True, exist_ok=True)
        existing = list_shards(self.dataset_dir)
        if existing:  # appending (a resumed run): the dataset must hold the same split
            present = Dataset(self.dataset_dir)
            if present.split != split:
                raise DatasetError(
                    f"{self.dataset_dir}: holds {present.split} rows; cannot add {split} rows"
                )
            version = present.row_version
        self.schema = row_schema(split, version)
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
            table = pa.Table.from_pylist(rows, schema=nullable_schema(self.schema))
        elif isinstance(rows, pa.RecordBatch):
            table = pa.Table.from_batches([rows])
        else:
            table = rows
        later = [n for n in table.column_names if n not in self.schema.names]
        if later and all(n in LATER_FIELDS for n in later):  # a v2 row into a v1 dataset
            table = table.drop_columns(later)
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
