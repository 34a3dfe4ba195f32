"""Parquet helpers of the store: writer options, row sizes, opening and batched reading."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from datagen.core.files import atomic_file
from datagen.data.dataset.layout import DatasetError


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


def nullable_schema(schema: pa.Schema) -> pa.Schema:
    """The schema with every field nullable, so from_pylist accepts rows before conform()
    names the missing value."""
    return pa.schema([f.with_nullable(True) for f in schema], metadata=schema.metadata)


def open_parquet(path: Path, pre_buffer: bool = True) -> pq.ParquetFile:
    """Open a Parquet file of the dataset. `pre_buffer=False` for files read in batches:
    pre-buffering keeps every column chunk read until the file is closed."""
    try:
        return pq.ParquetFile(path, pre_buffer=pre_buffer)
    except (pa.ArrowInvalid, OSError) as error:
        raise DatasetError(f"{path}: corrupt or not a Parquet file ({error})") from None


def check_batch_rows(batch_rows: int | None) -> None:
    if batch_rows is not None and batch_rows < 1:
        raise ValueError(f"batch_rows must be >= 1 or None, got {batch_rows}")


def read_batches(
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


def iter_tables(tables: Iterable[pa.Table]) -> Iterator[pa.RecordBatch]:
    for table in tables:
        yield from table.to_batches()
