"""Stylize stage: the clip's first frame and K extra frames, restyled by an image model.

The stylized first frame is what the animate stage brings to life; the K stylized extra frames
are the sample's style references. Two backends sit behind one interface:

- `sdxl` (CT tier): SDXL base + depth ControlNet + IP-Adapter with InstantStyle, i.e. the
  IP-Adapter image is injected only into the style block (style+layout as an option). The
  ControlNet keeps each frame's layout (its depth map, made by the control step whatever the
  control kind: the ControlNet was trained on depth); the prompt says what the clip shows, then
  the style ("<content>, <style prompt>", the content from the describe step's VLM), and the
  IP-Adapter image (the style's reference image) carries the style. A style given only as
  text gets an exemplar image, generated once by the same SDXL from the style prompt and cached
  on disk.
- `http` (SFT tier): any image-edit service that speaks the small JSON protocol below.

HTTP protocol (one request per frame)::

    POST <url>
    Authorization: Bearer <key>            (only when api_key_env or api_key_block is set)
    Content-Type: application/json
    {"image": "<base64 PNG>", "prompt": str, "negative_prompt": str,
     "reference_image": "<base64 PNG>" | null, "style_id": str, "seed": int,
     "width": int, "height": int}

    200 -> {"image": "<base64 PNG>"}   (any size; resized back to the frame's size)
    429 / 5xx -> retried with exponential backoff (Retry-After honoured), at most max_retries
    other statuses -> the sample is rejected (`image_edit_failed`)

The API key is read only from the environment variable that `api_key_env` names or the Prefect
Secret block that `api_key_block` names (datagen/core/api_keys.py), when the backend loads, on the
process that makes the requests; it never appears in reprs, logs, reject details, pickles or
outputs.

Both backends return images at the clip's exact size, whatever size the model ran at.
"""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import fcntl
import hashlib
import io
import json
import logging
import math
import os
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from datagen.core.api_keys import (
    SecretValue,
    check_key_source,
    describe_key_source,
    resolve_api_key,
)
from datagen.core.stage import ModelRef, Reject, Resources, Stage, pick_device
from datagen.data.styles import Style
from datagen.models.registry import PROFILES

log = logging.getLogger(__name__)

BACKENDS = ("sdxl", "http")
DTYPES = ("auto", "float32", "float16", "bfloat16")
DEFAULT_API_KEY_ENV = "DATAGEN_IMAGE_EDIT_API_KEY"
SIZE_MULTIPLE = 64  # SDXL sizes: multiples of 64 (VAE factor 8 x UNet depth)

# InstantStyle (Wang et al. 2024): the IP-Adapter is active in only these UNet blocks.
# "style" = `up_blocks.0.attentions.1`, the style-only map its ControlNet example uses
# (instantX-research/InstantStyle infer_style_controlnet.py:28-30) and the default here;
# "style_layout" adds `down_blocks.2.attentions.1` (infer_style_controlnet.py:29), which also
# carries the style image's layout into the frame.
INSTANTSTYLE_BLOCKS = {
    "style": lambda s: {"up": {"block_0": [0.0, s, 0.0]}},
    "style_layout": lambda s: {"down": {"block_2": [0.0, s]}, "up": {"block_0": [0.0, s, 0.0]}},
}

# Reject reason codes of this stage.
WRONG_FRAME_COUNT = "wrong_frame_count"
WRONG_CONTROL_COUNT = "wrong_control_count"
BAD_FRAME = "bad_frame"
CONTROL_SIZE_MISMATCH = "control_size_mismatch"
BAD_SEED = "bad_seed"
STYLE_REFERENCE_UNREADABLE = "style_reference_unreadable"
IMAGE_EDIT_FAILED = "image_edit_failed"
IMAGE_EDIT_UNAVAILABLE = "image_edit_unavailable"
IMAGE_EDIT_BAD_RESPONSE = "image_edit_bad_response"

