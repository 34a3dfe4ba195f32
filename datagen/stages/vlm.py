"""The vision-language model behind the caption and judge stages, with two backends.

- `transformers`: Qwen2.5-VL (production `Qwen/Qwen2.5-VL-7B-Instruct`, registry key `qwen_vl`)
  loaded in-process with `Qwen2_5_VLForConditionalGeneration` + `AutoProcessor` from the
  directory `datagen.models.registry.resolve` gives (the hub snapshot, or the tiny twin). Frames are
  handed over already decoded, as a video with its metadata (`do_sample_frames=False`: torchcodec
  does not load here, see FINDINGS.md). Greedy decoding, batched with left padding.
- `openai`: any OpenAI-compatible chat-completions server (vLLM, ...). Frames travel as base64
  image parts. The API key is read at load time, on the process that makes the requests, from
  the environment variable (`api_key_env`) or the Prefect Secret block (`api_key_block`) NAMED
  in the config (datagen/core/api_keys.py), and never appears in a repr, a log line, an exception, a
  pickle or a returned value.

Both take conversations (`Turn`s of text and `Video` parts) and return one `VLMReply` (text +
whether it was cut off at the token limit) or one `VLMRequestError` (a per-sample failure the
stage turns into a reject) per conversation. Failures that are not about one sample (server
down after the retries, bad credentials, model not served) raise, so the orchestrator retries
the batch instead of rejecting every sample.
"""

from __future__ import annotations

import base64
import hashlib
import io
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from string import Template
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from datagen.core.api_keys import (
    SecretValue,
    check_key_source,
    describe_key_source,
    resolve_api_key,
)
from datagen.core.package_data import package_data_dir
from datagen.core.stage import In, ModelRef, Out, Resources, Stage
from datagen.models.registry import PROFILES, resolve

log = logging.getLogger(__name__)

BACKENDS = ("transformers", "openai")
DTYPES = ("auto", "float32", "bfloat16", "float16")
IMAGE_FORMATS = ("jpeg", "png")
MIN_PIXELS = 56 * 56  # the smallest frame Qwen2.5-VL's processor works with
DEFAULT_API_KEY_ENV = "DATAGEN_VLM_API_KEY"
_RETRY_CAP_S = 30.0  # longest single wait between two HTTP attempts


