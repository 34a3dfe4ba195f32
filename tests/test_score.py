"""Score stage: CSD port and checkpoint loading, DINOv2 structure score, the Stage contract."""

from __future__ import annotations

import argparse
import hashlib
import os
import pathlib
import pickle
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from datagen.core.stage import Reject
from datagen.models.registry import MissingModelError, directory_revision
from datagen.models.twins.csd import (
    CHECKPOINT_FILE,
    TWIN_ARCH,
    build_csd,
    rename_globals,
    save_as_numpy1,
    training_args,
)
from datagen.models.twins.dinov2 import build_dinov2
from datagen.stages.score import (
    CLIP_MEAN,
    CLIP_STD,
    REJECT_FRAME_COUNT_MISMATCH,
    REJECT_FRAME_SIZE_MISMATCH,
    REJECT_INVALID_FRAMES,
    REJECT_INVALID_STYLE_REF,
    REJECT_NO_STYLE_REFS,
    REJECT_NONFINITE_SCORE,
    CheckpointError,
    ScoreConfig,
    ScoreInput,
    ScoreOutput,
    ScoreStage,
    csd_checkpoint_globals,
    csd_style_embeddings,
    dino_score,
    dinov2_cls_embeddings,
    dinov2_input_size,
    load_csd,
    load_dinov2,
    sample_frame_indices,
)

torch.set_num_threads(1)


