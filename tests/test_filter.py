"""`datagen filter`: results equal an independent pyarrow computation; every refusal case."""

from __future__ import annotations

import hashlib
import os

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from conftest import write_dataset

from datagen.data.dataset import (
    INDEX_DIR,
    REJECTS_DIR,
    Dataset,
    DatasetError,
    ShardLimits,
    list_shards,
    read_index,
    read_rejects,
)
from datagen.data.schema import SchemaError
from datagen.data.synthetic import make_row
from datagen.tools.filter import DROPPED_DIR, FilterCriteria, FilterError, filter_dataset


def all_rows(path) -> pa.Table:
    """Every row of a dataset, read with plain pyarrow (no datagen index involved)."""
    return pads.dataset([str(path / s) for s in list_shards(path)], format="parquet").to_table()


def expected_ids(path, predicate) -> set[str]:
    table = all_rows(path)
    return set(table.filter(predicate(table))["sample_id"].to_pylist())


def tree_digest(path) -> dict[str, str]:
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


def test_csd_filter_equals_an_independent_pyarrow_computation(dataset, tmp_path):
    before = tree_digest(dataset)
    result = filter_dataset(dataset, tmp_path / "out", FilterCriteria(csd=0.5))
    want = expected_ids(dataset, lambda t: pc.fill_null(pc.greater(t["csd_score"], 0.5), False))
    got = all_rows(tmp_path / "out")
    assert set(got["sample_id"].to_pylist()) == want
    assert result.kept == len(want) and result.missing == 1  # row 3 has no csd score
    assert result.kept + result.dropped + result.missing == 40
    assert "s00000004" not in want  # csd == 0.5 exactly: strictly greater drops it
    # the rows are copied whole, bytes included
    source = {r["sample_id"]: r for r in all_rows(dataset).to_pylist()}
    for row in got.to_pylist():
        assert row == source[row["sample_id"]]
    assert tree_digest(dataset) == before, "IN is never modified"


def test_combined_criteria_match_pyarrow(dataset, tmp_path):
    criteria = FilterCriteria(csd=0.2, dino=0.3, vlm_pass=True)
    filter_dataset(dataset, tmp_path / "out", criteria)

    def predicate(t):
        return pc.fill_null(
            pc.and_(
                pc.and_(pc.greater(t["csd_score"], 0.2), pc.greater(t["dino_score"], 0.3)),
                pc.equal(t["vlm_verdict"], "pass"),
            ),
            False,
        )

    assert set(read_index(tmp_path / "out")["sample_id"].to_pylist()) == expected_ids(
        dataset, predicate
    )


def test_output_is_a_valid_dataset_with_index_and_rejects(dataset, tmp_path):
    out = tmp_path / "out"
    result = filter_dataset(dataset, out, FilterCriteria(csd=0.5), limits=ShardLimits(max_rows=5))
    assert len(result.shards) == len(list_shards(out)) >= 2
    index = read_index(out, rebuild_missing=False)
    assert sorted(index["sample_id"].to_pylist()) == sorted(all_rows(out)["sample_id"].to_pylist())
    rejects = Dataset(out).rejects()
    stages = rejects["stage"].to_pylist()
    assert stages.count("plan") == 3, "IN's rejects are carried over"
    assert stages.count("filter") == 40 - result.kept
    filtered = {r["sample_id"]: r for r in rejects.to_pylist() if r["stage"] == "filter"}
    assert filtered["s00000003"]["reason"] == "csd_missing"
    assert filtered["s00000004"]["reason"] == "csd_below_threshold"
    assert filtered["s00000004"]["detail"] == "csd_score=0.5 <= 0.5"
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")], "no staging left"


def test_dry_run_counts_from_the_index_and_writes_nothing(dataset, tmp_path):
    dry = filter_dataset(dataset, tmp_path / "out", FilterCriteria(csd=0.5), dry_run=True)
    real = filter_dataset(dataset, tmp_path / "out", FilterCriteria(csd=0.5))
    assert (dry.kept, dry.dropped, dry.missing, dry.reasons) == (
        real.kept,
        real.dropped,
        real.missing,
        real.reasons,
    )
    # without OUT too, and reading no shard at all: corrupt every shard and it still counts
    for shard in list_shards(dataset):
        (dataset / shard).write_bytes(b"garbage")
    again = filter_dataset(dataset, None, FilterCriteria(csd=0.5), dry_run=True)
    assert again.kept == real.kept


