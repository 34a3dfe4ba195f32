"""The vision-language model behind the caption, describe and judge stages, with two backends.

- `transformers` (transformers_backend.py): Qwen2.5-VL (production
  `Qwen/Qwen2.5-VL-7B-Instruct`, registry key `qwen_vl`) loaded in-process with
  `Qwen2_5_VLForConditionalGeneration` + `AutoProcessor` from the directory
  `datagen.models.registry.resolve` gives (the hub snapshot, or the tiny twin). Frames are
  handed over already decoded, as a video with its metadata (`do_sample_frames=False`:
  torchcodec does not load here, see FINDINGS.md). Greedy decoding, batched with left padding.
- `openai` (openai_backend.py): any OpenAI-compatible chat-completions server (vLLM, ...),
  over the one retrying HTTP client (datagen/core/http.py). Frames travel as base64 image
  parts. The API key is read at load time, on the process that makes the requests, from the
  environment variable (`api_key_env`) or the Prefect Secret block (`api_key_block`) NAMED in
  the config (datagen/core/api_keys.py), and never appears in a repr, a log line, an
  exception, a pickle or a returned value.

Both take conversations (`Turn`s of text and `Video` parts) and return one `VLMReply` (text +
whether it was cut off at the token limit) or one `VLMRequestError` (a per-sample failure the
stage turns into a reject) per conversation. Failures that are not about one sample (server
down after the retries, bad credentials, model not served) raise, so the orchestrator retries
the batch instead of rejecting every sample.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from string import Template
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import numpy as np
from pydantic import Field

from datagen.core.api_keys import check_key_source
from datagen.core.config import (
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    config_class,
)
from datagen.core.package_data import package_data_dir
from datagen.core.stage import In, ModelRef, Out, Resources, Stage
from datagen.models.registry import PROFILES

BACKENDS = ("transformers", "openai")
DTYPES = ("auto", "float32", "bfloat16", "float16")
IMAGE_FORMATS = ("jpeg", "png")
MIN_PIXELS = 56 * 56  # the smallest frame Qwen2.5-VL's processor works with
DEFAULT_API_KEY_ENV = "DATAGEN_VLM_API_KEY"

# The field types of VLMConfig.
Backend = Literal[BACKENDS]
Profile = Literal[PROFILES]
Dtype = Literal[DTYPES]
ImageFormat = Literal[IMAGE_FORMATS]


@config_class
class VLMConfig:
    """What the caption, describe and judge stages share: which VLM, and how frames reach it."""

    backend: Backend = "transformers"  # "transformers" (in-process) | "openai" (HTTP server)
    profile: Profile = "tiny"
    tiny_dir: str | None = None
    hub_id: str | None = None  # transformers: another Qwen2.5-VL repo (e.g. the 3B)
    dtype: Dtype = "auto"  # auto: bfloat16 on GPU, float32 on CPU
    num_frames: PositiveInt = 8  # frames of each video shown to the VLM, uniformly spaced
    # per frame; larger frames are scaled down, aspect kept
    max_pixels: Annotated[int, Field(ge=MIN_PIXELS)] = 448 * 448
    max_new_tokens: PositiveInt = 256
    batch_size: PositiveInt = 4  # transformers: conversations per generate() call
    # openai backend
    base_url: str = "http://127.0.0.1:8000/v1"
    model: str = "Qwen/Qwen2.5-VL-7B-Instruct"
    model_revision: str = "unpinned"  # recorded with every row; the server cannot tell us
    # Where the key is, by NAME (never the key): an environment variable, or a Prefect Secret
    # block. Naming a block drops the default variable; naming both otherwise is an error.
    # None and None: requests go without a key. (No constraint on these two fields: their
    # checks, in __post_init__, never echo the value.)
    api_key_env: str | None = DEFAULT_API_KEY_ENV
    api_key_block: str | None = None
    image_format: ImageFormat = "jpeg"
    timeout_s: PositiveFloat = 120.0
    http_retries: NonNegativeInt = 4  # extra attempts on 429 / 5xx / connection errors
    # first wait; doubles per attempt (at least the server's Retry-After)
    retry_backoff_s: NonNegativeFloat = 1.0
    max_concurrency: PositiveInt = 4  # requests in flight per stage actor

    def __post_init__(self) -> None:
        # The rules that involve more than one field, or that must not echo a value; raised
        # as "<Class>: <message>" (datagen/core/config.py).
        if self.api_key_block is not None and self.api_key_env == DEFAULT_API_KEY_ENV:
            # The block replaces the default variable, so the config (and the row's params)
            # names exactly one source.
            object.__setattr__(self, "api_key_env", None)
        # Never echoes the offending value: a key pasted into the wrong field stays out of logs.
        check_key_source(self.api_key_env, self.api_key_block)
        if self.backend == "openai":
            _check_base_url(self.base_url)
            if not self.model.strip():
                raise ValueError("model (the served model name) must not be empty")
            if not self.model_revision.strip():
                raise ValueError("model_revision must not be empty")

    def default_resources(self) -> Resources:
        """One GPU for the in-process model; a client of a server needs none."""
        if self.backend == "transformers":
            return Resources(num_gpus=1, num_cpus=1)
        return Resources(num_gpus=0, num_cpus=0.5)


def _check_base_url(url: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("base_url must be an http(s) URL such as http://127.0.0.1:8000/v1")
    if parts.username or parts.password:
        raise ValueError(
            "base_url must not carry credentials; put the key in an environment variable "
            "(api_key_env) or a Prefect Secret block (api_key_block)"
        )
    if parts.query or parts.fragment:
        raise ValueError("base_url must not have a query or fragment")


# --- what goes in and comes out ------------------------------------------------------------


@dataclass(frozen=True)
class Video:
    """Frames shown to the VLM as one video: (F, H, W, 3) uint8 at `fps` frames per second."""

    frames: np.ndarray
    fps: float


@dataclass(frozen=True)
class Turn:
    """One chat turn: role 'user' or 'assistant', and its parts (text and videos, in order)."""

    role: str
    parts: tuple[str | Video, ...]


Conversation = Sequence[Turn]


@dataclass(frozen=True)
class VLMReply:
    text: str
    truncated: bool  # generation stopped at max_new_tokens, not at an end-of-turn token


class VLMRequestError(Exception):
    """One conversation failed (a 4xx answer, a malformed reply): a reject, not a crash."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class VLMServerError(RuntimeError):
    """The server refuses every request (credentials, unknown model, wrong URL)."""


