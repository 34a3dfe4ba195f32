"""Caption stage: Qwen2.5-VL twin through transformers, and an OpenAI-compatible server (fake)."""

from __future__ import annotations

import base64
import io
import json
import logging
import pickle

import numpy as np
import pytest
from fake_openai_server import FakeOpenAIServer, Reply, completion, error
from PIL import Image

from datagen.core.stage import Reject
from datagen.models.registry import MissingModelError, build_twin, directory_revision
from datagen.stages.caption import CaptionConfig, CaptionInput, CaptionOutput, CaptionStage
from datagen.stages.vlm import (
    TransformersVLM,
    Turn,
    VLMReply,
    VLMServerError,
    VLMUnavailableError,
    sample_video,
)

KEY_ENV = "DATAGEN_TEST_VLM_KEY"
SECRET = "sk-test-0123456789-very-secret"
CLEAN_NS = "A man walks a dog along a beach while the camera pans left."
STY = "A man walks a dog along a beach, painted in soft watercolor washes."


def clip(frames: int = 9, height: int = 32, width: int = 48, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (frames, height, width, 3), np.uint8)


def item(sample_id: str = "s1", **kwargs) -> CaptionInput:
    raw = kwargs.pop("raw", clip())
    return CaptionInput(
        sample_id,
        raw,
        kwargs.pop("stylized", 255 - raw),
        kwargs.pop("style_name", "Watercolor"),
        kwargs.pop("style_prompt", "soft watercolor washes on paper"),
        **kwargs,
    )


def is_sty(request) -> bool:
    return any("rendered in this visual style" in t for t in request.texts())


def is_retry(request) -> bool:
    return any("not allowed" in t for t in request.texts())