def test_rejects_flag_writes_the_dropped_rows_in_full(dataset, tmp_path):
    out = tmp_path / "out"
    result = filter_dataset(dataset, out, FilterCriteria(csd=0.5), write_dropped=True)
    dropped = all_rows(out / DROPPED_DIR)
    assert dropped.num_rows == result.dropped + result.missing == result.dropped_rows_written
    kept = set(all_rows(out)["sample_id"].to_pylist())
    assert kept | set(dropped["sample_id"].to_pylist()) == {f"s{i:08d}" for i in range(40)}
    assert not kept & set(dropped["sample_id"].to_pylist())


def test_overwrite_replaces_out_only_when_asked(dataset, tmp_path):
    out = tmp_path / "out"
    filter_dataset(dataset, out, FilterCriteria(csd=0.9))
    with pytest.raises(FilterError, match="not empty; pass --overwrite"):
        filter_dataset(dataset, out, FilterCriteria(csd=0.1))
    result = filter_dataset(dataset, out, FilterCriteria(csd=0.1), overwrite=True)
    assert read_index(out).num_rows == result.kept
    (tmp_path / "empty").mkdir()
    filter_dataset(dataset, tmp_path / "empty", FilterCriteria(csd=0.1))  # empty OUT is fine


@pytest.mark.parametrize("where", ["same", "inside", "contains"])
def test_out_overlapping_in_is_refused(dataset, where):
    out = {"same": dataset, "inside": dataset / "sub", "contains": dataset.parent}[where]
    before = tree_digest(dataset)
    with pytest.raises(FilterError, match="OUT"):
        filter_dataset(dataset, out, FilterCriteria(csd=0.5), overwrite=True)
    assert tree_digest(dataset) == before


def test_bad_inputs_give_clear_errors(tmp_path, dataset):
    with pytest.raises(DatasetError, match="no such directory"):
        filter_dataset(tmp_path / "missing", tmp_path / "o1", FilterCriteria(csd=0.5))
    (tmp_path / "noshards").mkdir()
    with pytest.raises(DatasetError, match="no part-"):
        filter_dataset(tmp_path / "noshards", tmp_path / "o2", FilterCriteria(csd=0.5))
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    pq.write_table(pa.table({"csd_score": [0.9]}), foreign / "part-0.parquet")
    with pytest.raises(SchemaError, match="not a datagen file"):
        filter_dataset(foreign, tmp_path / "o3", FilterCriteria(csd=0.5))
    with pytest.raises(FilterError, match=r"in \[-1, 1\]"):
        FilterCriteria(csd=1.5)
    with pytest.raises(FilterError, match=r"in \[-1, 1\]"):
        FilterCriteria(dino=float("nan"))
    with pytest.raises(FilterError, match="nothing to filter on"):
        FilterCriteria()
    with pytest.raises(FilterError, match="OUT is required"):
        filter_dataset(dataset, None, FilterCriteria(csd=0.5))
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o3").exists()


def test_corrupt_shard_fails_cleanly_and_leaves_no_out(dataset, tmp_path):
    victim = list_shards(dataset)[1]
    (dataset / victim).write_bytes(b"PAR1" + os.urandom(100))
    with pytest.raises(DatasetError, match="corrupt or not a Parquet file"):
        filter_dataset(dataset, tmp_path / "out", FilterCriteria(csd=-1.0))
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_stale_index_is_detected_not_copied_silently(tmp_path):
    a = write_dataset(tmp_path / "a", [make_row(i) for i in range(6)])
    b = write_dataset(tmp_path / "b", [make_row(i) for i in range(100, 106)])
    # replace a's shard with b's rows under a's name: a's index no longer describes it
    (a / list_shards(a)[0]).write_bytes((b / list_shards(b)[0]).read_bytes())
    with pytest.raises(DatasetError, match="index is stale"):
        filter_dataset(a, tmp_path / "out", FilterCriteria(csd=-1.0))
    assert not (tmp_path / "out").exists()


def test_index_rebuilt_when_missing_gives_the_same_result(dataset, tmp_path):
    expected = filter_dataset(dataset, tmp_path / "o1", FilterCriteria(csd=0.5)).kept
    for file in (dataset / INDEX_DIR).glob("*.parquet"):
        file.unlink()
    assert filter_dataset(dataset, tmp_path / "o2", FilterCriteria(csd=0.5)).kept == expected


def shard_rows(path) -> pa.Table:
    """Every row of a dataset's shards, in shard order then row order."""
    return pa.concat_tables([pq.read_table(path / s) for s in list_shards(path)])


