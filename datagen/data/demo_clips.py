"""`datagen samples DIR`: demo source clips made offline.

Camera pans and zooms over the photographs that ship inside scikit-image (no download), with
varied sizes, lengths, frame rates and orientations, so the embedded demo has real, decodable,
moving videos to work on.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from datagen.core.files import temporary_path
from datagen.data.video import encode_mp4


@dataclass(frozen=True)
class SampleClip:
    """One demo clip: which photo, the camera move, and the output geometry."""

    name: str
    image: str  # a skimage.data function name
    width: int
    height: int
    frames: int
    fps: float
    move: str  # "pan_right", "pan_down", "zoom_in", "zoom_out"


SAMPLE_CLIPS = (
    SampleClip("astronaut_zoom_in", "astronaut", 320, 240, 48, 24.0, "zoom_in"),
    SampleClip("coffee_pan_right", "coffee", 384, 216, 60, 30.0, "pan_right"),
    SampleClip("chelsea_zoom_out", "chelsea", 256, 256, 40, 16.0, "zoom_out"),
    SampleClip("rocket_pan_down_portrait", "rocket", 208, 368, 56, 24.0, "pan_down"),
    SampleClip("hubble_pan_right", "hubble_deep_field", 448, 256, 72, 24.0, "pan_right"),
    SampleClip("camera_zoom_in", "camera", 288, 224, 36, 12.0, "zoom_in"),
)


def _photo(name: str) -> np.ndarray:
    import skimage.data

    image = getattr(skimage.data, name)()
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    return np.ascontiguousarray(image[..., :3]).astype(np.uint8)


def camera_move(photo: np.ndarray, clip: SampleClip) -> np.ndarray:
    """Frames of a smooth pan or zoom over `photo`, (frames, height, width, 3) uint8."""
    src_h, src_w = photo.shape[:2]
    aspect = clip.width / clip.height
    # the largest window of the output aspect that fits the photo
    base_w = min(src_w, src_h * aspect)
    base_h = base_w / aspect
    image = Image.fromarray(photo)
    frames = np.empty((clip.frames, clip.height, clip.width, 3), np.uint8)
    for i in range(clip.frames):
        t = i / max(clip.frames - 1, 1)
        t = t * t * (3 - 2 * t)  # ease in and out
        if clip.move in ("zoom_in", "zoom_out"):
            scale = 1.0 - 0.45 * (t if clip.move == "zoom_in" else 1 - t)
            w, h = base_w * scale, base_h * scale
            left, top = (src_w - w) / 2, (src_h - h) / 2
        else:
            w, h = base_w * 0.7, base_h * 0.7
            if clip.move == "pan_right":
                left, top = (src_w - w) * t, (src_h - h) / 2
            else:
                left, top = (src_w - w) / 2, (src_h - h) * t
        box = (left, top, left + w, top + h)
        frames[i] = np.asarray(
            image.resize((clip.width, clip.height), Image.Resampling.BICUBIC, box=box)
        )
    return frames


def write_samples(directory: str | os.PathLike, clips=SAMPLE_CLIPS) -> list[Path]:
    """Write the demo clips as mp4 files (each appears only complete); return their paths.

    Existing files are kept, so a second call is cheap and reruns see the same sources."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for clip in clips:
        path = directory / f"{clip.name}.mp4"
        if not path.exists():
            data = encode_mp4(camera_move(_photo(clip.image), clip), clip.fps, crf=20)
            tmp = temporary_path(path)
            tmp.write_bytes(data)
            os.replace(tmp, path)
        written.append(path)
    return written
