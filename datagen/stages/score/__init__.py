"""Score stage: CSD style similarity and DINOv2 structure similarity of a stylized pair.

Definitions (recorded with every row, see schemas/ct_row.v1.json):

- **frames scored**: `csd_frames` indices (default 4) spread evenly over the clip, always
  including the first frame (and the last when more than one is asked), see
  `sample_frame_indices`; all frames when the clip is shorter than that.
- **csd_score**: the mean, over every (sampled stylized-video frame, style reference image)
  pair, of the cosine similarity between their CSD style embeddings. CSD (Somepalli et al.
  2024, learn2phoenix/CSD `CSD_CLIP`) is the CLIP ViT-L/14 visual tower (QuickGELU, fp32)
  whose `proj` was moved into a trained style head: embedding = normalize(feature @
  last_layer_style). CT keeps `csd_score > 0.5`.
- **dino_score**: the mean, over the same sampled frame indices, of the cosine similarity
  between the DINOv2 CLS embeddings (`pooler_output`: the layer-normed CLS token) of the raw
  frame and of the stylized frame at the same index. It measures whether the stylized video
  kept the raw video's structure. DINOv2 sees the whole frame, resized onto its 14-pixel patch
  grid at about the processor's 224x224 pixel count (`dinov2_input_size`), not centre-cropped.

Both lie in [-1, 1]. The CSD checkpoint is recorded by the sha256 of its file: the CSD
repository's issue #14 says the released weights do not reproduce the paper's numbers, so a
score is only meaningful together with the checkpoint that produced it.

The plain functions (`load_csd`, `csd_style_embeddings`, `csd_score` in csd.py, with the
checkpoint's safe loading; `load_dinov2`, `dinov2_cls_embeddings`, `dino_score` in dino.py;
all importable from here) work without the Stage. Heavy imports (torch, open_clip,
transformers) happen inside them, never at import time.
"""

from __future__ import annotations

import math
import typing
from dataclasses import asdict, dataclass
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import Field

from datagen.core.config import NonEmptyStr, PositiveInt, config_class
from datagen.core.stage import ModelRef, Reject, Resources, Stage, pick_device
from datagen.models.registry import MissingModelError, Profile, resolve
from datagen.stages.score.csd import (
    CLIP_MEAN,
    CLIP_STD,
    CSD_CHECKPOINT_FILE,
    CheckpointError,
    CSDArch,
    build_csd_module,
    csd_checkpoint_globals,
    csd_preprocess,
    csd_score,
    csd_style_embeddings,
    file_sha256,
    infer_csd_arch,
    load_csd,
    read_csd_checkpoint,
)
from datagen.stages.score.dino import (
    dino_score,
    dinov2_cls_embeddings,
    dinov2_input_size,
    load_dinov2,
)

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "CSD_CHECKPOINT_FILE",
    "DEVICE_PATTERN",
    "DINO_DTYPES",
    "REJECT_FRAME_COUNT_MISMATCH",
    "REJECT_FRAME_SIZE_MISMATCH",
    "REJECT_INVALID_FRAMES",
    "REJECT_INVALID_STYLE_REF",
    "REJECT_NONFINITE_SCORE",
    "REJECT_NO_STYLE_REFS",
    "CSDArch",
    "CheckpointError",
    "ScoreConfig",
    "ScoreInput",
    "ScoreOutput",
    "ScoreStage",
    "build_csd_module",
    "csd_checkpoint_globals",
    "csd_preprocess",
    "csd_score",
    "csd_style_embeddings",
    "dino_score",
    "dinov2_cls_embeddings",
    "dinov2_input_size",
    "file_sha256",
    "infer_csd_arch",
    "load_csd",
    "load_dinov2",
    "read_csd_checkpoint",
    "sample_frame_indices",
]

DinoDtype = Literal["float32", "float16", "bfloat16"]
DINO_DTYPES: tuple[str, ...] = typing.get_args(DinoDtype)
DEVICE_PATTERN = r"^(auto|cpu|cuda(:\d+)?)$"

# Reason codes of the samples this stage rejects.
REJECT_INVALID_FRAMES = "invalid_frames"  # not uint8 (F, H, W, 3) or empty
REJECT_FRAME_COUNT_MISMATCH = "frame_count_mismatch"  # raw and stylized differ in F
REJECT_FRAME_SIZE_MISMATCH = "frame_size_mismatch"  # raw and stylized differ in H, W
REJECT_NO_STYLE_REFS = "no_style_refs"
REJECT_INVALID_STYLE_REF = "invalid_style_ref"  # a reference that is not uint8 (H, W, 3)
REJECT_NONFINITE_SCORE = "nonfinite_score"  # NaN/inf from the models (broken weights, overflow)


