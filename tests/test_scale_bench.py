"""bench/scale.py runs the real executor on a two-node cluster of cost-faithful stand-ins and
holds its targets at a small size (the full curve, N = 1..32, is for the bench itself)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_the_scale_bench_meets_its_targets_at_n_1_and_4_on_two_nodes():
    command = [
        sys.executable, str(ROOT / "bench" / "scale.py"), "--gpus", "1,4", "--engines", "pools",
        "--rounds", "2", "--no-rss",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=500)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert re.fullmatch(r"scale: efficiency \d\.\d\d at N=4", lines[-1]), lines[-1]
    assert any("N= 4 (2 node(s),  4 animate actors" in line for line in lines), lines
