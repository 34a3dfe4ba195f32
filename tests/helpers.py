"""Test helpers: write real video files (good and deliberately broken) with PyAV."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np


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
    corpus["audio_only"] = (write_audio_only(folder / "audio_only.m4a"), "no_video_stream")
    Image.fromarray(good[0]).save(folder / "still.png")
    corpus["still_image"] = (folder / "still.png", "not_a_video")
    corpus["one_frame"] = (write_video(folder / "one_frame.mp4", good[:1]), "too_few_frames")
    corpus["tiny_odd"] = (
        write_video(folder / "tiny_odd.mp4", moving_frames(12, 17, 33), pix_fmt="yuv444p"),
        "unsupported_dimensions",
    )
    return corpus
