"""A local image-edit service speaking the stylize stage's HTTP protocol
(datagen/stages/stylize/).

It answers each POST with the colour-inverted input image, checks the bearer key when it was
given one, records every request, and can be told to fail the next N requests with a status
(e.g. 503) to exercise retries. It binds 127.0.0.1 on an ephemeral port, serves from a thread,
and stops at the end of a `with` block or of the `image_edit_server` fixture:

    from fake_image_edit_server import FakeImageEditServer, image_edit_server  # noqa: F401
"""

from __future__ import annotations

import base64
import io
import json
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

FAKE_API_KEY = "sk-fake-image-edit-0123456789"


@dataclass(frozen=True)
class RecordedRequest:
    path: str
    headers: dict[str, str]
    body: dict


def invert(image: np.ndarray) -> np.ndarray:
    return (255 - image).astype(np.uint8)


def encode_png(image: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def decode_png(data: str) -> np.ndarray:
    with Image.open(io.BytesIO(base64.b64decode(data))) as image:
        return np.asarray(image.convert("RGB"), dtype=np.uint8)


class FakeImageEditServer:
    def __init__(self, api_key: str | None = FAKE_API_KEY):
        self.api_key = api_key
        self.requests: list[RecordedRequest] = []
        self._failures: list[tuple[int, dict[str, str], str]] = []
        self.response_size: tuple[int, int] | None = None  # (h, w) to answer at another size
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/v1/edit"

    def fail_next(
        self, status: int, times: int = 1, retry_after: str | None = None, message: str = ""
    ) -> None:
        """Answer the next `times` requests with `status`, a Retry-After header if given, and
        `message` as the error text (to check what a client does with error bodies)."""
        headers = {"Retry-After": retry_after} if retry_after is not None else {}
        with self._lock:
            self._failures.extend([(status, headers, message or f"injected {status}")] * times)

    def start(self) -> FakeImageEditServer:
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> FakeImageEditServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _next_failure(self) -> tuple[int, dict[str, str], str] | None:
        with self._lock:
            return self._failures.pop(0) if self._failures else None

    def _handler_class(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format, *args):  # keep test output quiet
                pass

            def _reply(self, status: int, payload: dict, headers: dict | None = None) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                raw = self.rfile.read(length)
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = {"_unparsed": raw.decode("utf-8", "replace")}
                with server._lock:
                    server.requests.append(RecordedRequest(self.path, dict(self.headers), body))
                failure = server._next_failure()
                if failure is not None:
                    status, headers, message = failure
                    self._reply(status, {"error": message}, headers)
                    return
                if server.api_key is not None and (
                    self.headers.get("Authorization") != f"Bearer {server.api_key}"
                ):
                    self._reply(401, {"error": "missing or wrong bearer key"})
                    return
                try:
                    image = decode_png(body["image"])
                except Exception as error:
                    self._reply(400, {"error": f"bad image: {type(error).__name__}"})
                    return
                result = invert(image)
                if server.response_size is not None:
                    height, width = server.response_size
                    result = np.asarray(Image.fromarray(result).resize((width, height)))
                self._reply(200, {"image": encode_png(result)})

        return Handler


@pytest.fixture
def image_edit_server():
    """A running FakeImageEditServer expecting FAKE_API_KEY; stopped at teardown."""
    with FakeImageEditServer() as server:
        yield server