def sha256(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_raw(path: pathlib.Path) -> dict:
    with torch.serialization.safe_globals(csd_checkpoint_globals()):
        return torch.load(path, map_location="cpu", weights_only=True)


def pickle_globals(path: pathlib.Path) -> set[str]:
    """The globals a checkpoint's pickle names beyond torch's defaults (a static scan)."""
    return set(torch.serialization.get_unsafe_globals_in_checkpoint(path))


def gradient(height: int, width: int, phase: float = 0.0) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    image = np.stack([x / width + phase, y / height, 1 - x / width], axis=-1) % 1.0
    return (image * 255).astype(np.uint8)


def checkerboard(height: int, width: int, cells: int = 6) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    board = ((x * cells // width + y * cells // height) % 2).astype(np.uint8) * 255
    return np.stack([board, 255 - board, board // 2], axis=-1)


def video(kind: str, frames: int = 9, height: int = 48, width: int = 64) -> np.ndarray:
    if kind == "gradient":
        return np.stack([gradient(height, width, t / frames) for t in range(frames)])
    if kind == "checker":
        return np.stack([np.roll(checkerboard(height, width), t, axis=1) for t in range(frames)])
    raise ValueError(kind)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> pathlib.Path:
    return tmp_path_factory.mktemp("tiny-models")


@pytest.fixture(scope="module")
def stage(tiny_dir) -> ScoreStage:
    stage = ScoreStage(ScoreConfig(tiny_dir=str(tiny_dir), torch_threads=1))
    stage.setup()
    yield stage
    stage.teardown()


# --- config and frame sampling ---------------------------------------------------------------


def test_sample_frame_indices_are_even_and_start_at_first_frame():
    assert sample_frame_indices(81, 4) == [0, 27, 53, 80]
    assert sample_frame_indices(81, 1) == [0]
    assert sample_frame_indices(3, 4) == [0, 1, 2]
    assert sample_frame_indices(5, 5) == [0, 1, 2, 3, 4]
    for frames in range(1, 40):
        for count in range(1, 10):
            indices = sample_frame_indices(frames, count)
            assert indices[0] == 0
            assert len(indices) == min(frames, count)
            assert indices == sorted(set(indices)) and indices[-1] <= frames - 1
    with pytest.raises(ValueError):
        sample_frame_indices(0, 4)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"profile": "huge"}, "profile"),
        ({"csd_frames": 0}, "csd_frames"),
        ({"csd_frames": 2.5}, "csd_frames"),
        ({"batch_size": 0}, "batch_size"),
        ({"device": "tpu"}, "device"),
        ({"device": "cuda:x"}, "device"),
        ({"dino_dtype": "int8"}, "dino_dtype"),
        ({"torch_threads": 0}, "torch_threads"),
        ({"csd_hub_id": " "}, "csd_hub_id"),
    ],
)
def test_bad_config_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ScoreConfig(**kwargs)


def test_default_resources_share_a_gpu():
    stage = ScoreStage()
    assert (stage.resources.num_gpus, stage.resources.num_cpus) == (0.25, 1)
    assert not stage.loaded  # building a stage loads nothing
    assert stage.models() == {}  # known once the weights resolve
    assert stage.params()["csd_frames"] == 4


# --- twins and the CSD checkpoint loader -----------------------------------------------------


def test_twins_build_deterministically(tmp_path):
    for attempt in ("a", "b"):
        build_csd(tmp_path / attempt / "csd")
        build_dinov2(tmp_path / attempt / "dinov2")
    assert sha256(tmp_path / "a/csd" / CHECKPOINT_FILE) == sha256(
        tmp_path / "b/csd" / CHECKPOINT_FILE
    )
    assert directory_revision(tmp_path / "a/dinov2") == directory_revision(tmp_path / "b/dinov2")
    # Small, and in the released checkpoint's format.
    assert (tmp_path / "a/csd" / CHECKPOINT_FILE).stat().st_size < 2_000_000
    raw = read_raw(tmp_path / "a/csd" / CHECKPOINT_FILE)
    assert isinstance(raw["args"], argparse.Namespace)
    # The released file's globals (its Hub page: numpy.core.multiarray.scalar, numpy.dtype,
    # _codecs.encode, which torch allows by default), in numpy 1.x's spelling whatever numpy
    # built the twin.
    assert pickle_globals(tmp_path / "a/csd" / CHECKPOINT_FILE) == {
        "argparse.Namespace",
        "numpy.core.multiarray.scalar",
        "numpy.dtype",
    }
    assert type(raw["args"].lr) is np.float64 and type(raw["args"].iters) is np.int64
    assert raw["args"].feature_dtype == np.dtype("float32")
    keys = raw["model_state_dict"].keys()
    assert all(k.startswith("module.") for k in keys)
    assert {"module.last_layer_style", "module.last_layer_content"} <= set(keys)
    assert "module.backbone.proj" not in keys
    # 5 stem tensors + 12 per block + ln_post (2) + 2 heads, as CSD_CLIP (297 for 24 blocks).
    assert len(keys) == 5 + 12 * TWIN_ARCH["layers"] + 2 + 2
    assert sorted(p.name for p in (tmp_path / "a/dinov2").iterdir()) == [
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
    ]


def test_stage_loads_the_twin_through_the_production_loader(stage, tiny_dir):
    checkpoint = tiny_dir / "csd" / CHECKPOINT_FILE
    arch = stage.model_csd.arch
    assert (arch.width, arch.layers, arch.heads, arch.patch_size, arch.image_size) == (
        TWIN_ARCH["width"],
        TWIN_ARCH["layers"],
        TWIN_ARCH["heads"],
        TWIN_ARCH["patch_size"],
        TWIN_ARCH["image_size"],
    )
    assert arch.output_dim == TWIN_ARCH["output_dim"]
    assert arch.mlp_width == TWIN_ARCH["width"] * TWIN_ARCH["mlp_ratio"]
    # Every tensor of the file landed in the model, fp32.
    raw = read_raw(checkpoint)["model_state_dict"]
    loaded = stage.model_csd.state_dict()
    assert len(loaded) == len(raw)
    for key, value in raw.items():
        assert torch.equal(loaded[key.removeprefix("module.")], value), key
        assert loaded[key.removeprefix("module.")].dtype == torch.float32
    assert stage.model_dino.config.hidden_size == 32


def test_models_name_the_checkpoint_hash(stage, tiny_dir):
    refs = stage.models()
    assert set(refs) == {"csd", "dinov2"}
    assert refs["csd"].revision == "sha256:" + sha256(tiny_dir / "csd" / CHECKPOINT_FILE)
    assert refs["csd"].id == "tiny/csd"
    assert refs["dinov2"].revision == directory_revision(tiny_dir / "dinov2")


def _official_args() -> argparse.Namespace:
    """train_csd.py's args with numpy scalars, a numpy dtype and a numpy DType class."""
    args = training_args()
    args.min_lr = np.float64(1e-6)
    args.warmup_iters = np.int32(30000)
    args.dtype_class = type(np.dtype("float64"))  # numpy.dtypes.Float64DType (numpy >= 1.25)
    return args


@pytest.mark.parametrize(
    "saved_by, scalar_global",
    [
        ("numpy1", "numpy.core.multiarray.scalar"),  # the released file's spelling
        ("numpy2", "numpy._core.multiarray.scalar"),
    ],
)
def test_a_checkpoint_saved_the_official_way_loads_and_scores(
    saved_by, scalar_global, stage, tiny_dir, tmp_path
):
    state = read_raw(tiny_dir / "csd" / CHECKPOINT_FILE)["model_state_dict"]
    assert all(k.startswith("module.") for k in state)  # DDP prefixes, as train_csd.py saves
    checkpoint = {"model_state_dict": state, "args": _official_args(), "iter": 100000}
    path = tmp_path / CHECKPOINT_FILE
    (save_as_numpy1 if saved_by == "numpy1" else torch.save)(checkpoint, path)
    assert pickle_globals(path) == {
        "argparse.Namespace",
        scalar_global,
        "numpy.dtype",
        "numpy.dtypes.Float64DType",
    }
    # The loader that allowed argparse.Namespace only refused exactly this kind of file.
    only_namespace = torch.serialization.safe_globals([argparse.Namespace])
    with only_namespace, pytest.raises(pickle.UnpicklingError, match="numpy"):
        torch.load(path, map_location="cpu", weights_only=True)
    model = load_csd(path)
    images = [gradient(240, 320), checkerboard(200, 200)]
    got = csd_style_embeddings(model, images)
    assert torch.allclose(got, csd_style_embeddings(stage.model_csd, images), atol=1e-6)
    # The args come back as the numpy objects they were.
    from datagen.stages.score import read_csd_checkpoint

    _, args = read_csd_checkpoint(path)
    assert type(args.lr) is np.float64 and args.lr == np.float64(0.003)
    assert type(args.warmup_iters) is np.int32 and args.dtype_class is type(np.dtype("float64"))


def test_every_allowed_global_is_needed_by_an_official_checkpoint(tiny_dir, tmp_path):
    """No entry of the allowlist is there for nothing: without it, an official file fails."""
    state = read_raw(tiny_dir / "csd" / CHECKPOINT_FILE)["model_state_dict"]
    numpy1, numpy2 = tmp_path / "numpy1.bin", tmp_path / "numpy2.bin"
    save_as_numpy1({"model_state_dict": state, "args": training_args()}, numpy1)
    torch.save({"model_state_dict": state, "args": training_args()}, numpy2)
    allowed = csd_checkpoint_globals()

    def named(entry) -> str:
        return entry[1] if isinstance(entry, tuple) else f"{entry.__module__}.{entry.__qualname__}"

    def loads(path, entries) -> bool:
        try:
            with torch.serialization.safe_globals(entries):
                torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            return False
        return True

    assert loads(numpy1, allowed) and loads(numpy2, allowed)
    without = {
        "argparse.Namespace": [numpy1, numpy2],
        "numpy.dtype": [numpy1, numpy2],
        "numpy.core.multiarray.scalar": [numpy1],
        "numpy._core.multiarray.scalar": [numpy2],
        # No GLOBAL names it: numpy.dtype('f8', ...) returns one, which BUILD then sets up.
        "numpy.dtypes.Float64DType": [numpy1, numpy2],
    }
    for name, paths in without.items():
        rest = [entry for entry in allowed if named(entry) != name]
        assert len(rest) == len(allowed) - 1, name
        assert not any(loads(path, rest) for path in paths), name
    assert "_codecs.encode" in {named(entry) for entry in allowed}  # torch allows it already


def test_rename_globals_touches_only_global_opcodes():
    # The text of a GLOBAL inside a string stays as it is; only the opcode is renamed.
    payload = ["numpy._core.multiarray\nscalar\n", np.float64(2.5)]
    data = rename_globals(
        pickle.dumps(payload, protocol=2),
        {"numpy._core.multiarray scalar": "numpy.core.multiarray scalar"},
    )
    assert b"cnumpy.core.multiarray\nscalar\n" in data
    assert pickle.loads(data) == payload  # numpy 2 still resolves the numpy 1.x name
    with pytest.raises(ValueError, match="GLOBAL"):
        rename_globals(pickle.dumps(payload, protocol=4), {})


class _RunsShellWhenUnpickled:
    """os.system in a checkpoint: would create the marker file if it ran."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _EvalsWhenUnpickled:
    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return (eval, (f"open({str(self.marker)!r}, 'w').close()",))


@pytest.mark.parametrize(
    "payload, named",
    [
        (_RunsShellWhenUnpickled, "posix.system"),
        (_EvalsWhenUnpickled, "builtins.eval"),
        # An ndarray needs numpy's array reconstructor, which is not on the list either.
        (lambda marker: np.zeros(3), "multiarray._reconstruct"),
    ],
)
def test_a_smuggled_callable_is_refused_by_name_and_never_runs(payload, named, tiny_dir, tmp_path):
    marker = tmp_path / "pwned"
    args = _official_args()  # the allowed numpy objects are there too
    args.extra = payload(marker)
    state = read_raw(tiny_dir / "csd" / CHECKPOINT_FILE)["model_state_dict"]
    path = tmp_path / CHECKPOINT_FILE
    save_as_numpy1({"model_state_dict": state, "args": args}, path)
    with pytest.raises(CheckpointError, match=f"refused.*not unpickled.*{named}") as error:
        load_csd(path)
    assert "numpy.core.multiarray.scalar" not in str(error.value)  # only what is refused
    assert not marker.exists()
    # And the allowlist is not left registered after the load.
    assert not set(csd_checkpoint_globals()) & set(torch.serialization.get_safe_globals())


class _RunsCodeWhenUnpickled:
    """A payload that would create a file if the loader unpickled arbitrary objects."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def _foreign(kind: str, good: dict, tmp_path: pathlib.Path):
    state = dict(good["model_state_dict"])
    if kind == "missing_style_head":
        del state["module.last_layer_style"]
        return {"model_state_dict": state, "args": good["args"]}, "last_layer_style"
    if kind == "extra_key":
        state["module.backbone.proj"] = torch.zeros(64, 32)
        return {"model_state_dict": state, "args": good["args"]}, "unexpected.*backbone.proj"
    if kind == "missing_block_tensor":
        del state["module.backbone.transformer.resblocks.1.attn.out_proj.weight"]
        return {"model_state_dict": state}, "missing.*resblocks.1.attn.out_proj.weight"
    if kind == "wrong_head_shape":
        state["module.last_layer_content"] = torch.zeros(64, 16)
        return {"model_state_dict": state}, "wrong shape.*last_layer_content"
    if kind == "not_a_state_dict":
        return {"model_state_dict": {"fc.weight": torch.zeros(3, 3)}}, "not a CSD_CLIP"
    if kind == "list":
        return [torch.zeros(3)], "expected a dict"
    if kind == "unsafe_object":
        payload = _RunsCodeWhenUnpickled(tmp_path / "pwned")
        return {"model_state_dict": state, "args": payload}, "weights_only"
    raise ValueError(kind)


@pytest.mark.parametrize(
    "kind",
    [
        "missing_style_head",
        "extra_key",
        "missing_block_tensor",
        "wrong_head_shape",
        "not_a_state_dict",
        "list",
        "unsafe_object",
        "garbage_bytes",
    ],
)
def test_foreign_checkpoint_is_refused_with_a_clear_error(kind, tiny_dir, stage, tmp_path):
    path = tmp_path / CHECKPOINT_FILE
    if kind == "garbage_bytes":
        path.write_bytes(b"this is not a torch checkpoint")
        message = "not a readable torch file"
    else:
        payload, message = _foreign(kind, read_raw(tiny_dir / "csd" / CHECKPOINT_FILE), tmp_path)
        torch.save(payload, path)
    with pytest.raises(CheckpointError, match=message):
        load_csd(path)
    assert not (tmp_path / "pwned").exists()


def test_bare_state_dict_with_the_right_keys_loads(tiny_dir, tmp_path):
    raw = read_raw(tiny_dir / "csd" / CHECKPOINT_FILE)["model_state_dict"]
    torch.save({k.removeprefix("module."): v for k, v in raw.items()}, tmp_path / "bare.bin")
    model = load_csd(tmp_path / "bare.bin")
    # Without args the head count falls back to CLIP's width // 64 (1 for the twin's width 64).
    assert model.arch.heads == 1


# --- CSD math --------------------------------------------------------------------------------


def test_csd_of_an_image_with_itself_is_one(stage):
    images = [gradient(240, 320), checkerboard(200, 200)]
    embeddings = csd_style_embeddings(stage.model_csd, images + images[::-1])
    assert embeddings.shape == (4, TWIN_ARCH["output_dim"])
    assert torch.allclose(embeddings.norm(dim=-1), torch.ones(4), atol=1e-6)
    assert float(embeddings[0] @ embeddings[3]) == pytest.approx(1.0, abs=1e-5)
    assert float(embeddings[0] @ embeddings[1]) < 0.999  # and the twin does tell images apart


def _reference_pixels(image: np.ndarray, size: int) -> torch.Tensor:
    """CSD's eval transform by hand with PIL: short side -> size (bicubic), centre crop."""
    height, width = image.shape[:2]
    if height <= width:
        new_h, new_w = size, int(size * width / height)
    else:
        new_h, new_w = int(size * height / width), size
    resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BICUBIC))
    top, left = int(round((new_h - size) / 2)), int(round((new_w - size) / 2))
    crop = resized[top : top + size, left : left + size].astype(np.float64) / 255.0
    crop = (crop - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
    return torch.from_numpy(crop).permute(2, 0, 1)


def _reference_csd_forward(state: dict, heads: int, pixels: torch.Tensor) -> torch.Tensor:
    """CLIP ViT + CSD style head written from the raw state dict, in float64."""
    sd = {k.removeprefix("module."): v.double() for k, v in state.items()}

    def norm(x, prefix):
        return F.layer_norm(x, x.shape[-1:], sd[f"{prefix}.weight"], sd[f"{prefix}.bias"], 1e-5)

    conv = sd["backbone.conv1.weight"]
    x = F.conv2d(pixels, conv, stride=conv.shape[-1])  # (B, width, grid, grid)
    x = x.flatten(2).transpose(1, 2)
    batch, _, width = x.shape
    cls = sd["backbone.class_embedding"].expand(batch, 1, width)
    x = torch.cat([cls, x], dim=1) + sd["backbone.positional_embedding"]
    x = norm(x, "backbone.ln_pre")
    head_dim = width // heads
    block = 0
    while f"backbone.transformer.resblocks.{block}.ln_1.weight" in sd:
        p = f"backbone.transformer.resblocks.{block}"
        h = norm(x, f"{p}.ln_1")
        qkv = h @ sd[f"{p}.attn.in_proj_weight"].T + sd[f"{p}.attn.in_proj_bias"]
        q, k, v = (
            t.reshape(batch, -1, heads, head_dim).transpose(1, 2) for t in qkv.chunk(3, dim=-1)
        )
        attention = torch.softmax(q @ k.transpose(-1, -2) / head_dim**0.5, dim=-1) @ v
        attention = attention.transpose(1, 2).reshape(batch, -1, width)
        x = x + attention @ sd[f"{p}.attn.out_proj.weight"].T + sd[f"{p}.attn.out_proj.bias"]
        h = norm(x, f"{p}.ln_2")
        h = h @ sd[f"{p}.mlp.c_fc.weight"].T + sd[f"{p}.mlp.c_fc.bias"]
        h = h * torch.sigmoid(1.702 * h)  # QuickGELU
        x = x + h @ sd[f"{p}.mlp.c_proj.weight"].T + sd[f"{p}.mlp.c_proj.bias"]
        block += 1
    feature = norm(x[:, 0], "backbone.ln_post")
    return F.normalize(feature @ sd["last_layer_style"], dim=-1)


def test_csd_port_matches_an_independent_forward_from_the_raw_weights(stage, tiny_dir):
    raw = read_raw(tiny_dir / "csd" / CHECKPOINT_FILE)
    images = [
        gradient(240, 320),
        checkerboard(300, 224),
        np.random.default_rng(1).integers(0, 256, (256, 256, 3), dtype=np.uint8),
    ]
    size = TWIN_ARCH["image_size"]
    pixels = torch.stack([_reference_pixels(image, size) for image in images])
    expected = _reference_csd_forward(raw["model_state_dict"], raw["args"].vision_heads, pixels)
    got = csd_style_embeddings(stage.model_csd, images).double()
    assert (got - expected).abs().max() < 1e-5
    # The match is not trivial: the images' embeddings differ by far more than the tolerance.
    assert (expected[0] - expected[1]).abs().max() > 1e-2


# --- DINOv2 ----------------------------------------------------------------------------------


def test_dino_score_is_one_for_identical_videos_and_below_one_otherwise(stage, tiny_dir):
    model, processor = load_dinov2(tiny_dir / "dinov2")  # the plain function, no Stage
    raw = video("gradient")
    same = dinov2_cls_embeddings(model, processor, list(raw))
    assert same.shape == (len(raw), 32)
    assert dino_score(same, same.clone()) == pytest.approx(1.0, abs=1e-6)
    other = dinov2_cls_embeddings(model, processor, list(video("checker")))
    assert dino_score(same, other) < 0.999
    # Through the stage: identical videos score 1, different ones less.
    refs = [gradient(64, 64)]
    identical, different = stage(
        [
            ScoreInput("same", raw, raw.copy(), refs),
            ScoreInput("diff", raw, video("checker"), refs),
        ]
    )
    assert identical.dino_score == pytest.approx(1.0, abs=1e-5)
    assert different.dino_score < 0.999


def test_dinov2_input_size_keeps_the_whole_frame_on_the_patch_grid():
    budget = 224 * 224  # dinov2-base's crop: 16 x 16 patches of 14
    assert dinov2_input_size(480, 832, 14, budget) == (168, 294)  # 12 x 21 patches
    assert dinov2_input_size(300, 300, 14, budget) == (224, 224)  # a square: the crop size
    assert dinov2_input_size(832, 480, 14, budget) == (294, 168)
    for height, width in [(480, 832), (720, 1280), (64, 64), (1080, 1920), (100, 700), (7, 5)]:
        rows, cols = dinov2_input_size(height, width, 14, budget)
        assert rows % 14 == 0 and cols % 14 == 0
        # about the same pixel count, the aspect within rounding to whole patches
        assert 0.85 * budget <= rows * cols <= 1.15 * budget, (height, width)
        # the aspect as close as whole patches allow: within half a column of the row count's
        assert abs(cols / 14 - rows / 14 * width / height) <= 0.5, (height, width)
    # A frame too thin for the budget: one patch row or column, never a zero side.
    assert dinov2_input_size(1, 10_000, 14, budget) == (14, 14 * 256)
    assert dinov2_input_size(10_000, 1, 14, budget) == (14 * 256, 14)


def test_dino_score_sees_the_frame_edges_a_centre_crop_would_drop(stage, tiny_dir):
    model, processor = load_dinov2(tiny_dir / "dinov2")
    # 96 x 166: the production frames' 480 x 832 aspect, small for speed.
    raw = np.concatenate([gradient(96, 83), checkerboard(96, 83)], axis=1)
    edited = raw.copy()
    noise = np.random.default_rng(0).integers(0, 256, (96, 20, 3), dtype=np.uint8)
    edited[:, :20], edited[:, -20:] = noise, noise[:, ::-1]  # only the left and right 12%
    whole = dino_score(
        dinov2_cls_embeddings(model, processor, [raw]),
        dinov2_cls_embeddings(model, processor, [edited]),
    )
    assert whole < 0.9999
    # The processor's own path (resize 256, centre crop 224) never sees that change.
    with torch.inference_mode():
        pixels = processor(
            images=[raw, edited], return_tensors="pt", input_data_format="channels_last"
        )
        cropped = model(pixel_values=pixels["pixel_values"]).pooler_output
    assert dino_score(cropped[:1], cropped[1:]) == pytest.approx(1.0, abs=1e-9)


def test_dino_embeddings_of_mixed_frame_sizes_match_one_by_one(stage, tiny_dir):
    model, processor = load_dinov2(tiny_dir / "dinov2")
    images = [gradient(48, 64), checkerboard(96, 166), gradient(48, 64, 0.5), checkerboard(70, 70)]
    together = dinov2_cls_embeddings(model, processor, images, batch_size=1)
    alone = torch.cat([dinov2_cls_embeddings(model, processor, [image]) for image in images])
    assert together.shape == (4, model.config.hidden_size)
    assert torch.allclose(together, alone, atol=1e-5)
    assert dinov2_cls_embeddings(model, processor, []).shape == (0, model.config.hidden_size)
    # A 224 x 224 frame is already on the grid: it gets exactly the processor's rescaling and
    # mean/std normalisation, without the processor's resize and crop.
    square = np.random.default_rng(2).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    inputs = processor(
        images=[square],
        do_resize=False,
        do_center_crop=False,
        return_tensors="pt",
        input_data_format="channels_last",
    )
    with torch.inference_mode():
        expected = model(pixel_values=inputs["pixel_values"]).pooler_output
    assert torch.allclose(dinov2_cls_embeddings(model, processor, [square]), expected, atol=1e-5)


# --- the stage -------------------------------------------------------------------------------


def test_stage_returns_one_result_per_input_and_rejects_bad_samples(stage):
    raw, stylized = video("gradient"), video("checker")
    refs = [checkerboard(80, 60), gradient(64, 64)]
    batch = [
        ScoreInput("ok-1", raw, stylized, refs),
        ScoreInput("no-refs", raw, stylized, []),
        ScoreInput("count", raw, stylized[:5], refs),
        ScoreInput("size", raw, video("checker", height=32, width=64), refs),
        ScoreInput("dtype", raw.astype(np.float32), stylized, refs),
        ScoreInput("empty", raw[:0], stylized[:0], refs),
        ScoreInput("bad-ref", raw, stylized, [refs[0], refs[1][..., :2]]),
        ScoreInput("ok-2", stylized, raw, refs[:1]),
    ]
    rejects_before = stage.stats.rejects
    results = stage(batch)
    assert [r.sample_id for r in results] == [s.sample_id for s in batch]
    reasons = {r.sample_id: r.reason for r in results if isinstance(r, Reject)}
    assert reasons == {
        "no-refs": REJECT_NO_STYLE_REFS,
        "count": REJECT_FRAME_COUNT_MISMATCH,
        "size": REJECT_FRAME_SIZE_MISMATCH,
        "dtype": REJECT_INVALID_FRAMES,
        "empty": REJECT_INVALID_FRAMES,
        "bad-ref": REJECT_INVALID_STYLE_REF,
    }
    assert all(r.stage == "score" and r.detail for r in results if isinstance(r, Reject))
    assert stage.stats.rejects - rejects_before == 6
    for result in (results[0], results[-1]):
        assert isinstance(result, ScoreOutput)
        assert -1.0 <= result.csd_score <= 1.0 and -1.0 <= result.dino_score <= 1.0


def test_csd_score_is_the_mean_over_sampled_frames_and_references(stage):
    raw, stylized = video("gradient", frames=13), video("checker", frames=13)
    refs = [gradient(64, 96, 0.3), checkerboard(70, 70, cells=3)]
    alone = stage([ScoreInput("x", raw, stylized, refs)])[0]
    # Batched with other samples (so the forward passes mix them), the scores do not change.
    crowd = stage(
        [
            ScoreInput("a", stylized, raw, refs[:1]),
            ScoreInput("x", raw, stylized, refs),
            ScoreInput("b", raw, raw, refs),
        ]
    )
    assert crowd[1].csd_score == pytest.approx(alone.csd_score, abs=1e-6)
    assert crowd[1].dino_score == pytest.approx(alone.dino_score, abs=1e-6)
    # By definition: frames 0, 4, 8, 12 (csd_frames=4) against each reference, mean of cosines.
    indices = [0, 4, 8, 12]
    assert sample_frame_indices(13, stage.config.csd_frames) == indices
    frames = csd_style_embeddings(stage.model_csd, [stylized[i] for i in indices]).double()
    references = csd_style_embeddings(stage.model_csd, refs).double()
    pairs = [float(f @ r) for f in frames for r in references]
    assert len(pairs) == 8
    assert alone.csd_score == pytest.approx(sum(pairs) / len(pairs), abs=1e-6)
    # dino_score compares raw and stylized at the same sampled indices.
    model, processor = stage.model_dino, stage.dino_processor
    r = dinov2_cls_embeddings(model, processor, [raw[i] for i in indices])
    s = dinov2_cls_embeddings(model, processor, [stylized[i] for i in indices])
    assert alone.dino_score == pytest.approx(float(F.cosine_similarity(r, s).mean()), abs=1e-6)


def test_nonfinite_scores_from_broken_weights_are_rejected(tiny_dir, tmp_path, monkeypatch):
    # A local copy of the weights in the production profile (DATAGEN_MODEL_* directories), with
    # a NaN in the style head: the stage must reject, not write NaN scores.
    raw = read_raw(tiny_dir / "csd" / CHECKPOINT_FILE)
    raw["model_state_dict"]["module.last_layer_style"][0, 0] = float("nan")
    (tmp_path / "csd").mkdir()
    torch.save(raw, tmp_path / "csd" / CHECKPOINT_FILE)
    shutil.copytree(tiny_dir / "dinov2", tmp_path / "dinov2")
    monkeypatch.setenv("DATAGEN_MODEL_CSD", str(tmp_path / "csd"))
    monkeypatch.setenv("DATAGEN_MODEL_DINOV2", str(tmp_path / "dinov2"))
    broken = ScoreStage(ScoreConfig(profile="production", torch_threads=1))
    result = broken([ScoreInput("nan", video("gradient"), video("checker"), [gradient(64, 64)])])
    assert isinstance(result[0], Reject) and result[0].reason == REJECT_NONFINITE_SCORE
    revision = "sha256:" + sha256(tmp_path / "csd" / CHECKPOINT_FILE)
    assert broken.models()["csd"].revision == revision
    assert revision in result[0].detail
    broken.teardown()


def test_production_profile_without_weights_names_the_fetch_command(tmp_path, monkeypatch):
    import huggingface_hub.constants as hf_constants

    empty = tmp_path / "hf"
    empty.mkdir()
    for name in ("HF_HOME", "HF_HUB_CACHE"):
        monkeypatch.setenv(name, str(empty))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads these at import time, and transformers imported it already.
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(empty))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.delenv("DATAGEN_MODEL_CSD", raising=False)
    monkeypatch.delenv("DATAGEN_MODEL_DINOV2", raising=False)
    stage = ScoreStage(ScoreConfig(profile="production"))
    with pytest.raises(MissingModelError) as error:
        stage.setup()
    message = str(error.value)
    assert "tomg-group-umd/CSD-ViT-L" in message
    assert "hf download tomg-group-umd/CSD-ViT-L --include 'pytorch_model.bin'" in message
    assert "hf download facebook/dinov2-base" in message
    assert not stage.loaded
