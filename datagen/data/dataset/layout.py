"""What the store's files are called, run ids, and the error every part of the store raises.

A committed shard is a `part-*.parquet` file in the dataset directory; hidden `.*.tmp-*` files
(there, in `_index/` and in `_rejects/`) are what interrupted writers left. Run ids name the
files one writing run makes; `now_utc` is the time written into rows.
"""

from __future__ import annotations

import os
import secrets
import time
from datetime import UTC, datetime
from pathlib import Path

from datagen.core.files import TEMPORARY_GLOB

SHARD_PREFIX = "part-"
PARQUET_SUFFIX = ".parquet"
INDEX_DIR = "_index"
REJECTS_DIR = "_rejects"


class DatasetError(Exception):
    """A path is not a usable datagen dataset (missing, empty, corrupt, mixed)."""


def new_run_id() -> str:
    """Sortable, collision-resistant id of one writing run: UTC time + random suffix."""
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)


def now_utc() -> datetime:
    return datetime.now(UTC)


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
