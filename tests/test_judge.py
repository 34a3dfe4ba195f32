"""VLM judge: verdicts from JSON answers (fake OpenAI server) and the Qwen2.5-VL twin."""

from __future__ import annotations

import json

import numpy as np
import pytest
from fake_openai_server import FakeOpenAIServer, completion, error

from datagen.core.stage import Reject
from datagen.models.registry import MissingModelError
from datagen.stages.judge import (
    JudgeConfig,
    JudgeInput,
    JudgeOutput,
    JudgeStage,
    first_json_object,
    parse_answers,
)

PASS = '{"same_content_and_motion": "yes", "style_applied": "yes", "artifacts": "no"}'


def clip(frames: int = 8, height: int = 32, width: int = 48, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (frames, height, width, 3), np.uint8)


def item(sample_id: str = "s1", style_prompt: str = "thick oil paint, visible impasto"):
    raw = clip()
    return JudgeInput(sample_id, raw, 255 - raw, style_prompt)


@pytest.fixture
def server():
    with FakeOpenAIServer() as running:
        yield running


def api_judge(server: FakeOpenAIServer, **overrides) -> JudgeStage:
    settings = {
        "backend": "openai",
        "base_url": server.base_url,
        "model": "fake-vlm",
        "num_frames": 4,
        "retry_backoff_s": 0.01,
        **overrides,
    }
    return JudgeStage(JudgeConfig(**settings))


@pytest.mark.parametrize(
    ("text", "verdict", "answers"),
    [
        (PASS, "pass", ("yes", "yes", "no")),
        (
            'Here you go:\n```json\n{"same_content_and_motion": "Yes", "style_applied": "yes",'
            ' "artifacts": "no.", "reason": "Same  dog,\\n oil style."}\n```',
            "pass",
            ("yes", "yes", "no"),
        ),
        (PASS.replace('"artifacts": "no"', '"artifacts": "yes"'), "fail", ("yes", "yes", "yes")),
        (
            PASS.replace('"style_applied": "yes"', '"style_applied": "no"'),
            "fail",
            ("yes", "no", "no"),
        ),
        (
            '{"same_content_and_motion": true, "style_applied": true, "artifacts": false}',
            "pass",
            ("yes", "yes", "no"),
        ),
        (
            '{"Same_Content_And_Motion": "no", "style_applied": "yes", "artifacts": "no"}',
            "fail",
            ("no", "yes", "no"),
        ),
    ],
)
def test_answers_give_the_verdict(server, text, verdict, answers):
    server.script = lambda request: text
    (result,) = api_judge(server)([item()])
    assert isinstance(result, JudgeOutput) and result.verdict == verdict
    detail = json.loads(result.detail)
    assert (detail["same_content_and_motion"], detail["style_applied"], detail["artifacts"]) == (
        answers
    )


def test_both_videos_and_the_style_reach_the_vlm(server):
    server.script = lambda request: PASS
    (result,) = api_judge(server)([item(style_prompt="thick oil paint, visible impasto")])
    assert result.verdict == "pass"
    (request,) = server.chat_requests()
    assert len(request.images()) == 8  # 4 frames of A, 4 of B
    texts = request.texts()
    assert texts[0] == "Video A:" and texts[1] == "Video B:"
    assert "thick oil paint, visible impasto" in texts[2] and "JSON" in texts[2]
    parts = request.json["messages"][0]["content"]
    assert [p["type"] for p in parts] == ["text"] + ["image_url"] * 4 + ["text"] + [
        "image_url"
    ] * 4 + ["text"]


@pytest.mark.parametrize(
    "text",
    [
        "The videos look the same and the style is applied.",
        '{"same_content_and_motion": "yes", "style_applied": "yes"}',  # one answer missing
        '{"same_content_and_motion": "maybe", "style_applied": "yes", "artifacts": "no"}',
        '{"same_content_and_motion": "yes", "style_applied": ',  # cut off
        "[1, 2, 3]",
        "",
    ],
)
def test_garbage_is_rejected(server, text):
    server.script = lambda request: text
    (result,) = api_judge(server)([item()])
    assert isinstance(result, Reject)
    assert result.reason == "judge_unparseable" and result.stage == "judge"


def test_a_batch_keeps_order_and_per_sample_failures(server):
    def script(request):
        style = request.texts()[2]
        if "neon" in style:
            return error(400, "image too large")
        return "nonsense" if "ink" in style else PASS

    server.script = script
    bad = JudgeInput("bad", clip().astype(np.int16), clip(), "x")
    results = api_judge(server)([item("a"), item("b", "ink wash"), bad, item("c", "neon")])
    assert [getattr(r, "verdict", None) or r.reason for r in results] == [
        "pass",
        "judge_unparseable",
        "bad_frames",
        "vlm_http_error",
    ]
    assert "HTTP 400" in results[3].detail
    assert [r.sample_id for r in results] == ["a", "b", "bad", "c"]


def test_500_then_200_is_retried(server):
    server.replies.extend([error(500), completion(PASS)])
    (result,) = api_judge(server)([item()])
    assert isinstance(result, JudgeOutput) and result.verdict == "pass"
    assert len(server.chat_requests()) == 2


def test_first_json_object_skips_braces_that_are_not_json():
    assert first_json_object('{not json} then {"a": {"b": 1}} and {"c": 2}') == {"a": {"b": 1}}
    assert first_json_object("no object") is None
    assert parse_answers('{"same_content_and_motion": "yes"}') is None


# --- the Qwen2.5-VL twin -----------------------------------------------------------------------


def test_tiny_twin_judges_two_videos(tmp_path_factory):
    import torch

    torch.set_num_threads(1)
    stage = JudgeStage(
        JudgeConfig(tiny_dir=str(tmp_path_factory.mktemp("tiny")), num_frames=4, max_new_tokens=6)
    )
    stage.setup()
    seen = []
    hook = stage.backend.model.model.visual.register_forward_hook(
        lambda module, args, kwargs, out: seen.append(kwargs["grid_thw"].shape[0]),
        with_kwargs=True,
    )
    try:
        (result,) = stage([item()])
    finally:
        hook.remove()
    assert seen == [2]  # raw and stylized, in one pass
    # six random tokens are no JSON answer
    assert isinstance(result, Reject) and result.reason == "judge_unparseable"
    assert "cut off" in result.detail
    assert stage.models()["judge"].revision.startswith("sha256:")


def test_production_profile_without_weights_names_the_model(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("DATAGEN_MODEL_QWEN_VL", raising=False)
    with pytest.raises(MissingModelError, match="Qwen/Qwen2.5-VL-7B-Instruct"):
        JudgeStage(JudgeConfig(profile="production")).setup()


def test_defaults_and_bad_configs():
    assert JudgeStage(JudgeConfig()).resources.num_gpus == 1
    assert JudgeStage(JudgeConfig(backend="openai")).resources.num_gpus == 0
    assert JudgeConfig().max_new_tokens == 160
    for settings in (
        {"backend": "gpt"},
        {"num_frames": 0},
        {"api_key_env": "has space"},
        {"api_key_block": "Has_Underscore"},
        {"api_key_env": "JUDGE_KEY", "api_key_block": "judge-key"},
    ):
        with pytest.raises(ValueError):
            JudgeConfig(**settings)


def test_params_record_the_key_block_name_only():
    params = JudgeStage(JudgeConfig(backend="openai", api_key_block="judge-key")).params()
    assert params["api_key_block"] == "judge-key" and params["api_key_env"] is None
    assert json.loads(json.dumps(params)) == params  # what a row's params column holds
