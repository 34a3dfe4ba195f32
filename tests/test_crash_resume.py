"""Crash and resume: the build survives kill -9 at random points without losing or duplicating
a sample (the harness lives in bench/crash_resume.py; `--kills 50` there, 5 here)."""

from __future__ import annotations

import pytest
from helpers import load_script

pytestmark = pytest.mark.slow


def test_five_random_kills_then_a_complete_rerun_account_for_every_sample(tmp_path):
    harness = load_script("bench/crash_resume.py", "crash_resume")
    result = harness.run_harness(
        kills=5, work=tmp_path, seed=1, limit=6, max_delay_s=30.0, mid_write_every=2
    )
    assert result["kills"] == 5
    assert result["mid_write_kills"] >= 1  # kills 2 and 4 wait for a file being written
    assert result["planned"] == result["committed"] + result["rejected"] == 6
