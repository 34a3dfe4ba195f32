"""Stylize stage: the clip's first frame and K extra frames, restyled by an image model.

The stylized first frame is what the animate stage brings to life; the K stylized extra frames
are the sample's style references. Two backends sit behind one interface:

- `sdxl` (CT tier, sdxl.py): SDXL base + depth ControlNet + IP-Adapter with InstantStyle, i.e.
  the IP-Adapter image is injected only into the style block (style+layout as an option). The
  ControlNet keeps each frame's layout (its depth map, made by the control step whatever the
  control kind: the ControlNet was trained on depth); the prompt says what the clip shows, then
  the style ("<content>, <style prompt>", the content from the describe step's VLM), and the
  IP-Adapter image (the style's reference image) carries the style. A style given only as
  text gets an exemplar image, generated once by the same SDXL from the style prompt and cached
  on disk.
- `http` (SFT tier, http.py): any image-edit service that speaks the small JSON protocol below.

HTTP protocol (one request per frame)::

    POST <url>
    Authorization: Bearer <key>            (only when api_key_env or api_key_block is set)
    Content-Type: application/json
    {"image": "<base64 PNG>", "prompt": str, "negative_prompt": str,
     "reference_image": "<base64 PNG>" | null, "style_id": str, "seed": int,
     "width": int, "height": int}

    200 -> {"image": "<base64 PNG>"}   (any size; resized back to the frame's size)
    408 / 429 / 500 / 502 / 503 / 504 -> retried with exponential backoff (Retry-After
        honoured), at most max_retries times (datagen/core/http.py)
    other statuses -> the sample is rejected (`image_edit_failed`)

The API key is read only from the environment variable that `api_key_env` names or the Prefect
Secret block that `api_key_block` names (datagen/core/api_keys.py), when the backend loads, on
the process that makes the requests; it never appears in reprs, logs, reject details, pickles
or outputs.

Both backends return images at the clip's exact size, whatever size the model ran at.
"""

from __future__ import annotations

import base64
import io
import re
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import AfterValidator, Field

from datagen.core.api_keys import check_key_source
from datagen.core.config import NonEmptyStr, config_class
from datagen.core.stage import ModelRef, Reject, Resources, Stage, pick_device
from datagen.data.styles import Style
from datagen.models.registry import PROFILES

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

# The field types of StylizeConfig.
Backend = Literal[BACKENDS]
Profile = Literal[PROFILES]
Dtype = Literal[DTYPES]
InstantStyleBlocks = Literal[tuple(INSTANTSTYLE_BLOCKS)]


def _device(value: str) -> str:
    if not _DEVICE.match(value):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {value!r}")
    return value


Device = Annotated[str, AfterValidator(_device)]  # "auto" | "cpu" | "cuda" | "cuda:N"


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


