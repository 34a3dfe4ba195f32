"""The `http` backend of the stylize stage (SFT tier): each frame through an image-edit service
that speaks the JSON protocol in the package's doc, over the one retrying client
(datagen/core/http.py)."""

from __future__ import annotations

import concurrent.futures
import json
import threading
from pathlib import Path
from typing import Any

import numpy as np

from datagen.core.api_keys import describe_key_source, resolve_api_key
from datagen.core.http import HttpClient, HttpUnavailableError, RequestAbandoned
from datagen.core.stage import ModelRef
from datagen.data.styles import Style
from datagen.stages.stylize import (
    IMAGE_EDIT_BAD_RESPONSE,
    IMAGE_EDIT_FAILED,
    IMAGE_EDIT_UNAVAILABLE,
    STYLE_REFERENCE_UNREADABLE,
    StylizeConfig,
    StylizeInput,
    _Abandoned,
    _decode_image,
    _endpoint_id,
    _png_base64,
    _read_rgb,
    _resize,
    _SampleFailure,
)


class HttpImageEditStylizer:
    """Stylizes each frame through an HTTP image-edit endpoint (protocol in the package doc)."""

    RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
    MAX_WAIT_S = 60.0  # longest single wait between two attempts (Retry-After included)

    def __init__(self, config: StylizeConfig):
        self.config = config
        self._http: HttpClient | None = None
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
        state["_http"] = None
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
        self._http = HttpClient(
            timeout_s=config.timeout_s,
            retries=config.max_retries,
            backoff_s=config.retry_backoff_s,
            api_key=key,
            max_wait_s=self.MAX_WAIT_S,
            retry_statuses=self.RETRY_STATUSES,
            max_connections=config.http_concurrency,
            what="image edit",
        )
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=config.http_concurrency, thread_name_prefix="image-edit"
        )

    def unload(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        if self._http is not None:
            self._http.close()
        self._pool = None
        self._http = None

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
        try:
            return self._send(body, lost)
        except _SampleFailure:
            lost.set()
            raise

    def _send(self, body: dict, lost: threading.Event) -> np.ndarray:
        http = self._http
        try:
            response = http.request(
                "POST",
                self.config.url,
                json=body,
                headers={"Accept": "application/json"},
                stop=lost,
            )
        except RequestAbandoned:
            raise _Abandoned(IMAGE_EDIT_FAILED, "another frame of the sample failed") from None
        except HttpUnavailableError as error:
            if error.status is not None:
                detail = f"HTTP {error.status} after {error.attempts} attempts: {error.body}"
            else:
                detail = f"{error.cause} after {error.attempts} attempts"
            raise _SampleFailure(IMAGE_EDIT_UNAVAILABLE, detail) from None
        if not response.is_success:  # not retried: 4xx other than 408 and 429, ...
            detail = f"HTTP {response.status_code}: {http.snippet(response)}"
            raise _SampleFailure(IMAGE_EDIT_FAILED, detail)
        return self._parse(response.content, body["height"], body["width"])

    def _parse(self, payload: bytes, height: int, width: int) -> np.ndarray:
        try:
            image = _decode_image(json.loads(payload)["image"])
        except Exception as error:  # any malformed answer is this sample's failure
            text = self._http.redact(str(error))[:200]
            detail = f"{type(error).__name__}: {text}"
            raise _SampleFailure(IMAGE_EDIT_BAD_RESPONSE, detail) from None
        return _resize(image, height, width)
