"""The one retrying HTTP client of the stages that call a service (the VLM server of the caption,
describe and judge stages; the image-edit API of the stylize stage).

`HttpClient.request` sends one request and retries what a later attempt may fix: the retry
statuses (429 and 5xx by default) and connection errors and timeouts, with exponential backoff
(`backoff_s`, doubled per retry, at most `max_wait_s`) and the server's Retry-After (seconds or
HTTP-date form) as the least wait. Any other answer (2xx, and 4xx other than 429) is returned
as it is, for the stage to accept or reject with its own reason. When the retries run out it
raises `HttpUnavailableError`, which names the endpoint without credentials
(`datagen.core.api_keys.without_credentials`) and the last failure.

The API key travels only in the Authorization header the client adds. Nothing it returns,
raises or logs carries the key or the header: server text (an error body, an exception
message) passes through `redact` first, and the client pickles not at all (its key refuses
to), so a stage reads the key again where it runs. Redirects are not followed: the key is
never resent to another host.
"""

from __future__ import annotations

import email.utils
import logging
import math
import threading
import time
from collections.abc import Collection
from datetime import UTC, datetime
from typing import Any

from datagen.core.api_keys import SecretValue, without_credentials

log = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({429, *range(500, 600)})
DEFAULT_MAX_WAIT_S = 30.0  # longest single wait between two attempts
BODY_SNIPPET = 300  # characters of a server's answer kept for messages
MASK = "***"  # what stands for the key in a server's text


class HttpUnavailableError(RuntimeError):
    """No usable answer after the bounded retries (a retry status, or connection errors and
    timeouts, every time). `status` is the last answer's status (None: no answer at all) and
    `body` the start of its text, redacted; `cause` says what the last attempt got."""

    def __init__(
        self, method: str, endpoint: str, attempts: int, cause: str, status: int | None, body: str
    ):
        super().__init__(f"{method} {endpoint}: no answer after {attempts} attempts ({cause})")
        self.method = method
        self.endpoint = endpoint
        self.attempts = attempts
        self.cause = cause
        self.status = status
        self.body = body


class RequestAbandoned(Exception):
    """The caller's `stop` event was set before an attempt: the request was not (re)sent."""


class HttpClient:
    """A pooled, retrying HTTP client for one service; thread-safe (one per stage actor).

    `retries` is the number of extra attempts after the first. `what` names the service in
    log lines ("VLM", "image edit").
    """

    def __init__(
        self,
        *,
        timeout_s: float,
        retries: int,
        backoff_s: float,
        api_key: SecretValue | None = None,
        max_wait_s: float = DEFAULT_MAX_WAIT_S,
        retry_statuses: Collection[int] = RETRY_STATUSES,
        max_connections: int = 4,
        what: str = "HTTP",
    ):
        import httpx  # here, not at import: the stages' modules load without it

        self.retries = retries
        self.backoff_s = backoff_s
        self.max_wait_s = max_wait_s
        self.retry_statuses = frozenset(retry_statuses)
        self.what = what
        self._key = api_key if api_key is not None else SecretValue("")
        self._httpx = httpx
        self._client = httpx.Client(
            timeout=httpx.Timeout(timeout_s),
            limits=httpx.Limits(max_connections=max_connections),
            follow_redirects=False,  # never resend the key to another host
        )

    def __repr__(self) -> str:
        return f"HttpClient(what={self.what!r}, retries={self.retries}, key={self._key!r})"

    def close(self) -> None:
        self._client.close()

    def redact(self, text: str) -> str:
        """`text` (a server's answer, an exception message) with the key masked out."""
        return self._key.redact(text, MASK)

    def snippet(self, response: Any, limit: int = BODY_SNIPPET) -> str:
        """The start of a response's text, redacted: for messages and rejects."""
        return self.redact(response.text[:limit])

    def request(
        self,
        method: str,
        url: str,
        *,
        json: Any = None,
        headers: dict[str, str] | None = None,
        stop: threading.Event | None = None,
    ):
        """Send `method url` (with `json` as the body, if given), retrying retry statuses and
        connection errors; return the `httpx.Response` of any other status.

        Raises `HttpUnavailableError` when no attempt got a usable answer, and
        `RequestAbandoned` when `stop` was set before an attempt (a wait ends early on it).
        """
        endpoint = without_credentials(url)
        sent = dict(headers or {})
        if self._key:
            sent["Authorization"] = f"Bearer {self._key.reveal()}"
        attempts = self.retries + 1
        status: int | None = None
        cause, body, retry_after = "", "", None
        for attempt in range(attempts):
            if attempt:
                wait = retry_wait(attempt, self.backoff_s, retry_after, self.max_wait_s)
                log.warning(
                    "%s: %s %s: %s (attempt %d of %d); retrying in %.1f s",
                    self.what,
                    method,
                    endpoint,
                    cause,
                    attempt,
                    attempts,
                    wait,
                )
                if stop is not None:
                    stop.wait(wait)
                else:
                    time.sleep(wait)
            if stop is not None and stop.is_set():
                raise RequestAbandoned(f"{method} {endpoint}: abandoned")
            try:
                response = self._client.request(method, url, json=json, headers=sent)
            except self._httpx.TransportError as error:  # connect, read, write, timeouts
                status, body, retry_after = None, "", None
                text = self.redact(str(error))[:BODY_SNIPPET]
                cause = f"{type(error).__name__}: {text}" if text else type(error).__name__
                continue
            if response.status_code not in self.retry_statuses:
                return response
            status, body = response.status_code, self.snippet(response)
            cause = f"HTTP {status}"
            retry_after = parse_retry_after(response.headers.get("retry-after"))
        raise HttpUnavailableError(method, endpoint, attempts, cause, status, body)


def retry_wait(retry: int, backoff_s: float, retry_after: float | None, cap_s: float) -> float:
    """Seconds to wait before retry number `retry` (1 = the first): `backoff_s` doubled per
    retry, at least the server's Retry-After, at most `cap_s`."""
    wait = backoff_s * 2 ** (retry - 1)
    if retry_after is not None:
        wait = max(wait, retry_after)
    return min(wait, cap_s)


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """A Retry-After header in seconds (its delay-seconds or HTTP-date form, never below 0);
    None when absent or unreadable."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:  # an HTTP-date is in GMT
            when = when.replace(tzinfo=UTC)
        seconds = (when - (now or datetime.now(UTC))).total_seconds()
    if math.isnan(seconds):
        return None
    return max(seconds, 0.0)
