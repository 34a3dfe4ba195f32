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

The plain functions (`load_csd`, `csd_style_embeddings`, `load_dinov2`,
`dinov2_cls_embeddings`, `csd_score`, `dino_score`) work without the Stage. Heavy imports
(torch, open_clip, transformers) happen inside them, never at import time.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from datagen.core.stage import ModelRef, Reject, Resources, Stage, pick_device
from datagen.models.registry import MissingModelError, resolve

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch

CSD_CHECKPOINT_FILE = "pytorch_model.bin"
# OpenAI CLIP's normalisation, which CSD's evaluation transforms use.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")
DINO_DTYPES = ("float32", "float16", "bfloat16")

# Reason codes of the samples this stage rejects.
REJECT_INVALID_FRAMES = "invalid_frames"  # not uint8 (F, H, W, 3) or empty
REJECT_FRAME_COUNT_MISMATCH = "frame_count_mismatch"  # raw and stylized differ in F
REJECT_FRAME_SIZE_MISMATCH = "frame_size_mismatch"  # raw and stylized differ in H, W
REJECT_NO_STYLE_REFS = "no_style_refs"
REJECT_INVALID_STYLE_REF = "invalid_style_ref"  # a reference that is not uint8 (H, W, 3)
REJECT_NONFINITE_SCORE = "nonfinite_score"  # NaN/inf from the models (broken weights, overflow)


class CheckpointError(RuntimeError):
    """A model file that is not the checkpoint this stage expects (foreign or mismatched)."""


# --- frame sampling and score math -----------------------------------------------------------


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


def csd_score(frame_embeddings: torch.Tensor, ref_embeddings: torch.Tensor) -> float:
    """Mean cosine over all (frame, reference) pairs of L2-normalised style embeddings."""
    import torch.nn.functional as F

    frames = F.normalize(frame_embeddings.double(), dim=-1)
    refs = F.normalize(ref_embeddings.double(), dim=-1)
    return float((frames @ refs.T).mean())


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


# --- CSD -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CSDArch:
    """The CLIP vision tower a CSD checkpoint holds, read from its tensor shapes."""

    image_size: int
    patch_size: int
    width: int
    layers: int
    heads: int
    mlp_width: int
    output_dim: int


_BACKBONE_KEYS = (
    "backbone.conv1.weight",
    "backbone.class_embedding",
    "backbone.positional_embedding",
    "backbone.transformer.resblocks.0.mlp.c_fc.weight",
)
_HEAD_KEYS = ("last_layer_style", "last_layer_content")
_BLOCK = re.compile(r"^backbone\.transformer\.resblocks\.(\d+)\.")