def sample_frame_indices(num_frames: int, count: int) -> list[int]:
    """`count` frame indices spread evenly over [0, num_frames - 1], starting at frame 0.

    With count >= 2 the last frame is included too; a clip shorter than `count` gives all of
    its frames. Indices are distinct and increasing.
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    if count >= num_frames:
        return list(range(num_frames))
    if count == 1:
        return [0]
    # Spacing >= 1, so rounding never merges two indices.
    return [round(i * (num_frames - 1) / (count - 1)) for i in range(count)]


@config_class
class ScoreConfig:
    """How to score pairs. `csd_frames` frames per clip; `batch_size` images per forward pass."""

    profile: Profile = "tiny"
    tiny_dir: str | None = None
    csd_hub_id: NonEmptyStr | None = None  # override of tomg-group-umd/CSD-ViT-L
    dinov2_hub_id: NonEmptyStr | None = None  # override of facebook/dinov2-base
    csd_frames: PositiveInt = 4
    # "auto" (cuda when the stage was given a GPU and one is visible) | cpu | cuda | cuda:N
    device: Annotated[str, Field(pattern=DEVICE_PATTERN)] = "auto"
    dino_dtype: DinoDtype = "float32"  # CSD always runs in fp32, as the reference does
    batch_size: PositiveInt = 32
    torch_threads: PositiveInt | None = None  # cap torch's CPU threads here (small hosts)


@dataclass(frozen=True)
class ScoreInput:
    """One pair to score: raw and stylized videos (F, H, W, 3) uint8 and the style references."""

    sample_id: str
    raw_frames: np.ndarray
    stylized_frames: np.ndarray
    style_refs: list[np.ndarray]


@dataclass(frozen=True)
class ScoreOutput:
    """The scores of one pair (definitions in this module's docstring)."""

    sample_id: str
    csd_score: float
    dino_score: float


def _is_video(frames: Any) -> bool:
    return (
        isinstance(frames, np.ndarray)
        and frames.dtype == np.uint8
        and frames.ndim == 4
        and frames.shape[-1] == 3
        and all(n > 0 for n in frames.shape)
    )


def _is_image(image: Any) -> bool:
    return (
        isinstance(image, np.ndarray)
        and image.dtype == np.uint8
        and image.ndim == 3
        and image.shape[-1] == 3
        and all(n > 0 for n in image.shape)
    )


class ScoreStage(Stage[ScoreInput, ScoreOutput]):
    """CSD style score and DINOv2 structure score of each (raw, stylized, references) sample."""

    name = "score"

    def __init__(self, config: ScoreConfig | None = None, resources: Resources | None = None):
        # Two small models (~0.3 B + ~0.09 B parameters): a quarter of a GPU is plenty.
        super().__init__(resources or Resources(num_gpus=0.25, num_cpus=1))
        self.config = config or ScoreConfig()
        self.model_csd = None
        self.model_dino = None
        self.dino_processor = None
        self._refs: dict[str, ModelRef] = {}

    def _device(self) -> str:
        import torch

        if self.config.device == "auto":
            return pick_device(self.resources)
        if self.config.device.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError(
                f"ScoreConfig.device={self.config.device!r}: no CUDA device is visible"
            )
        return self.config.device

    def _load(self) -> None:
        import torch

        if self.config.torch_threads:
            torch.set_num_threads(self.config.torch_threads)
        # Resolve both before loading either, so a production host missing both hears of both.
        resolved, missing = {}, []
        for key, hub_id in (("csd", self.config.csd_hub_id), ("dinov2", self.config.dinov2_hub_id)):
            try:
                resolved[key] = resolve(key, self.config.profile, self.config.tiny_dir, hub_id)
            except MissingModelError as error:
                missing.append(str(error))
        if missing:
            raise MissingModelError("\n".join(missing))
        device = self._device()
        checkpoint = resolved["csd"].path / CSD_CHECKPOINT_FILE
        self.model_csd = load_csd(checkpoint, device=device)
        self.model_dino, self.dino_processor = load_dinov2(
            resolved["dinov2"].path, device=device, dtype=self.config.dino_dtype
        )
        self._refs = {
            # The weights file's own hash: released CSD weights differ from the paper's.
            "csd": ModelRef(resolved["csd"].ref.id, file_sha256(checkpoint)),
            "dinov2": resolved["dinov2"].ref,
        }

    def _unload(self) -> None:
        super()._unload()
        self.dino_processor = None

    def models(self) -> dict[str, ModelRef]:
        """Role -> model; filled at setup (the CSD revision is the hash of the file loaded)."""
        return dict(self._refs)

    def params(self) -> dict[str, Any]:
        """The settings that shaped the scores (recorded in the row's params)."""
        return asdict(self.config)

    def _check(self, sample: ScoreInput) -> Reject | None:
        raw, stylized = sample.raw_frames, sample.stylized_frames
        for label, frames in (("raw_frames", raw), ("stylized_frames", stylized)):
            if not _is_video(frames):
                shape = getattr(frames, "shape", None)
                dtype = getattr(frames, "dtype", type(frames).__name__)
                return self.reject(
                    sample.sample_id,
                    REJECT_INVALID_FRAMES,
                    f"{label} must be non-empty uint8 (F, H, W, 3), got {dtype} {shape}",
                )
        if raw.shape[0] != stylized.shape[0]:
            return self.reject(
                sample.sample_id,
                REJECT_FRAME_COUNT_MISMATCH,
                f"raw video has {raw.shape[0]} frames, stylized video {stylized.shape[0]}",
            )
        if raw.shape[1:3] != stylized.shape[1:3]:
            return self.reject(
                sample.sample_id,
                REJECT_FRAME_SIZE_MISMATCH,
                f"raw frames are {raw.shape[1:3]}, stylized frames {stylized.shape[1:3]}",
            )
        if not sample.style_refs:
            return self.reject(sample.sample_id, REJECT_NO_STYLE_REFS, "no style reference images")
        for i, ref in enumerate(sample.style_refs):
            if not _is_image(ref):
                shape = getattr(ref, "shape", None)
                dtype = getattr(ref, "dtype", type(ref).__name__)
                return self.reject(
                    sample.sample_id,
                    REJECT_INVALID_STYLE_REF,
                    f"style_refs[{i}] must be non-empty uint8 (H, W, 3), got {dtype} {shape}",
                )
        return None

    def _process(self, batch: list[ScoreInput]) -> list[ScoreOutput | Reject]:
        import torch

        results: list[ScoreOutput | Reject | None] = [None] * len(batch)
        # Gather every image of the valid samples into one list per model, so the forward
        # passes run over full batches across samples; remember each sample's slices.
        csd_images: list[np.ndarray] = []
        raw_images: list[np.ndarray] = []
        stylized_images: list[np.ndarray] = []
        plan: list[tuple[int, slice, slice, slice]] = []
        for position, sample in enumerate(batch):
            problem = self._check(sample)
            if problem is not None:
                results[position] = problem
                continue
            indices = sample_frame_indices(len(sample.stylized_frames), self.config.csd_frames)
            frames_at = len(csd_images)
            csd_images.extend(sample.stylized_frames[i] for i in indices)
            refs_at = len(csd_images)
            csd_images.extend(sample.style_refs)
            pairs_at = len(raw_images)
            raw_images.extend(sample.raw_frames[i] for i in indices)
            stylized_images.extend(sample.stylized_frames[i] for i in indices)
            plan.append(
                (
                    position,
                    slice(frames_at, refs_at),
                    slice(refs_at, len(csd_images)),
                    slice(pairs_at, len(raw_images)),
                )
            )
        if plan:
            size = self.config.batch_size
            with torch.inference_mode():
                style = csd_style_embeddings(self.model_csd, csd_images, batch_size=size)
                raw = dinov2_cls_embeddings(
                    self.model_dino, self.dino_processor, raw_images, batch_size=size
                )
                stylized = dinov2_cls_embeddings(
                    self.model_dino, self.dino_processor, stylized_images, batch_size=size
                )
            for position, frames, refs, pairs in plan:
                sample_id = batch[position].sample_id
                csd = csd_score(style[frames], style[refs])
                dino = dino_score(raw[pairs], stylized[pairs])
                if math.isfinite(csd) and math.isfinite(dino):
                    results[position] = ScoreOutput(sample_id, csd, dino)
                else:
                    results[position] = self.reject(
                        sample_id,
                        REJECT_NONFINITE_SCORE,
                        f"csd_score={csd}, dino_score={dino} (checkpoint "
                        f"{self._refs['csd'].revision})",
                    )
        return results  # type: ignore[return-value]  # every slot is filled above
