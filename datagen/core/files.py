"""Files that appear only complete, and the one advisory lock helper.

Every writer in datagen writes under a hidden temporary name next to the final one and renames
it into place (atomic on POSIX), so a reader never sees half a file and a killed writer leaves
only a hidden temporary that the next run removes.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import IO


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


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` (parents created) under a temporary name, then rename it into
    place: `path` appears complete. No fsync: for files a rerun can rewrite (work files)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    tmp.write_bytes(data)
    os.replace(tmp, path)


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


def content_digest(path: str | os.PathLike, chunk_bytes: int = 1 << 20) -> str:
    """The SHA-256 of a file's bytes, read in chunks (memory stays at one chunk)."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


class DigestCache:
    """content_digest of files, remembered across runs by (path, size, mtime) in an
    append-only JSON-lines file, so a rerun or an audit does not read every source again. A
    line a crash cut short is ignored when the file is read; `writable=False` (a reader that
    does not hold the dataset's lock, like audit) only reads it."""

    def __init__(self, path: str | os.PathLike, writable: bool = True):
        import json

        self.path, self.writable = Path(path), writable
        self._known: dict[tuple, str] = {}
        self._torn = False  # the file ends in a line a crash cut short: start a new one
        if self.path.exists():
            text = self.path.read_text(encoding="utf-8", errors="replace")
            self._torn = bool(text) and not text.endswith("\n")
            for line in text.splitlines():
                try:
                    name, size, mtime_ns, digest = json.loads(line)
                except (ValueError, TypeError):
                    continue  # cut short by a crash
                self._known[(name, size, mtime_ns)] = digest

    def __call__(self, file: str | os.PathLike) -> str:
        import json

        stat = os.stat(file)
        key = (os.fsencode(os.path.abspath(file)).hex(), stat.st_size, stat.st_mtime_ns)
        if key in self._known:
            return self._known[key]
        digest = self._known[key] = content_digest(file)
        if self.writable:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as out:  # one short line per write
                out.write(("\n" if self._torn else "") + json.dumps([*key, digest]) + "\n")
            self._torn = False
        return digest