def file_sha256(path: str | os.PathLike) -> str:
    """'sha256:<hex>' of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def csd_checkpoint_globals() -> list[Any]:
    """The pickle globals, beyond torch's own, that a released CSD checkpoint needs, and no more.

    learn2phoenix/CSD CSD/train_csd.py:421-432 saves `{'model_state_dict': ..., 'args': args}`
    with the training `argparse.Namespace`, and the released `tomg-group-umd/CSD-ViT-L`
    `pytorch_model.bin` holds numpy scalars in those args (its Hub file page lists
    `numpy.core.multiarray.scalar`, `numpy.dtype`, `_codecs.encode`). A numpy scalar pickles as
    `scalar(dtype, bytes)`: the reconstructor is named by the numpy that SAVED the file
    (`numpy.core.multiarray.scalar` by numpy 1.x, `numpy._core.multiarray.scalar` by numpy 2),
    so the one function is registered under both names, the (object, name) form of
    torch.serialization.add_safe_globals (torch >= 2.6, pytorch/pytorch#142153). The numpy
    DType classes (`numpy.dtypes.Float64DType`, ..., numpy >= 1.25) are needed although no
    GLOBAL names them, so a static scan (the Hub page, get_unsafe_globals_in_checkpoint) does
    not list them: `numpy.dtype('f8', False, True)` returns a Float64DType instance, and the
    BUILD that sets its state is only allowed on an allowlisted type (pytorch/pytorch#134346);
    a pickled dtype class itself names one as a GLOBAL too. `_codecs.encode` (the scalar's
    bytes) is in torch's own allowlist already; it is listed so this set does not depend on it.
    """
    import _codecs
    import argparse

    try:  # numpy >= 2 (and numpy 1.26's forward-compatibility alias)
        from numpy._core.multiarray import scalar
    except ImportError:  # pragma: no cover - older numpy
        from numpy.core.multiarray import scalar

    allowed: list[Any] = [
        argparse.Namespace,
        np.dtype,
        _codecs.encode,
        (scalar, "numpy.core.multiarray.scalar"),
        (scalar, "numpy._core.multiarray.scalar"),
    ]
    dtypes = getattr(np, "dtypes", None)  # numpy >= 1.25
    for name in getattr(dtypes, "__all__", ()):
        cls = getattr(dtypes, name)
        if isinstance(cls, type) and issubclass(cls, np.dtype) and cls not in allowed:
            allowed.append(cls)  # registered as numpy.dtypes.<qualname>, as they pickle
    return allowed


def read_csd_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Any], Any]:
    """(state dict without `module.` prefixes, args or None) of a CSD checkpoint file.

    Loads with `weights_only=True`: tensors, containers and primitives, plus exactly the
    globals of `csd_checkpoint_globals` (the training `args`: argparse.Namespace holding numpy
    scalars and dtypes). A pickle that needs any other global is refused, never executed, with a
    CheckpointError naming the globals. Accepts the training-checkpoint dict (`model_state_dict`
    + `args`, as released) or a bare state dict with the same keys.
    """
    import pickle

    import torch

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"CSD checkpoint {path} does not exist")
    with torch.serialization.safe_globals(csd_checkpoint_globals()):
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            raise CheckpointError(
                f"CSD checkpoint {path} was refused by torch.load(weights_only=True) and not "
                f"unpickled: it needs {_refused_globals(path, error)}, beyond tensors and the "
                "training args a CSD checkpoint holds (argparse.Namespace, numpy scalars and "
                "dtypes)"
            ) from None
        except Exception as error:  # corrupt zip, truncated file, not a torch file at all
            raise CheckpointError(
                f"CSD checkpoint {path} is not a readable torch file: "
                f"{error.__class__.__name__}: {error}"
            ) from None
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(
            f"CSD checkpoint {path} holds a {type(checkpoint).__name__}, expected a dict with "
            "'model_state_dict' (learn2phoenix/CSD train_csd.py format)"
        )
    if "model_state_dict" in checkpoint:
        state, args = checkpoint["model_state_dict"], checkpoint.get("args")
    else:
        state, args = checkpoint, None
    if not isinstance(state, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise CheckpointError(
            f"CSD checkpoint {path}: 'model_state_dict' is not a mapping of names to tensors"
        )
    state = {k.removeprefix("module."): v for k, v in state.items()}
    missing = [k for k in (*_BACKBONE_KEYS, *_HEAD_KEYS) if k not in state]
    if missing:
        raise CheckpointError(
            f"CSD checkpoint {path} is not a CSD_CLIP checkpoint: missing {missing} "
            f"(it has {len(state)} tensors, e.g. {sorted(state)[:3]})"
        )
    return state, args


def _refused_globals(path: Path, error: Exception) -> str:
    """The globals a refused checkpoint names beyond the allowed ones (read statically)."""
    import torch

    try:  # a static scan of the pickle's GLOBAL opcodes: nothing is executed
        names = sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # pragma: no cover - legacy (non-zip) files; the message still names it
        names = []
    if not names:
        named = re.search(r"GLOBAL (\S+)", str(error))
        names = [named.group(1)] if named else []
    if names:
        return "the pickle global(s) " + ", ".join(names)
    lines = str(error).strip().splitlines()
    return f"an object torch refuses ({lines[-1] if lines else error.__class__.__name__})"


def infer_csd_arch(state: Mapping[str, Any], args: Any = None) -> CSDArch:
    """The vision-tower geometry of a CSD state dict (ViT-L/14: 224, 14, 1024, 24, 16, 4096, 768).

    The head count is not visible in the shapes: it is `args.vision_heads` when the checkpoint
    records it (the tiny twin does) and otherwise width // 64, CLIP's rule (16 for ViT-L).
    """
    conv = state["backbone.conv1.weight"]
    width, _, patch, patch_w = conv.shape
    positions = state["backbone.positional_embedding"].shape[0] - 1
    grid = math.isqrt(positions)
    if patch != patch_w or grid * grid != positions:
        raise CheckpointError(
            f"CSD checkpoint: expected square patches and a square position grid, got conv1 "
            f"{tuple(conv.shape)} and {positions} positions"
        )
    layers = 1 + max(int(m.group(1)) for k in state if (m := _BLOCK.match(k)))
    heads = getattr(args, "vision_heads", None) or width // 64
    # The training args may hold numpy integers (see csd_checkpoint_globals).
    if isinstance(heads, bool) or not isinstance(heads, int | np.integer):
        raise CheckpointError(
            f"CSD checkpoint: args.vision_heads must be an integer, got {heads!r}"
        )
    heads = int(heads)
    style = state["last_layer_style"]
    if style.ndim != 2 or style.shape[0] != width:
        raise CheckpointError(
            f"CSD checkpoint: last_layer_style has shape {tuple(style.shape)}, expected "
            f"({width}, output_dim) for a backbone of width {width}"
        )
    if heads < 1 or width % heads:
        raise CheckpointError(f"CSD checkpoint: width {width} is not divisible by {heads} heads")
    return CSDArch(
        image_size=grid * patch,
        patch_size=patch,
        width=width,
        layers=layers,
        heads=heads,
        mlp_width=state["backbone.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        output_dim=style.shape[1],
    )


def build_csd_module(arch: CSDArch) -> torch.nn.Module:
    """An empty CSD_CLIP port: open_clip VisionTransformer (QuickGELU, no proj) + the 2 heads."""
    import torch
    from open_clip.transformer import QuickGELU, VisionTransformer

    backbone = VisionTransformer(
        image_size=arch.image_size,
        patch_size=arch.patch_size,
        width=arch.width,
        layers=arch.layers,
        heads=arch.heads,
        mlp_ratio=arch.mlp_width / arch.width,
        output_dim=arch.output_dim,
        act_layer=QuickGELU,  # OpenAI CLIP's activation; GELU would not match the weights
    )
    backbone.proj = None  # CSD moved proj into the heads
    module = torch.nn.Module()
    module.backbone = backbone
    module.last_layer_style = torch.nn.Parameter(torch.empty(arch.width, arch.output_dim))
    module.last_layer_content = torch.nn.Parameter(torch.empty(arch.width, arch.output_dim))
    module.arch = arch
    return module


def load_csd(path: str | os.PathLike, device: str = "cpu") -> torch.nn.Module:
    """Load a CSD checkpoint file strictly into the open_clip port (fp32, eval mode).

    Raises CheckpointError when the file is not a CSD_CLIP checkpoint of a consistent shape
    (missing or extra tensors, wrong shapes, non-tensor payloads).
    """
    state, args = read_csd_checkpoint(path)
    arch = infer_csd_arch(state, args)
    module = build_csd_module(arch)
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(
        f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    )
    if missing or unexpected or wrong_shape:
        raise CheckpointError(
            f"CSD checkpoint {path} does not match a CSD_CLIP vision tower {arch}: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}, "
            f"wrong shape {wrong_shape[:5]}"
        )
    module.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return module.float().eval().to(device)


def csd_preprocess(image_size: int = 224):
    """CSD's evaluation transform: Resize(short side, bicubic), CenterCrop, CLIP mean/std.

    Kept as published, centre crop included (unlike the DINOv2 input, which sees the whole
    frame): learn2phoenix/CSD CSD/loss_utils.py:52-61 `transforms_branch0` (size 224, CLIP
    normalisation), which main_sim.py:207,218,254 uses to embed CSD's query and database
    images; the released weights were evaluated on that view.
    """
    from torchvision import transforms

    return transforms.Compose(
        [
            transforms.Resize(image_size, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(image_size),
            transforms.ToTensor(),
            transforms.Normalize(CLIP_MEAN, CLIP_STD),
        ]
    )


def csd_style_embeddings(
    model: torch.nn.Module, images: Sequence[np.ndarray], batch_size: int = 32
) -> torch.Tensor:
    """(N, output_dim) unit-norm CSD style embeddings of uint8 (H, W, 3) images, on the CPU."""
    import torch
    import torch.nn.functional as F
    from PIL import Image

    transform = csd_preprocess(model.arch.image_size)
    device = model.last_layer_style.device
    outputs = []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            pixels = torch.stack(
                [transform(Image.fromarray(image)) for image in images[start : start + batch_size]]
            ).to(device)
            features = model.backbone(pixels)
            outputs.append(F.normalize(features @ model.last_layer_style, dim=-1).float().cpu())
    if not outputs:
        return torch.empty(0, model.arch.output_dim)
    return torch.cat(outputs)


# --- DINOv2 ----------------------------------------------------------------------------------


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


# --- the stage -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScoreConfig:
    """How to score pairs. `csd_frames` frames per clip; `batch_size` images per forward pass."""

    profile: str = "tiny"
    tiny_dir: str | None = None
    csd_hub_id: str | None = None  # override of tomg-group-umd/CSD-ViT-L
    dinov2_hub_id: str | None = None  # override of facebook/dinov2-base
    csd_frames: int = 4
    # "auto" (cuda when the stage was given a GPU and one is visible) | cpu | cuda | cuda:N
    device: str = "auto"
    dino_dtype: str = "float32"  # CSD always runs in fp32, as the reference does
    batch_size: int = 32
    torch_threads: int | None = None  # cap torch's CPU threads in this process (small hosts)

    def __post_init__(self) -> None:
        if self.profile not in ("tiny", "production"):
            raise ValueError(f"profile must be 'tiny' or 'production', got {self.profile!r}")
        if not isinstance(self.device, str) or not DEVICE_PATTERN.fullmatch(self.device):
            raise ValueError(
                f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}"
            )
        if self.dino_dtype not in DINO_DTYPES:
            raise ValueError(f"dino_dtype must be one of {DINO_DTYPES}, got {self.dino_dtype!r}")
        for name in ("csd_frames", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        threads = self.torch_threads
        if threads is not None and (
            isinstance(threads, bool) or not isinstance(threads, int) or threads < 1
        ):
            raise ValueError(f"torch_threads must be None or an integer >= 1, got {threads!r}")
        for name in ("csd_hub_id", "dinov2_hub_id"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ValueError(f"{name} must be None or a non-empty hub id, got {value!r}")


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
