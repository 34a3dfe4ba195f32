"""Shared fixtures: small datasets written through the real shard writer."""

from __future__ import annotations

from pathlib import Path

import pytest

from datagen.data.dataset import RejectsWriter, ShardLimits, ShardWriter
from datagen.data.synthetic import make_row


def write_dataset(
    path: Path,
    rows: list[dict],
    split: str = "ct",
    limits: ShardLimits | None = None,
    rejects: int = 0,
) -> Path:
    """Write `rows` as a dataset at `path` (plus `rejects` plan-stage rejects)."""
    with ShardWriter(path, split, limits=limits) as writer:
        writer.write(rows)
    if rejects:
        with RejectsWriter(path, run_id=writer.run_id) as rejected:
            for i in range(rejects):
                rejected.add(
                    f"r{i:04d}",
                    f"file:///videos/bad_{i}.mp4",
                    "plan",
                    "too_few_frames",
                    detail="clip needs 81 frames, video has 12",
                )
    return path


@pytest.fixture
def rows() -> list[dict]:
    """40 valid rows with decodable media and a spread of scores, incl. nulls and a tie."""
    result = [make_row(i) for i in range(40)]
    result[3]["csd_score"] = None
    result[4]["csd_score"] = 0.5  # exactly the threshold: strictly-greater drops it
    result[5]["dino_score"] = None
    for i, row in enumerate(result):
        row["vlm_verdict"] = [None, "pass", "pass", "fail"][i % 4]
    return result


@pytest.fixture
def dataset(tmp_path, rows) -> Path:
    """The 40 rows in shards of at most 12 rows, row groups of 5, and 3 rejects."""
    limits = ShardLimits(max_rows=12, row_group_rows=5)
    return write_dataset(tmp_path / "in" / "ct", rows, limits=limits, rejects=3)


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray of 2 CPUs whose workers import the tests folder's modules (test stages)."""
    from datagen.run.ray import init_ray, shutdown_ray

    # start a Ray of our own with that path, whatever an earlier test left running
    shutdown_ray()
    init_ray(num_cpus=2, runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).parent)}})
    yield
    shutdown_ray()
