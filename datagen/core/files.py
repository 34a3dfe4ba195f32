"""Files that appear only complete, and the one advisory lock helper.

Every writer in datagen writes under a hidden temporary name next to the final one and renames
it into place (atomic on POSIX), so a reader never sees half a file and a killed writer leaves
only a hidden temporary that the next run removes.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO


@contextlib.contextmanager
def file_lock(path: str | os.PathLike, *, blocking: bool = True) -> Iterator[IO[str]]:
    """Hold an exclusive advisory `flock` on `path` (created if missing) while in the block.

    The kernel releases it when the holder exits, so a killed process never leaves a stale
    lock. Yields the lock file, opened for appending and reading (a holder may record who it
    is in it). With `blocking=False` a lock held elsewhere raises BlockingIOError at once.
    """
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        try:
            yield handle
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
