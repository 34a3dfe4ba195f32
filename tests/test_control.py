"""Control stage: depth (Depth-Anything via transformers), pose (controlnet-aux OpenPose) and
dwpose (DWPose's ONNX pair, drawn as VACE draws it); the stylize step's depth conditioning."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from datagen.core.stage import Reject
from datagen.models.registry import SOURCES, MissingModelError, build_twin
from datagen.stages import dwpose
from datagen.stages.control import (
    ControlConfig,
    ControlInput,
    ControlOutput,
    ControlStage,
    control_sha256,
    normalize_depth,
    resize_maps,
)


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
    # normalised per frame, as VACE's depth annotator: every frame spans 0..255, gray
    assert (out.frames.min(axis=(1, 2, 3)) == 0).all()
    assert (out.frames.max(axis=(1, 2, 3)) == 255).all()
    assert np.array_equal(out.frames[..., 0], out.frames[..., 2])
    assert out.stylize_maps.shape == (0, 48, 80, 3)  # no stylize frames asked for


def test_depth_normalization_is_per_frame_and_truncates_like_vace():
    depth = np.stack(
        [
            np.linspace(0.0, 1.0, 12, dtype=np.float32).reshape(3, 4),
            np.linspace(10.0, 1000.0, 12, dtype=np.float32).reshape(3, 4),  # another range
            np.full((3, 4), 7.0, np.float32),  # constant: black, not 0/0
        ]
    )
    maps = normalize_depth(depth)
    assert maps.shape == (3, 3, 4, 3) and maps.dtype == np.uint8
    assert np.array_equal(maps[0], maps[1])  # each frame on its own scale
    assert maps[2].max() == 0
    # VACE: (d - min) / (max - min) * 255, clipped, truncated by astype(uint8)
    expected = ((depth[0] - depth[0].min()) / np.ptp(depth[0]) * 255.0).astype(np.uint8)
    assert np.array_equal(maps[0, ..., 0], expected)


def test_depth_stylize_maps_are_those_frames_of_the_control_video(depth_stage):
    clip = gradient_clip()
    (out,) = depth_stage([ControlInput("a", clip, (0, 4, 8))])
    assert out.stylize_control == "depth"
    assert np.array_equal(out.stylize_maps, out.frames[[0, 4, 8]])
    # per-frame normalisation: the maps of a few frames equal their maps within the clip
    (few,) = depth_stage([ControlInput("b", clip[[0, 4, 8]])])
    assert np.array_equal(few.frames, out.stylize_maps)
    (bad,) = depth_stage([ControlInput("c", clip, (0, 9))])
    assert isinstance(bad, Reject) and bad.reason == "bad_frames"
    assert depth_stage.params()["stylize_control"] == "depth"


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
    with pytest.raises(ValueError, match="dwpose_resolution"):
        ControlConfig(kind="dwpose", dwpose_resolution=32)


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
def test_pose_runs_the_openpose_body_model_at_clip_size(tiny_dir, depth_stage):
    stage = ControlStage(ControlConfig(kind="pose", tiny_dir=tiny_dir, pose_detect_resolution=128))
    clip = gradient_clip(frames=2)
    (out,) = stage([ControlInput("p", clip, (0, 1))])
    assert out.frames.shape == clip.shape and out.frames.dtype == np.uint8
    assert out.kind == "pose" and out.sha256 == control_sha256(out.frames)
    assert stage.models()["control_pose"].revision.startswith("sha256:")
    # the stylize step still gets depth: the depth kind's maps of those frames
    assert stage.models()["stylize_depth"] == depth_stage.models()["control_depth"]
    (depth,) = depth_stage([ControlInput("d", clip)])
    assert np.array_equal(out.stylize_maps, depth.frames)


@pytest.mark.slow
def test_annotators_twin_holds_every_file_the_production_loader_needs(tiny_dir):
    from controlnet_aux.open_pose import OpenposeDetector
    from controlnet_aux.open_pose.body import Body

    twin = build_twin("annotators", Path(tiny_dir)).path
    for name in SOURCES["annotators"].files:
        assert (twin / name).is_file(), name
    # what the control stage loads: the body network only (no hands or faces are drawn)
    assert SOURCES["annotators"].files == ("body_pose_model.pth",)
    OpenposeDetector(Body(str(twin / "body_pose_model.pth")))


# --- DWPose ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dwpose_stage(tiny_dir):
    stage = ControlStage(ControlConfig(kind="dwpose", tiny_dir=tiny_dir))
    stage.setup()
    return stage


def test_dwpose_twin_has_the_real_models_names_and_shapes(tiny_dir, tmp_path):
    import onnxruntime as ort

    twin = build_twin("dwpose", Path(tiny_dir)).path
    shapes = {}
    for name in SOURCES["dwpose"].files:
        session = ort.InferenceSession(str(twin / name), providers=["CPUExecutionProvider"])
        for value in session.get_inputs() + session.get_outputs():
            shapes[value.name] = value.shape
    assert shapes == {
        "images": [1, 3, 640, 640],
        "output": [1, 8400, 85],
        "input": [1, 3, 384, 288],
        "simcc_x": [1, 133, 576],
        "simcc_y": [1, 133, 768],
    }
    first = build_twin("dwpose", tmp_path / "one").ref.revision
    assert first == build_twin("dwpose", tmp_path / "two").ref.revision  # seeded: same bytes


def test_dwpose_twin_finds_a_person_and_runs_the_pose_model(dwpose_stage):
    model = dwpose_stage.model
    image = dwpose.resize_short_side(gradient_clip(frames=1)[0][..., ::-1].copy(), 1024)
    boxes = model.detect(image)
    assert len(boxes) >= 1 and boxes.shape[1] == 4
    keypoints, scores = model.keypoints(image, boxes)
    assert keypoints.shape == (len(boxes), 133, 2) and scores.shape == (len(boxes), 133)
    assert (scores > dwpose.VISIBLE).any()


def test_dwpose_stage_draws_at_clip_size_and_conditions_stylize_on_depth(dwpose_stage, depth_stage):
    clip = gradient_clip()
    (out,) = dwpose_stage([ControlInput("w", clip, (0, 4, 8))])
    assert out.kind == "dwpose" and out.frames.shape == clip.shape
    assert out.sha256 == control_sha256(out.frames)
    assert out.frames.any(), "the twin's person should be drawn"
    (depth,) = depth_stage([ControlInput("d", clip)])
    assert np.array_equal(out.stylize_maps, depth.frames[[0, 4, 8]])
    assert not np.array_equal(out.stylize_maps, out.frames[[0, 4, 8]])
    models = dwpose_stage.models()
    assert models["control_dwpose"].id == "tiny/dwpose"
    assert models["stylize_depth"].id == "tiny/depth_anything"
    assert dwpose_stage.params()["dwpose_resolution"] == 1024


def test_dwpose_production_without_weights_names_the_repo(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv(SOURCES["dwpose"].env, raising=False)
    assert "hf download yzd-v/DWPose --include 'yolox_l.onnx' --include 'dw-ll_ucoco_384.onnx'" in (
        SOURCES["dwpose"].download_command()
    )
    stage = ControlStage(ControlConfig(kind="dwpose", profile="production"))
    with pytest.raises(MissingModelError, match="yzd-v/DWPose"):
        stage.setup()


def test_decode_boxes_maps_anchor_rows_to_person_boxes():
    rows = np.zeros((8400, 85))
    rows[:, 4] = 0.05  # nothing confident...
    # ...but two overlapping stride-8 anchors and one far stride-32 anchor
    first = 10 * 80 + 20  # stride 8, cell (x=20, y=10)
    rows[first] = [0.5, 0.5, np.log(4), np.log(8), 0.9, 0.9] + [0.0] * 79
    rows[first + 1] = [0.5, 0.5, np.log(4), np.log(8), 0.8, 0.9] + [0.0] * 79
    far = 6400 + 1600 + 3 * 20 + 15  # stride 32, cell (x=15, y=3)
    rows[far] = [0.0, 0.0, 0.0, 0.0, 0.9, 0.5] + [0.0] * 79  # score 0.45
    boxes = dwpose.decode_boxes(rows, ratio=0.5)
    expected_first = np.array([20.5 * 8 - 16, 10.5 * 8 - 32, 20.5 * 8 + 16, 10.5 * 8 + 32]) / 0.5
    expected_far = np.array([15 * 32 - 16, 3 * 32 - 16, 15 * 32 + 16, 3 * 32 + 16]) / 0.5
    np.testing.assert_allclose(boxes, [expected_first, expected_far])  # the neighbour suppressed
    rows[:, 5] = 0.2  # person scores below 0.3 everywhere: no box
    assert dwpose.decode_boxes(rows, ratio=1.0).shape == (0, 4)


def test_crop_and_simcc_decoding_round_trip():
    box = np.array([100.0, 50.0, 200.0, 350.0])
    matrix, extent = dwpose.crop_transform(box, (288, 384))
    # the box's centre lands on the crop's centre; the padded box keeps the crop's aspect
    np.testing.assert_allclose(matrix @ [150.0, 200.0, 1.0], [144.0, 192.0])
    np.testing.assert_allclose(extent, [375 * 288 / 384, 375])
    # a SimCC peak at crop pixel (72, 288) decodes to the image point that maps there
    simcc_x, simcc_y = np.zeros((1, 2, 576)), np.zeros((1, 2, 768))
    simcc_x[0, 0, 144], simcc_y[0, 0, 576] = 0.9, 0.8
    simcc_x[0, 1, 10] = 0.7  # y never positive: not found
    keypoints, scores = dwpose.decode_simcc(simcc_x, simcc_y, box, (288, 384))
    np.testing.assert_allclose(matrix @ [*keypoints[0], 1.0], [72.0, 288.0])
    np.testing.assert_allclose(scores, [0.8, 0.0])


def test_to_openpose_inserts_the_neck_and_reorders_the_body():
    keypoints = np.arange(133 * 2, dtype=float).reshape(1, 133, 2)
    scores = np.full((1, 133), 0.9)
    scores[0, 6] = 0.2  # one shoulder unseen: the neck is not drawn
    points, values = dwpose.to_openpose(keypoints, scores)
    assert points.shape == (1, 134, 2) and values.shape == (1, 134)
    np.testing.assert_allclose(points[0, 1], keypoints[0, [5, 6]].mean(axis=0))  # neck
    assert values[0, 1] == 0.0
    np.testing.assert_allclose(points[0, 2], keypoints[0, 6])  # right shoulder
    np.testing.assert_allclose(points[0, 0], keypoints[0, 0])  # nose stays
    np.testing.assert_allclose(points[0, 24:92], keypoints[0, 23:91])  # face after the neck


# --- the stylize step's conditioning in the pipeline -----------------------------------------


class _Recorder:
    """A stylize runner that keeps what it was given and rejects everything."""

    def __init__(self):
        self.inputs = []

    def record(self, batch):
        self.inputs += batch
        return [Reject(item.sample_id, "stylize", "recorded") for item in batch]

    def run(self, job, batches):
        from datagen.core.runner import run_inline

        for batch in batches:
            yield run_inline(job, self.record, batch)


@pytest.mark.parametrize("kind", [pytest.param("pose", marks=pytest.mark.slow), "dwpose"])
def test_stylize_gets_depth_maps_whatever_the_control_kind(kind, tiny_dir, tmp_path):
    from datagen.build.execute import run_step
    from datagen.build.plan import plan_build
    from datagen.build.settings import BuildConfig
    from datagen.build.stage_configs import stage_factories
    from datagen.build.steps import step
    from datagen.build.workdir import ShardWork
    from datagen.data.demo_clips import SAMPLE_CLIPS, write_samples
    from datagen.run.local import LocalRunner

    write_samples(tmp_path / "src", SAMPLE_CLIPS[:1])
    config = BuildConfig(
        source=str(tmp_path / "src"),
        out=str(tmp_path / "out"),
        tiny_dir=tiny_dir,
        control_kind=kind,
    )
    (shard,) = plan_build(config).shards
    work = ShardWork(config.work_root, shard)
    stage = ControlStage(ControlConfig(kind=kind, tiny_dir=tiny_dir, pose_detect_resolution=128))
    assert run_step(step("control"), work, config, LocalRunner(stage)).done == 1
    describe = LocalRunner(stage_factories(config)["describe"]())
    assert run_step(step("describe"), work, config, describe).done
    recorder = _Recorder()
    run_step(step("stylize"), work, config, recorder)
    (given,) = recorder.inputs
    (sample,) = work.samples()
    assert work.values("control", sample.sample_id)["stylize_control"] == "depth"
    control = work.video("control", sample.sample_id, "control")  # the skeletons
    from datagen.stages.plan import ref_frame_indices

    picked = [0, *ref_frame_indices(len(control), config.k_refs)]
    assert len(given.control_images) == len(given.frames) == config.k_refs + 1
    # depth maps: gray, each frame spanning 0..255 ...
    for image in given.control_images:
        assert np.array_equal(image[..., 0], image[..., 1]) and image.max() == 255
    # ... not the pose control video
    assert not any(
        np.array_equal(image, control[i])
        for image, i in zip(given.control_images, picked, strict=True)
    )
    depth = ControlStage(ControlConfig(kind="depth", tiny_dir=tiny_dir))
    (expected,) = depth([ControlInput("d", np.stack(given.frames))])
    assert np.array_equal(np.stack(given.control_images), expected.frames)