@config_class
class StylizeConfig:
    backend: Backend = "sdxl"  # "sdxl" (CT) | "http" (SFT)
    profile: Profile = "tiny"
    tiny_dir: NonEmptyStr | None = None
    sdxl_id: NonEmptyStr | None = None  # hub id overrides (production profile)
    controlnet_id: NonEmptyStr | None = None
    ip_adapter_id: NonEmptyStr | None = None
    # K: extra frames stylized as style references
    num_style_refs: Annotated[int, Field(ge=1, le=16)] = 3
    # InstantStyle's ControlNet example (infer_style_controlnet.py:46-52): IP-Adapter scale 1.0
    # inside the style blocks, guidance 5, 30 steps, ControlNet conditioning scale 0.6.
    steps: Annotated[int, Field(ge=1, le=1000)] = 30
    guidance_scale: Annotated[float, Field(ge=0, le=100, allow_inf_nan=False)] = 5.0
    controlnet_conditioning_scale: Annotated[float, Field(ge=0, le=10, allow_inf_nan=False)] = 0.6
    # IP-Adapter weight inside the InstantStyle blocks
    ip_adapter_scale: Annotated[float, Field(ge=0, le=10, allow_inf_nan=False)] = 1.0
    ip_adapter_blocks: InstantStyleBlocks = "style"  # key of INSTANTSTYLE_BLOCKS
    # model runs at ~resolution^2 pixels, clip aspect, multiples of 64
    resolution: Annotated[int, Field(ge=SIZE_MULTIPLE, le=4096, multiple_of=SIZE_MULTIPLE)] = 1024
    keep_aspect: bool = True  # False: always resolution x resolution
    exemplar_seed: Annotated[int, Field(ge=0, le=_MAX_SEED)] = 0
    # style exemplars; default ~/.cache/datagen/style_exemplars
    cache_dir: NonEmptyStr | None = None
    url: str | None = None  # http backend endpoint
    # Where the key is, by NAME (never the key): an environment variable or a Prefect Secret
    # block. Naming a block drops the default variable; naming both otherwise is an error.
    # None and None: send no Authorization header. (No constraint on these two fields: their
    # checks, in __post_init__, never echo the value.)
    api_key_env: str | None = DEFAULT_API_KEY_ENV
    api_key_block: str | None = None
    timeout_s: Annotated[float, Field(gt=0, le=3600, allow_inf_nan=False)] = 120.0
    max_retries: Annotated[int, Field(ge=0, le=10)] = 3
    retry_backoff_s: Annotated[float, Field(ge=0, le=600, allow_inf_nan=False)] = 1.0
    http_concurrency: Annotated[int, Field(ge=1, le=64)] = 4
    http_model_id: str | None = None  # what the service runs, for provenance (default: url)
    http_model_revision: str = "unspecified"
    device: Device = "auto"  # "auto" | "cpu" | "cuda" | "cuda:N"
    dtype: Dtype = "auto"  # "auto" (float16 on GPU, float32 on CPU) | float32 | float16 | bfloat16

    def __post_init__(self) -> None:
        # The rules that involve more than one field, or that must not echo a value; raised
        # as "StylizeConfig: <message>" (datagen/core/config.py).
        if self.api_key_block is not None and self.api_key_env == DEFAULT_API_KEY_ENV:
            # The block replaces the default variable: the config names exactly one source.
            object.__setattr__(self, "api_key_env", None)
        check_key_source(self.api_key_env, self.api_key_block)  # never echoes the value
        if self.backend == "http" and not self.url:
            raise ValueError("backend 'http' needs url (the image-edit endpoint)")
        if self.url is not None:
            parsed = urllib.parse.urlsplit(self.url)
            if parsed.scheme not in ("http", "https") or not parsed.hostname:
                raise ValueError("url must be an http(s) URL with a host")
            if parsed.username or parsed.password:
                # Credentials belong in an environment variable or a Secret block, never in a
                # config value.
                raise ValueError(
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


# --- image helpers (both backends) ---------------------------------------------------------


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


# The backends, last: their modules import the names above from this package.
from datagen.stages.stylize.http import HttpImageEditStylizer  # noqa: E402
from datagen.stages.stylize.sdxl import SdxlStylizer, model_size  # noqa: E402

__all__ = [
    "BACKENDS",
    "BAD_FRAME",
    "BAD_SEED",
    "CONTROL_SIZE_MISMATCH",
    "DEFAULT_API_KEY_ENV",
    "DTYPES",
    "IMAGE_EDIT_BAD_RESPONSE",
    "IMAGE_EDIT_FAILED",
    "IMAGE_EDIT_UNAVAILABLE",
    "INSTANTSTYLE_BLOCKS",
    "SIZE_MULTIPLE",
    "STYLE_REFERENCE_UNREADABLE",
    "WRONG_CONTROL_COUNT",
    "WRONG_FRAME_COUNT",
    "HttpImageEditStylizer",
    "SdxlStylizer",
    "StylizeConfig",
    "StylizeInput",
    "StylizeOutput",
    "StylizeStage",
    "model_size",
    "stylize_prompt",
]
