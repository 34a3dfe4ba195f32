"""Plan stage: scan the source videos, cut clips, assign styles, derive deterministic ids.

Nothing here loads a model. A source that cannot be used becomes a reject (stage `plan`) with
the reason code of its `VideoError`; the plan goes on with the others. The same source files,
parameters and seed always give the same samples and `sample_id`s, which is what makes reruns
resume instead of duplicating.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable, Container, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import quote

from datagen.core.files import content_digest
from datagen.core.stage import Reject
from datagen.data.manifest import ManifestEntry, ManifestError, is_manifest, read_manifest
from datagen.data.styles import Style, StyleLibrary
from datagen.data.video import (
    ClipSpec,
    TooFewFramesError,
    UnsupportedDimensionsError,
    VideoError,
    clip_frame_indices,
    probe,
)
from datagen.stages.clean import CleanSettings, clean_start

VIDEO_SUFFIXES = {".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v", ".mpg", ".mpeg", ".ts"}


@dataclass(frozen=True)
class ClipSettings:
    """The geometry every clip of a run is cut to (production: 81 frames, 480x832, 16 fps)."""

    num_frames: int = 81
    height: int = 480
    width: int = 832
    fps: float = 16.0
    max_upscale: float = 2.0

    def spec(self, start: int = 0) -> ClipSpec:
        return ClipSpec(self.num_frames, self.height, self.width, self.fps, start, self.max_upscale)


@dataclass(frozen=True)
class PlannedSample:
    """One sample to build: a clip of a source, a style and a seed."""

    sample_id: str
    source_uri: str
    source_path: str
    clip_start: int  # first source frame
    num_frames: int
    fps: float
    height: int
    width: int
    style_id: str
    seed: int
    source_id: str = ""  # the collection's id of the source (a manifest's), or its file name
    licence: str | None = None  # the source's licence, where the manifest gives one


@dataclass
class Plan:
    samples: list[PlannedSample] = field(default_factory=list)
    rejects: list[tuple[str, Reject]] = field(default_factory=list)  # (source_uri, reject)
    clips_rejected: int = 0  # of the rejects, clips (scene_cut, too_static): planned samples


def source_uri(path: Path) -> str:
    """A file:// URI for any file name, including names that are not valid UTF-8."""
    return "file://" + quote(os.fsencode(os.path.abspath(path)), safe="/")


def list_sources(source: str | os.PathLike) -> list[Path]:
    """Video files of a source: a directory (walked, symlinked dirs not followed, so a symlink
    loop cannot trap the scan), a single video file, or a .txt file listing one path per line."""
    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"source {source} does not exist")
    if source.is_file() and source.suffix == ".txt":
        lines = source.read_text(encoding="utf-8").splitlines()
        return [
            Path(line.strip())
            for line in lines
            if line.strip() and not line.strip().startswith("#")
        ]
    if source.is_file():
        return [source]
    found = []
    for root, dirs, files in os.walk(source, followlinks=False):
        dirs.sort()
        for name in sorted(files):
            if Path(name).suffix.lower() in VIDEO_SUFFIXES and not name.startswith("."):
                found.append(Path(root) / name)
    return found


def _digest(*parts: object) -> bytes:
    return hashlib.sha256("|".join(str(p) for p in parts).encode()).digest()


def clip_starts(
    source_frames: int, source_fps: float, settings: ClipSettings, clips_per_video: int
) -> list[int]:
    """Evenly spaced start frames of up to `clips_per_video` clips that fit in the video."""
    span = clip_frame_indices(10**12, source_fps, settings.spec())[-1] + 1
    room = source_frames - span
    if room < 0:
        return []
    count = min(clips_per_video, room + 1)
    if count == 1:
        return [0]
    return sorted({round(i * room / (count - 1)) for i in range(count)})


