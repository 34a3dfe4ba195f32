"""CSD style embeddings: the released checkpoint read safely, loaded into an open_clip port.

CSD (Somepalli et al. 2024, learn2phoenix/CSD `CSD_CLIP`) is the CLIP ViT-L/14 visual tower
(QuickGELU, fp32) whose `proj` was moved into a trained style head: embedding =
normalize(feature @ last_layer_style). The checkpoint is a training pickle; it is read with
`torch.load(weights_only=True)` and exactly the globals of `csd_checkpoint_globals`, so a file
that needs anything else is refused, never executed. Heavy imports (torch, open_clip,
torchvision) happen inside the functions.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch

CSD_CHECKPOINT_FILE = "pytorch_model.bin"
# OpenAI CLIP's normalisation, which CSD's evaluation transforms use.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class CheckpointError(RuntimeError):
    """A model file that is not the checkpoint this stage expects (foreign or mismatched)."""


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


def csd_score(frame_embeddings: torch.Tensor, ref_embeddings: torch.Tensor) -> float:
    """Mean cosine over all (frame, reference) pairs of L2-normalised style embeddings."""
    import torch.nn.functional as F

    frames = F.normalize(frame_embeddings.double(), dim=-1)
    refs = F.normalize(ref_embeddings.double(), dim=-1)
    return float((frames @ refs.T).mean())
