"""The shard store: bounded Parquet shards that appear only complete, their index and rejects.

A dataset is one directory:

    part-<run>-<n>.parquet     rows (ct_row or sft_row schema), committed by an atomic rename
    _index/*.parquet           scalar columns + (shard, row) of committed rows, for fast filters
    _rejects/*.parquet         samples that were dropped, with stage and reason

Commit protocol of a shard: write `.part-….tmp-<pid>` (hidden), fsync, write its index file
atomically, then rename the shard to its final name. The shard rename is the commit point: an
index entry whose shard does not exist is ignored, and a shard without an index entry has its
index rebuilt from its scalar columns, so a crash at any point leaves a consistent dataset.

Modules, one job each (import from this package: every public name is re-exported here):

    layout    file and folder names, run ids, committed shards, hidden temporaries, DatasetError
    lock      DatasetLock, the writer lock held for a whole build run
    writer    ShardWriter and ShardLimits: bounded shards, committed one by one
    index     index files: writing, compaction, rebuilding, reconciled reading
    rejects   RejectsWriter and reading `_rejects/`
    reader    Dataset: schema-checked reading of shards, row groups and rows
    derived   checking OUT and moving a finished derived dataset into place
    parquet   Parquet writer options, row sizes, opening and batched reading

The atomic-file helpers (temporary_path, atomic_file, commit_file) live in datagen.core.files.
"""

from __future__ import annotations

from datagen.core.files import (
    TEMPORARY_GLOB,
    atomic_file,
    commit_file,
    fsync_path,
    temporary_path,
)
from datagen.data.dataset.derived import (
    check_output_dir,
    move_into_place,
)
from datagen.data.dataset.index import (
    COVERS_KEY,
    INDEX_ROW_COLUMNS,
    compact_index,
    iter_index,
    read_index,
    rebuild_shard_index,
    write_index_file,
    write_index_tables,
)
from datagen.data.dataset.layout import (
    INDEX_DIR,
    PARQUET_SUFFIX,
    REJECTS_DIR,
    SHARD_PREFIX,
    DatasetError,
    hidden_temporaries,
    list_shards,
    new_run_id,
    now_utc,
    remove_hidden_temporaries,
)
from datagen.data.dataset.lock import (
    LOCK_FILE,
    DatasetLock,
    DatasetLockedError,
)
from datagen.data.dataset.parquet import (
    iter_tables,
    parquet_options,
    row_sizes,
    write_table_atomic,
)
from datagen.data.dataset.reader import (
    Dataset,
    row_group_starts,
)
from datagen.data.dataset.rejects import (
    RejectsWriter,
    iter_rejects,
    read_rejects,
)
from datagen.data.dataset.writer import (
    ShardLimits,
    ShardWriter,
)
from datagen.data.schema import (
    SchemaError,
)

__all__ = [
    "COVERS_KEY",
    "Dataset",
    "DatasetError",
    "DatasetLock",
    "DatasetLockedError",
    "INDEX_DIR",
    "INDEX_ROW_COLUMNS",
    "LOCK_FILE",
    "PARQUET_SUFFIX",
    "REJECTS_DIR",
    "RejectsWriter",
    "SHARD_PREFIX",
    "SchemaError",
    "ShardLimits",
    "ShardWriter",
    "TEMPORARY_GLOB",
    "atomic_file",
    "check_output_dir",
    "commit_file",
    "compact_index",
    "fsync_path",
    "hidden_temporaries",
    "iter_index",
    "iter_rejects",
    "iter_tables",
    "list_shards",
    "move_into_place",
    "new_run_id",
    "now_utc",
    "parquet_options",
    "read_index",
    "read_rejects",
    "rebuild_shard_index",
    "remove_hidden_temporaries",
    "row_group_starts",
    "row_sizes",
    "temporary_path",
    "write_index_file",
    "write_index_tables",
    "write_table_atomic",
]
