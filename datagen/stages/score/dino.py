"""DINOv2 structure embeddings: the CLS embedding of each whole frame, and their cosine.

Heavy imports (torch, transformers, PIL) happen inside the functions.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch


def load_dinov2(
    path: str | os.PathLike, device: str = "cpu", dtype: str = "float32"
) -> tuple[Any, Any]:
    """(Dinov2Model in eval mode, its image processor) from a hub-layout directory."""
    import torch
    from transformers import AutoImageProcessor, Dinov2Model

    model = Dinov2Model.from_pretrained(path, dtype=getattr(torch, dtype)).eval().to(device)
    processor = AutoImageProcessor.from_pretrained(path)
    return model, processor


def dinov2_input_size(height: int, width: int, patch_size: int, pixels: int) -> tuple[int, int]:
    """(H, W) a frame is resized to for DINOv2: the whole frame, no crop, on the patch grid.

    Each side is a multiple of `patch_size` and the aspect ratio is kept to within rounding to
    whole patches, with about `pixels` pixels in all (the processor's 224x224 crop: 256 patches
    of 14 pixels, the resolution DINOv2 was mostly trained at, so scoring costs what it did
    with the crop). A square frame gets exactly 224x224; an 832x480 frame gets 294x168
    (21x12 = 252 patches), where the processor's resize to 256 + centre crop 224 kept only the
    middle 51% of its width.
    """
    patches = max(1, pixels // (patch_size * patch_size))
    aspect = width / height
    # Rows for the budget, then the columns that keep the aspect best for that row count (a
    # frame too narrow for one patch row or column is stretched to it, within the budget).
    rows = min(patches, max(1, round(math.sqrt(patches / aspect))))
    cols = min(math.ceil(patches / rows), max(1, round(rows * aspect)))
    return rows * patch_size, cols * patch_size


def _dinov2_pixels(processor: Any, image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(3, H, W) float32: `image` resized to `size` with the processor's resampling (bicubic
    for dinov2-base), rescaled and normalised with the processor's mean and std."""
    from PIL import Image

    resample = Image.Resampling(int(getattr(processor, "resample", Image.Resampling.BICUBIC)))
    resized = np.asarray(Image.fromarray(image).resize((size[1], size[0]), resample))
    pixels = resized.astype(np.float32) * np.float32(processor.rescale_factor)
    mean = np.asarray(processor.image_mean, dtype=np.float32)
    std = np.asarray(processor.image_std, dtype=np.float32)
    return ((pixels - mean) / std).transpose(2, 0, 1)


def dinov2_cls_embeddings(
    model: Any, processor: Any, images: Sequence[np.ndarray], batch_size: int = 32
) -> torch.Tensor:
    """(N, hidden) DINOv2 CLS embeddings (`pooler_output`) of uint8 (H, W, 3) images, fp32 CPU.

    Each image is seen whole: resized to `dinov2_input_size` (about the processor's crop area,
    on the patch grid; Dinov2Model interpolates its position embeddings to any grid), never
    centre-cropped, so a change anywhere in the frame can move the score. Images of the same
    input size share forward passes.
    """
    import torch

    crop = processor.crop_size
    pixels = crop["height"] * crop["width"]
    patch = model.config.patch_size
    groups: dict[tuple[int, int], list[int]] = {}
    for index, image in enumerate(images):
        size = dinov2_input_size(image.shape[0], image.shape[1], patch, pixels)
        groups.setdefault(size, []).append(index)
    outputs = torch.empty(len(images), model.config.hidden_size)
    with torch.inference_mode():
        for size, indices in groups.items():
            for start in range(0, len(indices), batch_size):
                chunk = indices[start : start + batch_size]
                batch = np.stack([_dinov2_pixels(processor, images[i], size) for i in chunk])
                tensor = torch.from_numpy(batch).to(device=model.device, dtype=model.dtype)
                outputs[chunk] = model(pixel_values=tensor).pooler_output.float().cpu()
    return outputs


def dino_score(raw_embeddings: torch.Tensor, stylized_embeddings: torch.Tensor) -> float:
    """Mean cosine between raw and stylized embeddings of the same frame index (row-wise)."""
    import torch.nn.functional as F

    if raw_embeddings.shape != stylized_embeddings.shape:
        raise ValueError(
            f"raw and stylized embeddings differ in shape: {tuple(raw_embeddings.shape)} vs "
            f"{tuple(stylized_embeddings.shape)}"
        )
    cosine = F.cosine_similarity(raw_embeddings.double(), stylized_embeddings.double(), dim=-1)
    return float(cosine.mean())