class VLMUnavailableError(RuntimeError):
    """No answer after the bounded retries (connection errors, timeouts, 429, 5xx)."""


def check_frames(frames: Any) -> str | None:
    """Why `frames` cannot be shown to the VLM, or None when they can."""
    if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8:
        return f"frames must be a uint8 numpy array, got {getattr(frames, 'dtype', type(frames))}"
    if frames.ndim != 4 or frames.shape[-1] != 3 or 0 in frames.shape:
        return f"frames must have shape (F, H, W, 3) with F, H, W > 0, got {frames.shape}"
    height, width = frames.shape[1:3]
    if max(height, width) / min(height, width) > 100:
        return f"aspect ratio {width}x{height} is too extreme for the VLM"
    return None


def check_videos(fps: float, *videos: Any) -> str | None:
    """Why these videos (frames at `fps`) cannot be shown to the VLM, or None when they can."""
    for frames in videos:
        problem = check_frames(frames)
        if problem:
            return problem
    if not (np.isfinite(fps) and fps > 0):
        return f"fps must be > 0, got {fps}"
    return None


def sample_video(frames: np.ndarray, fps: float, num_frames: int) -> Video:
    """`num_frames` uniformly spaced frames (all of them if there are fewer), and their fps."""
    total = len(frames)
    count = min(num_frames, total)
    indices = np.linspace(0, total - 1, count).round().astype(int)
    return Video(np.ascontiguousarray(frames[indices]), fps * count / total)


def fit_pixels(frame: np.ndarray, max_pixels: int) -> np.ndarray:
    """Scale a frame down (aspect kept) so that it has at most `max_pixels` pixels."""
    height, width = frame.shape[:2]
    if height * width <= max_pixels:
        return frame
    from PIL import Image

    scale = (max_pixels / (height * width)) ** 0.5
    size = (max(1, int(width * scale)), max(1, int(height * scale)))
    return np.asarray(Image.fromarray(frame).resize(size, Image.Resampling.BICUBIC))


# --- backends ------------------------------------------------------------------------------


class VLMBackend(ABC):
    """A loaded VLM: conversations in, one reply (or per-sample error) per conversation out."""

    @abstractmethod
    def generate(
        self, conversations: Sequence[Conversation], max_new_tokens: int
    ) -> list[VLMReply | VLMRequestError]: ...

    @abstractmethod
    def model_ref(self) -> ModelRef: ...

    @abstractmethod
    def close(self) -> None:
        """Release the model or the connection pool."""


def load_backend(config: VLMConfig, resources: Resources) -> VLMBackend:
    """Load the configured backend (heavy imports happen here, in the stage's setup)."""
    if config.backend == "transformers":
        return TransformersVLM(config, resources)
    return OpenAIVLM(config)


def load_prompt(file_name: str, fields: tuple[str, ...]) -> Template:
    """A prompt from prompts/ as a `string.Template` whose `$placeholders` are exactly
    `fields` (a prompt edited into asking for something the stage does not fill in, or
    forgetting what it must show, fails when the stage is built, not mid-run)."""
    path = package_data_dir("prompts") / file_name
    template = Template(path.read_text(encoding="utf-8").strip())
    if not template.is_valid():
        raise ValueError(f"{path}: malformed $placeholder")
    found = set(template.get_identifiers())
    if found != set(fields):
        raise ValueError(f"{path}: placeholders {sorted(found)}, expected {sorted(fields)}")
    return template


def prompt_sha256(*templates: Template) -> str:
    """A hash of the prompt texts, recorded with the parameters of every row."""
    digest = hashlib.sha256()
    for template in templates:
        digest.update(template.template.encode() + b"\0")
    return "sha256:" + digest.hexdigest()


class VLMStage(Stage[In, Out]):
    """A stage whose model is a VLM backend (transformers or an OpenAI-compatible server):
    the backend loads in setup, closes in teardown, and is recorded under the stage's name."""

    backend: VLMBackend | None = None
    loaded_attributes = ("backend",)  # it pickles as its config: see Stage

    def _load(self) -> None:
        self.backend = load_backend(self.config, self.resources)

    def _unload(self) -> None:
        if self.backend is not None:
            self.backend.close()
        self.backend = None

    def models(self) -> dict[str, ModelRef]:
        return {self.name: self.backend.model_ref()} if self.backend else {}


# The backends, last: their modules import the names above from this package.
from datagen.stages.vlm.openai_backend import OpenAIVLM  # noqa: E402
from datagen.stages.vlm.transformers_backend import TransformersVLM  # noqa: E402
