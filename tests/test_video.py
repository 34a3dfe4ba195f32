"""Video I/O: probe, decode, clip sampling, encoding, and typed errors on broken files."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import make_bad_corpus, moving_frames, write_video

from datagen.data import video
from datagen.data.video import ClipSpec


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """48 frames of 96x160 at 24 fps, losslessly encoded so pixel checks are exact-ish."""
    frames = moving_frames(48, 96, 160)
    path = write_video(
        tmp_path_factory.mktemp("src") / "source.mp4", frames, fps=24, pix_fmt="yuv444p"
    )
    return path, frames


def test_probe_reports_frames_fps_size_codec(source):
    path, frames = source
    info = video.probe(path)
    assert (info.num_frames, info.width, info.height) == (48, 160, 96)
    assert info.fps == pytest.approx(24)
    assert info.duration_s == pytest.approx(2.0, abs=0.05)
    assert info.codec == "h264"
    assert info.rotation == 0


def test_decode_selected_frames_matches_source(source):
    path, frames = source
    decoded = video.decode_frames(path, [0, 5, 47])
    assert decoded.shape == (3, 96, 160, 3) and decoded.dtype == np.uint8
    # lossless yuv444p: only colour-conversion rounding remains
    assert np.abs(decoded.astype(int) - frames[[0, 5, 47]].astype(int)).max() <= 3


def test_decord_and_pyav_agree(source):
    path, _ = source
    indices = [1, 2, 30]
    assert np.array_equal(video._decode_decord(path, indices), video._decode_pyav(path, indices))


def test_clip_indices_resample_by_frame_index():
    spec = ClipSpec(num_frames=5, height=16, width=16, fps=12, start=3)
    assert video.clip_frame_indices(100, 24.0, spec) == [3, 5, 7, 9, 11]
    upsample = ClipSpec(num_frames=4, height=16, width=16, fps=48)
    assert video.clip_frame_indices(100, 24.0, upsample) == [0, 1, 1, 2]  # nearest frame
    keep = ClipSpec(num_frames=3, height=16, width=16, start=10)
    assert video.clip_frame_indices(13, 30.0, keep) == [10, 11, 12]


def test_clip_needing_more_frames_than_the_video_has_is_too_few_frames():
    spec = ClipSpec(num_frames=10, height=16, width=16, fps=8, start=20)
    with pytest.raises(video.TooFewFramesError, match="has 30"):
        video.clip_frame_indices(30, 24.0, spec)


def test_read_clip_resamples_resizes_and_crops(source):
    path, frames = source
    spec = ClipSpec(num_frames=6, height=64, width=64, fps=12, start=2)
    clip = video.read_clip(path, spec)
    assert clip.frames.shape == (6, 64, 64, 3)
    assert clip.fps == 12
    assert clip.source_indices == [2, 4, 6, 8, 10, 12]
    # the red channel encodes the frame number (9 per frame)
    reds = clip.frames[:, 32, 32, 0].astype(int)
    assert np.abs(reds - np.array(clip.source_indices) * 9).max() <= 3
    # centre crop of a 160-wide source to a square: columns 32..128 survive, so the blue
    # ramp (x*255/159) starts near 32*255/159 = 51 instead of 0
    assert 40 < clip.frames[0, 32, 0, 2] < 62
    assert 190 < clip.frames[0, 32, -1, 2] < 215


def test_resize_center_crop_portrait_keeps_the_middle_rows():
    frames = moving_frames(1, 200, 100)  # portrait
    out = video.resize_center_crop(frames, 32, 64)  # landscape target: crop rows 75..125
    assert out.shape == (1, 32, 64, 3)
    green = out[0, :, 32, 1].astype(int)  # green encodes the source row
    assert 90 < green[0] < 105 and 150 < green[-1] < 165


def test_clip_spec_rejects_bad_sizes():
    with pytest.raises(ValueError, match="multiple of 16"):
        ClipSpec(num_frames=9, height=50, width=64)
    with pytest.raises(ValueError, match="num_frames"):
        ClipSpec(num_frames=0, height=64, width=64)


def test_mp4_round_trip_keeps_frames_fps_and_size():
    frames = moving_frames(9, 64, 96)
    data = video.encode_mp4(frames, fps=16, crf=0)
    assert data[4:8] == b"ftyp"
    decoded, info = video.decode_mp4(data)
    assert (info.num_frames, info.height, info.width) == (9, 64, 96)
    assert info.fps == pytest.approx(16)
    assert info.codec == "h264"
    assert np.abs(decoded.astype(int) - frames.astype(int)).mean() < 3
    header = video.probe_mp4(data)
    assert (header.num_frames, header.height, header.width) == (9, 64, 96)


def test_encode_refuses_odd_dimensions_and_bad_input():
    with pytest.raises(video.UnsupportedDimensionsError, match="even"):
        video.encode_mp4(moving_frames(2, 17, 32), fps=16)
    with pytest.raises(ValueError, match="uint8"):
        video.encode_mp4(np.zeros((2, 16, 16, 3), np.float32), fps=16)


def test_png_round_trip_is_lossless():
    frame = moving_frames(1, 20, 30)[0]
    data = video.encode_png(frame)
    assert np.array_equal(video.decode_png(data), frame)
    with pytest.raises(ValueError, match="PNG"):
        video.decode_png(b"GIF89a")


def test_corrupt_stored_video_bytes_give_a_typed_error():
    with pytest.raises(video.CorruptVideoError):
        video.decode_mp4(b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 100)


@pytest.fixture(scope="module")
def bad_corpus(tmp_path_factory):
    return make_bad_corpus(tmp_path_factory.mktemp("bad"))


@pytest.mark.parametrize(
    "name", ["empty", "text", "truncated", "audio_only", "still_image", "one_frame", "tiny_odd"]
)
def test_bad_files_raise_specific_typed_errors(bad_corpus, name):
    path, reason = bad_corpus[name]
    spec = ClipSpec(num_frames=9, height=64, width=64)
    with pytest.raises(video.VideoError) as caught:
        video.read_clip(path, spec)
    assert caught.value.reason == reason, str(caught.value)
    assert str(path) in str(caught.value)


def test_truncated_file_with_index_up_front_fails_at_decode(tmp_path):
    whole = write_video(tmp_path / "fast.mp4", moving_frames(40, 48, 64), faststart=True)
    data = whole.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: int(len(data) * 0.4)])
    info = video.probe(cut)  # the header still claims every frame
    assert info.num_frames == 40
    with pytest.raises(video.CorruptVideoError, match="truncated|decod"):
        video.read_clip(cut, ClipSpec(num_frames=40, height=48, width=64))


def test_odd_dimension_source_that_is_large_enough_is_cropped(tmp_path):
    path = write_video(tmp_path / "odd.mp4", moving_frames(12, 99, 131), pix_fmt="yuv444p")
    clip = video.read_clip(path, ClipSpec(num_frames=9, height=64, width=96))
    assert clip.frames.shape == (9, 64, 96, 3)


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(video.VideoNotFoundError):
        video.probe(tmp_path / "nope.mp4")
    with pytest.raises(video.NotAVideoError, match="directory"):
        video.probe(tmp_path)


@pytest.mark.parametrize("ccw_degrees, clockwise", [(-90, 90), (90, 270), (180, 180)])
def test_rotation_metadata_is_reported_and_applied(tmp_path, ccw_degrees, clockwise):
    import av

    frames = moving_frames(6, 32, 48)  # stored landscape
    path = tmp_path / "rotated.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=16)
        stream.width, stream.height, stream.pix_fmt = 48, 32, "yuv444p"
        stream.options = {"crf": "0"}
        stream.set_display_rotation(ccw_degrees)
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    info = video.probe(path)
    assert info.rotation == clockwise
    expected_size = (48, 32) if clockwise in (90, 270) else (32, 48)  # (height, width)
    assert (info.height, info.width) == expected_size
    upright = video.decode_frames(path, [0], rotation=info.rotation)
    assert upright.shape[1:3] == expected_size
    expected = np.rot90(frames[:1], k=-(clockwise // 90), axes=(1, 2))
    assert np.abs(upright.astype(int) - expected.astype(int)).max() <= 3
