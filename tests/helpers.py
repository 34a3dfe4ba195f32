"""Test helpers: write real video files (good and deliberately broken) with PyAV."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest


def moving_frames(num_frames: int, height: int, width: int) -> np.ndarray:
    """Frames whose pixel values encode (frame, row, column), so crops and resampling show."""
    t = np.arange(num_frames)[:, None, None]
    y = np.arange(height)[None, :, None]
    x = np.arange(width)[None, None, :]
    red = np.broadcast_to((t * 9) % 256, (num_frames, height, width))
    green = np.broadcast_to((y * 255) // max(height - 1, 1), (num_frames, height, width))
    blue = np.broadcast_to((x * 255) // max(width - 1, 1), (num_frames, height, width))
    return np.stack([red, green, blue], axis=-1).astype(np.uint8)


def write_video(
    path: Path,
    frames: np.ndarray,
    fps: float = 16,
    codec: str = "libx264",
    pix_fmt: str = "yuv420p",
    faststart: bool = False,
    crf: int = 0,
    container_options: dict | None = None,
) -> Path:
    options = dict(container_options or {})
    if faststart:
        options["movflags"] = "faststart"
    with av.open(str(path), mode="w", options=options) as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = pix_fmt
        if codec.startswith("libx264"):
            stream.options = {"crf": str(crf), "preset": "ultrafast"}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path


def write_audio_only(path: Path, seconds: float = 1.0) -> Path:
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("aac", rate=44100)
        stream.layout = "mono"
        samples = int(44100 * seconds)
        tone = np.sin(np.arange(samples) / 10).astype(np.float32)[None, :]
        for start in range(0, samples, 1024):
            chunk = np.ascontiguousarray(tone[:, start : start + 1024])
            frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout="mono")
            frame.sample_rate = 44100
            frame.pts = start
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def make_bad_corpus(folder: Path) -> dict[str, tuple[Path, str]]:
    """Broken inputs: name -> (file, expected reject reason)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    good = moving_frames(24, 48, 64)
    corpus = {}
    (folder / "empty.mp4").write_bytes(b"")
    corpus["empty"] = (folder / "empty.mp4", "not_a_video")
    (folder / "text.mp4").write_text("this is not a video\n" * 50)
    corpus["text"] = (folder / "text.mp4", "not_a_video")
    whole = write_video(folder / "whole.mp4", good).read_bytes()
    (folder / "truncated.mp4").write_bytes(whole[: len(whole) // 2])
    corpus["truncated"] = (folder / "truncated.mp4", "corrupt_video")
    corpus["audio_only"] = (write_audio_only(folder / "audio_only.mp4"), "no_video_stream")
    Image.fromarray(good[0]).save(folder / "still_image.mp4", format="PNG")
    corpus["still_image"] = (folder / "still_image.mp4", "not_a_video")
    corpus["one_frame"] = (write_video(folder / "one_frame.mp4", good[:1]), "too_few_frames")
    corpus["tiny_odd"] = (
        write_video(folder / "tiny_odd.mp4", moving_frames(12, 17, 33), pix_fmt="yuv444p"),
        "unsupported_dimensions",
    )
    return corpus


def write_rotated(path: Path, frames: np.ndarray, ccw_degrees: int) -> Path:
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=16)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        stream.set_display_rotation(ccw_degrees)
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path


def write_variable_rate(path: Path, frames: np.ndarray) -> Path:
    """Matroska with irregular frame timestamps (alternating 20 ms and 50 ms)."""
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=30)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        stream.codec_context.time_base = Fraction(1, 1000)
        pts = 0
        for i, frame in enumerate(frames):
            video_frame = av.VideoFrame.from_ndarray(frame, format="rgb24")
            video_frame.pts, video_frame.time_base = pts, Fraction(1, 1000)
            pts += 20 if i % 2 else 50
            container.mux(stream.encode(video_frame))
        container.mux(stream.encode())
    return path


def make_hostile_sources(folder: Path) -> dict[str, str | None]:
    """Good and bad sources side by side: file name -> expected reject reason (None: must
    become a pair). Covers the bad-input list of the reliability issue."""
    import os

    expected: dict[str, str | None] = {}
    for name, (path, reason) in make_bad_corpus(folder).items():
        if name != "whole":
            expected[path.name] = reason
    (folder / "whole.mp4").unlink()
    expected["short.mp4"] = "too_few_frames"
    write_video(folder / "short.mp4", moving_frames(6, 64, 96))  # shorter than the clip
    corrupt = bytearray(
        write_video(
            folder / "c.mp4", moving_frames(40, 64, 96), faststart=True, crf=20
        ).read_bytes()
    )
    start = len(corrupt) // 4  # past the header, inside the frames the clip needs
    for k in range(start, start + 400, 7):
        corrupt[k] ^= 0xFF  # broken packets mid-stream
    (folder / "c.mp4").unlink()
    (folder / "corrupt_mid_stream.mp4").write_bytes(bytes(corrupt))
    expected["corrupt_mid_stream.mp4"] = "corrupt_video"
    # good ones, each odd in its own way
    write_video(folder / "uhd_4k.mp4", moving_frames(20, 2160, 3840), crf=30)
    write_video(folder / "portrait.mp4", moving_frames(20, 160, 96))
    write_rotated(folder / "rotated.mp4", moving_frames(20, 96, 128), -90)
    write_video(folder / "ten_bit.mp4", moving_frames(20, 64, 96), pix_fmt="yuv420p10le")
    write_variable_rate(folder / "variable_rate.mkv", moving_frames(40, 64, 96))
    write_video(folder / "odd_but_large.mp4", moving_frames(20, 99, 131), pix_fmt="yuv444p")
    non_utf8 = os.fsdecode(b"caf\xe9-latin1.mp4")
    write_video(folder / non_utf8, moving_frames(20, 64, 96))
    for name in (
        "uhd_4k.mp4",
        "portrait.mp4",
        "rotated.mp4",
        "ten_bit.mp4",
        "variable_rate.mkv",
        "odd_but_large.mp4",
        non_utf8,
    ):
        expected[name] = None
    os.symlink(folder, folder / "loop")  # a symlink loop: not followed, not an error
    return expected


REPO = Path(__file__).resolve().parent.parent


def load_script(relative_path: str, name: str):
    """A script of the repository (scripts/, bench/) as a module, loaded once per session so
    the test files that use it share one instance."""
    import importlib.util
    import sys

    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / relative_path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def load_demo():
    """scripts/demo.py (`make demo`) as a module."""
    return load_script("scripts/demo.py", "datagen_demo_script")


@contextlib.contextmanager
def private_prefect(home: Path) -> Iterator[None]:
    """Point Prefect at its own PREFECT_HOME (so a temporary server never shares a SQLite
    database), with no API URL (a temporary local server), no analytics or Ray usage stats,
    and, as `datagen build` does, 120 s for the temporary server to start on a busy machine."""
    from prefect.settings import (
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
        temporary_settings,
    )

    with pytest.MonkeyPatch.context() as patch:
        # for the processes Prefect and Ray start (the temporary server reads PREFECT_HOME)
        patch.setenv("PREFECT_HOME", str(home))
        patch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        patch.setenv("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
        patch.setenv("RAY_USAGE_STATS_ENABLED", "0")
        patch.delenv("PREFECT_API_URL", raising=False)
        # This process read Prefect's settings when it first imported prefect, before the
        # variables above: the start-up timeout is given to its settings too (it was 20 s).
        with temporary_settings(updates={PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS: 120}):
            yield
