"""Crash and resume: the build survives kill -9 at random points without losing or duplicating
a sample (the harness lives in bench/crash_resume.py; `--kills 50` there, 5 here)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

HARNESS = Path(__file__).resolve().parent.parent / "bench" / "crash_resume.py"


def load_harness():
    spec = importlib.util.spec_from_file_location("crash_resume", HARNESS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_five_random_kills_then_a_complete_rerun_account_for_every_sample(tmp_path):
    harness = load_harness()
    result = harness.run_harness(kills=5, work=tmp_path, seed=1, limit=6, max_delay_s=30.0)
    assert result["kills"] == 5
    assert result["planned"] == result["committed"] + result["rejected"] == 6
