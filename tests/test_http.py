"""The one retrying HTTP client (datagen/core/http.py), against the local fake OpenAI server:
what is retried and how long it waits, what is returned as it is, and that the key shows in
no error or log line."""

from __future__ import annotations

import logging
import pickle
import threading
from datetime import UTC, datetime

import pytest
from fake_image_edit_server import FakeImageEditServer
from fake_openai_server import FakeOpenAIServer, Reply, error

from datagen.core.api_keys import SecretValue
from datagen.core.http import (
    HttpClient,
    HttpUnavailableError,
    RequestAbandoned,
    parse_retry_after,
    retry_wait,
)

KEY = "sk-http-client-0123456789-secret"


@pytest.fixture
def server():
    with FakeOpenAIServer() as running:
        yield running


def client(**overrides) -> HttpClient:
    settings = {"timeout_s": 5.0, "retries": 2, "backoff_s": 0.0, "api_key": SecretValue(KEY)}
    return HttpClient(**(settings | overrides))


def chat(server: FakeOpenAIServer) -> str:
    return f"{server.base_url}/chat/completions"


def test_waits_double_honour_retry_after_and_are_capped():
    assert [retry_wait(n, 1.0, None, 30.0) for n in (1, 2, 3, 4)] == [1.0, 2.0, 4.0, 8.0]
    assert retry_wait(1, 1.0, 5.0, 30.0) == 5.0  # the server asks for longer
    assert retry_wait(3, 1.0, 0.0, 30.0) == 4.0  # ... never shorter than the backoff
    assert retry_wait(9, 1.0, None, 30.0) == 30.0
    assert retry_wait(1, 1.0, 600.0, 60.0) == 60.0


def test_retry_after_in_seconds_or_as_an_http_date():
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after("-3") == 0.0
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    assert parse_retry_after("nan") is None
    now = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
    assert parse_retry_after("Thu, 01 Jan 2026 12:00:30 GMT", now) == 30.0
    assert parse_retry_after("Thu, 01 Jan 2026 11:00:00 GMT", now) == 0.0  # already past


def test_retry_statuses_are_retried_and_other_answers_returned(server):
    http = client()
    server.replies.extend([error(503), error(429, retry_after="0"), "fine"])
    response = http.request("POST", chat(server), json={"model": "fake-vlm"})
    assert response.status_code == 200 and len(server.chat_requests()) == 3
    assert {r.headers["authorization"] for r in server.requests} == {f"Bearer {KEY}"}
    assert server.chat_requests()[0].json == {"model": "fake-vlm"}

    server.requests.clear()
    server.replies.extend([error(404), error(400)])
    assert http.request("POST", chat(server)).status_code == 404  # not retried
    assert http.request("POST", chat(server)).status_code == 400
    assert len(server.requests) == 2

    server.requests.clear()
    server.replies.append(Reply(302, "", {"Location": "http://127.0.0.1:9/elsewhere"}))
    assert http.request("POST", chat(server)).status_code == 302  # redirects not followed
    assert len(server.requests) == 1
    http.close()


def test_a_stage_may_choose_its_retry_statuses(server):
    http = client(retry_statuses={408, 503})
    server.replies.extend([error(408), error(500)])
    assert http.request("POST", chat(server)).status_code == 500
    assert len(server.requests) == 2
    http.close()


def test_the_final_error_names_the_endpoint_and_never_the_key(caplog):
    caplog.set_level(logging.DEBUG)
    http = client(retries=1)
    with FakeImageEditServer() as edit:  # answers any path, query included
        edit.fail_next(503, times=2, message=f"overloaded; you sent Bearer {KEY}")
        host, port = edit.url.split("//")[1].split("/")[0].split(":")
        with pytest.raises(HttpUnavailableError) as raised:
            http.request("POST", f"http://user:pw@{host}:{port}/v1/edit?t=abc", json={})
        assert len(edit.requests) == 2
    failure = raised.value
    assert str(failure) == f"POST {edit.url}: no answer after 2 attempts (HTTP 503)"
    assert (failure.status, failure.attempts) == (503, 2)
    assert "Bearer ***" in failure.body
    assert "retrying" in caplog.text  # the retry was logged
    ours = "\n".join(r.getMessage() for r in caplog.records if r.name == "datagen.core.http")
    for text in (str(failure), failure.body, failure.cause, ours, repr(http)):
        assert KEY not in text and "pw" not in text and "t=abc" not in text
    assert KEY not in caplog.text
    with pytest.raises(TypeError, match="not pickled"):
        pickle.dumps(http._key)
    http.close()


def test_connection_errors_are_retried_then_reported(server):
    url = chat(server)
    server.stop()  # nothing listens there any more
    http = client(retries=2)
    with pytest.raises(HttpUnavailableError, match="3 attempts") as raised:
        http.request("GET", url)
    assert raised.value.status is None and raised.value.cause.startswith("ConnectError")
    http.close()


def test_a_set_stop_event_abandons_the_request(server):
    http = client(retries=3, backoff_s=10.0)
    server.script = lambda request: error(503)
    stop = threading.Event()
    threading.Timer(0.2, stop.set).start()  # set while the client waits to retry
    with pytest.raises(RequestAbandoned):
        http.request("POST", chat(server), stop=stop)
    assert len(server.chat_requests()) == 1  # the wait ended early; nothing resent
    http.close()
