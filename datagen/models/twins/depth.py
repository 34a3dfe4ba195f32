"""Tiny twin of Depth-Anything-V2 (transformers `DepthAnythingForDepthEstimation`)."""

from __future__ import annotations

from pathlib import Path


def build_depth_anything(target: Path) -> None:
    """A 4-layer, 32-wide DINOv2 backbone with the Depth-Anything neck and head, saved with its
    DPT image processor exactly as the hub repo is laid out (config.json, model.safetensors,
    preprocessor_config.json)."""
    import torch
    from transformers import (
        DepthAnythingConfig,
        DepthAnythingForDepthEstimation,
        Dinov2Config,
        DPTImageProcessor,
    )

    backbone = Dinov2Config(
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=64,
        patch_size=14,
        image_size=70,
        out_features=["stage1", "stage2", "stage3", "stage4"],
        reshape_hidden_states=False,
        apply_layernorm=True,
    )
    config = DepthAnythingConfig(
        backbone_config=backbone,
        patch_size=14,
        reassemble_hidden_size=32,
        neck_hidden_sizes=[8, 16, 16, 32],
        fusion_hidden_size=16,
        head_hidden_size=8,
        depth_estimation_type="relative",
    )
    torch.manual_seed(0)
    DepthAnythingForDepthEstimation(config).eval().save_pretrained(target)
    # The production processor (size 518, keep aspect, multiple of 14), scaled down to 70.
    DPTImageProcessor(
        do_resize=True,
        size={"height": 70, "width": 70},
        keep_aspect_ratio=True,
        ensure_multiple_of=14,
        resample=3,
        do_rescale=True,
        do_normalize=True,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
        do_pad=False,
    ).save_pretrained(target)