def assign_style(styles: list[Style], uri: str, start: int, seed: int) -> Style:
    """A style per clip from a hash of (clip, seed): stable when sources are added or removed."""
    index = int.from_bytes(_digest("style", uri, start, seed)[:8], "big") % len(styles)
    return styles[index]


def plan_samples(
    source: str | os.PathLike,
    library: StyleLibrary,
    *,
    style_ids: list[str] | None = None,
    settings: ClipSettings | None = None,
    clips_per_video: int = 1,
    limit: int | None = None,
    seed: int = 0,
    clean: CleanSettings | None = None,
    known: Container[str] = (),
    digest_of: Callable[[Path], str] = content_digest,
) -> Plan:
    """Plan every sample of a run (see module docstring). With `clean`, each clip is checked
    for shot cuts and motion first (stages/clean.py): moved inside one shot, or rejected
    (`scene_cut`, `too_static`, under the clip's own sample id). Clips in `known` (committed
    or rejected already) are planned as they are, not decoded again."""
    settings = settings or ClipSettings()
    if clips_per_video < 1:
        raise ValueError(f"clips_per_video must be >= 1, got {clips_per_video}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    styles = library.select(style_ids)
    plan = Plan()
    seen: set[str] = set()  # sample ids planned: two manifest rows may name the same clip

    def add(sample: PlannedSample) -> None:
        if sample.sample_id not in seen:
            seen.add(sample.sample_id)
            plan.samples.append(sample)

    contents: dict[str, str] = {}  # content digest -> the first source with those bytes
    for path, entry in sources_of(source):
        if limit is not None and len(plan.samples) >= limit:
            break
        if isinstance(entry, ManifestError):
            reject_id = "src-" + _digest("manifest", source, entry.row).hex()[:16]
            plan.rejects.append(
                (
                    f"{source}#{entry.row}",
                    Reject(reject_id, "plan", "bad_manifest_row", entry.detail),
                )
            )
            continue
        uri = source_uri(path)
        try:
            digest = digest_of(path)
        except OSError:
            digest = None  # probe names what is wrong with it
        if digest is not None and contents.setdefault(digest, uri) != uri:
            # the same bytes under another name (or row): planned once, from the first
            reject_id = "src-" + _digest("source", uri, *_span_key(entry)).hex()[:16]
            detail = f"the same content (sha256 {digest[:16]}...) as {contents[digest]}"
            plan.rejects.append((uri, Reject(reject_id, "plan", "duplicate_source", detail)))
            continue
        try:
            info = probe(path)
            scale = max(settings.width / info.width, settings.height / info.height)
            if scale > settings.max_upscale:
                raise UnsupportedDimensionsError(
                    path,
                    f"source {info.width}x{info.height} would need {scale:.2f}x "
                    f"upscaling to cover {settings.width}x{settings.height}",
                )
            first, end = span_frames(entry, info)
            starts = [
                first + s for s in clip_starts(end - first, info.fps, settings, clips_per_video)
            ]
            if not starts:
                try:
                    clip_frame_indices(end - first, info.fps, settings.spec())  # raises
                except TooFewFramesError as error:
                    if (first, end) == (0, info.num_frames):  # the whole video
                        raise
                    raise TooFewFramesError(
                        path,
                        f"the manifest's span holds source frames {first}..{end - 1}: "
                        + error.detail.split(" but ")[0],
                    ) from None
        except VideoError as error:
            reject_id = "src-" + _digest("source", uri, *_span_key(entry)).hex()[:16]
            plan.rejects.append((uri, Reject(reject_id, "plan", error.reason, error.detail)))
            continue
        planned_starts = set(starts)
        for start in starts:
            if limit is not None and len(plan.samples) >= limit:
                break
            sample = _sample(path, uri, start, settings, styles, seed, entry)
            if sample.sample_id in seen:
                continue
            if clean is None or not clean.enabled or sample.sample_id in known:
                add(sample)
                continue
            try:
                clean_at = clean_start(path, info, settings, start, clean, end)
            except VideoError as error:  # it probed, but its frames do not decode
                clean_at = Reject("", "plan", error.reason, error.detail)
            if clean_at != start and clean_at in planned_starts:
                clean_at = Reject(
                    "",
                    "plan",
                    "scene_cut",
                    f"a shot cut inside the clip at {start}; past "
                    f"it, at source frame {clean_at}, another clip of this video is planned",
                )
            if isinstance(clean_at, Reject):
                plan.rejects.append((uri, replace(clean_at, sample_id=sample.sample_id)))
                plan.clips_rejected += 1
                continue
            planned_starts.add(clean_at)
            add(
                sample
                if clean_at == start
                else _sample(path, uri, clean_at, settings, styles, seed, entry)
            )
    return plan


def sources_of(source) -> Iterator[tuple[Path | None, ManifestEntry | ManifestError | None]]:
    """(path, its manifest entry) per source: a manifest's rows (or their errors), else the
    files of a folder, a video or a .txt list (no entry)."""
    if is_manifest(source):
        for entry in read_manifest(source):
            yield (entry.path if isinstance(entry, ManifestEntry) else None), entry
        return
    for path in list_sources(source):
        yield path, None


def file_source_id(path: str | os.PathLike) -> str:
    """The source id of a file of a folder source: its name, as text (bytes that are not
    UTF-8 shown as U+FFFD; the sample's source_uri keeps the exact name)."""
    name = Path(path).name
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _span_key(entry: ManifestEntry | None) -> tuple:
    """What tells a manifest row's source reject from another row's of the same file."""
    return () if entry is None else (entry.row, entry.start_s, entry.end_s)


def span_frames(entry: ManifestEntry | None, info) -> tuple[int, int]:
    """The source frames [first, end) that clips must stay inside: the manifest row's span in
    seconds, within the video; the whole video without one."""
    if entry is None:
        return 0, info.num_frames
    first = 0 if entry.start_s is None else math.ceil(entry.start_s * info.fps - 1e-6)
    end = info.num_frames
    if entry.end_s is not None:
        end = min(end, math.floor(entry.end_s * info.fps + 1e-6))
    return min(first, info.num_frames), max(end, 0)


def _sample(
    path: Path,
    uri: str,
    start: int,
    settings: ClipSettings,
    styles: list,
    seed: int,
    entry: ManifestEntry | None = None,
) -> PlannedSample:
    """The sample of the clip at `start`; its id and seed follow from what makes it."""
    style = assign_style(styles, uri, start, seed)
    key = (
        uri,
        os.path.getsize(path),
        start,
        settings.num_frames,
        settings.fps,
        settings.height,
        settings.width,
        style.id,
        seed,
    )
    digest = _digest(*key)
    return PlannedSample(
        sample_id=digest.hex()[:24],
        source_uri=uri,
        source_path=os.fsdecode(os.path.abspath(path)),
        clip_start=start,
        num_frames=settings.num_frames,
        fps=settings.fps,
        height=settings.height,
        width=settings.width,
        style_id=style.id,
        seed=int.from_bytes(digest[12:20], "big") & (2**63 - 1),
        source_id=file_source_id(path) if entry is None else entry.source_id,
        licence=None if entry is None else entry.licence,
    )


def shards_of(samples: list[PlannedSample], shard_size: int) -> Iterator[list[PlannedSample]]:
    """Consecutive groups of `shard_size` samples (the unit of a Prefect task)."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    for start in range(0, len(samples), shard_size):
        yield samples[start : start + shard_size]


def ref_frame_indices(num_frames: int, k: int) -> list[int]:
    """Clip frames whose stylizations become the K style references: evenly spread after the
    first frame (which is stylized separately as the conditioning image)."""
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    if num_frames < 2:
        return [0] * k
    return [
        max(1, min(num_frames - 1, math.floor((i + 1) * num_frames / (k + 1)))) for i in range(k)
    ]
