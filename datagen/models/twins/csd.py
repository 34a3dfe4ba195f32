"""Tiny random-weight twin of CSD (tomg-group-umd/CSD-ViT-L), for tests and the tiny profile.

The production file is a CSD training checkpoint (learn2phoenix/CSD train_csd.py): a dict with
`model_state_dict` (DDP `module.` prefixes; `backbone.*` = the CLIP visual tower without `proj`,
plus the `last_layer_style` and `last_layer_content` heads) and `args` (the training
argparse.Namespace, holding numpy scalars in the released file). The twin writes that same
format from an open_clip VisionTransformer (QuickGELU, as OpenAI CLIP) with a tiny width and
depth but the production patch/image geometry, so preprocessing is identical and the production
loader (datagen.stages.score.load_csd) infers and loads it unchanged. Its pickle names the same
globals as the released file (`argparse.Namespace`, `numpy.core.multiarray.scalar`,
`numpy.dtype`, `_codecs.encode`): numpy scalars are written under numpy 1.x's module name, as
the numpy that saved the released file wrote them, whatever numpy builds the twin
(`save_as_numpy1`).
"""

from __future__ import annotations

import argparse
import io
import pickle
import pickletools
import types
from pathlib import Path

import numpy as np

CHECKPOINT_FILE = "pytorch_model.bin"
# numpy 2 moved numpy.core to numpy._core; pickles name the module of the numpy that wrote them.
NUMPY1_GLOBALS = {"numpy._core.multiarray scalar": "numpy.core.multiarray scalar"}

# Tiny, but with ViT-L/14's geometry (patch 14 on 224 pixels) so the same preprocessing applies.
TWIN_ARCH = {
    "image_size": 224,
    "patch_size": 14,
    "width": 64,
    "layers": 2,
    "heads": 4,
    "mlp_ratio": 4.0,
    "output_dim": 32,
}


def build_csd(target: Path) -> None:
    """Write `pytorch_model.bin` (CSD training-checkpoint format) with tiny random weights."""
    import torch
    from open_clip.transformer import QuickGELU, VisionTransformer

    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    backbone = VisionTransformer(
        image_size=TWIN_ARCH["image_size"],
        patch_size=TWIN_ARCH["patch_size"],
        width=TWIN_ARCH["width"],
        layers=TWIN_ARCH["layers"],
        heads=TWIN_ARCH["heads"],
        mlp_ratio=TWIN_ARCH["mlp_ratio"],
        output_dim=TWIN_ARCH["output_dim"],
        act_layer=QuickGELU,
    )
    # Random LayerNorm affine parameters, so a port that skipped or swapped a norm would show.
    with torch.no_grad():
        for name, parameter in backbone.named_parameters():
            if ".ln_" in f".{name}" and name.endswith("weight"):
                parameter.copy_(1.0 + 0.1 * torch.randn_like(parameter))
            elif ".ln_" in f".{name}" and name.endswith("bias"):
                parameter.copy_(0.1 * torch.randn_like(parameter))
            elif name.endswith("bias"):
                parameter.copy_(0.02 * torch.randn_like(parameter))
    # CSD_CLIP copies `proj` into both heads and sets backbone.proj = None; training then makes
    # them differ. The twin's content head is drawn independently so a style/content swap shows.
    style_head = backbone.proj.detach().clone()
    content_head = torch.randn_like(style_head) * TWIN_ARCH["width"] ** -0.5
    backbone.proj = None
    state = {f"module.backbone.{k}": v.detach().clone() for k, v in backbone.state_dict().items()}
    state["module.last_layer_style"] = style_head
    state["module.last_layer_content"] = content_head
    save_as_numpy1({"model_state_dict": state, "args": training_args()}, target / CHECKPOINT_FILE)


def training_args() -> argparse.Namespace:
    """Training args as train_csd.py saves them (CSD/train_csd.py:421-432: `'args': args`).

    Some values are numpy scalars, as in the released file, whose pickle needs
    `numpy.core.multiarray.scalar`, `numpy.dtype` and `_codecs.encode`; one is a bare numpy
    dtype, so the loader meets that global on its own too. Names follow train_csd.py's parser
    (CSD/train_csd.py:69-91).
    """
    return argparse.Namespace(
        arch="tiny_twin",
        content_proj_head="default",
        lr=np.float64(0.003),
        lr_bb=np.float64(0.0001),
        lambda_s=np.float64(1.0),
        iters=np.int64(100000),
        batch_size_per_gpu=np.int64(64),
        eval_k=[1, 5, 100],
        feature_dtype=np.dtype("float32"),
        # Not in the released checkpoint's args: the loader defaults to width // 64 heads (16
        # for ViT-L); the twin's width 64 would give 1, so it records its real head count.
        vision_heads=TWIN_ARCH["heads"],
    )


def save_as_numpy1(obj: object, path: Path) -> None:
    """torch.save `obj` with its numpy scalars' reconstructor named as numpy 1.x names it.

    torch.save pickles with protocol 2, whose GLOBAL opcodes spell out module and name; those
    opcodes (and only those, found with pickletools) are rewritten per NUMPY1_GLOBALS.
    """
    import torch

    module = types.ModuleType("numpy1_pickle")  # torch.save reads its __name__ and Pickler
    module.Pickler = _Numpy1Pickler
    torch.save(obj, path, pickle_module=module)


def rename_globals(data: bytes, renames: dict[str, str]) -> bytes:
    """A pickle whose GLOBAL opcodes naming `renames`' keys ("module name") name the values."""
    ops = list(pickletools.genops(data))
    out, start = [], 0
    for (opcode, arg, pos), following in zip(ops, [*ops[1:], (None, None, len(data))], strict=True):
        if opcode.name == "STACK_GLOBAL":
            raise ValueError("rename_globals handles GLOBAL opcodes (pickle protocol <= 3) only")
        if opcode.name == "GLOBAL" and arg in renames:
            module, name = renames[arg].split(" ")
            out += [data[start:pos], b"c" + f"{module}\n{name}\n".encode("ascii")]
            start = following[2]
    return b"".join(out) + data[start:]


class _Numpy1Pickler(pickle.Pickler):
    """A pickler (as torch.save's `pickle_module.Pickler`) that writes NUMPY1_GLOBALS' names."""

    def __init__(self, file, protocol=None, **kwargs):
        self._target = file
        self._buffer = io.BytesIO()
        super().__init__(self._buffer, protocol, **kwargs)

    def dump(self, obj):
        super().dump(obj)
        self._target.write(rename_globals(self._buffer.getvalue(), NUMPY1_GLOBALS))
