"""The bounded native heap (datagen/core/native_heap.py) is applied once per process, unless the
user tuned malloc themselves or opted out; each case runs in a fresh interpreter because the
setting is per process and must come before threads allocate."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only"
)

PROBE = (
    "from datagen.core.native_heap import bound_native_heap as b, trim_native_heap as t; "
    "print(b(), b()); t()"  # trimming is safe whether or not the heap was bounded
)


def probe(**env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "DATAGEN_"))}
    result = subprocess.run(
        [sys.executable, "-c", PROBE], env=clean | env, capture_output=True, text=True, check=True
    )
    return result.stdout.strip()


def test_applied_by_default_and_once():
    assert probe() == "True True"


def test_user_malloc_settings_win():
    assert probe(MALLOC_ARENA_MAX="4") == "False False"
    assert probe(MALLOC_MMAP_THRESHOLD_="65536") == "False False"


def test_opt_out():
    assert probe(DATAGEN_NATIVE_HEAP="default") == "False False"


ARROW_PROBE = (
    "import pyarrow; from datagen.core.native_heap import arrow_on_native_heap as a; "
    "print(a(), pyarrow.default_memory_pool().backend_name)"
)


def test_build_processes_put_arrow_on_the_bounded_heap_unless_told_otherwise():
    def arrow(**env: str) -> str:
        clean = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("MALLOC_", "DATAGEN_", "ARROW_"))
        }
        result = subprocess.run(
            [sys.executable, "-c", ARROW_PROBE],
            env=clean | env,
            capture_output=True,
            text=True,
            check=True,
        )
        return result.stdout.strip()

    assert arrow() == "True system"
    assert arrow(DATAGEN_NATIVE_HEAP="default") != "True system"
    assert arrow(ARROW_DEFAULT_MEMORY_POOL="jemalloc") == "False jemalloc"


def test_the_cli_applies_it_before_any_command(tmp_path):
    # the callback runs before every command, even one that then fails on its input
    code = (
        "import sys; from typer.testing import CliRunner; from datagen.cli import app; "
        "from datagen.core import native_heap; "
        "CliRunner().invoke(app, ['inspect', sys.argv[1]]); print(native_heap._applied)"
    )
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "DATAGEN_"))}
    result = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], env=clean, capture_output=True, text=True
    )
    assert result.stdout.strip().splitlines()[-1] == "True"
