"""`datagen validate`: every pair invariant is checked and violations name their rows."""

from __future__ import annotations

import json

import pytest
from conftest import write_dataset

from datagen.data.dataset import INDEX_DIR, ShardLimits, list_shards
from datagen.data.style_vocab import StyleVocabulary, load_style_vocabulary
from datagen.data.synthetic import make_row
from datagen.data.video import encode_mp4
from datagen.tools.validate import validate_dataset


def test_a_valid_dataset_passes_with_full_decoding(dataset):
    report = validate_dataset(dataset)
    assert report.ok, [str(v) for v in report.violations]
    assert (report.rows, report.shards) == (40, 4)


def break_params(row, **changes):
    params = json.loads(row["params"])
    params["animate"]["stylized"].update(changes)
    row["params"] = json.dumps(params)


BREAKAGES = {
    "caption_ns_style_words": lambda r: r.update(caption_ns="a watercolor painting of a park"),
    "caption_sty": lambda r: r.update(caption_sty="   "),
    "same_conditions": lambda r: break_params(r, seed=1),
    "video_geometry": lambda r: r.update(num_frames=10),
    "video_fps": lambda r: r.update(fps=24.0),
    "pair_differs": lambda r: r.update(stylized_video=r["raw_video"]),
    "video_decodes": lambda r: r.update(raw_video=b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 64),
    "image_geometry": lambda r: r.update(height=64, width=64),
    "style_refs": lambda r: r.update(style_refs=[]),
    "score_range": lambda r: r.update(csd_score=1.5),
    "models": lambda r: r.update(models=[("animate", {"id": "x", "revision": ""})]),
    "params": lambda r: r.update(params="{not json"),
    "control_sha256": lambda r: r.update(control_sha256="abc"),
    "vlm_verdict": lambda r: r.update(vlm_verdict="maybe"),
    "split": lambda r: r.update(split="sft"),
}


@pytest.mark.parametrize("rule", sorted(BREAKAGES))
def test_each_broken_invariant_is_reported_with_its_row(tmp_path, rule):
    rows = [make_row(i) for i in range(6)]
    BREAKAGES[rule](rows[4])
    path = write_dataset(tmp_path / "d", rows, limits=ShardLimits(max_rows=3))
    report = validate_dataset(path)
    assert not report.ok
    hits = [v for v in report.violations if v.rule == rule]
    assert hits, [str(v) for v in report.violations]
    assert {(v.sample_id, v.row) for v in hits} == {("s00000004", 1)}
    assert all(v.shard == list_shards(path)[1] for v in hits)
    assert all(v.sample_id == "s00000004" for v in report.violations)


def test_no_decode_mode_still_checks_headers(tmp_path):
    rows = [make_row(i) for i in range(3)]
    rows[1]["raw_video"] = encode_mp4(
        __import__("numpy").zeros((5, 32, 32, 3), "uint8"), fps=16
    )  # 5 frames, row says 9
    path = write_dataset(tmp_path / "d", rows)
    report = validate_dataset(path, decode_videos=False)
    assert [v.rule for v in report.violations] == ["video_geometry"]


def test_duplicate_sample_ids_across_shards_are_violations(tmp_path):
    path = write_dataset(tmp_path / "d", [make_row(i) for i in range(4)])
    write_dataset(path, [make_row(2)])  # a second run writes sample 2 again
    report = validate_dataset(path)
    dupes = [v for v in report.violations if v.rule == "unique_sample_id"]
    assert len(dupes) == 1 and dupes[0].sample_id == "s00000002"
    assert "also in part-" in dupes[0].detail


def test_index_that_does_not_match_its_shard_is_a_violation(tmp_path):
    a = write_dataset(tmp_path / "a", [make_row(i) for i in range(3)])
    b = write_dataset(tmp_path / "b", [make_row(i) for i in range(10, 13)])
    (a / list_shards(a)[0]).write_bytes((b / list_shards(b)[0]).read_bytes())
    report = validate_dataset(a)
    assert [v.rule for v in report.violations] == ["index"]
    for file in (a / INDEX_DIR).glob("*.parquet"):
        file.unlink()
    assert [v.rule for v in validate_dataset(a).violations] == ["index"]


def test_style_vocabulary_matches_whole_words_and_plurals():
    vocabulary = load_style_vocabulary()
    assert vocabulary.find("A Watercolor of two dogs") == ["watercolor"]
    assert vocabulary.find("soft brushstrokes and muted colors") == ["brushstroke", "muted colors"]
    assert vocabulary.find("cel shaded hero") == ["cel-shaded"]
    assert vocabulary.find("a man drinks tea in a stone house") == []
    assert vocabulary.find("a woman painting a fence") == []  # content, not style
    custom = StyleVocabulary(["ink wash"])
    assert custom.find("an ink-wash landscape") == ["ink wash"]
    with pytest.raises(ValueError, match="empty"):
        StyleVocabulary([" "])
