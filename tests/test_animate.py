"""Animate stage: Wan2.1 VACE (tiny twin) animating raw and stylized first frames as one pair."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from datagen.core.stage import Reject, Resources
from datagen.models.registry import (
    SOURCES,
    MissingModelError,
    build_twin,
    directory_revision,
)
from datagen.models.twins.wan import build_wan_vace
from datagen.stages.animate import (
    AnimateConfig,
    AnimateInput,
    AnimateOutput,
    AnimateStage,
    batched_pipeline_class,
    to_uint8,
)
from datagen.stages.control import control_sha256
from datagen.tools.validate import _check_provenance

FRAMES, HEIGHT, WIDTH = 9, 64, 64
PROMPT = "a person dancing in a park"


def make_sample(
    sample_id: str = "s0", seed: int = 7, prompt: str = PROMPT, shift: int = 0
) -> AnimateInput:
    """A gradient first frame, its 'stylized' recolouring, and a control video that pans."""
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH]
    base = np.stack([x * 4, y * 4, (x + y) * 2], axis=-1).astype(np.uint8)
    base = np.roll(base, shift, axis=0)
    stylized = ((255 - base) // 2 + 64).astype(np.uint8)
    control = np.stack([np.roll(base[..., ::-1], 3 * k, axis=1) for k in range(FRAMES)])
    return AnimateInput(
        sample_id=sample_id,
        raw_first_frame=base,
        stylized_first_frame=stylized,
        control_frames=control,
        control_sha256=control_sha256(control),
        prompt=prompt,
        seed=seed,
    )


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny-models")


@pytest.fixture(scope="module")
def stage(tiny_dir):
    stage = AnimateStage(AnimateConfig(tiny_dir=str(tiny_dir)))
    stage.setup()
    yield stage
    stage.teardown()


@pytest.fixture(scope="module")
def wide_stage(stage):
    """Two pairs per pipeline call."""
    wide = AnimateStage(dataclasses.replace(stage.config, max_pairs_per_call=2))
    wide.setup()
    yield wide
    wide.teardown()


# --- twin --------------------------------------------------------------------------------


def test_twin_builds_deterministically_in_the_hub_layout(stage, tiny_dir, tmp_path):
    twin = tiny_dir / "wan_vace"
    for part in ("transformer", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (twin / part).is_dir(), part
    index = json.loads((twin / "model_index.json").read_text())
    assert index["_class_name"] == "WanVACEPipeline"
    assert index["tokenizer"] == ["transformers", "T5TokenizerFast"]  # as on the hub
    assert index["text_encoder"] == ["transformers", "UMT5EncoderModel"]
    assert index["scheduler"] == ["diffusers", "UniPCMultistepScheduler"]
    weights = sum(f.stat().st_size for f in twin.rglob("*") if f.is_file())
    assert weights < 5 * 2**20

    again = tmp_path / "again"
    again.mkdir()
    build_wan_vace(again)
    assert directory_revision(again) == directory_revision(twin)
    # the stage records the twin's content hash
    assert stage.models()["wan_vace"].revision == directory_revision(twin)


def test_production_loading_code_loads_the_twin_unchanged(stage, tiny_dir, monkeypatch):
    """The production profile, pointed at the twin's directory, takes the same loading path
    and produces exactly the tiny profile's frames."""
    twin = build_twin("wan_vace", tiny_dir).path
    monkeypatch.setenv(SOURCES["wan_vace"].env, str(twin))
    config = AnimateConfig(
        profile="production", num_frames=FRAMES, height=HEIGHT, width=WIDTH, steps=2
    )
    production = AnimateStage(config, Resources(num_gpus=0))
    production.setup()
    try:
        from diffusers import UniPCMultistepScheduler, WanVACEPipeline

        assert type(production.pipe) is batched_pipeline_class()
        assert isinstance(production.pipe, WanVACEPipeline)
        scheduler = production.pipe.scheduler
        assert isinstance(scheduler, UniPCMultistepScheduler)
        assert scheduler.config.prediction_type == "flow_prediction"
        assert scheduler.config.use_flow_sigmas and scheduler.config.flow_shift == 16.0
        assert production.pipe.vae.dtype == torch.float32
        ref = production.models()["wan_vace"]
        assert ref.id == str(twin) and ref.revision == directory_revision(twin)

        sample = make_sample()
        [mine], [theirs] = stage([sample]), production([sample])
        assert np.array_equal(mine.raw_frames, theirs.raw_frames)
        assert np.array_equal(mine.stylized_frames, theirs.stylized_frames)
    finally:
        production.teardown()


