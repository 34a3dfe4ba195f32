"""Video I/O: probe, decode, clip sampling, H.264 and PNG encoding.

Decoding uses decord (fast random access) and falls back to PyAV, whose frames are bit-identical
(shared/FINDINGS.md). Every failure on a source file is a `VideoError` subclass whose `reason` is
the machine-readable code a reject records.
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image

# --- typed errors --------------------------------------------------------------------------


class VideoError(Exception):
    """A source video cannot be used. `reason` is the reject code, the message the detail."""

    reason = "video_error"

    def __init__(self, path: str | os.PathLike | None, message: str):
        self.path = str(path) if path is not None else None
        self.detail = message
        super().__init__(f"{self.path}: {message}" if self.path else message)


class VideoNotFoundError(VideoError):
    reason = "not_found"


class UnreadableVideoError(VideoError):
    reason = "unreadable"


class NotAVideoError(VideoError):
    reason = "not_a_video"


class NoVideoStreamError(VideoError):
    reason = "no_video_stream"


class CorruptVideoError(VideoError):
    reason = "corrupt_video"


class TooFewFramesError(VideoError):
    reason = "too_few_frames"


class UnsupportedDimensionsError(VideoError):
    reason = "unsupported_dimensions"


# Demuxers that ffmpeg uses for single images; such a file opens with one "video" frame.
_IMAGE_FORMATS = {"image2", "webp_pipe", "gif", "apng"}

# Leading bytes of video containers: a file that starts like one but fails to open is a
# truncated or corrupt video, not "not a video".
_CONTAINER_MAGIC = (
    (4, b"ftyp"),  # mp4 / mov / m4v
    (4, b"moov"),
    (4, b"mdat"),
    (0, b"\x1a\x45\xdf\xa3"),  # matroska / webm
    (0, b"RIFF"),  # avi
    (0, b"FLV"),
    (0, b"\x00\x00\x01\xba"),  # mpeg-ps
)


def _looks_like_video_container(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            head = handle.read(16)
    except OSError:
        return False
    return any(head[offset : offset + len(magic)] == magic for offset, magic in _CONTAINER_MAGIC)


# --- probing -------------------------------------------------------------------------------


@dataclass(frozen=True)
class VideoInfo:
    """What a source video is. `width`/`height` are the display size, after `rotation`."""

    path: str
    num_frames: int
    fps: float
    width: int
    height: int
    duration_s: float
    codec: str
    rotation: int  # clockwise degrees to apply for display: 0, 90, 180 or 270
    pix_fmt: str | None
    container: str


def _check_readable(path: Path) -> None:
    if not path.exists():
        raise VideoNotFoundError(path, "no such file")
    if path.is_dir():
        raise NotAVideoError(path, "is a directory")
    if not os.access(path, os.R_OK):
        raise UnreadableVideoError(path, "permission denied")
    if path.stat().st_size == 0:
        raise NotAVideoError(path, "empty file (0 bytes)")


def _open(path: Path) -> av.container.InputContainer:
    _check_readable(path)
    try:
        return av.open(str(path), mode="r", metadata_errors="ignore")
    except PermissionError as error:
        raise UnreadableVideoError(path, str(error)) from None
    except (av.error.FFmpegError, UnicodeDecodeError, OSError) as error:
        if _looks_like_video_container(path):
            raise CorruptVideoError(path, f"truncated or corrupt container: {error}") from None
        raise NotAVideoError(path, f"not a recognised video container: {error}") from None


def _display_rotation(container: av.container.InputContainer, stream, path: Path) -> int:
    """Clockwise display rotation (0/90/180/270) from the stream's display matrix.

    PyAV exposes the matrix on decoded frames (`VideoFrame.rotation`, counter-clockwise), so
    this decodes the first frame; a stream whose first frame does not decode is corrupt.
    """
    try:
        for frame in container.decode(stream):
            return (-int(round(frame.rotation))) % 360
    except av.error.FFmpegError as error:
        raise CorruptVideoError(path, f"first frame does not decode: {error}") from None
    raise CorruptVideoError(path, "video stream holds no decodable frame")


def _video_stream(container: av.container.InputContainer, path: Path):
    if not container.streams.video:
        kinds = sorted({s.type for s in container.streams}) or ["none"]
        raise NoVideoStreamError(path, f"no video stream (streams: {', '.join(kinds)})")
    return container.streams.video[0]


def probe(path: str | os.PathLike) -> VideoInfo:
    """Read a video's frame count, rate, display size, duration, codec and rotation."""
    path = Path(path)
    with _open(path) as container:
        if container.format.name in _IMAGE_FORMATS or container.format.name.endswith("_pipe"):
            raise NotAVideoError(path, f"a still image ({container.format.name}), not a video")
        stream = _video_stream(container, path)
        codec = stream.codec_context.name
        width, height = stream.codec_context.width, stream.codec_context.height
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        fps = float(rate) if rate else 0.0
        duration_s = (
            float(stream.duration * stream.time_base)
            if stream.duration
            else (container.duration / av.time_base if container.duration else 0.0)
        )
        num_frames = stream.frames
        rotation = _display_rotation(container, stream, path)
        if not num_frames:
            # Containers without a frame index (e.g. some mkv/ts): count packets, no decode.
            container.seek(0)
            num_frames = sum(1 for packet in container.demux(stream) if packet.size)
        pix_fmt = stream.codec_context.pix_fmt
        container_name = container.format.name
    if width <= 0 or height <= 0:
        raise UnsupportedDimensionsError(path, f"stream reports size {width}x{height}")
    if fps <= 0:
        fps = num_frames / duration_s if duration_s > 0 else 0.0
    if num_frames <= 0:
        raise CorruptVideoError(path, "video stream holds no frames")
    if rotation in (90, 270):
        width, height = height, width
    return VideoInfo(
        str(path),
        num_frames,
        fps,
        width,
        height,
        duration_s,
        codec,
        rotation,
        pix_fmt,
        container_name,
    )