def test_tiny_batches_give_the_same_output_as_one_batch(dataset, tmp_path):
    criteria = FilterCriteria(csd=0.5, vlm_pass=True)
    outputs = {}
    for batch_rows in (7, 1_000_000):
        out = tmp_path / f"out-{batch_rows}"
        result = filter_dataset(
            dataset,
            out,
            criteria,
            write_dropped=True,
            limits=ShardLimits(max_rows=5),
            batch_rows=batch_rows,
        )
        index = read_index(out, rebuild_missing=False)
        outputs[batch_rows] = {
            "result": {k: v for k, v in result.as_dict().items() if k not in ("out", "shards")},
            "rows": shard_rows(out),
            "dropped": shard_rows(out / DROPPED_DIR),
            # shard names carry the run id; where each row lives is compared by row number
            "index": index.drop_columns(["shard"]),
            "rejects": read_rejects(out).drop_columns(["created_at"]),
            "rejects_files": [
                pq.ParquetFile(f).num_row_groups for f in (out / REJECTS_DIR).glob("*.parquet")
            ],
        }
    tiny, whole = outputs[7], outputs[1_000_000]
    assert tiny["result"] == whole["result"]
    assert whole["result"]["kept"] > 0 and whole["result"]["dropped_rows_written"] > 0
    for part in ("rows", "dropped", "index", "rejects"):
        assert tiny[part].equals(whole[part]), part
    # 3 carried-over rejects + one per dropped row, flushed every 7 rows or more: one file of
    # several row groups
    assert len(whole["rejects_files"]) == len(tiny["rejects_files"]) == 1
    assert whole["rejects_files"][0] == 1 and tiny["rejects_files"][0] >= 3
    assert tiny["rejects"].num_rows == 3 + 40 - whole["result"]["kept"]
    assert tiny["rejects"]["stage"].to_pylist()[:3] == ["plan"] * 3, "IN's rejects come first"
    with pytest.raises(FilterError, match="batch_rows must be >= 1"):
        filter_dataset(dataset, tmp_path / "o", criteria, batch_rows=0)


def test_dry_run_in_batches_counts_the_same(dataset):
    whole = filter_dataset(dataset, None, FilterCriteria(csd=0.3, dino=0.2), dry_run=True)
    tiny = filter_dataset(
        dataset, None, FilterCriteria(csd=0.3, dino=0.2), dry_run=True, batch_rows=3
    )
    assert tiny == whole and whole.total == 40 and whole.missing == 2


def test_nothing_kept_still_writes_the_rejects(dataset, tmp_path):
    result = filter_dataset(dataset, tmp_path / "out", FilterCriteria(csd=1.0), batch_rows=7)
    assert result.kept == 0 and result.shards == []
    assert read_rejects(tmp_path / "out").num_rows == 3 + 40


def test_an_index_rewritten_while_filtering_is_detected(dataset, tmp_path):
    (index_file,) = (dataset / INDEX_DIR).glob("*.parquet")

    def rewrite_index(_total: int) -> None:
        # as if another run rewrote IN's scores between the decisions and the rejects
        table = pq.read_table(index_file)
        zeros = pa.array([0.0] * table.num_rows, table.schema.field("csd_score").type)
        index = table.schema.get_field_index("csd_score")
        pq.write_table(table.set_column(index, table.schema.field(index), zeros), index_file)

    with pytest.raises(DatasetError, match="the index changed while filtering"):
        filter_dataset(dataset, tmp_path / "out", FilterCriteria(csd=0.5), on_start=rewrite_index)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no staging left"


def test_each_row_group_is_read_once_however_the_index_is_batched(dataset, tmp_path, monkeypatch):
    reads = []
    original = pq.ParquetFile.read_row_group

    files = []  # held, so a closed file's id is never reused for another one

    def counting(self, group, *args, **kwargs):
        files.append(self)
        reads.append((id(self), group))
        return original(self, group, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", counting)
    # batches of 3 index rows split most row groups of 5 rows across batches
    result = filter_dataset(
        dataset, tmp_path / "out", FilterCriteria(csd=-1.0), write_dropped=True, batch_rows=3
    )
    assert result.kept > 0
    # 40 rows in shards of 12, 12, 12, 4 with row groups of 5: 3 + 3 + 3 + 1 groups
    assert len(reads) == len(set(reads)) == 10


def test_an_index_naming_rows_a_shard_lacks_is_stale(tmp_path):
    a = write_dataset(tmp_path / "a", [make_row(i) for i in range(6)])
    b = write_dataset(tmp_path / "b", [make_row(i) for i in range(3)])
    # a's index says 6 rows; the shard now holds 3
    (a / list_shards(a)[0]).write_bytes((b / list_shards(b)[0]).read_bytes())
    with pytest.raises(DatasetError, match="index is stale"):
        filter_dataset(a, tmp_path / "out", FilterCriteria(csd=-1.0))
    assert not (tmp_path / "out").exists()
