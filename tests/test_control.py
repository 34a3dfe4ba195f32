"""Control stage: depth (Depth-Anything via transformers) and pose (controlnet-aux OpenPose)."""

from __future__ import annotations

import numpy as np
import pytest

from datagen.control import (
    ControlConfig,
    ControlInput,
    ControlOutput,
    ControlStage,
    control_sha256,
    resize_maps,
)
from datagen.models import MissingModelError, build_twin
from datagen.stage import Reject


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def depth_stage(tiny_dir):
    stage = ControlStage(ControlConfig(kind="depth", tiny_dir=tiny_dir))
    stage.setup()
    return stage


def gradient_clip(frames: int = 9, height: int = 48, width: int = 80) -> np.ndarray:
    y = np.linspace(0, 255, height)[None, :, None, None]
    x = np.linspace(0, 255, width)[None, None, :, None]
    t = np.arange(frames)[:, None, None, None] * 10
    return np.broadcast_to((y + x / 2 + t) % 256, (frames, height, width, 3)).astype(np.uint8)


def test_depth_keeps_frame_count_and_size_and_hashes_the_result(depth_stage):
    clip = gradient_clip()
    (out,) = depth_stage([ControlInput("a", clip)])
    assert isinstance(out, ControlOutput)
    assert out.frames.shape == clip.shape and out.frames.dtype == np.uint8
    assert out.kind == "depth"
    assert out.sha256 == control_sha256(out.frames)
    # normalised over the whole clip: the full range is used, and all channels are equal
    assert out.frames.min() == 0 and out.frames.max() == 255
    assert np.array_equal(out.frames[..., 0], out.frames[..., 2])


def test_depth_is_deterministic_and_input_dependent(depth_stage):
    clip = gradient_clip()
    first, second, other = depth_stage(
        [
            ControlInput("a", clip),
            ControlInput("b", clip),
            ControlInput("c", clip[:, ::-1].copy()),
        ]
    )
    assert first.sha256 == second.sha256
    assert first.sha256 != other.sha256


def test_model_loads_once_and_records_its_revision(depth_stage):
    depth_stage([ControlInput("a", gradient_clip(frames=2))])
    depth_stage.setup()
    assert depth_stage.stats.loads == 1
    ref = depth_stage.models()["control_depth"]
    assert ref.id == "tiny/depth_anything" and ref.revision.startswith("sha256:")


def test_bad_frames_become_rejects_and_the_batch_goes_on(depth_stage):
    good = gradient_clip(frames=3)
    results = depth_stage(
        [
            ControlInput("bad", good.astype(np.float32)),
            ControlInput("good", good),
            ControlInput("gray", good[..., 0]),
        ]
    )
    assert isinstance(results[0], Reject) and results[0].reason == "bad_frames"
    assert isinstance(results[1], ControlOutput)
    assert isinstance(results[2], Reject) and results[2].stage == "control"


def test_twin_builds_reproducibly(tmp_path):
    first = build_twin("depth_anything", tmp_path / "one")
    second = build_twin("depth_anything", tmp_path / "two")
    assert first.ref.revision == second.ref.revision


def test_resize_maps_maps_back_to_the_frame_size():
    maps = np.zeros((2, 64, 128, 3), np.uint8)
    maps[:, :, 64:] = 255
    out = resize_maps(maps, 48, 80)
    assert out.shape == (2, 48, 80, 3)
    assert out[:, :, :38].max() == 0 and out[:, :, 42:].min() == 255


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="control kind"):
        ControlConfig(kind="canny")
    with pytest.raises(ValueError, match="profile"):
        ControlConfig(profile="huge")


def test_production_without_weights_names_the_model_and_the_fetch_command(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    stage = ControlStage(ControlConfig(kind="depth", profile="production"))
    with pytest.raises(MissingModelError) as caught:
        stage.setup()
    message = str(caught.value)
    assert "depth-anything/Depth-Anything-V2-Large-hf" in message
    assert "hf download depth-anything/Depth-Anything-V2-Large-hf" in message


@pytest.mark.slow
def test_pose_runs_the_openpose_body_model_at_clip_size(tiny_dir):
    stage = ControlStage(ControlConfig(kind="pose", tiny_dir=tiny_dir, pose_detect_resolution=128))
    clip = gradient_clip(frames=2)
    (out,) = stage([ControlInput("p", clip)])
    assert out.frames.shape == clip.shape and out.frames.dtype == np.uint8
    assert out.kind == "pose" and out.sha256 == control_sha256(out.frames)
    assert stage.models()["control_pose"].revision.startswith("sha256:")
