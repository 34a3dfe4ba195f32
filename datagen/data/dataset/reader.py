"""Reading a dataset: its shards, schema-checked as they are opened, row groups and rows."""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from datagen.data.dataset.index import read_index
from datagen.data.dataset.layout import PARQUET_SUFFIX, SHARD_PREFIX, DatasetError, list_shards
from datagen.data.dataset.parquet import open_parquet
from datagen.data.dataset.rejects import read_rejects
from datagen.data.schema import ROW_SCHEMAS, check_schema, row_schema, schema_identity


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
        file = open_parquet(path)
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

    @functools.cached_property
    def row_version(self) -> int:
        """The row schema version of the dataset's shards (the first one's; a dataset keeps
        the version it was begun with), read once."""
        identity = schema_identity(self.open_shard(self.shards[0]).schema_arrow)
        return identity[1]

    @property
    def schema(self) -> pa.Schema:
        return row_schema(self.split, self.row_version)

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
