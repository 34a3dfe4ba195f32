"""The review web app (FastAPI, imported when the app is built) over a ReviewSession, its
uvicorn server on a socket, and the links and commands a run summary shows."""

import os
import shlex
import socket
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from datagen.data.dataset import DatasetError
from datagen.review.defaults import DEFAULT_HOST, DEFAULT_PORT, LOOPBACK_HOSTS
from datagen.review.journal import BadDecision, DecisionConflict, ReviewError, UnknownSample
from datagen.review.session import ReviewSession

# No `from __future__ import annotations` here: FastAPI reads the endpoints' annotations
# (Request, the body model) at runtime, and those are imported inside create_app.
if TYPE_CHECKING:  # only for annotations: the web stack is imported when the app is built
    from fastapi import FastAPI

STATIC_DIR = Path(__file__).resolve().parent / "static"


class RangeNotSatisfiable(Exception):
    pass


def parse_range(header: str, size: int) -> tuple[int, int] | None:
    """The (first, last) byte of a single `bytes=` range, or None to serve the whole body
    (other units, several ranges, bad syntax: RFC 9110 lets a server ignore those).
    RangeNotSatisfiable when the range starts past the end."""
    unit, _, spec = header.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, dash, last = spec.strip().partition("-")
    if not dash:
        return None
    if size == 0:  # no byte of an empty body can be asked for
        raise RangeNotSatisfiable
    try:
        if not first:  # suffix: the last N bytes
            length = int(last)
            if length <= 0:
                raise RangeNotSatisfiable
            return max(size - length, 0), size - 1
        start = int(first)
        end = int(last) if last else size - 1
    except ValueError:
        return None
    if end < start and last:  # "bytes=7-3" is invalid syntax: ignore it
        return None
    if start >= size:
        raise RangeNotSatisfiable
    return start, min(end, size - 1)


def create_app(session: ReviewSession, trusted_hosts: list[str] | None = None) -> "FastAPI":
    """The review web app over `session`. Errors are JSON `{"error": ...}`: 400 for a bad
    request, 404 for an unknown sample, 409 for a stale decision.

    `trusted_hosts` (the loopback names when bound to loopback) refuses other Host headers,
    so a web page elsewhere cannot reach the app through DNS rebinding.
    """
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse, Response
    from fastapi.staticfiles import StaticFiles
    from pydantic import BaseModel, ConfigDict
    from starlette.exceptions import HTTPException
    from starlette.middleware.trustedhost import TrustedHostMiddleware

    app = FastAPI(title="datagen review", docs_url=None, redoc_url=None, openapi_url=None)
    if trusted_hosts:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=trusted_hosts)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    no_store = {"Cache-Control": "no-store"}

    def error(status: int, message: str, **extra: Any) -> JSONResponse:
        return JSONResponse({"error": message, **extra}, status_code=status, headers=no_store)

    @app.exception_handler(BadDecision)
    def bad_request(request: Request, exc: BadDecision) -> JSONResponse:
        return error(400, str(exc))

    @app.exception_handler(UnknownSample)
    def not_found(request: Request, exc: UnknownSample) -> JSONResponse:
        return error(404, str(exc))

    @app.exception_handler(DecisionConflict)
    def conflict(request: Request, exc: DecisionConflict) -> JSONResponse:
        current = exc.current.as_dict() if exc.current else None
        return error(409, str(exc), current=current, revision=exc.revision)

    @app.exception_handler(RequestValidationError)
    def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'body'}: {e.get('msg')}"
            for e in exc.errors()
        )
        return error(400, f"bad request: {problems}")

    @app.exception_handler(HTTPException)
    def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return error(exc.status_code, str(exc.detail))

    @app.exception_handler(ReviewError)
    @app.exception_handler(DatasetError)
    @app.exception_handler(OSError)
    def server_error(request: Request, exc: Exception) -> JSONResponse:
        # e.g. a read-only dataset directory: the decision was NOT saved, say so
        return error(500, f"{type(exc).__name__}: {exc}")

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers=no_store)

    @app.get("/api/state")
    def state() -> JSONResponse:
        return JSONResponse(session.info(), headers=no_store)

    @app.get("/api/progress")
    def progress() -> JSONResponse:
        return JSONResponse(session.progress(), headers=no_store)

    @app.get("/api/samples")
    def samples(
        status: str = "all",
        style: str | None = None,
        csd_min: float | None = None,
        csd_max: float | None = None,
        dino_min: float | None = None,
        dino_max: float | None = None,
    ) -> JSONResponse:
        chosen = session.samples(status, style or None, csd_min, csd_max, dino_min, dino_max)
        return JSONResponse(
            {"samples": chosen, "count": len(chosen), "progress": session.progress()},
            headers=no_store,
        )

    @app.get("/api/samples/{sample_id}")
    def sample(sample_id: str) -> JSONResponse:
        return JSONResponse(session.detail(sample_id), headers=no_store)

    def serve_bytes(request: Request, sample_id: str, name: str, number: int | None) -> Response:
        data, content_type = session.media(sample_id, name, number)
        tag = session.media_tag(sample_id, name, number)
        headers = {"Accept-Ranges": "bytes", "ETag": tag, "Cache-Control": "private, max-age=3600"}
        if request.headers.get("if-none-match") == tag:
            return Response(status_code=304, headers=headers)
        requested = request.headers.get("range")
        if_range = request.headers.get("if-range")
        if requested and (if_range is None or if_range == tag):
            # Chrome asks for ranges to find the moov box at the end and to seek
            try:
                span = parse_range(requested, len(data))
            except RangeNotSatisfiable:
                return Response(
                    status_code=416, headers={**headers, "Content-Range": f"bytes */{len(data)}"}
                )
            if span is not None:
                first, last = span
                headers["Content-Range"] = f"bytes {first}-{last}/{len(data)}"
                return Response(
                    data[first : last + 1], 206, headers=headers, media_type=content_type
                )
        return Response(data, headers=headers, media_type=content_type)

    @app.api_route("/api/samples/{sample_id}/style_refs/{number}", methods=["GET", "HEAD"])
    def style_ref(request: Request, sample_id: str, number: int) -> Response:
        return serve_bytes(request, sample_id, "style_refs", number)

    @app.api_route("/api/samples/{sample_id}/{name}", methods=["GET", "HEAD"])
    def media(request: Request, sample_id: str, name: str) -> Response:
        if name == "style_refs":
            raise UnknownSample("style references are served one by one: style_refs/<number>")
        return serve_bytes(request, sample_id, name, None)

    class DecisionRequest(BaseModel):
        model_config = ConfigDict(extra="forbid", strict=True)
        verdict: str
        reason: str | None = None
        note: str | None = None
        base_revision: int
        override: bool = False
        reviewer: str | None = None

    @app.post("/api/samples/{sample_id}/decision")
    def decide(sample_id: str, body: DecisionRequest) -> JSONResponse:
        # FastAPI parses only application/json bodies: a cross-site form post cannot decide
        decision = session.decide(
            sample_id,
            body.verdict,
            body.reason,
            body.note,
            body.base_revision,
            reviewer=body.reviewer,
            override=body.override,
        )
        i = session._position_of(sample_id)
        return JSONResponse(
            {
                "decision": decision.as_dict(),
                "sample": session.summary(i),
                "progress": session.progress(),
            },
            headers=no_store,
        )

    return app


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening socket on (host, port); port 0 picks a free one. ReviewError when taken."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as error:
        raise ReviewError(f"cannot resolve host {host!r}: {error}") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # restart despite TIME_WAIT
    try:
        sock.bind(address)
        sock.listen(128)
    except OSError as error:
        sock.close()
        raise ReviewError(
            f"cannot listen on {host}:{port} ({error.strerror}); pick another --port"
        ) from None
    sock.set_inheritable(True)
    return sock


