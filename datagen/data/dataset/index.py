"""The index: scalar columns and (shard, row) of committed rows, for fast filters.

Each committed shard has an index file naming it in its metadata; compaction merges them. The
index is reconciled with the shards on disk as it is read (see `iter_index`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from datagen.core.files import atomic_file
from datagen.data.dataset.layout import INDEX_DIR, PARQUET_SUFFIX, DatasetError, list_shards
from datagen.data.dataset.parquet import check_batch_rows, open_parquet, read_batches
from datagen.data.schema import INDEX, ROW_SCHEMAS, check_schema, conform, table_schema

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
        covers = _covered_shards(open_parquet(path), path)
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
    file = open_parquet(path)
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
    check_batch_rows(batch_rows)
    dataset_dir = Path(dataset_dir)
    present = set(list_shards(dataset_dir))
    if restrict_to is not None:
        present &= restrict_to
    candidates = []
    for path in _index_files(dataset_dir):
        file = open_parquet(path, pre_buffer=False)
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
        for table in read_batches(file, read, batch_rows):
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
