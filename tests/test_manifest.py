"""Source manifests (datagen/data/manifest.py): Parquet, CSV and JSONL tables of sources with
licences, ids and clip spans; the planned samples carry them and stay inside the spans."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest

from datagen.data.demo_clips import SAMPLE_CLIPS, write_samples
from datagen.data.manifest import ManifestFormatError, read_manifest
from datagen.data.styles import load_style_library
from datagen.data.video import clip_frame_indices, probe
from datagen.stages.plan import ClipSettings, plan_samples

TINY = ClipSettings(num_frames=9, height=64, width=64, fps=8.0)
HUBBLE = "hubble_pan_right"  # 72 frames at 24 fps: 3 s


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("videos")
    write_samples(folder, [c for c in SAMPLE_CLIPS if c.name in (HUBBLE, "astronaut_zoom_in")])
    return folder


def rows(videos):
    return [
        {"uri": f"{HUBBLE}.mp4", "source_id": "vid-001", "licence": "CC-BY-4.0",
         "start_s": 1.0, "end_s": 3.0},
        {"uri": (videos / "astronaut_zoom_in.mp4").as_uri(), "source_id": "vid-002",
         "licence": "CC0-1.0", "start_s": None, "end_s": None},
        {"uri": None, "source_id": "vid-003", "licence": "CC0-1.0", "start_s": None,
         "end_s": None},
        {"uri": f"{HUBBLE}.mp4", "source_id": "vid-004", "licence": "CC-BY-4.0",
         "start_s": 0.0, "end_s": 0.5},
    ]  # fmt: skip


def write_manifest(videos, kind: str):
    table = pa.Table.from_pylist(rows(videos))
    path = videos / f"manifest.{kind}"
    if kind == "parquet":
        pq.write_table(table, path)
    elif kind == "csv":
        pcsv.write_csv(table, path)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows(videos)))
    return path


def plan(path, clips_per_video=2):
    return plan_samples(path, load_style_library(), settings=TINY, clips_per_video=clips_per_video)


@pytest.mark.parametrize("kind", ["parquet", "csv", "jsonl"])
def test_a_manifest_plans_clips_that_carry_its_ids_and_licences_inside_its_spans(videos, kind):
    result = plan(write_manifest(videos, kind))
    by_source = {}
    for sample in result.samples:
        by_source.setdefault(sample.source_id, []).append(sample)
    assert sorted(by_source) == ["vid-001", "vid-002"]
    assert {s.licence for s in by_source["vid-001"]} == {"CC-BY-4.0"}
    assert {s.licence for s in by_source["vid-002"]} == {"CC0-1.0"}
    info = probe(videos / f"{HUBBLE}.mp4")
    for sample in by_source["vid-001"]:  # 1..3 s: source frames 24..71
        frames = clip_frame_indices(info.num_frames, info.fps, TINY.spec(sample.clip_start))
        assert frames[0] >= 24 and frames[-1] <= 71, frames
    assert len(by_source["vid-001"]) == 2
    reasons = sorted((uri.rsplit("#", 1)[-1], r.reason) for uri, r in result.rejects)
    # the row without a URI, and the half-second span too short for a 25-frame clip
    assert ("2", "bad_manifest_row") in reasons
    [short] = [r for _, r in result.rejects if r.reason == "too_few_frames"]
    assert "the manifest's span holds source frames 0..11" in short.detail
    assert len({s.sample_id for s in result.samples}) == len(result.samples)


def test_the_same_clip_named_by_two_rows_is_planned_once(videos):
    path = videos / "twice.jsonl"
    row = {"uri": f"{HUBBLE}.mp4", "source_id": "same"}
    path.write_text((json.dumps(row) + "\n") * 2)
    assert len(plan(path, clips_per_video=1).samples) == 1


def test_a_manifest_without_a_uri_column_names_its_columns(videos):
    path = videos / "no_uri.csv"
    path.write_text("name,licence\nx.mp4,CC0-1.0\n")
    with pytest.raises(ManifestFormatError, match="no URI column .*its columns: name, licence"):
        list(read_manifest(path))


def test_bad_rows_are_errors_and_the_other_rows_go_on(videos):
    path = videos / "bad.jsonl"
    path.write_text(
        '{"uri": "a.mp4", "start_s": 2, "end_s": 1}\nnot json\n'
        '{"uri": "s3://bucket/b.mp4"}\n{"uri": "c.mp4", "fps": "fast"}\n{"uri": "d.mp4"}\n'
    )
    entries = list(read_manifest(path))
    details = [getattr(e, "detail", None) for e in entries]
    assert "ends (1 s) before it starts" in details[0]
    assert "not JSON" in details[1]
    assert "s3:// sources are not readable yet" in details[2]
    assert "fps 'fast' is not a number" in details[3]
    assert details[4] is None and entries[4].path == videos / "d.mp4"
    assert entries[4].source_id == "bad.jsonl#4"  # default id: the manifest and row


def test_a_build_given_an_unreadable_manifest_fails_before_any_work(videos, tmp_path):
    from datagen.build.settings import BuildConfig, BuildConfigError

    path = videos / "no_uri.parquet"
    pq.write_table(pa.table({"name": ["x.mp4"]}), path)
    with pytest.raises(BuildConfigError, match="no URI column"):
        BuildConfig(source=str(path), out=str(tmp_path / "out"))


@pytest.mark.slow
def test_a_build_from_a_manifest_writes_the_clips_of_its_spans(videos, tmp_path):
    from datagen.build.settings import BuildConfig
    from datagen.build.stage_configs import stage_factories
    from datagen.data.dataset import Dataset
    from datagen.run.local import LocalRunner, build_in_process
    from datagen.tools.validate import validate_dataset

    manifest = videos / "one.jsonl"
    manifest.write_text(
        json.dumps({"uri": f"{HUBBLE}.mp4", "licence": "CC-BY-4.0", "start_s": 1.0}) + "\n"
    )
    config = BuildConfig(
        source=str(manifest),
        out=str(tmp_path / "out"),
        csd_threshold=-1.0,
        clips_per_video=2,
        tiny_dir=str(tmp_path / "tiny"),
    )
    runners = {name: LocalRunner(factory()) for name, factory in stage_factories(config).items()}
    build_in_process(config, runners)
    rows = Dataset(config.dataset_dir).index().to_pylist()
    assert len(rows) == 2 and {r["source_uri"] for r in rows} == {
        (videos / f"{HUBBLE}.mp4").as_uri()
    }
    assert validate_dataset(config.dataset_dir).ok
    shards = [pq.read_table(p, columns=["source_id", "licence"]) for p in
              sorted(config.dataset_dir.glob("part-*.parquet"))]  # fmt: skip
    carried = pa.concat_tables(shards).to_pylist()
    assert carried == [{"source_id": "one.jsonl#0", "licence": "CC-BY-4.0"}] * 2  # schema v2


def test_identical_sources_are_planned_once(videos, tmp_path):
    import shutil

    folder = tmp_path / "copies"
    folder.mkdir()
    for name in ("a.mp4", "b.mp4"):  # the same bytes under two names
        shutil.copy(videos / f"{HUBBLE}.mp4", folder / name)
    result = plan(folder, clips_per_video=1)
    assert [s.source_id for s in result.samples] == ["a.mp4"]
    [(uri, reject)] = result.rejects
    assert uri.endswith("b.mp4") and reject.reason == "duplicate_source"
    assert reject.detail.endswith("a.mp4") and "the same content (sha256 " in reject.detail


def test_source_digests_are_remembered_until_the_file_changes(videos, tmp_path, monkeypatch):
    import os
    import shutil

    from datagen.core import files
    from datagen.core.files import DigestCache

    copy = tmp_path / "a.mp4"
    shutil.copy(videos / f"{HUBBLE}.mp4", copy)
    read = []
    real = files.content_digest
    monkeypatch.setattr(files, "content_digest", lambda path: read.append(path) or real(path))
    first = DigestCache(tmp_path / "digests.jsonl")(copy)
    assert first == real(copy) and len(read) == 1
    assert DigestCache(tmp_path / "digests.jsonl")(copy) == first and len(read) == 1  # no read
    with open(tmp_path / "digests.jsonl", "a") as out:
        out.write('["cut sho')  # a line a crash cut short is ignored
    copy.write_bytes(copy.read_bytes() + b"\0")
    os.utime(copy, ns=(1, 1))
    assert DigestCache(tmp_path / "digests.jsonl")(copy) != first and len(read) == 2
    assert DigestCache(tmp_path / "digests.jsonl")(copy) != first and len(read) == 2  # kept
    readonly = DigestCache(tmp_path / "other.jsonl", writable=False)
    readonly(copy)
    assert not (tmp_path / "other.jsonl").exists()
