"""A small local OpenAI-compatible chat-completions server for tests.

Threaded `http.server` on 127.0.0.1 and an ephemeral port. It serves `GET /v1/models` and
`POST /v1/chat/completions` with scripted answers (a queue of replies, or a function of the
request), and records every request (method, path, headers, JSON body) so tests can check what
a client sent. Given `api_key`, it answers 401 to any request without `Authorization: Bearer
<api_key>`, as a real server does. Use it as a context manager or through the
`fake_openai_server` fixture; it stops itself on exit.
"""

from __future__ import annotations

import json
import threading
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest


@dataclass(frozen=True)
class Reply:
    """One scripted answer: status, JSON body (or raw text) and extra headers."""

    status: int = 200
    body: dict | str = ""
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]  # lower-case names
    json: dict | None

    def texts(self) -> list[str]:
        """The text parts of every message, in order."""
        found = []
        for message in (self.json or {}).get("messages", []):
            content = message.get("content")
            if isinstance(content, str):
                found.append(content)
            else:
                found += [p["text"] for p in content or [] if p.get("type") == "text"]
        return found

    def images(self) -> list[str]:
        """The image data URLs of every message, in order."""
        return [
            part["image_url"]["url"]
            for message in (self.json or {}).get("messages", [])
            if isinstance(message.get("content"), list)
            for part in message["content"]
            if part.get("type") == "image_url"
        ]


def completion(text: str | None, finish_reason: str = "stop") -> Reply:
    """A successful chat completion whose answer is `text`."""
    return Reply(
        200,
        {
            "id": "chatcmpl-fake",
            "object": "chat.completion",
            "model": "fake",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": finish_reason,
                }
            ],
        },
    )


def error(status: int, message: str = "scripted error", **headers: str) -> Reply:
    return Reply(status, {"error": {"message": message, "code": status}}, headers)


Script = Callable[[RecordedRequest], Reply | str]


class FakeOpenAIServer:
    """Answers chat completions from `replies` (in order; a str is a completion) or from
    `script(request)`; a request with nothing scripted gets a 500 and is counted in
    `unscripted`. With `api_key`, requests without that bearer key get a 401."""

    def __init__(
        self,
        replies: Iterable[Reply | str] = (),
        script: Script | None = None,
        models: Iterable[str] = ("fake-vlm",),
        models_status: int = 200,
        api_key: str | None = None,
    ):
        self.api_key = api_key
        self.replies: deque[Reply | str] = deque(replies)
        self.script = script
        self.models = list(models)
        self.models_status = models_status
        self.requests: list[RecordedRequest] = []
        self.unscripted = 0
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._address: tuple[str, int] | None = None

    # --- lifecycle ---
    def start(self) -> FakeOpenAIServer:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._address = self._server.server_address[:2]
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=5)
            self._server = None

    def __enter__(self) -> FakeOpenAIServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def address(self) -> tuple[str, int]:
        """Where it listens (or listened, once stopped)."""
        return self._address

    @property
    def base_url(self) -> str:
        host, port = self.address
        return f"http://{host}:{port}/v1"

    def chat_requests(self) -> list[RecordedRequest]:
        return [r for r in self.requests if r.path.endswith("/chat/completions")]

    # --- answering ---
    def _answer(self, request: RecordedRequest) -> Reply:
        with self._lock:
            self.requests.append(request)
            if self.api_key is not None and (
                request.headers.get("authorization") != f"Bearer {self.api_key}"
            ):
                return error(401, "missing or wrong bearer key")
            if request.method == "GET" and request.path == "/v1/models":
                data = [{"id": m, "object": "model", "owned_by": "fake"} for m in self.models]
                if self.models_status != 200:
                    return error(self.models_status)
                return Reply(200, {"object": "list", "data": data})
            if request.method != "POST" or request.path != "/v1/chat/completions":
                return error(404, f"no route {request.method} {request.path}")
            if self.script is None and not self.replies:
                self.unscripted += 1
                return error(500, "nothing scripted for this request")
            answer = self.script(request) if self.script else self.replies.popleft()
        return completion(answer) if isinstance(answer, str) else answer


def _handler_for(server: FakeOpenAIServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            try:
                body = json.loads(raw) if raw else None
            except ValueError:
                body = None
            request = RecordedRequest(
                method=self.command,
                path=self.path,
                headers={k.lower(): v for k, v in self.headers.items()},
                json=body,
            )
            reply = server._answer(request)
            payload = reply.body.encode() if isinstance(reply.body, str) else json.dumps(reply.body)
            payload = payload if isinstance(payload, bytes) else payload.encode()
            self.send_response(reply.status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            for name, value in reply.headers.items():
                self.send_header(name.replace("_", "-"), value)
            self.end_headers()
            self.wfile.write(payload)

        do_GET = _serve
        do_POST = _serve

        def log_message(self, format: str, *args) -> None:  # keep test output quiet
            pass

    return Handler


@pytest.fixture
def fake_openai_server():
    """A running FakeOpenAIServer with nothing scripted; script it through `.replies` or
    `.script`. Stopped at teardown."""
    with FakeOpenAIServer() as server:
        yield server
