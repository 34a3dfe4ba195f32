"""Tiny random-weight twin of DINOv2 (facebook/dinov2-base), for tests and the tiny profile.

Saved with `save_pretrained` in the hub layout (config.json, model.safetensors,
preprocessor_config.json), so `Dinov2Model.from_pretrained` and
`AutoImageProcessor.from_pretrained` load it exactly as they load the real repository. The
model config keeps dinov2-base's patch size and 518-pixel position grid (interpolated to the
224-pixel crop at run time, as in production); the processor config is dinov2-base's.
"""

from __future__ import annotations

from pathlib import Path


def build_dinov2(target: Path) -> None:
    """Write a tiny Dinov2Model and dinov2-base's BitImageProcessor config into `target`."""
    import torch
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    config = Dinov2Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        mlp_ratio=4,
        patch_size=14,
        image_size=518,
        layerscale_value=1.0,
        layer_norm_eps=1e-6,
        use_swiglu_ffn=False,
    )
    torch.manual_seed(0)
    model = Dinov2Model(config).eval()
    model.save_pretrained(target)
    # dinov2-base's preprocessor_config.json: resize shortest edge 256 (bicubic), crop 224,
    # ImageNet mean/std.
    processor = BitImageProcessor(
        do_resize=True,
        size={"shortest_edge": 256},
        resample=3,
        do_center_crop=True,
        crop_size={"height": 224, "width": 224},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
        do_convert_rgb=True,
    )
    processor.save_pretrained(target)