_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
_MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class StylizeInput:
    """The clip's first frame then K extra frames, their depth maps, the style and the seed."""

    sample_id: str
    frames: list[np.ndarray]  # K + 1 images (H, W, 3) uint8; frames[0] is the first frame
    control_images: list[np.ndarray]  # the depth map of each frame, (H, W, 3) uint8
    style: Style
    seed: int
    # What the clip shows, content only (the describe step's VLM answer), put before the style
    # words in the prompt as InstantStyle's example does ("a man, masterpiece, ...",
    # infer_style_controlnet.py:44); empty: the style words alone.
    content: str = ""

    @property
    def prompt(self) -> str:
        return stylize_prompt(self.content, self.style)


def stylize_prompt(content: str, style: Style) -> str:
    """'<content>, <style prompt>': what to draw, then how."""
    from datagen.stages.describe import content_first

    return content_first(content, style.prompt)


@dataclass(frozen=True)
class StylizeOutput:
    sample_id: str
    stylized_first_frame: np.ndarray  # (H, W, 3) uint8, the clip's size
    style_refs: list[np.ndarray]  # K images (H, W, 3) uint8
    prompt: str
    params: dict[str, Any] = field(default_factory=dict)  # what produced it, for the row


@dataclass(frozen=True)
class StylizeConfig:
    backend: str = "sdxl"  # "sdxl" (CT) | "http" (SFT)
    profile: str = "tiny"
    tiny_dir: str | None = None
    sdxl_id: str | None = None  # hub id overrides (production profile)
    controlnet_id: str | None = None
    ip_adapter_id: str | None = None
    num_style_refs: int = 3  # K: extra frames stylized as style references
    # InstantStyle's ControlNet example (infer_style_controlnet.py:46-52): IP-Adapter scale 1.0
    # inside the style blocks, guidance 5, 30 steps, ControlNet conditioning scale 0.6.
    steps: int = 30
    guidance_scale: float = 5.0
    controlnet_conditioning_scale: float = 0.6
    ip_adapter_scale: float = 1.0  # IP-Adapter weight inside the InstantStyle blocks
    ip_adapter_blocks: str = "style"  # key of INSTANTSTYLE_BLOCKS
    resolution: int = 1024  # model runs at ~resolution^2 pixels, clip aspect, multiples of 64
    keep_aspect: bool = True  # False: always resolution x resolution
    exemplar_seed: int = 0
    cache_dir: str | None = None  # style exemplars; default ~/.cache/datagen/style_exemplars
    url: str | None = None  # http backend endpoint
    # Where the key is, by NAME (never the key): an environment variable or a Prefect Secret
    # block. Naming a block drops the default variable; naming both otherwise is an error.
    # None and None: send no Authorization header.
    api_key_env: str | None = DEFAULT_API_KEY_ENV
    api_key_block: str | None = None
    timeout_s: float = 120.0
    max_retries: int = 3
    retry_backoff_s: float = 1.0
    http_concurrency: int = 4
    http_model_id: str | None = None  # what the service runs, for provenance (default: url)
    http_model_revision: str = "unspecified"
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:N"
    dtype: str = "auto"  # "auto" (float16 on GPU, float32 on CPU) | float32 | float16 | bfloat16

    def __post_init__(self) -> None:
        def fail(message: str) -> None:
            raise ValueError(f"StylizeConfig: {message}")

        def integer(name: str, low: int, high: int) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                fail(f"{name} must be an integer in [{low}, {high}], got {value!r}")

        def number(name: str, low: float, high: float = math.inf, low_open: bool = False) -> None:
            value = getattr(self, name)
            ok = (
                isinstance(value, int | float)
                and not isinstance(value, bool)
                and math.isfinite(value)
                and (value > low if low_open else value >= low)
                and value <= high
            )
            if not ok:
                fail(
                    f"{name} must be a finite number {'>' if low_open else '>='} {low}, "
                    f"got {value!r}"
                )

        if self.backend not in BACKENDS:
            fail(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.profile not in PROFILES:
            fail(f"profile must be one of {PROFILES}, got {self.profile!r}")
        for name in ("sdxl_id", "controlnet_id", "ip_adapter_id", "tiny_dir", "cache_dir"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                fail(f"{name} must be None or a non-empty string, got {value!r}")
        integer("num_style_refs", 1, 16)
        integer("steps", 1, 1000)
        integer("resolution", SIZE_MULTIPLE, 4096)
        if self.resolution % SIZE_MULTIPLE:
            fail(f"resolution must be a multiple of {SIZE_MULTIPLE}, got {self.resolution}")
        integer("exemplar_seed", 0, _MAX_SEED)
        integer("max_retries", 0, 10)
        integer("http_concurrency", 1, 64)
        number("guidance_scale", 0.0, 100.0)
        number("controlnet_conditioning_scale", 0.0, 10.0)
        number("ip_adapter_scale", 0.0, 10.0)
        number("timeout_s", 0.0, 3600.0, low_open=True)
        number("retry_backoff_s", 0.0, 600.0)
        if self.ip_adapter_blocks not in INSTANTSTYLE_BLOCKS:
            fail(
                f"ip_adapter_blocks must be one of {sorted(INSTANTSTYLE_BLOCKS)}, "
                f"got {self.ip_adapter_blocks!r}"
            )
        if not isinstance(self.keep_aspect, bool):
            fail(f"keep_aspect must be a bool, got {self.keep_aspect!r}")
        if not isinstance(self.device, str) or not _DEVICE.match(self.device):
            fail(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        if self.dtype not in DTYPES:
            fail(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.api_key_block is not None and self.api_key_env == DEFAULT_API_KEY_ENV:
            # The block replaces the default variable: the config names exactly one source.
            object.__setattr__(self, "api_key_env", None)
        try:
            check_key_source(self.api_key_env, self.api_key_block)
        except ValueError as error:  # its messages never echo the value
            fail(str(error))
        if self.backend == "http" and not self.url:
            fail("backend 'http' needs url (the image-edit endpoint)")
        if self.url is not None:
            parsed = urllib.parse.urlsplit(str(self.url))
            if parsed.scheme not in ("http", "https") or not parsed.hostname:
                fail("url must be an http(s) URL with a host")
            if parsed.username or parsed.password:
                # Credentials belong in an environment variable or a Secret block, never in a
                # config value.
                fail(
                    "url must not carry credentials; put the key in an environment variable "
                    "(api_key_env) or a Prefect Secret block (api_key_block)"
                )

    def settings(self) -> dict[str, Any]:
        """The settings that shape the outputs (recorded with every row)."""
        if self.backend == "http":
            return {
                "backend": "http",
                "endpoint": self.http_model_id or _endpoint_id(self.url),
                "num_style_refs": self.num_style_refs,
            }
        return {
            "backend": "sdxl",
            # what the ControlNet is fed: depth maps, what diffusers/controlnet-depth-sdxl-1.0
            # was trained on, whatever control kind animates the pair (datagen/stages/control.py)
            "controlnet_condition": "depth",
            "num_style_refs": self.num_style_refs,
            "steps": self.steps,
            "guidance_scale": self.guidance_scale,
            "controlnet_conditioning_scale": self.controlnet_conditioning_scale,
            "ip_adapter_scale_map": self.instantstyle_map,
            "resolution": self.resolution,
            "keep_aspect": self.keep_aspect,
            "exemplar_seed": self.exemplar_seed,
        }

    @property
    def instantstyle_map(self) -> dict:
        return INSTANTSTYLE_BLOCKS[self.ip_adapter_blocks](float(self.ip_adapter_scale))


def _endpoint_id(url: str | None) -> str:
    """The endpoint without query or fragment (which may carry tokens), for provenance."""
    parts = urllib.parse.urlsplit(url or "")
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))


class _SampleFailure(Exception):
    """A per-sample failure inside a backend; becomes a Reject."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class _Abandoned(_SampleFailure):
    """A frame not sent because another frame of its sample had already failed."""


# --- image helpers -------------------------------------------------------------------------


def model_size(height: int, width: int, resolution: int, keep_aspect: bool = True) -> tuple:
    """(h, w) the model runs at: ~resolution^2 pixels, the clip's aspect, multiples of 64."""
    if not keep_aspect:
        return resolution, resolution
    aspect = width / height
    area = resolution * resolution

    def snap(value: float) -> int:
        return max(SIZE_MULTIPLE, round(value / SIZE_MULTIPLE) * SIZE_MULTIPLE)

    return snap(math.sqrt(area / aspect)), snap(math.sqrt(area * aspect))


def _resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    from PIL import Image

    if image.shape[:2] == (height, width):
        return image
    resized = Image.fromarray(image).resize((width, height), Image.Resampling.LANCZOS)
    return np.asarray(resized, dtype=np.uint8)


def _png_base64(image: np.ndarray) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _decode_image(data: str) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(base64.b64decode(data, validate=True))) as image:
        return np.asarray(image.convert("RGB"), dtype=np.uint8)


def _read_rgb(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.uint8)


def _check_image(image: Any, what: str) -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
        raise _SampleFailure(BAD_FRAME, f"{what} is not a uint8 numpy array")
    if image.ndim != 3 or image.shape[2] != 3 or min(image.shape[:2]) < 8:
        raise _SampleFailure(BAD_FRAME, f"{what} has shape {image.shape}, expected (H, W, 3)")


# --- SDXL + depth ControlNet + IP-Adapter (InstantStyle) -----------------------------------


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
        with _file_lock(path.with_name(f".{path.name}.lock")):
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


@contextlib.contextmanager
def _file_lock(path: Path):
    """One generator per exemplar across the processes sharing a cache dir."""
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# --- HTTP image-edit service ---------------------------------------------------------------


class HttpImageEditStylizer:
    """Stylizes each frame through an HTTP image-edit endpoint (protocol in the module doc)."""

    RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
    MAX_RETRY_AFTER_S = 60.0

    def __init__(self, config: StylizeConfig):
        self.config = config
        self._api_key: SecretValue | None = None
        self._pool = None
        self.refs = {"image_edit": ModelRef(self.model_id, config.http_model_revision)}
        self._references: dict[Path, str] = {}

    @property
    def model_id(self) -> str:
        return self.config.http_model_id or _endpoint_id(self.config.url)

    def __repr__(self) -> str:
        source = describe_key_source(self.config.api_key_env, self.config.api_key_block)
        return f"HttpImageEditStylizer(url={self.model_id!r}, key_from={source!r})"

    def __getstate__(self) -> dict:
        # Never carry the key across a pickle (Ray ships actors); load() reads it again.
        state = dict(self.__dict__)
        state["_api_key"] = None
        state["_pool"] = None
        return state

    def load(self) -> None:
        config = self.config
        # Read here, on the process that makes the requests; a missing block raises.
        key = resolve_api_key(config.api_key_env, config.api_key_block, "stylize (http backend)")
        if key is not None and not key:
            raise RuntimeError(
                f"stylize: backend 'http' reads its API key from ${config.api_key_env}, "
                "which is not set"
            )
        self._api_key = key
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=self.config.http_concurrency, thread_name_prefix="image-edit"
        )

    def unload(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        self._pool = None
        self._api_key = None

    def stylize(self, sample: StylizeInput) -> tuple[list[np.ndarray], dict[str, Any]]:
        style = sample.style
        reference = self._reference(style)
        height, width = sample.frames[0].shape[:2]
        bodies = [
            {
                "image": _png_base64(frame),
                "prompt": sample.prompt,
                "negative_prompt": style.negative_prompt,
                "reference_image": reference,
                "style_id": style.id,
                "seed": sample.seed,
                "width": width,
                "height": height,
            }
            for frame in sample.frames
        ]
        # Once one frame fails the sample is lost: its other frames stop before their next
        # attempt, and none of its requests outlives the sample.
        lost = threading.Event()
        futures = [self._pool.submit(self._edit, body, lost) for body in bodies]
        try:
            images = [future.result() for future in futures]  # the first failure raises
        except BaseException as error:
            lost.set()
            for future in futures:
                future.cancel()
            concurrent.futures.wait(futures)
            # Report the frame that failed, not one that stopped because of it.
            causes = [
                f.exception()
                for f in futures
                if not f.cancelled() and not isinstance(f.exception(), _Abandoned | type(None))
            ]
            raise (causes[0] if causes else error) from None
        return images, {"style_image": "reference" if reference else "none"}

    def _reference(self, style: Style) -> str | None:
        if style.reference is None:
            return None
        if style.reference not in self._references:
            try:
                self._references[style.reference] = _png_base64(_read_rgb(style.reference))
            except OSError as error:
                raise _SampleFailure(
                    STYLE_REFERENCE_UNREADABLE, f"{style.reference}: {error}"
                ) from None
        return self._references[style.reference]

    def _edit(self, body: dict, lost: threading.Event) -> np.ndarray:
        data = json.dumps(body).encode()
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key.reveal()}"
        try:
            return self._attempts(data, headers, body, lost)
        except _SampleFailure:
            lost.set()
            raise

    def _attempts(self, data: bytes, headers: dict, body: dict, lost: threading.Event):
        config = self.config
        retry_after, failure = "", ""
        for attempt in range(config.max_retries + 1):
            if lost.is_set():
                raise _Abandoned(IMAGE_EDIT_FAILED, "another frame of the sample failed")
            if attempt:
                time.sleep(self._backoff(attempt, retry_after))
            request = urllib.request.Request(config.url, data=data, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=config.timeout_s) as response:
                    payload = response.read()
            except urllib.error.HTTPError as error:
                snippet = self._scrub(error.read(300).decode("utf-8", "replace"))
                retry_after = error.headers.get("Retry-After", "") if error.headers else ""
                if error.code in self.RETRY_STATUSES:
                    log.warning("image edit: HTTP %s, attempt %d", error.code, attempt + 1)
                    failure = f"HTTP {error.code} after {attempt + 1} attempts: {snippet}"
                    continue
                raise _SampleFailure(IMAGE_EDIT_FAILED, f"HTTP {error.code}: {snippet}") from None
            except (urllib.error.URLError, TimeoutError, ConnectionError) as error:
                reason = getattr(error, "reason", error)
                log.warning("image edit: %s, attempt %d", type(reason).__name__, attempt + 1)
                failure = f"{self._scrub(str(reason))} after {attempt + 1} attempts"
                retry_after = ""
                continue
            return self._parse(payload, body["height"], body["width"])
        raise _SampleFailure(IMAGE_EDIT_UNAVAILABLE, failure)

    def _backoff(self, attempt: int, retry_after: str) -> float:
        delay = self.config.retry_backoff_s * 2 ** (attempt - 1)
        with contextlib.suppress(ValueError):
            delay = max(delay, float(retry_after))
        return min(delay, self.MAX_RETRY_AFTER_S)

    def _parse(self, payload: bytes, height: int, width: int) -> np.ndarray:
        try:
            image = _decode_image(json.loads(payload)["image"])
        except Exception as error:  # any malformed answer is this sample's failure
            raise _SampleFailure(
                IMAGE_EDIT_BAD_RESPONSE, f"{type(error).__name__}: {self._scrub(str(error))[:200]}"
            ) from None
        return _resize(image, height, width)

    def _scrub(self, text: str) -> str:
        """Remove the key from anything that might end up in a reject or a log."""
        return self._api_key.redact(text, "***") if self._api_key else text