# --- decoding ------------------------------------------------------------------------------


def _rotate(frames: np.ndarray, rotation: int) -> np.ndarray:
    """Apply a clockwise display rotation to NHWC frames."""
    if rotation == 0:
        return frames
    return np.ascontiguousarray(np.rot90(frames, k=-(rotation // 90), axes=(1, 2)))


def _decode_decord(path: Path, indices: list[int]) -> np.ndarray:
    import decord

    reader = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)
    if max(indices) >= len(reader):
        raise IndexError(f"frame {max(indices)} of {len(reader)}")
    return reader.get_batch(indices).asnumpy()


def _decode_pyav(path: Path, indices: list[int]) -> np.ndarray:
    wanted = {index: [] for index in indices}
    last = max(indices)
    decoded = 0
    with _open(path) as container:
        stream = _video_stream(container, path)
        stream.thread_type = "AUTO"
        try:
            for frame in container.decode(stream):
                if decoded in wanted:
                    wanted[decoded] = frame.to_ndarray(format="rgb24")
                decoded += 1
                if decoded > last:
                    break
        except av.error.FFmpegError as error:
            raise CorruptVideoError(path, f"decoding failed at frame {decoded}: {error}") from None
    if decoded <= last:
        raise CorruptVideoError(
            path, f"truncated: only {decoded} frames decode, frame {last} was needed"
        )
    return np.stack([wanted[index] for index in indices])


def decode_frames(path: str | os.PathLike, indices: list[int], rotation: int = 0) -> np.ndarray:
    """Decode source frames `indices` as uint8 RGB NHWC, upright (rotation applied)."""
    path = Path(path)
    if not indices:
        raise ValueError("no frame indices to decode")
    if min(indices) < 0:
        raise ValueError(f"negative frame index {min(indices)}")
    if rotation:
        # decord applies the display matrix itself, inconsistently across versions; PyAV
        # returns the coded frames and the rotation is applied here, the same way every time.
        return _rotate(_decode_pyav(path, indices), rotation)
    try:
        return _decode_decord(path, indices)
    except Exception:  # decord raises its own DECORDError and RuntimeErrors; PyAV decides
        return _decode_pyav(path, indices)


# --- clip sampling -------------------------------------------------------------------------


@dataclass(frozen=True)
class ClipSpec:
    """Which clip to cut from a source: frames, rate and size of the result."""

    num_frames: int
    height: int
    width: int
    fps: float | None = None  # None keeps the source rate
    start: int = 0  # first source frame
    max_upscale: float = 2.0  # refuse sources that must be enlarged more than this to cover HxW

    def __post_init__(self) -> None:
        if self.num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {self.num_frames}")
        for name in ("height", "width"):
            value = getattr(self, name)
            if value <= 0 or value % 16:
                raise ValueError(f"{name} must be a positive multiple of 16, got {value}")
        if self.fps is not None and not (self.fps > 0 and math.isfinite(self.fps)):
            raise ValueError(f"fps must be positive, got {self.fps}")
        if self.start < 0:
            raise ValueError(f"start must be >= 0, got {self.start}")
        if self.max_upscale < 1:
            raise ValueError(f"max_upscale must be >= 1, got {self.max_upscale}")


@dataclass(frozen=True)
class Clip:
    frames: np.ndarray  # uint8, (num_frames, height, width, 3)
    fps: float
    source_indices: list[int]
    info: VideoInfo


def clip_frame_indices(source_frames: int, source_fps: float, spec: ClipSpec) -> list[int]:
    """Source frame indices of a clip, resampled from `source_fps` to `spec.fps` by frame index.

    Output frame i shows the source frame nearest to time i / fps after the clip start.
    """
    step = 1.0 if spec.fps is None else source_fps / spec.fps
    indices = [spec.start + int(math.floor(i * step + 0.5)) for i in range(spec.num_frames)]
    if indices[-1] >= source_frames:
        needed = indices[-1] + 1
        raise TooFewFramesError(
            None,
            f"clip needs source frames {spec.start}..{indices[-1]} ({needed} frames at "
            f"{source_fps:g} fps for {spec.num_frames} frames at {spec.fps or source_fps:g} fps) "
            f"but the video has {source_frames}",
        )
    return indices


def crop_box(src_width: int, src_height: int, width: int, height: int) -> tuple[float, ...]:
    """The centred box of the source with the target aspect ratio (left, top, right, bottom)."""
    target_aspect = width / height
    if src_width / src_height > target_aspect:
        crop_width = src_height * target_aspect
        left = (src_width - crop_width) / 2
        return (left, 0.0, left + crop_width, float(src_height))
    crop_height = src_width / target_aspect
    top = (src_height - crop_height) / 2
    return (0.0, top, float(src_width), top + crop_height)


def resize_center_crop(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """Scale NHWC frames to cover height x width and crop the centre, in one resampling."""
    src_height, src_width = frames.shape[1:3]
    if (src_height, src_width) == (height, width):
        return frames
    box = crop_box(src_width, src_height, width, height)
    out = np.empty((len(frames), height, width, 3), dtype=np.uint8)
    for i, frame in enumerate(frames):
        image = Image.fromarray(frame).resize((width, height), Image.Resampling.BICUBIC, box=box)
        out[i] = np.asarray(image)
    return out


def read_clip(path: str | os.PathLike, spec: ClipSpec, info: VideoInfo | None = None) -> Clip:
    """Cut `spec`'s clip out of a source video: probe, pick frames, decode, resize and crop."""
    info = info or probe(path)
    scale = max(spec.width / info.width, spec.height / info.height)
    if scale > spec.max_upscale:
        raise UnsupportedDimensionsError(
            path,
            f"source {info.width}x{info.height} would need {scale:.2f}x upscaling to cover "
            f"{spec.width}x{spec.height} (max_upscale={spec.max_upscale:g})",
        )
    try:
        indices = clip_frame_indices(info.num_frames, info.fps, spec)
    except TooFewFramesError as error:
        raise TooFewFramesError(path, error.detail) from None
    frames = decode_frames(path, indices, rotation=info.rotation)
    frames = resize_center_crop(frames, spec.height, spec.width)
    return Clip(frames=frames, fps=spec.fps or info.fps, source_indices=indices, info=info)


# --- encoding ------------------------------------------------------------------------------


def encode_mp4(frames: np.ndarray, fps: float, crf: int = 18, preset: str = "medium") -> bytes:
    """Encode uint8 RGB NHWC frames to H.264 (yuv420p) mp4 bytes."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(
            f"expected uint8 frames of shape (N, H, W, 3), got {frames.dtype} {frames.shape}"
        )
    if len(frames) == 0:
        raise ValueError("no frames to encode")
    height, width = frames.shape[1:3]
    if height % 2 or width % 2:
        raise UnsupportedDimensionsError(
            None, f"H.264 yuv420p needs even dimensions, got {width}x{height}"
        )
    if not 0 <= crf <= 51:
        raise ValueError(f"crf must be in [0, 51], got {crf}")
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf), "preset": preset}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return buffer.getvalue()


@dataclass(frozen=True)
class EncodedVideoInfo:
    num_frames: int
    fps: float
    width: int
    height: int
    codec: str


def decode_mp4(data: bytes) -> tuple[np.ndarray, EncodedVideoInfo]:
    """Decode mp4 bytes (as stored in a shard) to uint8 RGB NHWC frames and their metadata."""
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            if not container.streams.video:
                raise NoVideoStreamError(None, "no video stream in the stored bytes")
            stream = container.streams.video[0]
            frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
            rate = stream.average_rate or stream.guessed_rate
            codec = stream.codec_context.name
    except av.error.FFmpegError as error:
        raise CorruptVideoError(None, f"stored video does not decode: {error}") from None
    if not frames:
        raise CorruptVideoError(None, "stored video holds no frames")
    array = np.stack(frames)
    info = EncodedVideoInfo(
        len(frames), float(rate) if rate else 0.0, array.shape[2], array.shape[1], codec
    )
    return array, info


def probe_mp4(data: bytes) -> EncodedVideoInfo:
    """Read frame count, fps and size of mp4 bytes from the container header, without decoding."""
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            if not container.streams.video:
                raise NoVideoStreamError(None, "no video stream in the stored bytes")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            info = EncodedVideoInfo(
                stream.frames,
                float(rate) if rate else 0.0,
                stream.codec_context.width,
                stream.codec_context.height,
                stream.codec_context.name,
            )
    except av.error.FFmpegError as error:
        raise CorruptVideoError(None, f"stored video does not open: {error}") from None
    if info.num_frames <= 0:
        raise CorruptVideoError(None, "stored video's header lists no frames")
    return info


def encode_png(frame: np.ndarray, compress_level: int = 4) -> bytes:
    """Encode one uint8 RGB HWC frame as PNG bytes."""
    frame = np.asarray(frame)
    if frame.ndim != 3 or frame.shape[-1] != 3 or frame.dtype != np.uint8:
        raise ValueError(
            f"expected a uint8 frame of shape (H, W, 3), got {frame.dtype} {frame.shape}"
        )
    buffer = io.BytesIO()
    Image.fromarray(frame).save(buffer, format="PNG", compress_level=compress_level)
    return buffer.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    """Decode PNG bytes to a uint8 RGB HWC frame."""
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        raise ValueError("not PNG bytes")
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))
