"""The work directory: what one stage hands to the next, per shard and sample, on disk.

Prefect tasks pass shard URIs, never tensors: each (shard, stage) task reads its inputs from
here and writes its outputs here. Every file appears complete (temporary name, then rename), so
a retried or resumed task skips the samples whose outputs already exist. Videos are stored
losslessly (H.264 RGB, CRF 0: bit-exact, about 10x smaller than raw frames), so the control
video the animate stage reads is exactly the one whose SHA-256 was recorded.

    WORK/<shard>/manifest.json            the planned samples of the shard
    WORK/<shard>/<stage>/<sample_id>.*    one stage's output for one sample
    WORK/<shard>/<stage>/_rejects.jsonl   samples that stage rejected (appended, one per line)
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
from pathlib import Path

import av
import numpy as np

from datagen.core.files import TEMPORARY_GLOB, temporary_path, write_bytes_atomic
from datagen.core.stage import Reject
from datagen.data.video import decode_png, encode_png
from datagen.stages.plan import PlannedSample


def remove_leftovers(work_root: Path) -> list[Path]:
    """Delete what killed writers and removals left under a build's work folder: hidden
    temporary files and shard folders renamed away for deletion. Call it only while holding
    the dataset's lock (then nothing else is writing there). Returns what was removed."""
    if not work_root.is_dir():
        return []
    leftovers = sorted(work_root.rglob(TEMPORARY_GLOB), key=lambda p: len(p.parts))
    removed = []
    for path in leftovers:
        if not path.exists():
            continue  # inside a folder removed before it
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def encode_lossless(frames: np.ndarray, fps: float = 16.0) -> bytes:
    """Bit-exact RGB video bytes (libx264rgb, CRF 0, Matroska)."""
    frames = np.ascontiguousarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"expected uint8 (F, H, W, 3), got {frames.dtype} {frames.shape}")
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="matroska") as container:
        stream = container.add_stream("libx264rgb", rate=round(fps) or 16)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "rgb24"
        stream.options = {"crf": "0", "preset": "ultrafast"}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return buffer.getvalue()


def decode_lossless(data: bytes) -> np.ndarray:
    with av.open(io.BytesIO(data), mode="r") as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


class ShardWork:
    """The work files of one shard."""

    def __init__(self, root: str | os.PathLike, shard: str):
        self.root = Path(root) / shard
        self.shard = shard

    # manifest

    def write_manifest(self, samples: list[PlannedSample]) -> Path:
        path = self.root / "manifest.json"
        data = json.dumps([dataclasses.asdict(s) for s in samples], indent=1)
        write_bytes_atomic(path, data.encode())
        return path

    def samples(self) -> list[PlannedSample]:
        data = json.loads((self.root / "manifest.json").read_text())
        return [PlannedSample(**entry) for entry in data]

    # per-sample outputs

    def path(self, stage: str, sample_id: str, suffix: str) -> Path:
        return self.root / stage / f"{sample_id}{suffix}"

    def has(self, stage: str, sample_id: str) -> bool:
        return self.path(stage, sample_id, ".done").exists()

    def save(
        self,
        stage: str,
        sample_id: str,
        *,
        videos: dict[str, np.ndarray] | None = None,
        images: dict[str, np.ndarray | list[np.ndarray]] | None = None,
        values: dict | None = None,
        fps: float = 16.0,
    ) -> None:
        """Save one sample's outputs of `stage`; the `.done` marker is written last."""
        for name, frames in (videos or {}).items():
            write_bytes_atomic(
                self.path(stage, sample_id, f".{name}.mkv"), encode_lossless(frames, fps)
            )
        for name, image in (images or {}).items():
            group = image if isinstance(image, list) else [image]
            for i, single in enumerate(group):
                write_bytes_atomic(
                    self.path(stage, sample_id, f".{name}.{i}.png"), encode_png(single)
                )
        write_bytes_atomic(self.path(stage, sample_id, ".json"), json.dumps(values or {}).encode())
        write_bytes_atomic(self.path(stage, sample_id, ".done"), b"")

    def video(self, stage: str, sample_id: str, name: str) -> np.ndarray:
        return decode_lossless(self.path(stage, sample_id, f".{name}.mkv").read_bytes())

    def images(self, stage: str, sample_id: str, name: str) -> list[np.ndarray]:
        paths = sorted(
            self.root.joinpath(stage).glob(f"{sample_id}.{name}.*.png"),
            key=lambda p: int(p.name.rsplit(".", 2)[-2]),
        )
        return [decode_png(p.read_bytes()) for p in paths]

    def image(self, stage: str, sample_id: str, name: str) -> np.ndarray:
        return decode_png(self.path(stage, sample_id, f".{name}.0.png").read_bytes())

    def png_bytes(self, stage: str, sample_id: str, name: str) -> list[bytes]:
        paths = sorted(
            self.root.joinpath(stage).glob(f"{sample_id}.{name}.*.png"),
            key=lambda p: int(p.name.rsplit(".", 2)[-2]),
        )
        return [p.read_bytes() for p in paths]

    def values(self, stage: str, sample_id: str) -> dict:
        return json.loads(self.path(stage, sample_id, ".json").read_text())

    # rejects

    def add_reject(self, reject: Reject) -> None:
        """Record a stage's reject (append one JSON line; a torn last line is ignored)."""
        path = self.root / reject.stage / "_rejects.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(dataclasses.asdict(reject)) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def rejects(self) -> dict[str, Reject]:
        """sample_id -> its reject, over every stage of the shard."""
        found = {}
        for path in sorted(self.root.glob("*/_rejects.jsonl")):
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    found.setdefault(json.loads(line)["sample_id"], Reject(**json.loads(line)))
                except (json.JSONDecodeError, TypeError, KeyError):
                    continue  # a line torn by a crash: that sample simply runs again
        return found

    def pending(self, stage: str) -> list[PlannedSample]:
        """Samples still to run through `stage`: not done there, not rejected anywhere."""
        rejected = self.rejects()
        return [
            s
            for s in self.samples()
            if s.sample_id not in rejected and not self.has(stage, s.sample_id)
        ]

    def exists(self) -> bool:
        return self.root.is_dir()

    def remove(self) -> None:
        """Delete the shard's work files. The folder is renamed away first so that it goes at
        once: a missing shard folder then always means the shard was written and cleaned up
        (see run_write), never that a delete stopped half-way."""
        if not self.exists():
            return
        doomed = temporary_path(self.root)
        os.rename(self.root, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
