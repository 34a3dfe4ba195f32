"""The `sdxl` backend of the stylize stage (CT tier): SDXL base + depth ControlNet + IP-Adapter
in the InstantStyle blocks, with exemplar images for text-only styles generated once and
cached on disk (see the package's doc)."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from datagen.core.files import file_lock
from datagen.core.stage import ModelRef
from datagen.data.styles import Style
from datagen.stages.stylize import (
    SIZE_MULTIPLE,
    STYLE_REFERENCE_UNREADABLE,
    StylizeConfig,
    StylizeInput,
    _read_rgb,
    _SampleFailure,
)

log = logging.getLogger(__name__)


def model_size(height: int, width: int, resolution: int, keep_aspect: bool = True) -> tuple:
    """(h, w) the model runs at: ~resolution^2 pixels, the clip's aspect, multiples of 64."""
    if not keep_aspect:
        return resolution, resolution
    aspect = width / height
    area = resolution * resolution

    def snap(value: float) -> int:
        return max(SIZE_MULTIPLE, round(value / SIZE_MULTIPLE) * SIZE_MULTIPLE)

    return snap(math.sqrt(area / aspect)), snap(math.sqrt(area * aspect))


class SdxlStylizer:
    """SDXL + depth ControlNet + IP-Adapter in the InstantStyle blocks, loaded once."""

    def __init__(self, config: StylizeConfig, device: str):
        self.config = config
        self.device = device
        self.pipe = None  # StableDiffusionXLControlNetPipeline
        self.text_to_image = None  # StableDiffusionXLPipeline sharing pipe's modules
        self.refs: dict[str, ModelRef] = {}
        self.exemplars_generated = 0
        self._style_images: dict[str, np.ndarray] = {}

    def load(self) -> None:
        from datagen.models.registry import resolve

        config = self.config
        # Resolve all three first: a missing production weight fails before anything loads.
        sdxl = resolve("sdxl", config.profile, config.tiny_dir, config.sdxl_id)
        controlnet_dir = resolve(
            "controlnet_depth_sdxl", config.profile, config.tiny_dir, config.controlnet_id
        )
        ip_adapter = resolve("ip_adapter", config.profile, config.tiny_dir, config.ip_adapter_id)

        import torch
        from diffusers import (
            ControlNetModel,
            StableDiffusionXLControlNetPipeline,
            StableDiffusionXLPipeline,
        )

        dtype = _torch_dtype(config.dtype, self.device)
        # variant: the fp16 weight files where the hub repo has them (models/registry.py), so
        # a production cache needs only those, not the fp32 copies too
        controlnet = ControlNetModel.from_pretrained(
            controlnet_dir.path, variant=controlnet_dir.variant, dtype=dtype
        )
        pipe = StableDiffusionXLControlNetPipeline.from_pretrained(
            sdxl.path,
            controlnet=controlnet,
            variant=sdxl.variant,
            dtype=dtype,
            add_watermarker=False,  # training data: no invisible watermark in the pixels
        )
        pipe.load_ip_adapter(
            str(ip_adapter.path),
            subfolder="sdxl_models",
            weight_name="ip-adapter_sdxl.safetensors",
        )
        pipe.to(self.device)  # weights already in `dtype` (from_pretrained, load_ip_adapter)
        # Set once here and never touched per call (shared state of the loaded model).
        pipe.set_ip_adapter_scale(config.instantstyle_map)
        pipe.set_progress_bar_config(disable=True)
        # Exemplars are plain text-to-image: a second pipeline over the SAME modules (no copy);
        # each call switches the IP-Adapter off with an all-zero ip_adapter_mask argument
        # instead of changing the shared scales. Its own scheduler: schedulers keep per-call
        # state (timesteps).
        text_to_image = StableDiffusionXLPipeline(
            vae=pipe.vae,
            text_encoder=pipe.text_encoder,
            text_encoder_2=pipe.text_encoder_2,
            tokenizer=pipe.tokenizer,
            tokenizer_2=pipe.tokenizer_2,
            unet=pipe.unet,
            scheduler=type(pipe.scheduler).from_config(pipe.scheduler.config),
            image_encoder=pipe.image_encoder,
            feature_extractor=pipe.feature_extractor,
            force_zeros_for_empty_prompt=pipe.config.force_zeros_for_empty_prompt,
            add_watermarker=False,
        )
        text_to_image.set_progress_bar_config(disable=True)
        self.pipe, self.text_to_image = pipe, text_to_image
        self.refs = {
            "sdxl": sdxl.ref,
            "controlnet_depth_sdxl": controlnet_dir.ref,
            "ip_adapter": ip_adapter.ref,
        }
        self._torch = torch

    def unload(self) -> None:
        self.pipe = self.text_to_image = None
        self._style_images.clear()

    def stylize(self, sample: StylizeInput) -> tuple[list[np.ndarray], dict[str, Any]]:
        """K + 1 stylized images at the model size, and what was used as the style image."""
        with self._torch.inference_mode():
            return self._stylize(sample)

    def _stylize(self, sample: StylizeInput) -> tuple[list[np.ndarray], dict[str, Any]]:
        from PIL import Image

        config = self.config
        height, width = sample.frames[0].shape[:2]
        model_h, model_w = model_size(height, width, config.resolution, config.keep_aspect)
        style_image, style_source = self._style_image(sample.style)
        controls = [
            Image.fromarray(c).resize((model_w, model_h), Image.Resampling.BILINEAR)
            for c in sample.control_images
        ]
        count = len(controls)
        # The same seed for every frame: one noise, so the first frame and the references
        # share one rendering of the style. CPU generators give the same noise on any device.
        generators = [self._torch.Generator("cpu").manual_seed(int(sample.seed)) for _ in controls]
        result = self.pipe(
            prompt=[sample.prompt] * count,
            negative_prompt=[sample.style.negative_prompt] * count,
            image=controls,
            ip_adapter_image=Image.fromarray(style_image),
            height=model_h,
            width=model_w,
            num_inference_steps=config.steps,
            guidance_scale=config.guidance_scale,
            controlnet_conditioning_scale=config.controlnet_conditioning_scale,
            generator=generators,
            output_type="np",
        ).images
        images = [_to_uint8(image) for image in result]
        return images, {"model_size": [model_h, model_w], "style_image": style_source}

    # The style image: the library's reference, or an exemplar generated once and cached.

    def _style_image(self, style: Style) -> tuple[np.ndarray, str]:
        if style.reference is not None:
            key = f"reference:{style.reference}"
            if key not in self._style_images:
                try:
                    self._style_images[key] = _read_rgb(style.reference)
                except OSError as error:
                    raise _SampleFailure(
                        STYLE_REFERENCE_UNREADABLE, f"{style.reference}: {error}"
                    ) from None
            return self._style_images[key], key
        path = self.exemplar_path(style)
        key = f"exemplar:{path.name}"
        if key not in self._style_images:
            self._style_images[key] = self._exemplar(style, path)
        return self._style_images[key], key

    def exemplar_path(self, style: Style) -> Path:
        """Cache file of a text-only style's exemplar: style id, prompt hash, revision, seed."""
        config = self.config
        settings = json.dumps(
            {
                "prompt": style.prompt,
                "negative_prompt": style.negative_prompt,
                "steps": config.steps,
                "guidance_scale": config.guidance_scale,
                "resolution": config.resolution,
            },
            sort_keys=True,
        )
        prompt_hash = hashlib.sha256(settings.encode()).hexdigest()[:16]
        revision = hashlib.sha256(self.refs["sdxl"].revision.encode()).hexdigest()[:16]
        name = f"{style.id}-p{prompt_hash}-r{revision}-s{config.exemplar_seed}.png"
        return _exemplar_dir(config) / name

    def _exemplar(self, style: Style, path: Path) -> np.ndarray:
        # One generator per exemplar across the processes sharing a cache dir.
        with file_lock(path.with_name(f".{path.name}.lock")):
            # Another process may have made it while this one waited for the lock.
            if path.is_file():
                return _read_rgb(path)
            image = self._generate_exemplar(style)
            staging = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            from PIL import Image

            Image.fromarray(image).save(staging, format="PNG")
            os.replace(staging, path)  # appears complete or not at all
            self.exemplars_generated += 1
            log.info("generated style exemplar %s", path)
            return image

    def _generate_exemplar(self, style: Style) -> np.ndarray:
        from PIL import Image

        torch = self._torch
        size = self.config.resolution
        # The UNet's IP-Adapter projection needs an image; a zero mask removes its
        # contribution exactly in every IP-Adapter layer, for this call only.
        neutral = Image.new("RGB", (size, size), (127, 127, 127))
        zero_mask = torch.zeros(1, 1, size, size)
        result = self.text_to_image(
            prompt=style.prompt,
            negative_prompt=style.negative_prompt,
            ip_adapter_image=neutral,
            cross_attention_kwargs={"ip_adapter_masks": [zero_mask]},
            height=size,
            width=size,
            num_inference_steps=self.config.steps,
            guidance_scale=self.config.guidance_scale,
            generator=torch.Generator("cpu").manual_seed(self.config.exemplar_seed),
            output_type="np",
        ).images
        return _to_uint8(result[0])


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return (np.clip(image, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def _torch_dtype(name: str, device: str):
    import torch

    if name == "auto":
        return torch.float16 if device.startswith("cuda") else torch.float32
    return getattr(torch, name)


def _exemplar_dir(config: StylizeConfig) -> Path:
    if config.cache_dir:
        folder = Path(config.cache_dir)
    else:
        cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
        folder = cache / "datagen" / "style_exemplars"
    folder.mkdir(parents=True, exist_ok=True)
    return folder
