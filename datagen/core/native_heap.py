"""Keep the native heap of a long build from growing with the number of samples it processes.

glibc's malloc gives threads their own arenas (up to eight per core) and raises its mmap
threshold every time a large block is freed. Model inference allocates many large, short-lived
buffers (decoded frames, activations, encoded videos) from several threads (Prefect task
threads, prefetchers), so after the first shards those buffers land in arenas whose freed space
is fragmented and rarely returned to the system: peak RSS creeps up shard after shard although
Python holds nothing more. Measured on the tiny build in one process (`bench/memory.py`): 8 ->
40 samples went 1611 -> 1970 MiB with glibc's defaults, 1356 -> 1380 MiB with two arenas and a
fixed 1 MiB mmap threshold (large buffers then go straight back to the system when freed), at
the same speed.

`bound_native_heap()` applies those two settings with `mallopt` at the start of every process
that runs stages (the CLI, the flow body, each Ray stage actor), and `trim_native_heap()` hands
freed pages back after every stage batch. It does nothing where the C
library is not glibc, when the user chose their own values (`MALLOC_ARENA_MAX`,
`MALLOC_MMAP_THRESHOLD_`), or with `DATAGEN_NATIVE_HEAP=default`. `arrow_on_native_heap()`
(build processes) also makes Arrow allocate from that heap instead of keeping its own.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import platform

log = logging.getLogger(__name__)

ARENAS = 2
MMAP_THRESHOLD_BYTES = 1 << 20
# mallopt parameters, from glibc's <malloc.h>
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8

_applied: bool | None = None
_libc = None


def bound_native_heap() -> bool:
    """Apply the bounded-heap malloc settings once per process; True if they are in force."""
    global _applied, _libc
    if _applied is not None:
        return _applied
    _applied = False
    if os.environ.get("DATAGEN_NATIVE_HEAP", "bounded") == "default":
        return False
    if "MALLOC_ARENA_MAX" in os.environ or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False  # the user tuned malloc themselves
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # mallopt returns 1 on success, 0 on error
    _applied = bool(
        mallopt(_M_ARENA_MAX, ARENAS) and mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
    )
    if _applied:
        _libc = libc
    else:
        log.warning("could not bound the native heap (mallopt refused); RSS may creep up")
    return _applied


def arrow_on_native_heap() -> bool:
    """In a build process, let Arrow allocate from the bounded native heap instead of its own
    allocator (mimalloc in the pyarrow wheels), which keeps the pages its Parquet reads and
    writes freed: on the tiny build that retained memory grew by about 65 MiB over 20 shards
    while nothing else did (`bench/memory.py`). Build processes allocate little through Arrow,
    so its allocator's speed does not matter there; `datagen filter`, which streams everything
    through Arrow, keeps mimalloc. True if Arrow now uses the system allocator; the user's
    ARROW_DEFAULT_MEMORY_POOL and DATAGEN_NATIVE_HEAP=default are left alone."""
    if not bound_native_heap() or "ARROW_DEFAULT_MEMORY_POOL" in os.environ:
        return False
    import pyarrow

    pyarrow.set_memory_pool(pyarrow.system_memory_pool())
    return True


def trim_native_heap() -> None:
    """Hand the free pages of every arena back to the system (malloc_trim), after a batch:
    what one batch freed then never adds to the next one's peak. A no-op unless the heap
    was bounded in this process."""
    if _libc is not None:
        _libc.malloc_trim(0)
