"""Clean clips before any GPU (datagen/stages/clean.py): no planned clip crosses a shot cut,
and a still video is rejected as too static; both on real encoded videos, during planning."""

from __future__ import annotations

import numpy as np
import pytest

from datagen.data.demo_clips import SampleClip, _photo, camera_move
from datagen.data.styles import load_style_library
from datagen.data.video import clip_frame_indices, encode_mp4, probe
from datagen.stages.clean import CleanSettings
from datagen.stages.plan import ClipSettings, plan_samples

TINY = ClipSettings(num_frames=9, height=64, width=64, fps=8.0)  # a clip spans 25 frames at 24 fps
CLEAN = CleanSettings()
SHOT_A = SampleClip("a", "astronaut", 320, 240, 24, 24.0, "pan_right")
SHOT_B = SampleClip("b", "coffee", 320, 240, 48, 24.0, "zoom_in")
CUT = SHOT_A.frames  # the first frame of the second shot


def write_video(path, frames, fps=24.0):
    path.write_bytes(encode_mp4(frames, fps, crf=20))
    return path


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clean")
    two_shots = np.concatenate(
        [camera_move(_photo(SHOT_A.image), SHOT_A), camera_move(_photo(SHOT_B.image), SHOT_B)]
    )
    write_video(folder / "cut.mp4", two_shots)
    still = np.repeat(camera_move(_photo("chelsea"), SHOT_A)[:1], 40, axis=0)
    write_video(folder / "still.mp4", still)
    return folder


def plan(path, clips_per_video=1, clean=CLEAN):
    return plan_samples(
        path, load_style_library(), settings=TINY, clips_per_video=clips_per_video, clean=clean
    )


def source_frames(sample) -> list[int]:
    info = probe(sample.source_path)
    return clip_frame_indices(info.num_frames, info.fps, TINY.spec(sample.clip_start))


def test_a_clip_over_a_hard_cut_is_moved_inside_the_next_shot(sources):
    unchecked = plan(sources / "cut.mp4", clean=CleanSettings(0.0, 0.0))
    assert [s.clip_start for s in unchecked.samples] == [0]  # its 25 frames cross frame 24
    assert (
        min(source_frames(unchecked.samples[0])) < CUT <= max(source_frames(unchecked.samples[0]))
    )

    moved = plan(sources / "cut.mp4")
    assert [s.clip_start for s in moved.samples] == [CUT] and moved.rejects == []
    assert moved.samples[0].sample_id != unchecked.samples[0].sample_id  # another clip


def test_no_planned_clip_crosses_the_cut(sources):
    result = plan(sources / "cut.mp4", clips_per_video=4)
    assert result.samples, "the second shot holds a clip"
    for sample in result.samples:
        frames = source_frames(sample)
        assert not (frames[0] < CUT <= frames[-1]), (sample.clip_start, frames)
    # the clips that could not move (their next shot taken or too short) are rejects, by id
    reasons = {reject.reason for _, reject in result.rejects}
    assert reasons <= {"scene_cut"}
    assert len(result.samples) + len(result.rejects) == 4


def test_a_camera_move_is_not_a_cut_and_a_still_video_is_too_static(sources, tmp_path):
    zoom = write_video(tmp_path / "zoom.mp4", camera_move(_photo("coffee"), SHOT_B))
    assert [s.clip_start for s in plan(zoom).samples] == [0]
    still = plan(sources / "still.mp4")
    assert still.samples == []
    [(uri, reject)] = still.rejects
    assert uri.endswith("still.mp4") and reject.reason == "too_static" and reject.stage == "plan"
    measured = float(reject.detail.split("%")[0].removeprefix("motion "))
    assert measured < 0.05 and reject.detail.endswith("% of the width per frame < min_motion 0.1")
    assert plan(sources / "still.mp4", clean=CleanSettings(min_motion=0.0)).samples  # off


def test_the_build_records_the_still_clip_as_rejected_and_a_rerun_decodes_it_no_more(
    sources, tmp_path, monkeypatch
):
    from datagen.build.plan import plan_build
    from datagen.build.settings import BuildConfig
    from datagen.data.dataset import read_rejects
    from datagen.stages import clean

    config = BuildConfig(source=str(sources), out=str(tmp_path / "out"), shard_size=4)
    first = plan_build(config)
    assert first.planned == 2 and first.to_build == 1  # the cut clip, moved; the still one
    [row] = read_rejects(config.dataset_dir).to_pylist()
    assert row["reason"] == "too_static" and row["source_uri"].endswith("still.mp4")

    checked = []
    monkeypatch.setattr(clean, "motion", lambda frames: checked.append(1) or 1.0)
    again = plan_build(config)  # the reject is accounted for: that clip is not decoded again
    assert again.skipped_rejected == 1 and again.plan_rejects == 0
    assert len(checked) == 1  # only the cut clip, which is not committed yet
    assert len(read_rejects(config.dataset_dir)) == 1