def test_reduced_precision_keeps_the_vae_in_float32(stage):
    """The production dtype split (bf16 transformer and text encoder, fp32 VAE), run on CPU."""
    half = AnimateStage(dataclasses.replace(stage.config, dtype="bfloat16", device="cpu"))
    half.setup()
    try:
        assert half.pipe.transformer.dtype == torch.bfloat16
        assert half.pipe.text_encoder.dtype == torch.bfloat16
        assert half.pipe.vae.dtype == torch.float32
        [output] = half([make_sample()])
        assert isinstance(output, AnimateOutput)
        assert output.raw_frames.shape == (FRAMES, HEIGHT, WIDTH, 3)
        [reference] = stage([make_sample()])
        # same model at lower precision: close to the float32 result (measured ~0.4 levels)
        error = np.abs(output.raw_frames.astype(int) - reference.raw_frames).mean()
        assert 0 < error < 4
    finally:
        half.teardown()


# --- outputs -----------------------------------------------------------------------------


def test_outputs_shapes_and_identical_conditions(stage):
    sample = make_sample(seed=11)
    [output] = stage([sample])
    assert isinstance(output, AnimateOutput) and output.sample_id == "s0"
    for frames in (output.raw_frames, output.stylized_frames):
        assert frames.shape == (FRAMES, HEIGHT, WIDTH, 3)
        assert frames.dtype == np.uint8
        assert frames.std() > 1.0  # not a blank video

    raw, stylized = output.conditions["raw"], output.conditions["stylized"]
    assert raw == stylized
    assert raw["control_sha256"] == sample.control_sha256
    assert raw["seed"] == 11 and raw["prompt"] == PROMPT
    assert raw["steps"] == 2 and raw["num_frames"] == FRAMES
    # what `datagen validate` checks in a row built from this output
    row = {
        "models": [(f"animate.{k}", v.as_dict()) for k, v in stage.models().items()],
        "params": json.dumps({"animate": output.conditions}),
        "control_sha256": sample.control_sha256,
        "seed": sample.seed,
    }
    assert _check_provenance(row) == []
    # and it does catch a pair recorded with different noise seeds
    tampered = json.loads(row["params"])
    tampered["animate"]["stylized"]["seed"] = 12
    assert _check_provenance({**row, "params": json.dumps(tampered)})


def test_batched_pair_equals_two_stock_single_calls(stage, tiny_dir):
    """The one batched call gives each member what the unmodified pipeline gives it alone."""
    from diffusers import WanVACEPipeline
    from PIL import Image

    sample = make_sample(seed=3)
    frames, [noise_hash] = stage.generate_pairs([sample])
    assert frames.shape == (2, FRAMES, HEIGHT, WIDTH, 3) and frames.dtype == np.float32

    config = stage.config
    stock = WanVACEPipeline.from_pretrained(tiny_dir / "wan_vace")  # the unmodified class
    stock.scheduler = type(stage.pipe.scheduler).from_config(stage.pipe.scheduler.config)
    stock.set_progress_bar_config(disable=True)
    black, white = Image.new("L", (WIDTH, HEIGHT), 0), Image.new("L", (WIDTH, HEIGHT), 255)
    mask = [black] + [white] * (FRAMES - 1)
    control = [Image.fromarray(frame) for frame in sample.control_frames[1:]]
    noise = stage.initial_noise(sample.seed)
    for member, first in enumerate((sample.raw_first_frame, sample.stylized_first_frame)):
        single = stock(
            video=[Image.fromarray(first), *control],
            mask=mask,
            prompt=sample.prompt,
            negative_prompt=config.negative_prompt,
            latents=noise.clone(),
            height=HEIGHT,
            width=WIDTH,
            num_frames=FRAMES,
            num_inference_steps=config.steps,
            guidance_scale=config.guidance_scale,
            max_sequence_length=config.max_sequence_length,
            output_type="np",
        ).frames[0]
        assert np.abs(frames[member] - single).max() < 1e-4
    [output] = stage([sample])
    assert np.abs(output.raw_frames.astype(int) - to_uint8(frames[0])).max() == 0
    assert output.conditions["raw"]["noise_sha256"] == noise_hash