class ReviewServer:
    """The review app on a real socket (uvicorn). `run()` blocks (Ctrl-C stops it);
    `start()` / `stop()` run it in a thread (tests, notebooks)."""

    def __init__(self, session: ReviewSession, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT):
        import uvicorn

        self.session = session
        self.host = host
        self.socket = bind_socket(host, port)
        self.port = self.socket.getsockname()[1]
        self.url = review_url(session.path, host, self.port)
        trusted = list(LOOPBACK_HOSTS) if host in LOOPBACK_HOSTS else None
        config = uvicorn.Config(
            create_app(session, trusted_hosts=trusted),
            log_level="warning",
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=2,
        )
        self.server: uvicorn.Server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    def run(self) -> None:
        try:
            self.server.run(sockets=[self.socket])
        finally:
            self.socket.close()

    def start(self, timeout: float = 30.0) -> "ReviewServer":
        self._thread = threading.Thread(target=self.run, name="datagen-review", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise ReviewError(f"review server did not start on {self.url}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)


# --- links for summaries -------------------------------------------------------------------


def _url_host(host: str) -> str:
    if host in ("", "0.0.0.0", "::"):  # listening everywhere: link to this machine's name
        return socket.gethostname()
    return f"[{host}]" if ":" in host else host


def review_url(
    sft_dir: str | os.PathLike, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT
) -> str:
    """The page of `datagen review SFT_DIR --host HOST --port PORT`. The dataset travels in the
    query so the page warns when the server there reviews another dataset."""
    dataset = quote(str(Path(sft_dir).resolve()), safe="/")
    return f"http://{_url_host(host)}:{port}/?dataset={dataset}"


def review_command(
    sft_dir: str | os.PathLike, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT
) -> str:
    """The shell command that starts the review app over `sft_dir`."""
    command = ["datagen", "review", str(sft_dir)]
    if host != DEFAULT_HOST:
        command += ["--host", host]
    if port != DEFAULT_PORT:
        command += ["--port", str(port)]
    return shlex.join(command)


def review_markdown(
    sft_dir: str | os.PathLike, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT
) -> str:
    """A markdown paragraph for a run summary: how to start the review app and its link."""
    url = review_url(sft_dir, host, port)
    return (
        "## Human review\n\n"
        f"Start the review app with `{review_command(sft_dir, host, port)}`, then open "
        f"[{url}]({url}). When done: "
        f"`datagen review finalize {shlex.quote(str(sft_dir))} OUT`."
    )
