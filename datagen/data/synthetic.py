"""Synthetic, schema-valid rows for tests and benchmarks.

`media="real"` rows carry genuinely decodable H.264 videos and PNGs that satisfy every pair
invariant; `media="random"` rows carry incompressible random bytes of a chosen size in the media
columns (like real video for storage and filtering, but not decodable), for benchmarks.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from functools import cache

import numpy as np

from datagen import __version__
from datagen.data.schema import SFT_REVIEW_PENDING

STYLES = ["ink_wash", "watercolor", "pixel_art", "claymation"]


@cache
def _real_media(num_frames: int, height: int, width: int, fps: float) -> dict:
    from datagen.data.video import encode_mp4, encode_png

    t = np.linspace(0, 1, num_frames)[:, None, None, None]
    y = np.linspace(0, 1, height)[None, :, None, None]
    x = np.linspace(0, 1, width)[None, None, :, None]
    shape = (num_frames, height, width, 1)
    channels = [np.broadcast_to(c, shape) for c in (x + t, y + 0 * t, 0.5 * (x + y) + 0 * t)]
    raw = ((np.concatenate(channels, axis=-1) % 1.0) * 255).astype(np.uint8)
    stylized = (255 - raw) // 2 + 64
    return {
        "raw_video": encode_mp4(raw, fps),
        "stylized_video": encode_mp4(stylized, fps),
        "raw_first_frame": encode_png(raw[0]),
        "stylized_first_frame": encode_png(stylized[0]),
        "style_refs": [encode_png(stylized[i]) for i in (1, num_frames // 2, num_frames - 1)],
    }


def make_row(
    number: int,
    *,
    split: str = "ct",
    media: str = "real",
    media_bytes: int = 50_000,
    num_frames: int = 9,
    height: int = 32,
    width: int = 32,
    fps: float = 16.0,
    csd_score: float | None = None,
    dino_score: float | None = None,
    vlm_verdict: str | None = None,
    rng: np.random.Generator | None = None,
) -> dict:
    """Row number `number` of a synthetic dataset; scores default to a seeded draw."""
    rng = rng or np.random.default_rng(number)
    if media == "real":
        payload = _real_media(num_frames, height, width, fps)
    elif media == "random":

        def blob(size: int) -> bytes:
            return rng.bytes(size)

        payload = {
            "raw_video": blob(media_bytes),
            "stylized_video": blob(media_bytes),
            "raw_first_frame": blob(media_bytes // 10),
            "stylized_first_frame": blob(media_bytes // 10),
            "style_refs": [blob(media_bytes // 10) for _ in range(3)],
        }
    else:
        raise ValueError(f"media must be 'real' or 'random', got {media!r}")
    style = STYLES[number % len(STYLES)]
    seed = 1000 + number
    control_sha256 = hashlib.sha256(f"control-{number}".encode()).hexdigest()
    prompt = f"a person walks through a park, clip {number}"
    params = {
        "clip": {"num_frames": num_frames, "height": height, "width": width, "fps": fps},
        "animate": {
            branch: {"control_sha256": control_sha256, "seed": seed, "prompt": prompt}
            for branch in ("raw", "stylized")
        },
    }
    row = {
        "sample_id": f"s{number:08d}",
        "split": split,
        "source_uri": f"file:///videos/source_{number // 4:06d}.mp4",
        "source_id": f"source_{number // 4:06d}",
        "licence": "CC-BY-4.0",
        "clip_start": (number % 4) * 81,
        "num_frames": num_frames,
        "fps": fps,
        "height": height,
        "width": width,
        "style_id": style,
        "style_prompt": f"{style.replace('_', ' ')} style",
        "control_kind": "depth",
        "control_sha256": control_sha256,
        "caption_ns": prompt,
        "caption_sty": f"{prompt}, in {style.replace('_', ' ')} style",
        "csd_score": float(rng.uniform(-0.2, 1.0)) if csd_score is None else csd_score,
        "dino_score": float(rng.uniform(0.0, 1.0)) if dino_score is None else dino_score,
        "vlm_verdict": vlm_verdict,
        "vlm_detail": None,
        "seed": seed,
        "models": [
            ("animate", {"id": "Wan-AI/Wan2.1-VACE-1.3B-diffusers", "revision": "tiny"}),
            ("score", {"id": "tomg-group-umd/CSD-ViT-L", "revision": "sha256:" + "0" * 64}),
        ],
        "params": json.dumps(params),
        "created_at": datetime(2026, 11, 20, tzinfo=UTC),
        "datagen_version": __version__,
        **payload,
    }
    if split == "sft":
        row |= SFT_REVIEW_PENDING
    return row


def synthetic_table(
    start: int,
    count: int,
    *,
    media_bytes: int = 50_000,
    split: str = "ct",
    seed: int = 0,
):
    """`count` rows numbered from `start` as one Arrow table, built column-wise (fast enough
    for millions of rows): random incompressible media, seeded scores with ~3% nulls."""
    import pyarrow as pa

    from datagen.data.schema import row_schema

    rng = np.random.default_rng(seed + start)
    numbers = np.arange(start, start + count)

    def blobs(size: int, per_row: int = 1) -> pa.Array:
        total = count * per_row
        data = pa.py_buffer(rng.bytes(size * total))
        offsets = pa.py_buffer((np.arange(total + 1, dtype=np.int32) * size).tobytes())
        return pa.Array.from_buffers(pa.binary(), total, [None, offsets, data])

    def text(values) -> pa.Array:
        return pa.array(list(values), pa.string())

    def scores(low: float, high: float) -> pa.Array:
        values = rng.uniform(low, high, count).astype(np.float32)
        return pa.array(values, pa.float32(), mask=rng.random(count) < 0.03)

    styles = np.array(STYLES)[numbers % len(STYLES)]
    control = [hashlib.sha256(f"control-{n}".encode()).hexdigest() for n in numbers]
    prompts = [f"a person walks through a park, clip {n}" for n in numbers]
    ref_offsets = pa.array(np.arange(count + 1, dtype=np.int32) * 3)
    models = make_row(0, media="random", media_bytes=10)["models"]
    schema = row_schema(split)
    columns = {
        "sample_id": text(f"s{n:08d}" for n in numbers),
        "split": text([split] * count),
        "source_uri": text(f"file:///videos/source_{n // 4:06d}.mp4" for n in numbers),
        "source_id": text(f"source_{n // 4:06d}" for n in numbers),
        "licence": text(["CC-BY-4.0"] * count),
        "clip_start": pa.array((numbers % 4) * 81, pa.int32()),
        "num_frames": pa.array(np.full(count, 81), pa.int32()),
        "fps": pa.array(np.full(count, 16.0), pa.float32()),
        "height": pa.array(np.full(count, 480), pa.int32()),
        "width": pa.array(np.full(count, 832), pa.int32()),
        "style_id": text(styles),
        "style_prompt": text(f"{s.replace('_', ' ')} style" for s in styles),
        "style_refs": pa.ListArray.from_arrays(ref_offsets, blobs(media_bytes // 10, 3)),
        "raw_first_frame": blobs(media_bytes // 10),
        "stylized_first_frame": blobs(media_bytes // 10),
        "raw_video": blobs(media_bytes),
        "stylized_video": blobs(media_bytes),
        "control_kind": text(["depth"] * count),
        "control_sha256": text(control),
        "caption_ns": text(prompts),
        "caption_sty": text(
            f"{p}, in {s.replace('_', ' ')} style" for p, s in zip(prompts, styles, strict=True)
        ),
        "csd_score": scores(-0.2, 1.0),
        "dino_score": scores(0.0, 1.0),
        "vlm_verdict": pa.array(np.where(rng.random(count) < 0.8, "pass", "fail"), pa.string()),
        "vlm_detail": pa.nulls(count, pa.string()),
        "seed": pa.array(1000 + numbers, pa.int64()),
        "models": pa.array([models], schema.field("models").type).take(np.zeros(count, int)),
        "params": text(
            json.dumps(
                {
                    "animate": {
                        b: {"control_sha256": c, "seed": int(1000 + n), "prompt": p}
                        for b in ("raw", "stylized")
                    }
                }
            )
            for n, c, p in zip(numbers, control, prompts, strict=True)
        ),
        "created_at": pa.array(
            np.full(count, np.datetime64("2026-11-20T00:00:00", "us")), pa.timestamp("us", tz="UTC")
        ),
        "datagen_version": text([__version__] * count),
    }
    if split == "sft":
        columns["review_status"] = text(["pending"] * count)
        for name in ("review_reason", "review_note", "reviewer"):
            columns[name] = pa.nulls(count, pa.string())
        columns["reviewed_at"] = pa.nulls(count, pa.timestamp("us", tz="UTC"))
    return pa.table(columns).cast(schema)
