"""Plan stage and demo samples: deterministic ids, clip placement, style assignment, rejects."""

from __future__ import annotations

import os

import pytest
from helpers import make_bad_corpus

from datagen.data.demo_clips import SAMPLE_CLIPS, write_samples
from datagen.data.styles import StyleLibraryError, load_style_library
from datagen.data.video import probe
from datagen.stages.plan import (
    ClipSettings,
    clip_starts,
    list_sources,
    plan_samples,
    ref_frame_indices,
    shards_of,
    source_uri,
)

TINY = ClipSettings(num_frames=9, height=64, width=64, fps=8.0)


@pytest.fixture(scope="module")
def samples_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("samples")
    write_samples(folder, SAMPLE_CLIPS[:3])
    return folder


def test_demo_samples_are_real_moving_videos_of_varied_shapes(samples_dir):
    infos = [probe(p) for p in sorted(samples_dir.glob("*.mp4"))]
    assert len(infos) == 3
    assert len({(i.width, i.height) for i in infos}) == 3
    assert len({i.num_frames for i in infos}) == 3
    from datagen.data.video import decode_frames

    frames = decode_frames(samples_dir / "astronaut_zoom_in.mp4", [0, 47])
    assert abs(frames[0].astype(int) - frames[1].astype(int)).mean() > 5, "the camera moves"


def test_plan_is_deterministic_and_ids_are_unique(samples_dir):
    library = load_style_library()
    first = plan_samples(samples_dir, library, settings=TINY, clips_per_video=2, seed=7)
    second = plan_samples(samples_dir, library, settings=TINY, clips_per_video=2, seed=7)
    assert first.samples == second.samples
    ids = [s.sample_id for s in first.samples]
    assert len(ids) == len(set(ids)) == 6
    other_seed = plan_samples(samples_dir, library, settings=TINY, clips_per_video=2, seed=8)
    assert {s.sample_id for s in other_seed.samples}.isdisjoint(ids)


def test_styles_are_restricted_and_limit_applies(samples_dir):
    library = load_style_library()
    plan = plan_samples(
        samples_dir,
        library,
        style_ids=["ink_wash", "pixel_art"],
        settings=TINY,
        clips_per_video=3,
        limit=4,
    )
    assert len(plan.samples) == 4
    assert {s.style_id for s in plan.samples} <= {"ink_wash", "pixel_art"}
    with pytest.raises(StyleLibraryError, match="unknown style 'vaporwave_2'"):
        plan_samples(samples_dir, library, style_ids=["vaporwave_2"], settings=TINY)


def test_clip_starts_are_spread_and_fit():
    assert clip_starts(100, 8.0, TINY, 1) == [0]
    starts = clip_starts(100, 8.0, TINY, 3)
    assert starts == [0, 46, 91] and 91 + 9 <= 100
    assert clip_starts(5, 8.0, TINY, 2) == []  # too short for even one clip
    # 9 frames at 8 fps from a 24 fps source use source frames 0, 3, ..., 24: a span of 25
    assert clip_starts(24, 24.0, TINY, 2) == []
    assert clip_starts(26, 24.0, TINY, 5) == [0, 1]


def test_bad_sources_become_plan_rejects_with_reasons(tmp_path, samples_dir):
    corpus = make_bad_corpus(tmp_path / "src")
    (tmp_path / "src" / "whole.mp4").unlink()  # keep only the broken ones, plus one good
    os.symlink(samples_dir / "astronaut_zoom_in.mp4", tmp_path / "src" / "good.mp4")
    os.symlink(tmp_path / "src", tmp_path / "src" / "loop")  # a symlink loop is not followed
    plan = plan_samples(tmp_path / "src", load_style_library(), settings=TINY)
    assert [s.source_path.endswith("good.mp4") for s in plan.samples] == [True]
    reasons = {uri.rsplit("/", 1)[-1]: reject.reason for uri, reject in plan.rejects}
    expected = {
        path.name: reason
        for path, reason in corpus.values()
        if path.suffix in (".mp4", ".m4a") and path.name != "whole.mp4"
    }
    assert reasons == {name: reason for name, reason in expected.items() if name in reasons}
    assert reasons["empty.mp4"] == "not_a_video"
    assert reasons["truncated.mp4"] == "corrupt_video"
    assert reasons["one_frame.mp4"] == "too_few_frames"
    assert reasons["tiny_odd.mp4"] == "unsupported_dimensions"
    assert all(r.stage == "plan" and r.detail for _, r in plan.rejects)


def test_non_utf8_file_names_get_a_valid_uri(tmp_path):
    name = os.fsdecode(b"clip-\xff.mp4")
    uri = source_uri(tmp_path / name)
    uri.encode("utf-8")  # storable in Parquet
    assert uri.startswith("file://") and uri.endswith("clip-%FF.mp4")


def test_sources_from_a_list_file_and_missing_source(tmp_path, samples_dir):
    listing = tmp_path / "list.txt"
    listing.write_text(f"# demo\n{samples_dir / 'chelsea_zoom_out.mp4'}\n\n")
    assert [p.name for p in list_sources(listing)] == ["chelsea_zoom_out.mp4"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list_sources(tmp_path / "missing")


def test_shards_and_reference_frames():
    assert [len(s) for s in shards_of(list(range(7)), 3)] == [3, 3, 1]
    assert ref_frame_indices(9, 3) == [2, 4, 6]
    assert ref_frame_indices(81, 3) == [20, 40, 60]
    assert all(1 <= i < 9 for i in ref_frame_indices(9, 8))
