"""The `openai` backend of the VLM: a client of an OpenAI-compatible chat-completions server
(vLLM, ...) over the one retrying HTTP client (datagen/core/http.py); see the package's doc."""

from __future__ import annotations

import base64
import io
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from datagen.core.api_keys import SecretValue, describe_key_source, resolve_api_key
from datagen.core.http import HttpClient, HttpUnavailableError
from datagen.core.stage import ModelRef
from datagen.stages.vlm import (
    Conversation,
    Video,
    VLMBackend,
    VLMConfig,
    VLMReply,
    VLMRequestError,
    VLMServerError,
    VLMUnavailableError,
    fit_pixels,
)

log = logging.getLogger(__name__)

_RETRY_CAP_S = 30.0  # longest single wait between two HTTP attempts (Retry-After included)


class OpenAIVLM(VLMBackend):
    """A client of an OpenAI-compatible chat-completions server (vLLM, ...)."""

    def __init__(self, config: VLMConfig):
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
        self._http = HttpClient(
            timeout_s=config.timeout_s,
            retries=config.http_retries,
            backoff_s=config.retry_backoff_s,
            api_key=self._key,
            max_wait_s=_RETRY_CAP_S,
            max_connections=config.max_concurrency,
            what="VLM",
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
        self._http.close()

    def _request(self, method: str, path: str, payload: dict | None = None):
        """Send with bounded retries on 429 / 5xx / connection errors; return the response
        for any other status."""
        try:
            return self._http.request(method, f"{self.base_url}{path}", json=payload)
        except HttpUnavailableError as error:
            raise VLMUnavailableError(str(error)) from None

    def _refused(self, response) -> VLMServerError:
        hint = ""
        if response.status_code in (401, 403):
            hint = f" (check the key in {self._key_source})"
        elif response.status_code == 404:
            hint = f" (is {self.base_url} the API root, e.g. http://host:8000/v1?)"
        return VLMServerError(
            f"{response.request.method} {response.request.url}: HTTP {response.status_code}"
            f"{hint}: {self._http.snippet(response)}"
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
            body = self._http.snippet(response)
            raise VLMRequestError("vlm_http_error", f"HTTP {status}: {body}")
        try:
            choice = response.json()["choices"][0]
            content = choice["message"]["content"]
            if isinstance(content, list):  # some servers answer in parts
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
            if not isinstance(content, str | None):
                raise TypeError(type(content).__name__)
        except (ValueError, KeyError, IndexError, TypeError) as error:
            detail = f"{type(error).__name__}: {self._http.snippet(response)}"
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
