"""A source mixing good clips with every kind of bad file: each bad one becomes a reject with
a specific reason, the good ones (odd as they are) become valid pairs, the run completes."""

from __future__ import annotations

import os
from urllib.parse import unquote_to_bytes

import pytest
from helpers import make_hostile_sources

from datagen.build.settings import BuildConfig
from datagen.build.stage_configs import stage_factories
from datagen.data.dataset import Dataset, read_rejects
from datagen.data.video import UnreadableVideoError, probe
from datagen.run.local import LocalRunner, build_in_process
from datagen.tools.validate import validate_dataset

pytestmark = pytest.mark.slow


def file_name(uri: str) -> str:
    return os.fsdecode(unquote_to_bytes(uri.rsplit("/", 1)[-1]))


def test_every_bad_input_is_a_specific_reject_and_the_good_ones_become_pairs(tmp_path):
    expected = make_hostile_sources(tmp_path / "src")
    config = BuildConfig(
        source=str(tmp_path / "src"),
        out=str(tmp_path / "out"),
        csd_threshold=-1.0,
        shard_size=4,
        tiny_dir=str(tmp_path / "tiny"),
        # the good sources are colour ramps (tests/helpers.py moving_frames) with no motion to
        # measure: this test is about bad files, tests/test_clean.py about still clips
        min_motion=0.0,
        scene_threshold=0.0,
    )
    runners = {name: LocalRunner(factory()) for name, factory in stage_factories(config).items()}
    build_in_process(config, runners)

    rejects = {file_name(r["source_uri"]): r for r in read_rejects(config.dataset_dir).to_pylist()}
    for name, reason in expected.items():
        if reason is not None:
            assert name in rejects, f"{name} should be rejected as {reason}"
            assert rejects[name]["reason"] == reason, (name, rejects[name])
            assert rejects[name]["detail"]
    rows = Dataset(config.dataset_dir).index().to_pylist()
    written = {file_name(r["source_uri"]) for r in rows}
    assert written == {name for name, reason in expected.items() if reason is None}
    assert validate_dataset(config.dataset_dir).ok


# Plans a folder in a child process that first drops root (the test machines run as root,
# and root reads chmod-000 files): the kernel itself then denies the read.
PLAN_AS_AN_UNPRIVILEGED_USER = """
import json, os, sys
import av  # imported while still root: the interpreter's own files may be root-only
from datagen.stages.plan import ClipSettings, plan_samples
from datagen.data.styles import load_style_library
library = load_style_library()
settings = ClipSettings(num_frames=8, height=64, width=96, fps=8.0)
plan_samples(sys.argv[2], library, settings=settings)  # warm every lazy import
if os.geteuid() == 0:
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)
plan = plan_samples(sys.argv[1], library, settings=settings)
print(json.dumps({
    "planned": sorted(s.source_uri.rsplit("/", 1)[-1] for s in plan.samples),
    "rejects": {u.rsplit("/", 1)[-1]: [r.reason, r.detail] for u, r in plan.rejects},
}))
"""


def test_a_file_the_kernel_refuses_to_read_is_rejected_as_unreadable():
    import json
    import shutil
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    from helpers import REPO, moving_frames, write_video

    # not under pytest's base temp, which is 0700: the unprivileged user must reach the files
    root = Path(tempfile.mkdtemp(prefix="datagen-unreadable-"))
    try:
        folder, readable = root / "sources", root / "warm-up"
        folder.mkdir()
        readable.mkdir()
        write_video(folder / "good.mp4", moving_frames(20, 64, 96))
        write_video(folder / "locked.mp4", moving_frames(20, 64, 96))
        write_video(readable / "warm.mp4", moving_frames(20, 64, 96))
        for path in (root, folder, readable):
            path.chmod(0o755)
        for path in (folder / "good.mp4", readable / "warm.mp4"):
            path.chmod(0o644)
        (folder / "locked.mp4").chmod(0)
        result = subprocess.run(
            [sys.executable, "-c", PLAN_AS_AN_UNPRIVILEGED_USER, str(folder), str(readable)],
            capture_output=True,
            text=True,
            cwd=REPO,
            env=os.environ | {"PYTHONPATH": str(REPO)},
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    assert result.returncode == 0, result.stderr[-2000:]
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    assert outcome["planned"] == ["good.mp4"], outcome
    reason, detail = outcome["rejects"]["locked.mp4"]
    assert reason == "unreadable"
    assert "permission denied" in detail


def test_an_unreadable_file_is_named_as_such(tmp_path, monkeypatch):
    # Root reads chmod-000 files anyway, so deny the access check the probe makes.
    victim = tmp_path / "secret.mp4"
    victim.write_bytes(b"\x00" * 100)
    real_access = os.access
    monkeypatch.setattr(
        os, "access", lambda p, mode: False if str(p) == str(victim) else real_access(p, mode)
    )
    with pytest.raises(UnreadableVideoError, match="permission denied"):
        probe(victim)