def test_members_differ_only_through_their_first_frames(stage):
    sample = make_sample(seed=5)
    frames, _ = stage.generate_pairs([sample])
    difference = np.abs(frames[0] - frames[1])
    assert difference.mean() > 1e-3  # thousands of times the batching error (~3e-7)
    [output] = stage([sample])
    assert not np.array_equal(output.raw_frames, output.stylized_frames)

    # same first frame in both members: the two outputs coincide, so nothing else differs
    same = dataclasses.replace(sample, stylized_first_frame=sample.raw_first_frame.copy())
    frames, _ = stage.generate_pairs([same])
    assert np.abs(frames[0] - frames[1]).max() < 1e-5


def test_several_pairs_in_one_call_match_pair_by_pair(stage):
    a = make_sample("a", seed=1)
    b = make_sample("b", seed=2, prompt="a dog running on a beach", shift=9)
    together, hashes = stage.generate_pairs([a, b])
    alone_a, [hash_a] = stage.generate_pairs([a])
    alone_b, [hash_b] = stage.generate_pairs([b])
    assert np.abs(together[:2] - alone_a).max() < 1e-4
    assert np.abs(together[2:] - alone_b).max() < 1e-4
    assert hashes == [hash_a, hash_b] and hash_a != hash_b  # own noise per seed
    assert np.abs(alone_a[0] - alone_b[0]).mean() > 1e-3  # another seed, another video


def test_pairs_per_call_setting_keeps_order_and_results(stage, wide_stage):
    bad = dataclasses.replace(make_sample("bad"), control_sha256="0" * 64)
    batch = [make_sample("a", seed=1), bad, make_sample("b", seed=2, shift=9)]
    results = wide_stage(batch)
    assert wide_stage.stats.batches == 1
    assert [r.sample_id for r in results] == ["a", "bad", "b"]
    assert isinstance(results[1], Reject)
    [alone_b] = stage([batch[2]])
    assert np.abs(results[2].stylized_frames.astype(int) - alone_b.stylized_frames).max() <= 1


# --- rejects -----------------------------------------------------------------------------


def test_per_sample_failures_become_rejects(stage):
    good = make_sample("good")
    short = good.control_frames[:5]
    small = good.control_frames[:, :32]
    batch = [
        dataclasses.replace(
            good, sample_id="frames", control_frames=short, control_sha256=control_sha256(short)
        ),
        dataclasses.replace(
            good,
            sample_id="control_size",
            control_frames=small,
            control_sha256=control_sha256(small),
        ),
        dataclasses.replace(
            good, sample_id="first_size", stylized_first_frame=good.raw_first_frame[:, :48]
        ),
        dataclasses.replace(good, sample_id="dtype", raw_first_frame=good.raw_first_frame / 255.0),
        dataclasses.replace(good, sample_id="gray", raw_first_frame=good.raw_first_frame[..., 0]),
        dataclasses.replace(good, sample_id="sha", control_sha256="f" * 64),
        dataclasses.replace(good, sample_id="prompt", prompt="  "),
        dataclasses.replace(good, sample_id="seed", seed=-1),
        good,
    ]
    results = stage(batch)
    reasons = {r.sample_id: r.reason for r in results if isinstance(r, Reject)}
    assert reasons == {
        "frames": "frame_count_mismatch",
        "control_size": "size_mismatch",
        "first_size": "size_mismatch",
        "dtype": "bad_input",
        "gray": "bad_input",
        "sha": "control_sha_mismatch",
        "prompt": "bad_input",
        "seed": "bad_input",
    }
    assert all(r.stage == "animate" and r.detail for r in results[:-1])
    assert isinstance(results[-1], AnimateOutput) and results[-1].sample_id == "good"


