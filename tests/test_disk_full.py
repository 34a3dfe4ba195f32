"""A write that fails (disk full, read-only output) leaves the dataset as it was."""

from __future__ import annotations

import errno
import hashlib
import subprocess

import pyarrow.parquet as pq
import pytest
from conftest import write_dataset

from datagen.build.settings import BuildConfig, BuildConfigError
from datagen.data.dataset import Dataset, DatasetError, ShardLimits, ShardWriter, hidden_temporaries
from datagen.data.synthetic import make_row, synthetic_table
from datagen.tools.filter import FilterCriteria, filter_dataset


def digest(path) -> dict:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file() and not p.name.startswith(".")
    }


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs: a real file system that fills up."""
    mount = tmp_path / "disk"
    mount.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_simulated_disk_full_discards_only_the_shard_being_written(tmp_path, monkeypatch):
    path = write_dataset(tmp_path / "d", [make_row(i) for i in range(4)])
    before = digest(path)
    calls = {"n": 0}
    original = pq.ParquetWriter.write_table

    def fill_up(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetWriter, "write_table", fill_up)
    with (
        pytest.raises(DatasetError, match="No space left on device.*intact"),
        ShardWriter(path, "ct", limits=ShardLimits(row_group_rows=2)) as writer,
    ):
        writer.write([make_row(i) for i in range(10, 16)])
    assert digest(path) == before
    assert hidden_temporaries(path) == []
    assert Dataset(path).index().num_rows == 4


def test_a_real_full_disk_leaves_committed_shards_intact(small_disk):
    path = small_disk / "ct"
    with ShardWriter(path, "ct") as writer:
        writer.write(synthetic_table(0, 4, media_bytes=20_000))
    before = digest(path)
    with (
        pytest.raises(DatasetError, match="No space left on device"),
        ShardWriter(path, "ct", limits=ShardLimits(row_group_rows=5)) as writer,
    ):
        for start in range(100, 400, 10):  # ~10 MB into 4 MiB
            writer.write(synthetic_table(start, 10, media_bytes=50_000))
    assert digest(path) == before
    assert hidden_temporaries(path) == []
    dataset = Dataset(path)
    assert dataset.index().num_rows == 4


def test_filter_into_a_full_disk_leaves_no_out_and_in_untouched(small_disk, tmp_path):
    source = tmp_path / "in"
    with ShardWriter(source, "ct") as writer:
        writer.write(synthetic_table(0, 200, media_bytes=50_000))  # ~25 MB
    before = digest(source)
    with pytest.raises(DatasetError, match="No space left on device"):
        filter_dataset(source, small_disk / "out", FilterCriteria(csd=-1.0))
    assert not (small_disk / "out").exists()
    assert not list(small_disk.iterdir()), "the staging directory is removed too"
    assert digest(source) == before


def test_read_only_output_is_refused_before_any_work(small_disk, tmp_path):
    from datagen.data.demo_clips import SAMPLE_CLIPS, write_samples

    write_samples(tmp_path / "src", SAMPLE_CLIPS[:1])
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    with pytest.raises(BuildConfigError, match="not writable"):
        BuildConfig(source=str(tmp_path / "src"), out=str(small_disk / "out"))
    with pytest.raises((DatasetError, OSError)):
        filter_dataset(
            write_dataset(tmp_path / "in", [make_row(0)]),
            small_disk / "out",
            FilterCriteria(csd=-1.0),
        )
