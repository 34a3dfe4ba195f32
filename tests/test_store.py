"""The shard store: bounded shards, atomic commits, index reconciliation, rejects."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import write_dataset

from datagen.data.dataset import (
    INDEX_DIR,
    Dataset,
    DatasetError,
    RejectsWriter,
    ShardLimits,
    ShardWriter,
    compact_index,
    hidden_temporaries,
    iter_index,
    iter_rejects,
    list_shards,
    read_index,
    read_rejects,
)
from datagen.data.schema import SchemaError
from datagen.data.synthetic import make_row, synthetic_table


def shard_row_counts(path: Path) -> list[int]:
    return [pq.ParquetFile(path / s).metadata.num_rows for s in list_shards(path)]


def test_shards_are_bounded_in_rows_and_row_groups(dataset):
    assert shard_row_counts(dataset) == [12, 12, 12, 4]
    for shard in list_shards(dataset):
        file = pq.ParquetFile(dataset / shard)
        sizes = [file.metadata.row_group(g).num_rows for g in range(file.num_row_groups)]
        assert max(sizes) <= 5


def test_shards_are_bounded_in_bytes(tmp_path):
    table = synthetic_table(0, 30, media_bytes=20_000)  # ~50 KB per row
    limits = ShardLimits(max_bytes=200_000, row_group_bytes=100_000)
    with ShardWriter(tmp_path / "d", "ct", limits=limits) as writer:
        writer.write(table)
    counts = shard_row_counts(tmp_path / "d")
    assert sum(counts) == 30
    assert max(counts) == 3  # 4 rows would pass 200 kB
    for shard in list_shards(tmp_path / "d"):
        assert (tmp_path / "d" / shard).stat().st_size < 200_000 + 50_000


def test_index_points_at_every_row_and_is_compacted(dataset, rows):
    index = read_index(dataset)
    assert sorted(index["sample_id"].to_pylist()) == sorted(r["sample_id"] for r in rows)
    for entry in index.to_pylist():
        table = pq.read_table(dataset / entry["shard"], columns=["sample_id"])
        assert table["sample_id"][entry["row"]].as_py() == entry["sample_id"]
    # one compacted index file for the run, listing the shards it covers
    assert len(list((dataset / INDEX_DIR).glob("*.parquet"))) == 1


def test_get_returns_the_full_row(dataset, rows):
    found = Dataset(dataset).get("s00000017")
    assert found["raw_video"] == rows[17]["raw_video"]
    assert found["caption_sty"] == rows[17]["caption_sty"]
    assert Dataset(dataset).get("nope") is None


def test_iter_row_groups_yields_every_row_once(dataset):
    seen = []
    for shard, _first, table in Dataset(dataset).iter_row_groups(columns=["sample_id"]):
        assert shard in list_shards(dataset)
        seen += table["sample_id"].to_pylist()
    assert sorted(seen) == sorted(set(seen)) and len(seen) == 40


def test_shard_without_index_entries_gets_them_rebuilt(dataset):
    for index_file in (dataset / INDEX_DIR).glob("*.parquet"):
        index_file.unlink()
    index = read_index(dataset)
    assert index.num_rows == 40
    assert read_index(dataset, rebuild_missing=False).num_rows == 0


def test_index_entries_of_an_uncommitted_shard_are_ignored(dataset):
    victim = list_shards(dataset)[0]
    (dataset / victim).unlink()  # as if the crash came between index write and rename
    index = read_index(dataset)
    assert index.num_rows == 28
    assert victim not in set(index["shard"].to_pylist())


def test_overlapping_index_files_after_an_interrupted_compaction_do_not_duplicate(tmp_path):
    path = tmp_path / "d"
    write_dataset(path, [make_row(i) for i in range(10)], limits=ShardLimits(max_rows=4))
    write_dataset(path, [make_row(i) for i in range(10, 16)], limits=ShardLimits(max_rows=4))
    before = sorted(read_index(path)["sample_id"].to_pylist())
    files = sorted((path / INDEX_DIR).glob("*.parquet"))
    assert len(files) == 2
    copies = [f.read_bytes() for f in files]
    compact_index(path)
    assert len(list((path / INDEX_DIR).glob("*.parquet"))) == 1
    for file, data in zip(files, copies, strict=True):  # the old files "survived" a crash
        file.write_bytes(data)
    assert (
        sorted(read_index(path)["sample_id"].to_pylist())
        == before
        == [f"s{i:08d}" for i in range(16)]
    )


def test_an_exception_discards_only_the_shard_being_filled(tmp_path):
    path = tmp_path / "d"
    with (
        pytest.raises(RuntimeError, match="boom"),
        ShardWriter(path, "ct", limits=ShardLimits(max_rows=4)) as writer,
    ):
        writer.write([make_row(i) for i in range(10)])  # commits 2 shards, 2 rows pending
        raise RuntimeError("boom")
    assert shard_row_counts(path) == [4, 4]
    assert read_index(path).num_rows == 8
    assert hidden_temporaries(path) == []


def test_rows_breaking_the_schema_are_refused_before_anything_is_written(tmp_path):
    bad = make_row(0)
    bad["caption_ns"] = None
    with pytest.raises(SchemaError, match="caption_ns"), ShardWriter(tmp_path / "d", "ct") as w:
        w.write([make_row(1), bad])
    assert list_shards(tmp_path / "d") == []


SLOW_WRITER = """
import sys, time
from datagen.data.dataset import ShardLimits, ShardWriter
from datagen.data.synthetic import synthetic_table
limits = ShardLimits(max_rows=10**6, row_group_rows=20)
with ShardWriter(sys.argv[1], "ct", run_id="victim", limits=limits) as writer:
    print("writing", flush=True)
    for start in range(40, 100000, 20):
        writer.write(synthetic_table(start, 20, media_bytes=20000))
        time.sleep(0.01)