@dataclass(frozen=True)
class VLMConfig:
    """What the caption and judge stages share: which VLM, and how frames reach it."""

    backend: str = "transformers"  # "transformers" (in-process) | "openai" (HTTP server)
    profile: str = "tiny"
    tiny_dir: str | None = None
    hub_id: str | None = None  # transformers: another Qwen2.5-VL repo (e.g. the 3B)
    dtype: str = "auto"  # auto: bfloat16 on GPU, float32 on CPU
    num_frames: int = 8  # frames of each video shown to the VLM, uniformly spaced
    max_pixels: int = 448 * 448  # per frame; larger frames are scaled down, aspect kept
    max_new_tokens: int = 256
    batch_size: int = 4  # transformers: conversations per generate() call
    # openai backend
    base_url: str = "http://127.0.0.1:8000/v1"
    model: str = "Qwen/Qwen2.5-VL-7B-Instruct"
    model_revision: str = "unpinned"  # recorded with every row; the server cannot tell us
    # Where the key is, by NAME (never the key): an environment variable, or a Prefect Secret
    # block. Naming a block drops the default variable; naming both otherwise is an error.
    # None and None: requests go without a key.
    api_key_env: str | None = DEFAULT_API_KEY_ENV
    api_key_block: str | None = None
    image_format: str = "jpeg"
    timeout_s: float = 120.0
    http_retries: int = 4  # extra attempts on 429 / 5xx / connection errors
    retry_backoff_s: float = 1.0  # first wait; doubles per attempt (Retry-After wins)
    max_concurrency: int = 4  # requests in flight per stage actor

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.profile not in PROFILES:
            raise ValueError(f"profile must be one of {PROFILES}, got {self.profile!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.image_format not in IMAGE_FORMATS:
            raise ValueError(
                f"image_format must be one of {IMAGE_FORMATS}, got {self.image_format!r}"
            )
        for name, low in (
            ("num_frames", 1),
            ("max_new_tokens", 1),
            ("batch_size", 1),
            ("max_concurrency", 1),
            ("http_retries", 0),
            ("max_pixels", MIN_PIXELS),
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        for name in ("timeout_s", "retry_backoff_s"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and np.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.timeout_s <= 0:
            raise ValueError("timeout_s must be > 0")
        if self.api_key_block is not None and self.api_key_env == DEFAULT_API_KEY_ENV:
            # The block replaces the default variable, so the config (and the row's params)
            # names exactly one source.
            object.__setattr__(self, "api_key_env", None)
        # Never echoes the offending value: a key pasted into the wrong field stays out of logs.
        check_key_source(self.api_key_env, self.api_key_block)
        if self.backend == "openai":
            _check_base_url(self.base_url)
            if not (isinstance(self.model, str) and self.model.strip()):
                raise ValueError("model (the served model name) must not be empty")
            if not self.model_revision.strip():
                raise ValueError("model_revision must not be empty")

    def default_resources(self) -> Resources:
        """One GPU for the in-process model; a client of a server needs none."""
        if self.backend == "transformers":
            return Resources(num_gpus=1, num_cpus=1)
        return Resources(num_gpus=0, num_cpus=0.5)


def _check_base_url(url: str) -> None:
    parts = urlsplit(url) if isinstance(url, str) else None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
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


class TransformersVLM(VLMBackend):
    """Qwen2.5-VL in-process, loaded once from the resolved directory."""

    def __init__(self, config: VLMConfig, resources: Resources):
        import torch
        from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

        from datagen.core.stage import pick_device

        resolved = resolve("qwen_vl", config.profile, config.tiny_dir, hub_id=config.hub_id)
        self.config = config
        self.device = pick_device(resources)
        if config.dtype == "auto":
            self.dtype = torch.bfloat16 if self.device == "cuda" else torch.float32
        else:
            self.dtype = getattr(torch, config.dtype)
        self.processor = AutoProcessor.from_pretrained(resolved.path)
        # Batched generation appends to the right end of every row, so pad on the left. Set
        # once here: the processor is this backend's own.
        self.processor.tokenizer.padding_side = "left"
        self.model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            resolved.path, dtype=self.dtype
        )
        self.model.to(self.device).eval()
        # Greedy: the captions of a sample must not change from run to run. Set once on the
        # model this backend owns; generate() then only passes the per-call token limit.
        generation = self.model.generation_config
        generation.do_sample = False
        for name in ("temperature", "top_p", "top_k"):
            setattr(generation, name, None)
        eos = generation.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos])
        video_size = dict(self.processor.video_processor.size)
        self.video_size = {
            "shortest_edge": min(video_size.get("shortest_edge", MIN_PIXELS), config.max_pixels),
            "longest_edge": config.max_pixels,
        }
        self._ref = resolved.ref
        self._torch = torch

    def model_ref(self) -> ModelRef:
        return self._ref

    def close(self) -> None:
        self.model = None
        self.processor = None

    def _chat(self, conversation: Conversation) -> tuple[str, list[Video]]:
        messages, videos = [], []
        for turn in conversation:
            content = []
            for part in turn.parts:
                if isinstance(part, Video):
                    content.append({"type": "video"})
                    videos.append(part)
                else:
                    content.append({"type": "text", "text": part})
            messages.append({"role": turn.role, "content": content})
        text = self.processor.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        return text, videos

    def generate(
        self, conversations: Sequence[Conversation], max_new_tokens: int
    ) -> list[VLMReply | VLMRequestError]:
        replies: list[VLMReply | VLMRequestError] = []
        size = self.config.batch_size
        for start in range(0, len(conversations), size):
            replies.extend(self._generate(conversations[start : start + size], max_new_tokens))
        return replies

    def _generate(self, conversations: Sequence[Conversation], max_new_tokens: int) -> list:
        from transformers.video_utils import VideoMetadata

        texts, videos = [], []
        for conversation in conversations:
            text, clip = self._chat(conversation)
            texts.append(text)
            videos.extend(clip)
        video_kwargs: dict[str, Any] = {}
        if videos:
            video_kwargs = {
                "videos": [v.frames for v in videos],
                # the frames are already the sampled ones: metadata says they are all of them
                "video_metadata": [
                    VideoMetadata(
                        total_num_frames=len(v.frames),
                        fps=v.fps,
                        height=v.frames.shape[1],
                        width=v.frames.shape[2],
                        frames_indices=list(range(len(v.frames))),
                    )
                    for v in videos
                ],
                "do_sample_frames": False,
                "size": self.video_size,
                "cap_pixels_per_frame": True,  # the reference (qwen-vl-utils) pixel budget
            }
        inputs = self.processor(text=texts, padding=True, return_tensors="pt", **video_kwargs)
        inputs = inputs.to(self.device)
        if "pixel_values_videos" in inputs:
            inputs["pixel_values_videos"] = inputs["pixel_values_videos"].to(self.dtype)
        with self._torch.inference_mode():
            output = self.model.generate(**inputs, max_new_tokens=max_new_tokens)
        generated = output[:, inputs["input_ids"].shape[1] :].tolist()
        replies = []
        for tokens in generated:
            # Rows that stopped early are padded with end tokens; a row with none ran out.
            truncated = not any(t in self.eos_ids for t in tokens)
            text = self.processor.tokenizer.decode(tokens, skip_special_tokens=True)
            replies.append(VLMReply(text=text.strip(), truncated=truncated))
        return replies