def test_non_finite_output_rejects_only_that_sample(wide_stage):
    def poison_member_2(module, inputs, output):
        # fault injection: the second sample's raw member decodes from NaN latents
        output = output.clone()
        output[2] = float("nan")
        return output

    hook = wide_stage.pipe.vae.post_quant_conv.register_forward_hook(poison_member_2)
    try:
        results = wide_stage([make_sample("a", seed=1), make_sample("b", seed=2)])
    finally:
        hook.remove()
    assert isinstance(results[0], AnimateOutput)
    assert isinstance(results[1], Reject) and results[1].reason == "non_finite_output"
    assert "raw" in results[1].detail


# --- production and config ---------------------------------------------------------------


@pytest.mark.parametrize(
    "hub_id", [None, "Wan-AI/Wan2.1-VACE-1.3B-diffusers"], ids=["default", "override"]
)
def test_production_without_weights_names_the_hub_id(hub_id, tmp_path, monkeypatch):
    import huggingface_hub.constants

    empty = tmp_path / "hf"
    empty.mkdir()
    monkeypatch.setenv("HF_HOME", str(empty))
    monkeypatch.setenv("HF_HUB_CACHE", str(empty / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(empty / "hub"))
    monkeypatch.delenv(SOURCES["wan_vace"].env, raising=False)
    stage = AnimateStage(AnimateConfig(profile="production", hub_id=hub_id))
    with pytest.raises(MissingModelError) as error:
        stage.setup()
    expected = hub_id or "Wan-AI/Wan2.1-VACE-14B-diffusers"
    assert expected in str(error.value)
    assert f"hf download {expected}" in str(error.value)
    assert not stage.loaded


def test_profile_defaults_and_resources():
    tiny, production = AnimateConfig(), AnimateConfig(profile="production")
    assert (tiny.num_frames, tiny.height, tiny.width, tiny.steps) == (9, 64, 64, 2)
    assert (production.num_frames, production.height, production.width) == (81, 480, 832)
    assert production.steps >= 30 and production.flow_shift == 16.0  # VACE's shift
    assert production.repo == "Wan-AI/Wan2.1-VACE-14B-diffusers"
    resources = AnimateStage().resources
    assert (resources.num_gpus, resources.num_cpus) == (1, 1)


@pytest.mark.parametrize(
    "overrides",
    [
        {"profile": "huge"},
        {"num_frames": 8},
        {"num_frames": 10},
        {"num_frames": 1},
        {"num_frames": True},
        {"height": 72},
        {"width": 0},
        {"steps": 0},
        {"steps": 2.5},
        {"guidance_scale": 0.5},
        {"guidance_scale": float("nan")},
        {"flow_shift": 0.0},
        {"conditioning_scale": -1.0},
        {"max_sequence_length": 0},
        {"max_sequence_length": 1024},
        {"max_pairs_per_call": 0},
        {"dtype": "int8"},
        {"device": "tpu"},
        {"hub_id": "Wan-AI/Wan2.1-VACE-1.3B-diffusers"},  # tiny profile
        {"profile": "production", "hub_id": "not a repo id"},
    ],
    ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()),
)
def test_bad_config_raises(overrides):
    with pytest.raises(ValueError):
        AnimateConfig(**overrides)