"""


def test_writer_killed_mid_file_leaves_no_visible_partial_shard(tmp_path):
    path = tmp_path / "d"
    write_dataset(path, [make_row(i) for i in range(500_000, 500_006)])  # committed before
    process = subprocess.Popen(
        [sys.executable, "-c", SLOW_WRITER, str(path)], stdout=subprocess.PIPE, text=True
    )
    assert process.stdout.readline().strip() == "writing"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # wait until the hidden shard holds real data
        partial = [p for p in hidden_temporaries(path) if p.stat().st_size > 1_000_000]
        if partial:
            break
        time.sleep(0.05)
    assert partial, "the writer never got going"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    # only the shard committed before the crash is visible; readers never see the partial one
    assert len(list_shards(path)) == 1
    dataset = Dataset(path)
    assert dataset.index().num_rows == 6
    assert sorted(read_index(path)["sample_id"].to_pylist()) == [
        f"s{i:08d}" for i in range(500_000, 500_006)
    ]
    assert hidden_temporaries(path), "the partial file stays hidden, for inspection"


def test_rejects_round_trip(tmp_path):
    with RejectsWriter(tmp_path, flush_every=2) as rejects:
        rejects.add("a", "file:///a.mp4", "plan", "not_a_video", detail="text file")
        rejects.add("b", "file:///b.mp4", "caption", "style_words_in_caption_ns", style_id="x")
        rejects.add("c", "file:///c.mp4", "score", "csd_missing", clip_start=81)
    table = read_rejects(tmp_path)
    assert table.num_rows == 3
    assert len(list((tmp_path / "_rejects").glob("*.parquet"))) == 2  # flushed at 2, then 1
    by_id = {r["sample_id"]: r for r in table.to_pylist()}
    assert by_id["a"]["reason"] == "not_a_video" and by_id["a"]["detail"] == "text file"
    assert by_id["c"]["clip_start"] == 81 and by_id["b"]["style_id"] == "x"


def test_rejects_in_one_file_appear_whole_on_a_clean_close_only(tmp_path):
    def add_five(rejects: RejectsWriter) -> None:
        for i in range(5):
            rejects.add(f"r{i}", f"file:///{i}.mp4", "filter", "csd_missing")
        # flushed twice already, into the hidden file only
        assert not list((rejects.folder).glob("rejects-*.parquet"))

    with RejectsWriter(tmp_path / "ok", flush_every=2, one_file=True) as rejects:
        add_five(rejects)
    (file,) = (tmp_path / "ok" / "_rejects").iterdir()
    assert pq.ParquetFile(file).num_row_groups == 3  # 2 + 2 + 1
    assert read_rejects(tmp_path / "ok")["sample_id"].to_pylist() == [f"r{i}" for i in range(5)]

    failing = RejectsWriter(tmp_path / "bad", flush_every=2, one_file=True)
    with pytest.raises(RuntimeError), failing as rejects:
        add_five(rejects)
        raise RuntimeError("the run failed")
    assert list((tmp_path / "bad" / "_rejects").iterdir()) == [], "nothing, not even hidden"


def test_dataset_errors_are_specific(tmp_path, dataset):
    with pytest.raises(DatasetError, match="no such directory"):
        Dataset(tmp_path / "missing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(DatasetError, match="not a directory"):
        Dataset(tmp_path / "file")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no part-"):
        Dataset(tmp_path / "empty")
    with pytest.raises(DatasetError, match="did you mean .*ct"):
        Dataset(dataset.parent)


def test_corrupt_foreign_and_mixed_shards_are_refused(tmp_path, dataset):
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "part-x.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DatasetError, match="corrupt or not a Parquet file"):
        Dataset(corrupt).open_shard("part-x.parquet")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    pq.write_table(pa.table({"x": [1]}), foreign / "part-y.parquet")
    with pytest.raises(SchemaError, match="not a datagen file"):
        Dataset(foreign).split  # noqa: B018 - the property opens the first shard
    with pytest.raises(DatasetError, match="holds ct rows; cannot add sft rows"):
        ShardWriter(dataset, "sft")
    sft = write_dataset(tmp_path / "sft", [make_row(99, split="sft")], split="sft")
    (dataset / "part-zzz.parquet").write_bytes((sft / list_shards(sft)[0]).read_bytes())
    mixed = Dataset(dataset)
    with pytest.raises(DatasetError, match="holds (ct|sft) rows but"):
        for shard in mixed.shards:
            mixed.open_shard(shard)


def test_a_second_writer_is_refused_by_the_lock_with_the_holder_named(tmp_path):
    from datagen.data.dataset import DatasetLock, DatasetLockedError

    code = (
        "import sys, time\n"
        "from datagen.data.dataset import DatasetLock\n"
        "with DatasetLock(sys.argv[1], purpose='build-ct'):\n"
        "    print('locked', flush=True)\n"
        "    time.sleep(60)\n"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(tmp_path / "ct")], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(DatasetLockedError, match=rf"build-ct pid {holder.pid} on .* since"):
            DatasetLock(tmp_path / "ct").acquire()
    finally:
        holder.kill()
        holder.wait()
    # a killed holder leaves no stale lock
    with DatasetLock(tmp_path / "ct"):
        pass


def test_iter_index_streams_the_reconciled_index_in_order(tmp_path):
    path = tmp_path / "d"
    limits = ShardLimits(max_rows=4)
    write_dataset(path, [make_row(i) for i in range(10)], limits=limits)  # 3 shards
    first_shard = list_shards(path)[0]  # rows 0-3
    write_dataset(path, [make_row(i) for i in range(10, 16)], limits=limits)  # 2 shards
    old = {f: f.read_bytes() for f in (path / INDEX_DIR).glob("*.parquet")}
    compact_index(path)
    for file, data in old.items():  # an interrupted compaction: overlapping files survive
        file.write_bytes(data)
    with ShardWriter(path, "ct", limits=limits) as writer:  # 2 more shards, then unindexed
        writer.write([make_row(i) for i in range(16, 21)])
    for file in (path / INDEX_DIR).glob(f"run-{writer.run_id}.parquet"):
        file.unlink()
    (path / first_shard).unlink()  # its entries are now those of a shard never committed
    assert len(list((path / INDEX_DIR).glob("*.parquet"))) == 3

    whole = read_index(path)
    expected = {f"s{i:08d}" for i in range(4, 21)}  # rows 0-3 were in the deleted shard
    assert sorted(whole["sample_id"].to_pylist()) == sorted(expected)
    for batch_rows in (1, 3, 7, None):
        for columns in (None, ["sample_id", "shard", "row"], ["csd_score"]):
            tables = list(iter_index(path, columns=columns, batch_rows=batch_rows))
            assert all(0 < t.num_rows <= (batch_rows or 10**9) for t in tables)
            streamed = pa.concat_tables(tables)
            assert streamed.equals(read_index(path, columns=columns)), (batch_rows, columns)
    with pytest.raises(ValueError, match="batch_rows must be >= 1"):
        iter_index(path, batch_rows=0)


def test_compaction_streams_and_keeps_every_row(tmp_path):
    path = tmp_path / "d"
    write_dataset(path, [make_row(i) for i in range(10)], limits=ShardLimits(max_rows=4))
    write_dataset(path, [make_row(i) for i in range(10, 16)], limits=ShardLimits(max_rows=4))
    before = read_index(path)
    compact_index(path)
    (merged,) = (path / INDEX_DIR).glob("*.parquet")
    # written batch by batch (a row group per batch read), not gathered into one table first
    assert pq.ParquetFile(merged).metadata.num_row_groups == 2
    assert read_index(path).equals(before)


def test_rejects_across_several_files_are_read_back_in_order(tmp_path):
    with RejectsWriter(tmp_path, flush_every=2) as rejects:
        for i in range(5):
            rejects.add(f"r{i}", f"file:///{i}.mp4", "plan", "not_a_video", detail=str(i))
    (tmp_path / "_rejects" / ".rejects-partial.parquet").write_bytes(b"hidden: never read")
    assert len(list((tmp_path / "_rejects").glob("rejects-*.parquet"))) == 3
    for batch_rows in (1, 2, None):
        tables = list(iter_rejects(tmp_path, batch_rows=batch_rows))
        assert all(0 < t.num_rows <= (batch_rows or 10) for t in tables)
        streamed = pa.concat_tables(tables)
        assert streamed["sample_id"].to_pylist() == [f"r{i}" for i in range(5)]
        assert streamed.equals(read_rejects(tmp_path))
    assert read_rejects(tmp_path / "nowhere").num_rows == 0
    assert list(iter_rejects(tmp_path / "nowhere")) == []