class OpenAIVLM(VLMBackend):
    """A client of an OpenAI-compatible chat-completions server (vLLM, ...)."""

    def __init__(self, config: VLMConfig):
        import httpx

        self.config = config
        self.base_url = config.base_url.rstrip("/")
        self._key_source = describe_key_source(config.api_key_env, config.api_key_block)
        # Read once, here, on the worker that makes the requests; a missing block raises.
        key = resolve_api_key(
            config.api_key_env, config.api_key_block, f"VLM client of {self.base_url}"
        )
        self._key = key if key is not None else SecretValue("")
        if config.api_key_env is not None and not self._key:
            log.warning(
                "%s is not set: requests to %s go without an API key",
                config.api_key_env,
                self.base_url,
            )
        self._httpx = httpx
        self._client = httpx.Client(
            timeout=httpx.Timeout(config.timeout_s),
            limits=httpx.Limits(max_connections=config.max_concurrency),
            follow_redirects=False,  # never resend the key to another host
        )
        self._check_model_served()

    def __repr__(self) -> str:
        return (
            f"OpenAIVLM(base_url={self.base_url!r}, model={self.config.model!r}, "
            f"key_from={self._key_source!r})"
        )

    def model_ref(self) -> ModelRef:
        return ModelRef(self.config.model, self.config.model_revision)

    def close(self) -> None:
        self._client.close()

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key.reveal()}"
        return headers

    def _redact(self, text: str) -> str:
        """`text` (a server's answer) with the key blanked out, should the server echo it."""
        return self._key.redact(text)

    def _request(self, method: str, path: str, payload: dict | None = None):
        """Send with bounded retries on 429 / 5xx / connection errors; return the response
        for any other status."""
        url = f"{self.base_url}{path}"
        last = ""
        attempts = self.config.http_retries + 1
        for attempt in range(attempts):
            wait = min(self.config.retry_backoff_s * 2**attempt, _RETRY_CAP_S)
            try:
                response = self._client.request(method, url, json=payload, headers=self._headers())
            except self._httpx.TransportError as error:  # connect, read, timeouts
                last = f"{type(error).__name__}"
            else:
                if response.status_code != 429 and response.status_code < 500:
                    return response
                last = f"HTTP {response.status_code}"
                wait = _retry_after(response, wait)
            if attempt + 1 < attempts:
                log.info("%s %s: %s; retrying in %.1f s", method, url, last, wait)
                time.sleep(wait)
        raise VLMUnavailableError(f"{method} {url}: no answer after {attempts} attempts ({last})")

    def _refused(self, response) -> VLMServerError:
        hint = ""
        if response.status_code in (401, 403):
            hint = f" (check the key in {self._key_source})"
        elif response.status_code == 404:
            hint = f" (is {self.base_url} the API root, e.g. http://host:8000/v1?)"
        body = self._redact(response.text[:300])
        return VLMServerError(
            f"{response.request.method} {response.request.url}: HTTP {response.status_code}"
            f"{hint}: {body}"
        )

    def _check_model_served(self) -> None:
        """Fail at setup, not once per sample, when the server does not serve the model."""
        response = self._request("GET", "/models")
        if response.status_code in (401, 403):
            raise self._refused(response)
        if response.status_code != 200:
            return  # not every compatible server lists its models
        try:
            served = [entry["id"] for entry in response.json()["data"]]
        except (ValueError, KeyError, TypeError):
            return
        if self.config.model not in served:
            raise VLMServerError(
                f"{self.base_url} does not serve model {self.config.model!r}; it serves {served}"
            )

    def _content(self, part: str | Video) -> list[dict]:
        if isinstance(part, str):
            return [{"type": "text", "text": part}]
        return [
            {"type": "image_url", "image_url": {"url": self._data_url(frame)}}
            for frame in part.frames
        ]

    def _data_url(self, frame: np.ndarray) -> str:
        from PIL import Image

        buffer = io.BytesIO()
        image = Image.fromarray(fit_pixels(frame, self.config.max_pixels))
        if self.config.image_format == "jpeg":
            image.save(buffer, format="JPEG", quality=90)
        else:
            image.save(buffer, format="PNG")
        encoded = base64.b64encode(buffer.getvalue()).decode("ascii")
        return f"data:image/{self.config.image_format};base64,{encoded}"

    def _payload(self, conversation: Conversation, max_new_tokens: int) -> dict:
        messages = []
        for turn in conversation:
            if turn.role == "assistant":
                text = "".join(p for p in turn.parts if isinstance(p, str))
                messages.append({"role": "assistant", "content": text})
            else:
                content = [c for part in turn.parts for c in self._content(part)]
                messages.append({"role": turn.role, "content": content})
        return {
            "model": self.config.model,
            "messages": messages,
            "max_tokens": max_new_tokens,
            "temperature": 0.0,
        }

    def _complete(self, conversation: Conversation, max_new_tokens: int) -> VLMReply:
        response = self._request(
            "POST", "/chat/completions", self._payload(conversation, max_new_tokens)
        )
        status = response.status_code
        if status in (401, 403, 404):
            raise self._refused(response)
        if status >= 400:
            body = self._redact(response.text[:300])
            raise VLMRequestError("vlm_http_error", f"HTTP {status}: {body}")
        try:
            choice = response.json()["choices"][0]
            content = choice["message"]["content"]
            if isinstance(content, list):  # some servers answer in parts
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
            if not isinstance(content, str | None):
                raise TypeError(type(content).__name__)
        except (ValueError, KeyError, IndexError, TypeError) as error:
            detail = self._redact(f"{type(error).__name__}: {response.text[:300]}")
            raise VLMRequestError("vlm_bad_response", detail) from None
        return VLMReply(
            text=(content or "").strip(), truncated=choice.get("finish_reason") == "length"
        )

    def generate(
        self, conversations: Sequence[Conversation], max_new_tokens: int
    ) -> list[VLMReply | VLMRequestError]:
        def one(conversation: Conversation) -> VLMReply | VLMRequestError:
            try:
                return self._complete(conversation, max_new_tokens)
            except VLMRequestError as error:
                return error

        if len(conversations) <= 1:
            return [one(c) for c in conversations]
        workers = min(self.config.max_concurrency, len(conversations))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="vlm") as pool:
            return list(pool.map(one, conversations))


def _retry_after(response, default: float) -> float:
    """The server's Retry-After (seconds form), capped; `default` when absent or a date."""
    try:
        seconds = float(response.headers.get("retry-after", ""))
    except ValueError:
        return default
    return min(max(seconds, 0.0), _RETRY_CAP_S) if np.isfinite(seconds) else default


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
