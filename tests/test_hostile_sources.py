"""A source mixing good clips with every kind of bad file: each bad one becomes a reject with
a specific reason, the good ones (odd as they are) become valid pairs, the run completes."""

from __future__ import annotations

import os
from urllib.parse import unquote_to_bytes

import pytest
from helpers import make_hostile_sources

from datagen.pipeline import (
    STAGE_FUNCTIONS,
    BuildConfig,
    LocalRunner,
    collect_provenance,
    plan_build,
    run_write,
    stage_factories,
)
from datagen.store import Dataset, read_rejects
from datagen.validate import validate_dataset
from datagen.video import UnreadableVideoError, probe
from datagen.workdir import ShardWork

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
    )
    runners = {name: LocalRunner(factory()) for name, factory in stage_factories(config).items()}
    plan = plan_build(config)
    provenance = collect_provenance(runners)
    for shard in plan.shards:
        work = ShardWork(config.work_root, shard)
        for name, runner in runners.items():
            STAGE_FUNCTIONS[name](work, config, runner)
        run_write(work, config, provenance)

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
