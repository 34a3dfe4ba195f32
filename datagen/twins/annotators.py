"""Tiny-profile twin of lllyasviel/Annotators' OpenPose body model (controlnet-aux).

The OpenPose architecture is fixed-size, so this twin is the real architecture with random
weights (about 100 MB, stored in float16), not a small one. Checkpoints in that repository are
saved without the first module-name component, which controlnet-aux's loader expects.
"""

from __future__ import annotations

from pathlib import Path


def build_annotators(target: Path) -> None:
    import torch
    from controlnet_aux.open_pose.model import bodypose_model

    torch.manual_seed(0)
    model = bodypose_model()
    state = {
        ".".join(name.split(".")[1:]): tensor.half() for name, tensor in model.state_dict().items()
    }
    torch.save(state, target / "body_pose_model.pth")
