"""Rejected samples: `_rejects/` files recording each dropped sample, its stage and reason."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from datagen import __version__
from datagen.core.files import commit_file, temporary_path
from datagen.data.dataset.layout import PARQUET_SUFFIX, REJECTS_DIR, new_run_id, now_utc
from datagen.data.dataset.parquet import (
    check_batch_rows,
    nullable_schema,
    open_parquet,
    read_batches,
    write_table_atomic,
)
from datagen.data.schema import REJECTS, check_schema, conform, table_schema


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
                conform(pa.Table.from_pylist(self._rows, schema=nullable_schema(schema)), schema)
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
    check_batch_rows(batch_rows)
    folder = Path(dataset_dir) / REJECTS_DIR
    paths = sorted(folder.glob(f"*{PARQUET_SUFFIX}")) if folder.is_dir() else []
    files = []
    for path in paths:
        if path.name.startswith("."):
            continue
        file = open_parquet(path, pre_buffer=False)
        check_schema(file.schema_arrow, REJECTS, str(path))
        files.append(file)
    return _rejects_batches(files, batch_rows)


def _rejects_batches(files: list[pq.ParquetFile], batch_rows: int | None) -> Iterator[pa.Table]:
    metadata = table_schema(REJECTS).metadata
    for file in files:
        for table in read_batches(file, None, batch_rows):
            if table.num_rows:
                yield table.replace_schema_metadata(metadata)


def read_rejects(dataset_dir: str | os.PathLike) -> pa.Table:
    """Every rejects row of a dataset, held whole in memory (`iter_rejects` streams them)."""
    tables = list(iter_rejects(dataset_dir, batch_rows=None))
    return pa.concat_tables(tables) if tables else table_schema(REJECTS).empty_table()