# --- the stage -----------------------------------------------------------------------------


class StylizeStage(Stage[StylizeInput, StylizeOutput]):
    """Stylize the first frame and K reference frames of each sample (one output per sample)."""

    name = "stylize"
    loaded_attributes = ("backend",)  # it pickles as its config: see Stage

    def __init__(self, config: StylizeConfig | None = None, resources: Resources | None = None):
        self.config = config or StylizeConfig()
        if resources is None:
            # The HTTP backend only waits on the network.
            resources = (
                Resources(num_gpus=1.0) if self.config.backend == "sdxl" else Resources(0, 0.5)
            )
        super().__init__(resources)
        self.backend: SdxlStylizer | HttpImageEditStylizer | None = None

    def __repr__(self) -> str:
        return f"StylizeStage({self.config!r})"

    def _load(self) -> None:
        if self.config.backend == "http":
            backend = HttpImageEditStylizer(self.config)
        else:
            device = self.config.device
            if device == "auto":
                device = pick_device(self.resources)
            backend = SdxlStylizer(self.config, device)
        backend.load()
        self.backend = backend

    def _unload(self) -> None:
        if self.backend is not None:
            self.backend.unload()
        self.backend = None

    def models(self) -> dict[str, ModelRef]:
        """Role -> model; filled at setup (the revision is known once the weights resolve)."""
        return dict(self.backend.refs) if self.backend is not None else {}

    def params(self) -> dict[str, Any]:
        return self.config.settings()

    def _process(self, batch: list[StylizeInput]) -> list[StylizeOutput | Reject]:
        results: list[StylizeOutput | Reject] = []
        for sample in batch:
            try:
                self._check(sample)
                images, used = self.backend.stylize(sample)
            except _SampleFailure as failure:
                results.append(self.reject(sample.sample_id, failure.reason, failure.detail))
                continue
            height, width = sample.frames[0].shape[:2]
            images = [_resize(image, height, width) for image in images]
            results.append(
                StylizeOutput(
                    sample_id=sample.sample_id,
                    stylized_first_frame=images[0],
                    style_refs=images[1:],
                    prompt=sample.prompt,
                    params={
                        **self.params(),
                        **used,
                        "seed": sample.seed,
                        "style_id": sample.style.id,
                    },
                )
            )
        if isinstance(self.backend, SdxlStylizer):
            self.stats.extra["exemplars_generated"] = self.backend.exemplars_generated
        return results

    def _check(self, sample: StylizeInput) -> None:
        expected = self.config.num_style_refs + 1
        if len(sample.frames) != expected:
            raise _SampleFailure(
                WRONG_FRAME_COUNT,
                f"got {len(sample.frames)} frames, expected {expected} "
                f"(first frame + {self.config.num_style_refs} style reference frames)",
            )
        if len(sample.control_images) != len(sample.frames):
            raise _SampleFailure(
                WRONG_CONTROL_COUNT,
                f"got {len(sample.control_images)} control images for {len(sample.frames)} frames",
            )
        for index, frame in enumerate(sample.frames):
            _check_image(frame, f"frame {index}")
            if frame.shape != sample.frames[0].shape:
                raise _SampleFailure(
                    BAD_FRAME, f"frame {index} is {frame.shape}, frame 0 {sample.frames[0].shape}"
                )
        for index, control in enumerate(sample.control_images):
            _check_image(control, f"control image {index}")
            if control.shape != sample.frames[0].shape:
                raise _SampleFailure(
                    CONTROL_SIZE_MISMATCH,
                    f"control image {index} is {control.shape}, frames {sample.frames[0].shape}",
                )
        seed = sample.seed
        if (
            isinstance(seed, bool)
            or not isinstance(seed, int | np.integer)
            or not (0 <= seed <= _MAX_SEED)
        ):
            raise _SampleFailure(BAD_SEED, f"seed must be an integer in [0, 2**63), got {seed!r}")
