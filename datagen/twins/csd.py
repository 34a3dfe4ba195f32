"""Tiny random-weight twin of CSD (tomg-group-umd/CSD-ViT-L), for tests and the tiny profile.

The production file is a CSD training checkpoint (learn2phoenix/CSD train_csd.py): a dict with
`model_state_dict` (DDP `module.` prefixes; `backbone.*` = the CLIP visual tower without `proj`,
plus the `last_layer_style` and `last_layer_content` heads) and `args` (an argparse.Namespace).
The twin writes that same format from an open_clip VisionTransformer (QuickGELU, as OpenAI
CLIP) with a tiny width and depth but the production patch/image geometry, so preprocessing is
identical and the production loader (datagen.score.load_csd) infers and loads it unchanged.
"""

from __future__ import annotations

import argparse
from pathlib import Path

CHECKPOINT_FILE = "pytorch_model.bin"

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
    args = argparse.Namespace(
        arch="tiny_twin",
        content_proj_head="default",
        # Not in the released checkpoint's args: the loader defaults to width // 64 heads (16
        # for ViT-L); the twin's width 64 would give 1, so it records its real head count.
        vision_heads=TWIN_ARCH["heads"],
    )
    torch.save({"model_state_dict": state, "args": args}, target / CHECKPOINT_FILE)
