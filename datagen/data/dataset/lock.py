"""The writer lock of a dataset directory: one build run writes a dataset at a time."""

from __future__ import annotations

import contextlib
import os
import socket
import time
from pathlib import Path

from datagen.core.files import file_lock
from datagen.data.dataset.layout import DatasetError


class DatasetLockedError(DatasetError):
    """Another run holds the dataset's writer lock."""


LOCK_FILE = ".datagen.lock"


class DatasetLock:
    """Exclusive writer lock of a dataset directory, held for a whole build run.

    An advisory `flock` on a hidden file (`datagen.core.files.file_lock`): released by the
    kernel when the holder exits, so a killed run never leaves a stale lock. The file records
    who holds it, for the message the second run gets.
    """

    def __init__(self, dataset_dir: str | os.PathLike, purpose: str = "build"):
        self.path = Path(dataset_dir) / LOCK_FILE
        self.purpose = purpose
        self._held: contextlib.ExitStack | None = None

    def acquire(self) -> DatasetLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        held = contextlib.ExitStack()
        try:
            handle = held.enter_context(file_lock(self.path, blocking=False))
        except BlockingIOError:
            raise DatasetLockedError(
                f"{self.path.parent} is being written by another run ({self._holder()}); wait "
                "for it to finish or write to another output directory"
            ) from None
        try:
            handle.seek(0)
            handle.truncate()
            handle.write(
                f"{self.purpose} pid {os.getpid()} on {socket.gethostname()} since "
                f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}"
            )
            handle.flush()
        except BaseException:
            held.close()  # not recorded as held: release it again
            raise
        self._held = held
        return self

    def _holder(self) -> str:
        """Who holds the lock, as its holder recorded it in the lock file."""
        try:
            return self.path.read_text().strip() or "unknown holder"
        except OSError:
            return "unknown holder"

    def release(self) -> None:
        if self._held is not None:
            self._held.close()
            self._held = None

    def __enter__(self) -> DatasetLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
