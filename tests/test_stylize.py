"""The stylize stage: SDXL + depth ControlNet + IP-Adapter (InstantStyle) on tiny twins loaded
by the production code, and the HTTP image-edit backend against a local fake service."""

from __future__ import annotations

import json
import logging
import pickle
from dataclasses import replace
from pathlib import Path

import fake_image_edit_server
import numpy as np
import pytest
from fake_image_edit_server import FAKE_API_KEY, invert
from PIL import Image

from datagen.data.styles import Style, load_style_library
from datagen.models.registry import MissingModelError, directory_revision, resolve
from datagen.models.twins import sdxl as sdxl_twins
from datagen.stages.stylize import (
    BAD_FRAME,
    CONTROL_SIZE_MISMATCH,
    DEFAULT_API_KEY_ENV,
    IMAGE_EDIT_FAILED,
    IMAGE_EDIT_UNAVAILABLE,
    WRONG_CONTROL_COUNT,
    WRONG_FRAME_COUNT,
    StylizeConfig,
    StylizeInput,
    StylizeOutput,
    StylizeStage,
    model_size,
)

H, W = 48, 80  # non-square and not a model size: outputs must come back at exactly this size
K = 3
# InstantStyle's style-only map (the default): the IP-Adapter enters this block only
STYLE_BLOCKS = ("up_blocks.0.attentions.1.",)
LAYOUT_BLOCK = "down_blocks.2.attentions.1."


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the development machine's 2 cores are shared
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny-models")


@pytest.fixture(scope="module")
def config(tiny_dir, tmp_path_factory) -> StylizeConfig:
    return StylizeConfig(
        tiny_dir=str(tiny_dir),
        steps=2,
        resolution=64,
        num_style_refs=K,
        cache_dir=str(tmp_path_factory.mktemp("exemplars")),
        device="cpu",
    )


@pytest.fixture(scope="module")
def stage(config):
    stage = StylizeStage(config)
    stage.setup()
    yield stage
    stage.teardown()


def _image(seed: int, height: int = H, width: int = W) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _depth(seed: int) -> np.ndarray:
    """A smooth depth-like map: a ramp plus a bump, grey in 3 channels like the control stage's."""
    y, x = np.mgrid[0:H, 0:W]
    cy, cx = np.random.default_rng(seed).uniform([0, 0], [H, W])
    depth = 0.5 * x / W + 0.5 * np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / 200.0)
    return np.repeat((depth * 255).astype(np.uint8)[..., None], 3, axis=2)


@pytest.fixture(scope="module")
def reference_style(tmp_path_factory) -> Style:
    path = tmp_path_factory.mktemp("refs") / "swirl.png"
    Image.fromarray(_image(99, 40, 56)).save(path)
    return Style("test_swirl", "Swirl", "swirly painting", "photo", reference=path)


@pytest.fixture(scope="module")
def text_style() -> Style:
    style = load_style_library().get("ink_wash")
    assert style.reference is None
    return style


def _sample(style: Style, seed: int = 7, sample_id: str = "s0", frames: int = K + 1):
    return StylizeInput(
        sample_id=sample_id,
        frames=[_image(i) for i in range(frames)],
        control_images=[_depth(i) for i in range(frames)],
        style=style,
        seed=seed,
    )


def _ip_scales(stage: StylizeStage) -> dict[str, list[float]]:
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

    processors = stage.backend.pipe.unet.attn_processors
    return {
        name: list(processor.scale)
        for name, processor in processors.items()
        if isinstance(processor, IPAdapterAttnProcessor2_0)
    }


# --- twins ---------------------------------------------------------------------------------


