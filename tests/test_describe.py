"""Describe step: one content-only sentence per clip, from a VLM, before stylize."""

from __future__ import annotations

import numpy as np
import pytest
from fake_openai_server import FakeOpenAIServer

from datagen.core.stage import Reject
from datagen.data.styles import load_style_library
from datagen.stages.caption import caption_token_budget
from datagen.stages.describe import (
    CONTENT_MAX_WORDS,
    DescribeConfig,
    DescribeInput,
    DescribeOutput,
    DescribeStage,
)
from datagen.stages.stylize import stylize_prompt

KEY_ENV = "DATAGEN_TEST_VLM_KEY"
CONTENT = "A man walks a dog along a beach."


def frames(count: int = 4, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, 32, 48, 3), np.uint8)


def is_retry(request) -> bool:
    return any("not allowed" in t for t in request.texts())


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk-test-describe")
    with FakeOpenAIServer() as running:
        yield running


def api_stage(server, **overrides) -> DescribeStage:
    settings = {
        "backend": "openai",
        "base_url": server.base_url,
        "model": "fake-vlm",
        "api_key_env": KEY_ENV,
        "retry_backoff_s": 0.01,
        **overrides,
    }
    return DescribeStage(DescribeConfig(**settings))


def test_the_clip_frames_go_to_the_vlm_with_the_content_only_question(server):
    server.script = lambda request: CONTENT
    (result,) = api_stage(server)([DescribeInput("s1", frames(4), fps=0.8)])
    assert result == DescribeOutput("s1", CONTENT, attempts=1)
    [request] = server.chat_requests()
    assert len(request.images()) == 4  # the first frame and the K reference frames
    question = " ".join(request.texts())
    assert f"at most {CONTENT_MAX_WORDS} words" in question
    assert "Do not name the colours" in question and "style" in question
    assert request.json["max_tokens"] == caption_token_budget(CONTENT_MAX_WORDS)


def test_style_words_are_regenerated_then_rejected(server):
    server.script = lambda request: CONTENT if is_retry(request) else "A watercolor beach."
    (fixed,) = api_stage(server)([DescribeInput("s1", frames(), fps=1.0)])
    assert isinstance(fixed, DescribeOutput) and fixed.content == CONTENT and fixed.attempts == 2
    retry = next(r for r in server.chat_requests() if is_retry(r))
    assert [m["role"] for m in retry.json["messages"]] == ["user", "assistant", "user"]

    server.script = lambda request: "A moody beach in pastel colors."
    (rejected,) = api_stage(server, max_retries=2)([DescribeInput("s2", frames(), fps=1.0)])
    assert isinstance(rejected, Reject) and rejected.reason == "content_style_words"
    assert "moody" in rejected.detail and "pastel colors" in rejected.detail


def test_bad_frames_are_a_reject_and_the_batch_goes_on(server):
    server.script = lambda request: CONTENT
    bad = DescribeInput("bad", np.zeros((4, 32, 48), np.uint8), fps=1.0)
    results = api_stage(server)([bad, DescribeInput("good", frames(), fps=1.0)])
    assert isinstance(results[0], Reject) and results[0].reason == "bad_frames"
    assert results[1] == DescribeOutput("good", CONTENT, attempts=1)


def test_the_content_opens_the_stylize_prompt_inside_clip_s_window():
    style = load_style_library().get("watercolor")
    assert stylize_prompt("A man walks a dog.", style) == f"A man walks a dog, {style.prompt}"
    assert stylize_prompt("", style) == style.prompt
    # a sentence at the word limit and the longest style prompt stay within 77 CLIP tokens
    longest = max(load_style_library().styles.values(), key=lambda s: len(s.prompt.split()))
    words = CONTENT_MAX_WORDS + len(longest.prompt.replace(",", " ").split())
    assert words * 1.3 < 77, "about 1.3 CLIP tokens per English word"


def test_the_tiny_twin_describes_through_transformers(tmp_path_factory):
    import torch

    torch.set_num_threads(1)
    tiny = str(tmp_path_factory.mktemp("tiny"))
    stage = DescribeStage(
        DescribeConfig(tiny_dir=tiny, num_frames=4, max_new_tokens=4, accept_truncated=True)
    )
    stage.setup()
    try:
        (result,) = stage([DescribeInput("s1", frames(4), fps=1.0)])
        assert isinstance(result, DescribeOutput | Reject)
        if isinstance(result, DescribeOutput):
            assert result.content.strip()
        assert stage.models()["describe"].id == "tiny/qwen_vl"
    finally:
        stage.teardown()