# --- transformers backend on the tiny Qwen2.5-VL twin -----------------------------------------


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> str:
    import torch

    torch.set_num_threads(1)
    return str(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def tiny_stage(tiny_dir) -> CaptionStage:
    stage = CaptionStage(CaptionConfig(tiny_dir=tiny_dir, num_frames=4, max_new_tokens=4))
    stage.setup()
    return stage


def test_twin_builds_reproducibly_in_the_hub_layout(tiny_stage, tiny_dir, tmp_path):
    first = tiny_stage.models()["caption"]
    again = build_twin("qwen_vl", tmp_path / "again", force=True)
    assert again.ref.revision == first.revision == directory_revision(again.path)
    assert first.id == "tiny/qwen_vl"
    names = {p.name for p in again.path.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= names
    assert {"chat_template.jinja", "processor_config.json"} <= names
    config = json.loads((again.path / "config.json").read_text())
    assert config["architectures"] == ["Qwen2_5_VLForConditionalGeneration"]
    assert config["vision_config"]["fullatt_block_indexes"] == [1]
    size = sum(p.stat().st_size for p in again.path.iterdir())
    assert size < 5_000_000


def test_the_production_loading_code_loads_the_twin(tiny_stage, tiny_dir, monkeypatch):
    """profile=production reads the directory in DATAGEN_MODEL_QWEN_VL: the same
    from_pretrained calls as for the hub snapshot, here on the twin."""
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor

    twin = tiny_stage.backend
    assert isinstance(twin, TransformersVLM)
    assert isinstance(twin.model, Qwen2_5_VLForConditionalGeneration)
    assert isinstance(twin.processor, Qwen2_5_VLProcessor)
    monkeypatch.setenv("DATAGEN_MODEL_QWEN_VL", f"{tiny_dir}/qwen_vl")
    stage = CaptionStage(CaptionConfig(profile="production", num_frames=4, max_new_tokens=3))
    stage.setup()
    assert stage.models()["caption"].id == f"{tiny_dir}/qwen_vl"
    (result,) = stage([item()])
    assert isinstance(result, Reject) and result.reason == "caption_truncated"


def test_backend_turns_frames_into_video_tokens_and_text(tiny_stage):
    backend = tiny_stage.backend
    seen = []
    hook = backend.model.model.visual.register_forward_hook(
        lambda module, args, kwargs, out: seen.append(kwargs["grid_thw"].tolist()),
        with_kwargs=True,
    )
    try:
        replies = backend.generate(
            [
                [Turn("user", (sample_video(clip(), 16.0, 4), "Describe the video."))],
                [Turn("user", (sample_video(clip(6, 40, 40, seed=1), 16.0, 4), "Describe."))],
            ],
            max_new_tokens=2,
        )
    finally:
        hook.remove()
    # one pass of the vision tower over both videos: 4 frames -> 2 temporal patches each
    assert len(seen) == 1 and [thw[0] for thw in seen[0]] == [2, 2]
    assert len(replies) == 2
    for reply in replies:
        assert isinstance(reply, VLMReply) and isinstance(reply.text, str)
        # a random model does not stop by itself within 2 tokens
        assert reply.truncated is True


def test_a_reply_that_ends_is_not_truncated(tiny_stage):
    """Force the end token: generation stops before the limit and is not called truncated."""
    backend = tiny_stage.backend
    end = backend.processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    conversation = [Turn("user", (sample_video(clip(), 16.0, 4), "Describe."))]
    generation = backend.model.generation_config
    generation.forced_eos_token_id = end  # forces <|im_end|> as the last allowed token
    try:
        (reply,) = backend.generate([conversation], max_new_tokens=3)
    finally:
        generation.forced_eos_token_id = None
    assert reply.truncated is False


def test_truncated_captions_are_rejected(tiny_stage):
    results = tiny_stage([item("a"), item("b", raw=clip(5, 28, 56, seed=3))])
    assert [r.reason for r in results] == ["caption_truncated", "caption_truncated"]
    assert all(r.stage == "caption" and "max_new_tokens=4" in r.detail for r in results)
    assert tiny_stage.stats.loads == 1


def test_production_profile_without_weights_names_the_model(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("DATAGEN_MODEL_QWEN_VL", raising=False)
    stage = CaptionStage(CaptionConfig(profile="production"))
    with pytest.raises(MissingModelError, match="Qwen/Qwen2.5-VL-7B-Instruct"):
        stage.setup()


# --- OpenAI-compatible backend against the fake server -----------------------------------------


@pytest.fixture
def server():
    with FakeOpenAIServer() as running:
        yield running


@pytest.fixture
def keyed(monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)


def api_stage(server: FakeOpenAIServer, **overrides) -> CaptionStage:
    settings = {
        "backend": "openai",
        "base_url": server.base_url,
        "model": "fake-vlm",
        "api_key_env": KEY_ENV,
        "num_frames": 3,
        "retry_backoff_s": 0.01,
        **overrides,
    }
    return CaptionStage(CaptionConfig(**settings))


def test_the_fake_server_binds_loopback_only(server):
    host, port = server.address
    assert host == "127.0.0.1" and port > 0


def test_clean_captions_are_accepted_and_frames_are_sent(server, keyed):
    server.script = lambda request: STY if is_sty(request) else CLEAN_NS
    stage = api_stage(server)
    (result,) = stage([item()])
    assert result == CaptionOutput("s1", CLEAN_NS, STY, attempts=1)
    chats = server.chat_requests()
    assert len(chats) == 2
    for request in chats:
        assert request.json["model"] == "fake-vlm" and request.json["temperature"] == 0
        images = request.images()
        assert len(images) == 3  # num_frames
        head, data = images[0].split(",", 1)
        assert head == "data:image/jpeg;base64"
        assert Image.open(io.BytesIO(base64.b64decode(data))).size == (48, 32)
    sty = next(r for r in chats if is_sty(r))
    assert "soft watercolor washes on paper" in " ".join(sty.texts())
    # the raw video goes with caption_ns, the stylized one with caption_sty
    ns = next(r for r in chats if not is_sty(r))
    assert ns.images() != sty.images()


def test_style_words_in_caption_ns_are_regenerated(server, keyed):
    def script(request):
        if is_sty(request):
            return STY
        return CLEAN_NS if is_retry(request) else "A man walks a dog, a watercolor scene."

    server.script = script
    (result,) = api_stage(server)([item()])
    assert isinstance(result, CaptionOutput)
    assert result.caption_ns == CLEAN_NS and result.attempts == 2
    retry = next(r for r in server.chat_requests() if is_retry(r))
    messages = retry.json["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]
    assert "watercolor" in messages[1]["content"]  # the offending answer, in the conversation
    assert "watercolor" in messages[2]["content"][0]["text"]  # named as forbidden


def test_caption_ns_that_stays_stylistic_is_rejected_after_n_attempts(server, keyed):
    answers = iter(["A moody watercolor beach.", "A beach in pastel colors.", "A grainy beach."])

    def script(request):
        return STY if is_sty(request) else next(answers)

    server.script = script
    (result,) = api_stage(server, max_retries=3)([item()])
    assert isinstance(result, Reject) and result.reason == "caption_ns_style_words"
    for word in ("moody", "watercolor", "pastel colors", "grainy"):
        assert word in result.detail
    assert len([r for r in server.chat_requests() if not is_sty(r)]) == 3
    last = [r for r in server.chat_requests() if is_retry(r)][-1]
    assert "pastel colors" in last.texts()[-1] and "moody" in last.texts()[-1]


def test_a_batch_mixes_outputs_and_rejects(server, keyed):
    def script(request):
        if is_sty(request):
            return "" if "ink" in " ".join(request.texts()) else STY
        return CLEAN_NS

    server.script = script
    results = api_stage(server)(
        [
            item("ok"),
            item("empty", style_name="Ink", style_prompt="ink wash"),
            item("bad", raw=clip().astype(np.float32)),
        ]
    )
    assert isinstance(results[0], CaptionOutput)
    assert isinstance(results[1], Reject) and results[1].reason == "caption_empty"
    assert isinstance(results[2], Reject) and results[2].reason == "bad_frames"


def test_length_cut_replies_are_truncated_rejects(server, keyed):
    server.script = lambda request: completion("A man walks", finish_reason="length")
    (result,) = api_stage(server)([item()])
    assert isinstance(result, Reject) and result.reason == "caption_truncated"


def test_the_key_reaches_the_server_and_nothing_else(server, keyed, caplog):
    caplog.set_level(logging.DEBUG)
    echo = {"echo": f"Bearer {SECRET}"}  # a careless server that echoes the header
    server.script = lambda request: (
        Reply(400, echo)
        if "Ink" in " ".join(request.texts())
        else STY
        if is_sty(request)
        else CLEAN_NS
    )
    stage = api_stage(server)
    results = stage([item("a"), item("b", style_name="Ink")])
    assert {r.headers.get("authorization") for r in server.requests} == {f"Bearer {SECRET}"}
    assert isinstance(results[0], CaptionOutput)
    assert isinstance(results[1], Reject) and results[1].reason == "vlm_http_error"
    assert "HTTP 400" in results[1].detail
    visible = [repr(stage), repr(stage.config), repr(stage.backend), repr(vars(stage.backend))]
    visible += [repr(results), str(stage.backend._key), f"{stage.backend._key}"]
    visible += [json.dumps(stage.params()), repr(stage.models()), caplog.text]
    server.script = lambda request: Reply(401, echo)
    with pytest.raises(VLMServerError) as refused:
        stage([item()])
    visible.append(str(refused.value))
    assert "401" in str(refused.value) and KEY_ENV in str(refused.value)
    assert all(SECRET not in text for text in visible)
    with pytest.raises(TypeError, match="not pickled"):  # never shipped with the stage
        pickle.dumps(stage.backend._key)


def test_server_errors_are_retried(server, keyed):
    server.replies.extend([error(500), STY, error(429, retry_after="0"), error(503), CLEAN_NS])
    stage = api_stage(server, max_concurrency=1)
    (result,) = stage([item()])
    assert result == CaptionOutput("s1", CLEAN_NS, STY, attempts=1)
    assert len(server.chat_requests()) == 5 and server.unscripted == 0


def test_retries_are_bounded(server, keyed):
    server.script = lambda request: error(502)
    stage = api_stage(server, http_retries=2)
    with pytest.raises(VLMUnavailableError, match="3 attempts"):
        stage([item()])
    assert len(server.chat_requests()) == 6  # two conversations, three attempts each


def test_setup_fails_fast_on_an_unserved_model_or_a_dead_server(server, keyed):
    with pytest.raises(VLMServerError, match="other-model"):
        api_stage(server, model="other-model").setup()
    server.stop()  # nothing listens on its port any more
    with pytest.raises(VLMUnavailableError, match="2 attempts"):
        api_stage(server, http_retries=1).setup()


def test_default_resources_follow_the_backend():
    assert CaptionStage(CaptionConfig()).resources.num_gpus == 1
    remote = CaptionConfig(backend="openai", base_url="https://vlm.example.com/v1")
    assert CaptionStage(remote).resources.num_gpus == 0


@pytest.mark.parametrize(
    "settings",
    [
        {"backend": "vllm"},
        {"profile": "huge"},
        {"num_frames": 0},
        {"max_new_tokens": 0},
        {"max_retries": 0},
        {"max_pixels": 100},
        {"dtype": "int8"},
        {"image_format": "gif"},
        {"timeout_s": 0},
        {"http_retries": -1},
        {"backend": "openai", "base_url": "ftp://host/v1"},
        {"backend": "openai", "base_url": "http://127.0.0.1:8000/v1", "model": " "},
        {"api_key_block": "Not_A_Block_Name"},
        {"api_key_env": "MY_KEY", "api_key_block": "vlm-key"},  # two sources
    ],
)
def test_bad_configs_raise(settings):
    with pytest.raises(ValueError):
        CaptionConfig(**settings)


def test_config_errors_never_echo_a_secret():
    with pytest.raises(ValueError) as pasted:
        CaptionConfig(backend="openai", api_key_env=SECRET)
    with pytest.raises(ValueError) as in_url:
        CaptionConfig(backend="openai", base_url=f"https://user:{SECRET}@vlm.example.com/v1")
    # SECRET (sk-, lowercase, digits, dashes) would pass as a block name: refused all the same
    with pytest.raises(ValueError, match="looks like an API key") as as_block:
        CaptionConfig(backend="openai", api_key_block=SECRET)
    for raised in (pasted, in_url, as_block):
        assert SECRET not in str(raised.value)


def test_a_block_name_replaces_the_default_variable_in_config_and_params():
    stage = CaptionStage(CaptionConfig(backend="openai", api_key_block="vlm-key"))
    assert stage.config.api_key_env is None
    params = stage.params()
    assert params["api_key_block"] == "vlm-key" and params["api_key_env"] is None
    assert CaptionConfig().api_key_env == "DATAGEN_VLM_API_KEY"  # unchanged without a block


def test_an_unset_key_variable_is_a_warning_and_no_source_is_silent(server, monkeypatch, caplog):
    server.script = lambda request: STY if is_sty(request) else CLEAN_NS
    monkeypatch.delenv(KEY_ENV, raising=False)
    with caplog.at_level(logging.WARNING, logger="datagen.stages.vlm"):
        (unset,) = api_stage(server)([item()])
    assert isinstance(unset, CaptionOutput)
    assert f"{KEY_ENV} is not set" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="datagen.stages.vlm"):
        (open_server,) = api_stage(server, api_key_env=None)([item()])
    assert isinstance(open_server, CaptionOutput) and not caplog.records
    assert all("authorization" not in r.headers for r in server.requests)


def test_a_loaded_stage_pickles_as_its_config_and_reads_the_key_again(server, keyed):
    server.script = lambda request: STY if is_sty(request) else CLEAN_NS
    stage = api_stage(server)
    stage([item()])
    shipped = pickle.dumps(stage)
    assert SECRET.encode() not in shipped
    clone = pickle.loads(shipped)
    assert not clone.loaded and clone.backend is None and stage.loaded
    server.requests.clear()
    (result,) = clone([item("s2")])
    assert isinstance(result, CaptionOutput)
    assert {r.headers.get("authorization") for r in server.requests} == {f"Bearer {SECRET}"}
    stage.teardown()
    clone.teardown()


def test_accept_truncated_keeps_cut_off_captions_for_the_tiny_profile(tmp_path_factory):
    """The tiny twin never ends a sentence; the tiny profile keeps its captions anyway."""
    import numpy as np

    from datagen.stages.caption import CaptionConfig, CaptionInput, CaptionOutput, CaptionStage

    tiny = str(tmp_path_factory.mktemp("tiny-accept"))
    frames = np.random.default_rng(0).integers(0, 255, (5, 32, 32, 3), dtype=np.uint8)
    sample = CaptionInput("s", frames, frames[::-1].copy(), "Ink wash", "ink wash", fps=8.0)
    strict = CaptionStage(CaptionConfig(tiny_dir=tiny, max_new_tokens=4))
    assert strict([sample])[0].reason == "caption_truncated"
    lenient = CaptionStage(CaptionConfig(tiny_dir=tiny, max_new_tokens=4, accept_truncated=True))
    (output,) = lenient([sample])
    assert isinstance(output, CaptionOutput) and output.caption_ns and output.caption_sty


# --- word limits, the token budget and colours ---------------------------------------------


def test_the_token_budget_derives_from_the_prompts_word_limits():
    from datagen.stages.caption import (
        CAPTION_MAX_NEW_TOKENS,
        CAPTION_NS_MAX_WORDS,
        CAPTION_STY_MAX_WORDS,
        TOKENS_PER_WORD,
        caption_token_budget,
    )

    assert caption_token_budget(120) == 233  # 120 x 1.5 x 1.25 + 8
    assert CAPTION_MAX_NEW_TOKENS == caption_token_budget() == caption_token_budget(120)
    assert CAPTION_STY_MAX_WORDS >= CAPTION_NS_MAX_WORDS
    for words in (CAPTION_NS_MAX_WORDS, CAPTION_STY_MAX_WORDS):
        # the stated limit at the upper-end ratio, with room to spare, fits the default budget
        assert words * TOKENS_PER_WORD * 1.2 < caption_token_budget(words) <= CAPTION_MAX_NEW_TOKENS
    assert caption_token_budget(121) > caption_token_budget(120)
    assert CaptionConfig().max_new_tokens == CAPTION_MAX_NEW_TOKENS
    assert CaptionConfig(max_new_tokens=64).max_new_tokens == 64  # still settable
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="words"):
            caption_token_budget(bad)


def test_the_prompts_state_the_word_limits_and_ask_for_no_colours(server, keyed):
    from datagen.stages.caption import CAPTION_NS_MAX_WORDS, CAPTION_STY_MAX_WORDS

    server.script = lambda request: (
        STY if is_sty(request) else CLEAN_NS if is_retry(request) else "A watercolor dog."
    )
    stage = api_stage(server)
    (result,) = stage([item()])
    assert isinstance(result, CaptionOutput) and result.attempts == 2
    requests = server.chat_requests()
    sty = next(r for r in requests if is_sty(r))
    ns = next(r for r in requests if not is_sty(r) and not is_retry(r))
    retry = next(r for r in requests if is_retry(r))
    sty_text, ns_text, retry_text = (" ".join(r.texts()) for r in (sty, ns, retry))
    assert f"at most {CAPTION_STY_MAX_WORDS} words" in sty_text
    assert f"at most {CAPTION_NS_MAX_WORDS} words" in ns_text
    assert f"at most {CAPTION_NS_MAX_WORDS} words" in retry.texts()[-1]
    assert all("$" not in text for text in (sty_text, ns_text, retry_text))
    # caption_ns: colours are not invited but ruled out (a recolouring style changes them).
    assert "You may name the colours" not in ns_text
    assert 'Do not name the colours of things either (write "a car", not "a red car")' in ns_text
    assert "without naming colours" in retry.texts()[-1]
    # Every request asks for the budget the word limits need.
    assert {r.json["max_tokens"] for r in requests} == {stage.config.max_new_tokens}
    assert stage.config.max_new_tokens == 233
    assert stage.params()["max_words"] == {
        "caption_ns": CAPTION_NS_MAX_WORDS,
        "caption_sty": CAPTION_STY_MAX_WORDS,
    }


def test_a_budget_below_the_word_limits_is_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="datagen.stages.caption"):
        CaptionStage(CaptionConfig(max_new_tokens=160))  # the old production value
    assert "max_new_tokens=160 is below the 233 tokens a 120-word caption" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="datagen.stages.caption"):
        CaptionStage(CaptionConfig())
        CaptionStage(CaptionConfig(max_new_tokens=24, accept_truncated=True))  # tiny profile
    assert not caplog.records


def test_bare_colour_names_are_left_to_the_prompt_not_the_style_check():
    """A whole-word check cannot tell a colour a style changes from a name or a kind ("a red
    panda", "an orange", "the White House"); a hit costs a regeneration and, three times over,
    a sample whose video is already made. Colour treatment words stay checked."""
    from datagen.data.style_vocab import load_style_vocabulary

    vocabulary = load_style_vocabulary()
    assert vocabulary.find("A red panda eats an orange near the White House.") == []
    assert vocabulary.find("A dog runs, in vivid colors, desaturated.") == [
        "vivid colors",
        "desaturated",
    ]