def test_twins_build_deterministically_in_hub_layouts(tiny_dir, tmp_path, stage):
    builders = {
        "sdxl": sdxl_twins.build_sdxl,
        "controlnet_depth_sdxl": sdxl_twins.build_controlnet_depth_sdxl,
        "ip_adapter": sdxl_twins.build_ip_adapter,
    }
    for key, build in builders.items():
        again = tmp_path / key
        build(again)
        # Same bytes as the copy the stage loaded (built earlier through models.resolve).
        assert directory_revision(again) == directory_revision(tiny_dir / key), key
        assert stage.models()[key].revision == directory_revision(again)

    sdxl = tiny_dir / "sdxl"
    index = json.loads((sdxl / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    for folder in ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
        assert (sdxl / folder).is_dir() and folder in index, folder
    assert (sdxl / "scheduler" / "scheduler_config.json").is_file()
    assert (sdxl / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    controlnet = tiny_dir / "controlnet_depth_sdxl"
    assert (controlnet / "config.json").is_file()
    assert (controlnet / "diffusion_pytorch_model.safetensors").is_file()
    ip = tiny_dir / "ip_adapter" / "sdxl_models"
    assert (ip / "image_encoder" / "config.json").is_file()

    from safetensors import safe_open

    with safe_open(ip / "ip-adapter_sdxl.safetensors", "pt") as weights:
        keys = set(weights.keys())
    assert {"image_proj.proj.weight", "image_proj.proj.bias"} <= keys
    assert {"image_proj.norm.weight", "image_proj.norm.bias"} <= keys
    indices = sorted({int(k.split(".")[1]) for k in keys if k.startswith("ip_adapter.")})
    assert indices == list(range(1, 2 * len(indices), 2))  # 1, 3, 5, ... as in h94's file
    assert all(
        f"ip_adapter.{i}.{p}.weight" in keys for i in indices for p in ("to_k_ip", "to_v_ip")
    )


def test_stage_loads_the_twins_through_the_production_classes(stage, tiny_dir):
    import torch
    from diffusers import ControlNetModel, StableDiffusionXLControlNetPipeline
    from safetensors.torch import load_file
    from transformers import CLIPVisionModelWithProjection

    pipe = stage.backend.pipe
    assert type(pipe) is StableDiffusionXLControlNetPipeline
    assert isinstance(pipe.controlnet, ControlNetModel)
    assert isinstance(pipe.image_encoder, CLIPVisionModelWithProjection)
    assert pipe.unet.config.down_block_types == list(sdxl_twins.DOWN_BLOCKS)
    # load_ip_adapter put the file's weights into the UNet's processors: h94's index i is the
    # processor's position among all processors.
    weights = load_file(tiny_dir / "ip_adapter" / "sdxl_models" / "ip-adapter_sdxl.safetensors")
    processors = list(pipe.unet.attn_processors.items())
    checked = 0
    for index, (name, processor) in enumerate(processors):
        if name.endswith("attn2.processor"):
            expected = weights[f"ip_adapter.{index}.to_k_ip.weight"]
            assert torch.equal(processor.to_k_ip[0].weight, expected), name
            checked += 1
    assert checked == sum(k.endswith("to_k_ip.weight") for k in weights)
    assert stage.models()["sdxl"].id == "tiny/sdxl"


# --- InstantStyle --------------------------------------------------------------------------


def test_instantstyle_map_only_in_style_blocks_and_unchanged_by_calls(
    stage, reference_style, text_style
):
    before = _ip_scales(stage)
    active = {name for name, scale in before.items() if any(s != 0 for s in scale)}
    assert active, "no IP-Adapter processor is active"
    assert all(name.startswith(STYLE_BLOCKS) for name in active), sorted(active)
    assert all(any(n.startswith(block) for n in active) for block in STYLE_BLOCKS)
    inactive = set(before) - active
    assert any(n.startswith("mid_block") for n in inactive)
    assert any(n.startswith("down_blocks.2.attentions.0.") for n in inactive)
    assert any(n.startswith(LAYOUT_BLOCK) for n in inactive), "style-only by default"
    assert any(n.startswith("up_blocks.0.attentions.2.") for n in inactive)
    assert all(before[n] == [1.0] for n in active)

    for seed, style in [(1, reference_style), (2, text_style), (3, reference_style)]:
        (result,) = stage([_sample(style, seed=seed)])
        assert isinstance(result, StylizeOutput), result
        assert _ip_scales(stage) == before
    assert stage.backend.text_to_image.unet is stage.backend.pipe.unet  # shared, not copied


def test_reference_image_and_depth_both_steer_the_output(stage, reference_style, tmp_path):
    (base,) = stage([_sample(reference_style)])
    other_path = tmp_path / "other.png"
    Image.fromarray(_image(5, 40, 56)).save(other_path)
    other_style = replace(reference_style, reference=other_path)
    (other_ref,) = stage([_sample(other_style)])
    assert not np.array_equal(base.stylized_first_frame, other_ref.stylized_first_frame)
    moved = _sample(reference_style)
    moved = replace(moved, control_images=[_depth(50 + i) for i in range(K + 1)])
    (other_depth,) = stage([moved])
    assert not np.array_equal(base.stylized_first_frame, other_depth.stylized_first_frame)


# --- outputs -------------------------------------------------------------------------------


def test_outputs_come_back_at_the_clip_size(stage, reference_style):
    (result,) = stage([_sample(reference_style)])
    assert isinstance(result, StylizeOutput)
    assert result.sample_id == "s0"
    assert result.stylized_first_frame.shape == (H, W, 3)
    assert result.stylized_first_frame.dtype == np.uint8
    assert len(result.style_refs) == K
    assert all(r.shape == (H, W, 3) and r.dtype == np.uint8 for r in result.style_refs)
    assert result.stylized_first_frame.std() > 0
    assert result.prompt == reference_style.prompt
    assert result.params["model_size"] == [64, 64]
    assert result.params["seed"] == 7
    assert result.params["ip_adapter_scale_map"] == {"up": {"block_0": [0.0, 1.0, 0.0]}}
    assert result.params["controlnet_conditioning_scale"] == 0.6  # InstantStyle's example


def test_style_layout_map_is_an_option():
    layout = StylizeConfig(ip_adapter_blocks="style_layout", ip_adapter_scale=0.8)
    assert layout.instantstyle_map == {
        "down": {"block_2": [0.0, 0.8]},
        "up": {"block_0": [0.0, 0.8, 0.0]},
    }


def test_the_content_goes_before_the_style_words_and_steers_the_image(stage, reference_style):
    (plain,) = stage([_sample(reference_style)])
    described = replace(_sample(reference_style), content="a red fox running through snow.")
    (result,) = stage([described])
    assert result.prompt == f"a red fox running through snow, {reference_style.prompt}"
    assert not np.array_equal(result.stylized_first_frame, plain.stylized_first_frame)
    assert stage.params()["backend"] == "sdxl" and stage.params()["steps"] == 2


def test_same_seed_same_output_other_seed_other_output(stage, reference_style):
    first, second, other = stage(
        [
            _sample(reference_style, seed=11, sample_id="a"),
            _sample(reference_style, seed=11, sample_id="b"),
            _sample(reference_style, seed=12, sample_id="c"),
        ]
    )
    assert np.array_equal(first.stylized_first_frame, second.stylized_first_frame)
    assert all(
        np.array_equal(x, y) for x, y in zip(first.style_refs, second.style_refs, strict=True)
    )
    assert not np.array_equal(first.stylized_first_frame, other.stylized_first_frame)


def test_model_size_keeps_aspect_in_multiples_of_64():
    assert model_size(480, 832, 1024) == (768, 1344)
    assert model_size(H, W, 64) == (64, 64)
    assert model_size(480, 832, 1024, keep_aspect=False) == (1024, 1024)


# --- exemplars for text-only styles --------------------------------------------------------


def test_exemplar_generated_once_reused_and_plain_text_to_image(config, text_style, tmp_path):
    import torch
    from diffusers import StableDiffusionXLPipeline

    cached = replace(config, cache_dir=str(tmp_path / "exemplars"))
    first = StylizeStage(cached)
    results = first([_sample(text_style, sample_id="a"), _sample(text_style, sample_id="b")])
    results += first([_sample(text_style, seed=8, sample_id="c")])
    assert all(isinstance(r, StylizeOutput) for r in results)
    assert first.backend.exemplars_generated == 1
    files = list((tmp_path / "exemplars").glob("*.png"))
    assert [f.name for f in files] == [first.backend.exemplar_path(text_style).name]
    assert files[0].name.startswith("ink_wash-") and files[0].name.endswith("-s0.png")
    assert results[0].params["style_image"] == f"exemplar:{files[0].name}"

    # A second stage (think: another Ray actor or a later run) reuses the file.
    second = StylizeStage(cached)
    (again,) = second([_sample(text_style, sample_id="a")])
    assert second.backend.exemplars_generated == 0
    assert np.array_equal(again.stylized_first_frame, results[0].stylized_first_frame)
    second.teardown()

    # The exemplar is SDXL text-to-image from the style prompt: the IP-Adapter contributes
    # nothing (a plain pipeline without IP-Adapter gives the same image).
    plain = StableDiffusionXLPipeline.from_pretrained(
        resolve("sdxl", "tiny", config.tiny_dir).path, add_watermarker=False
    )
    plain.set_progress_bar_config(disable=True)
    expected = plain(
        prompt=text_style.prompt,
        negative_prompt=text_style.negative_prompt,
        height=64,
        width=64,
        num_inference_steps=2,
        guidance_scale=config.guidance_scale,
        generator=torch.Generator("cpu").manual_seed(config.exemplar_seed),
        output_type="np",
    ).images[0]
    expected = (np.clip(expected, 0, 1) * 255).round().astype(np.uint8)
    exemplar = np.asarray(Image.open(files[0]).convert("RGB"))
    assert np.abs(exemplar.astype(int) - expected.astype(int)).max() <= 1
    first.teardown()


# --- rejects -------------------------------------------------------------------------------


def test_malformed_samples_are_rejected_with_a_reason(stage, reference_style):
    good = _sample(reference_style, sample_id="good")
    wrong_size_control = replace(
        good,
        sample_id="control_size",
        control_images=[_image(i, 32, 32) for i in range(K + 1)],
    )
    float_frames = replace(
        good, sample_id="float", frames=[f.astype(np.float32) for f in good.frames]
    )
    results = stage(
        [
            _sample(reference_style, sample_id="too_few", frames=K),
            good,
            _sample(reference_style, sample_id="too_many", frames=K + 2),
            replace(good, sample_id="controls", control_images=good.control_images[:2]),
            wrong_size_control,
            float_frames,
        ]
    )
    assert isinstance(results[1], StylizeOutput)  # the batch goes on around the rejects
    reasons = {r.sample_id: r.reason for r in results if not isinstance(r, StylizeOutput)}
    assert reasons == {
        "too_few": WRONG_FRAME_COUNT,
        "too_many": WRONG_FRAME_COUNT,
        "controls": WRONG_CONTROL_COUNT,
        "control_size": CONTROL_SIZE_MISMATCH,
        "float": BAD_FRAME,
    }
    assert "expected 4" in results[0].detail
    assert all(r.stage == "stylize" for r in results if not isinstance(r, StylizeOutput))


# --- configuration and production profile --------------------------------------------------


def test_production_profile_without_weights_names_the_sdxl_repo(tmp_path, monkeypatch):
    import huggingface_hub.constants as hub_constants

    empty = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(empty))
    monkeypatch.setenv("HF_HUB_CACHE", str(empty / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads these when imported (earlier tests imported it).
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(empty / "hub"))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    for key in ("SDXL", "CONTROLNET_DEPTH_SDXL", "IP_ADAPTER"):
        monkeypatch.delenv(f"DATAGEN_MODEL_{key}", raising=False)
    stage = StylizeStage(StylizeConfig(profile="production"))
    with pytest.raises(MissingModelError, match="stabilityai/stable-diffusion-xl-base-1.0"):
        stage.setup()
    assert not stage.loaded


@pytest.mark.parametrize(
    "changes",
    [
        {"backend": "dalle"},
        {"profile": "huge"},
        {"num_style_refs": 0},
        {"num_style_refs": 2.5},
        {"steps": 0},
        {"guidance_scale": float("nan")},
        {"controlnet_conditioning_scale": -1.0},
        {"ip_adapter_scale": True},
        {"ip_adapter_blocks": "everything"},
        {"resolution": 100},
        {"device": "tpu"},
        {"dtype": "float8"},
        {"backend": "http"},  # no url
        {"backend": "http", "url": "ftp://example.com/edit"},
        {"backend": "http", "url": "https://user:secret@example.com/edit"},
        {"api_key_env": "not a name"},
        {"api_key_block": "Not A Block"},
        {"api_key_env": "MY_EDIT_KEY", "api_key_block": "edit-key"},  # two sources
        {"timeout_s": 0},
        {"max_retries": -1},
        {"http_concurrency": 0},
        {"sdxl_id": ""},
    ],
)
def test_bad_configs_raise_value_error(changes):
    with pytest.raises(ValueError, match="StylizeConfig"):
        StylizeConfig(**changes)


def test_key_config_errors_never_echo_a_pasted_key():
    with pytest.raises(ValueError, match="NAME of an environment variable") as as_env:
        StylizeConfig(api_key_env=FAKE_API_KEY)
    with pytest.raises(ValueError, match="looks like an API key") as as_block:
        StylizeConfig(api_key_block=FAKE_API_KEY)
    with pytest.raises(ValueError, match="must not carry credentials") as in_url:
        StylizeConfig(backend="http", url=f"https://user:{FAKE_API_KEY}@example.com/edit")
    for raised in (as_env, as_block, in_url):
        assert FAKE_API_KEY not in str(raised.value)


def test_a_block_name_replaces_the_default_variable():
    config = StylizeConfig(backend="http", url="http://127.0.0.1:9/edit", api_key_block="edit-key")
    assert config.api_key_env is None and config.api_key_block == "edit-key"
    assert "edit-key" in repr(StylizeStage(config))
    assert StylizeConfig().api_key_env == DEFAULT_API_KEY_ENV  # unchanged without a block


def test_default_resources_follow_the_backend():
    assert StylizeStage(StylizeConfig()).resources.num_gpus == 1
    http = StylizeConfig(backend="http", url="http://127.0.0.1:9/edit")
    assert StylizeStage(http).resources.num_gpus == 0


# --- HTTP backend --------------------------------------------------------------------------


image_edit_server = fake_image_edit_server.image_edit_server  # the module's fixture, used here


@pytest.fixture
def server(image_edit_server):
    """The fake image-edit service (tests/fake_image_edit_server.py), stopped at teardown."""
    return image_edit_server


@pytest.fixture
def http_config(server, monkeypatch) -> StylizeConfig:
    monkeypatch.setenv(DEFAULT_API_KEY_ENV, FAKE_API_KEY)
    return StylizeConfig(
        backend="http", url=server.url, num_style_refs=K, retry_backoff_s=0.0, timeout_s=10
    )


def test_http_backend_returns_the_services_images(server, http_config, reference_style):
    stage = StylizeStage(http_config)
    sample = _sample(reference_style)
    server.response_size = (96, 96)  # the service answers at its own size
    (result,) = stage([sample])
    assert isinstance(result, StylizeOutput), result
    # Resized back to the clip's size; the fake inverts colours.
    assert result.stylized_first_frame.shape == (H, W, 3)
    expected = [
        np.asarray(Image.fromarray(invert(f)).resize((96, 96)).resize((W, H), Image.LANCZOS))
        for f in sample.frames
    ]
    assert np.array_equal(result.stylized_first_frame, expected[0])
    assert all(np.array_equal(r, e) for r, e in zip(result.style_refs, expected[1:], strict=True))

    server.response_size = None
    (same_size,) = stage([sample])
    assert np.array_equal(same_size.stylized_first_frame, invert(sample.frames[0]))
    assert all(
        np.array_equal(r, invert(f))
        for r, f in zip(same_size.style_refs, sample.frames[1:], strict=True)
    )

    assert len(server.requests) == 2 * (K + 1)
    for request in server.requests:
        assert request.headers["Authorization"] == f"Bearer {FAKE_API_KEY}"
        assert request.body["prompt"] == reference_style.prompt
        assert request.body["reference_image"]  # the style's reference travels with each frame
        assert (request.body["height"], request.body["width"]) == (H, W)
    assert stage.models() == {"image_edit": stage.backend.refs["image_edit"]}
    assert stage.models()["image_edit"].id == server.url
    assert stage.params() == {"backend": "http", "endpoint": server.url, "num_style_refs": K}
    stage.teardown()


def test_http_backend_retries_a_503(server, http_config, text_style):
    stage = StylizeStage(replace(http_config, http_concurrency=1))
    server.fail_next(503, times=2, retry_after="0")
    (result,) = stage([_sample(text_style)])
    assert isinstance(result, StylizeOutput), result
    assert np.array_equal(result.stylized_first_frame, invert(_sample(text_style).frames[0]))
    assert len(server.requests) == K + 1 + 2
    assert server.requests[0].body["reference_image"] is None  # text-only style

    # Retries are bounded; a 4xx is not retried.
    bounded = StylizeStage(replace(http_config, http_concurrency=1, max_retries=1))
    server.requests.clear()
    server.fail_next(503, times=20)
    (unavailable,) = bounded([_sample(text_style, sample_id="u")])
    assert unavailable.reason == IMAGE_EDIT_UNAVAILABLE and "503" in unavailable.detail
    # One try + one retry for the first frame; the sample is lost, its other frames not sent.
    assert len(server.requests) == 2
    server._failures.clear()
    server.requests.clear()
    server.fail_next(400, times=1)
    (failed,) = bounded([_sample(text_style, sample_id="f")])
    assert failed.reason == IMAGE_EDIT_FAILED and "400" in failed.detail
    assert len(server.requests) == 1  # not retried
    stage.teardown()
    bounded.teardown()


def test_http_key_never_leaks(server, http_config, reference_style, caplog):
    caplog.set_level(logging.DEBUG)
    stage = StylizeStage(replace(http_config, http_concurrency=1, max_retries=1))
    # A service that echoes the key in its error bodies must not get it into a reject.
    server.fail_next(401, message=f"bad key {FAKE_API_KEY}")
    (rejected,) = stage([_sample(reference_style, sample_id="r")])
    assert rejected.reason == IMAGE_EDIT_FAILED
    server.fail_next(503, times=2, message=f"overloaded for {FAKE_API_KEY}")
    (unavailable,) = stage([_sample(reference_style, sample_id="u")])
    assert unavailable.reason == IMAGE_EDIT_UNAVAILABLE
    (result,) = stage([_sample(reference_style)])
    assert isinstance(result, StylizeOutput)

    texts = [
        repr(stage),
        repr(stage.config),
        repr(stage.backend),
        repr(rejected),
        repr(unavailable),
        json.dumps(result.params),
        result.prompt,
        repr(stage.models()),
        repr(stage.stats),
        caplog.text,
    ]
    assert caplog.records  # the retries were logged
    assert all(FAKE_API_KEY not in text for text in texts)
    assert FAKE_API_KEY.encode() not in pickle.dumps(stage.backend)
    assert "bad key ***" in rejected.detail  # the service's text arrives, scrubbed
    stage.teardown()


def test_a_loaded_http_stage_pickles_as_its_config(server, http_config, text_style):
    stage = StylizeStage(http_config)
    assert isinstance(stage([_sample(text_style)])[0], StylizeOutput)
    shipped = pickle.dumps(stage)
    assert FAKE_API_KEY.encode() not in shipped
    clone = pickle.loads(shipped)
    assert not clone.loaded and clone.backend is None and stage.loaded
    server.requests.clear()
    (result,) = clone([_sample(text_style, sample_id="clone")])  # reads $KEY again, and works
    assert isinstance(result, StylizeOutput), result
    assert {r.headers["Authorization"] for r in server.requests} == {f"Bearer {FAKE_API_KEY}"}
    stage.teardown()
    clone.teardown()


def test_http_backend_needs_the_key_variable(server, monkeypatch, text_style):
    monkeypatch.delenv("MY_EDIT_KEY", raising=False)
    stage = StylizeStage(StylizeConfig(backend="http", url=server.url, api_key_env="MY_EDIT_KEY"))
    with pytest.raises(RuntimeError, match=r"\$MY_EDIT_KEY"):
        stage.setup()
    # A service without auth: no api_key_env, no Authorization header (the fake then says 401).
    open_stage = StylizeStage(
        StylizeConfig(backend="http", url=server.url, api_key_env=None, max_retries=0)
    )
    (result,) = open_stage([_sample(text_style)])
    assert result.reason == IMAGE_EDIT_FAILED and "401" in result.detail
    assert "Authorization" not in server.requests[-1].headers
    open_stage.teardown()
