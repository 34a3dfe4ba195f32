"""Model registry: tiny twins built once and atomically; production weights found or named."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from datagen.cli import app
from datagen.core.stage import ModelRef
from datagen.models.registry import (
    SOURCES,
    MissingModelError,
    build_all_twins,
    build_twin,
    check_production,
    directory_revision,
    install_twins_in_hub_cache,
    matching,
    missing_files,
    relative_files,
    resolve,
    twin_hub_files,
    with_variant,
)


@pytest.fixture
def empty_hf_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for source in SOURCES.values():
        monkeypatch.delenv(source.env, raising=False)
    return tmp_path / "hf"


def test_twin_is_built_once_then_reused(tmp_path):
    first = build_twin("depth_anything", tmp_path)
    stamp = (first.path / "config.json").stat().st_mtime_ns
    again = resolve("depth_anything", "tiny", tmp_path)
    assert again.path == first.path and again.ref == first.ref
    assert (first.path / "config.json").stat().st_mtime_ns == stamp, "not rebuilt"
    assert first.ref.revision == directory_revision(first.path)
    assert not [p for p in tmp_path.iterdir() if ".building-" in p.name]


def test_force_rebuild_gives_the_same_revision(tmp_path):
    first = build_twin("depth_anything", tmp_path)
    rebuilt = build_twin("depth_anything", tmp_path, force=True)
    assert rebuilt.ref.revision == first.ref.revision


def test_every_production_model_is_reported_missing_with_its_fetch_command(empty_hf_cache):
    report = check_production()
    assert {entry["key"] for entry in report} == set(SOURCES)
    for entry in report:
        assert entry["present"] is False
        assert entry["fetch"].startswith(f"hf download {entry['hub_id']}")
    with pytest.raises(MissingModelError, match="stabilityai/stable-diffusion-xl-base-1.0"):
        resolve("sdxl", "production")


def test_a_cached_snapshot_is_found_and_its_commit_recorded(empty_hf_cache):
    snapshot = empty_hf_cache / "hub" / "models--facebook--dinov2-base" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    for name in SOURCES["dinov2"].files:
        (snapshot / name).write_text("{}")
    refs = snapshot.parent.parent / "refs"
    refs.mkdir()
    (refs / "main").write_text("a" * 40)
    resolved = resolve("dinov2", "production")
    assert resolved.path == snapshot and resolved.variant is None
    assert resolved.ref.id == "facebook/dinov2-base" and resolved.ref.revision == "a" * 40
    (snapshot / "model.safetensors").unlink()
    with pytest.raises(MissingModelError, match=r"lacks \['model.safetensors'\]"):
        resolve("dinov2", "production")


def test_a_local_directory_overrides_the_hub(empty_hf_cache, tmp_path, monkeypatch):
    local = tmp_path / "my-dinov2"
    local.mkdir()
    for name in SOURCES["dinov2"].files:
        (local / name).write_text("{}")
    monkeypatch.setenv(SOURCES["dinov2"].env, str(local))
    resolved = resolve("dinov2", "production")
    assert resolved.path == local and resolved.ref.revision.startswith("sha256:")
    (local / "preprocessor_config.json").unlink()
    with pytest.raises(MissingModelError, match=r"lacks \['preprocessor_config.json'\]"):
        resolve("dinov2", "production")
    monkeypatch.setenv(SOURCES["dinov2"].env, str(tmp_path / "nope"))
    with pytest.raises(MissingModelError, match="is not a directory"):
        resolve("dinov2", "production")


def test_unknown_keys_and_profiles_are_refused():
    with pytest.raises(KeyError, match="unknown model"):
        resolve("gpt", "tiny")
    with pytest.raises(ValueError, match="unknown profile"):
        resolve("sdxl", "medium")


def test_cli_models_check_lists_missing_and_exits_1(empty_hf_cache):
    result = CliRunner().invoke(app, ["models", "check", "--profile", "production", "--json"])
    assert result.exit_code == 1
    report = json.loads(result.output[: result.output.rindex("]") + 1])
    assert len(report) == len(SOURCES)
    text = CliRunner().invoke(app, ["models", "check"]).output
    assert "MISSING  sdxl" in text and "hf download Wan-AI/Wan2.1-VACE-14B-diffusers" in text


def test_cli_models_tiny_builds_the_named_twins(tmp_path):
    result = CliRunner().invoke(app, ["models", "tiny", str(tmp_path), "--only", "depth_anything"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "depth_anything" / "model.safetensors").exists()
    assert "sha256:" in result.output
    bad = CliRunner().invoke(app, ["models", "tiny", str(tmp_path), "--only", "gpt"])
    assert bad.exit_code == 2


# --- what is fetched is what is checked is what the loaders read ---------------------------

# stabilityai/stable-diffusion-xl-base-1.0's files (a public download script that lists the
# repository); diffusers/controlnet-depth-sdxl-1.0 holds config.json and its weights as .bin,
# .safetensors and .fp16.safetensors.
SDXL_REPO = [
    ".gitattributes", "01.png", "LICENSE.md", "README.md", "comparison.png", "files.txt",
    "model_index.json", "pipeline.png", "scheduler/scheduler_config.json",
    "sd_xl_base_1.0.safetensors", "sd_xl_base_1.0_0.9vae.safetensors",
    "sd_xl_offset_example-lora_1.0.safetensors",
    *(f"{t}/{f}" for t in ("tokenizer", "tokenizer_2") for f in (
        "merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json")),
    *(f"{t}/{f}" for t in ("text_encoder", "text_encoder_2") for f in (
        "config.json", "model.fp16.safetensors", "model.safetensors", "model.onnx",
        "openvino_model.bin", "openvino_model.xml")),
    "text_encoder_2/model.onnx_data",
    *(f"unet/{f}" for f in (
        "config.json", "diffusion_pytorch_model.fp16.safetensors",
        "diffusion_pytorch_model.safetensors", "model.onnx", "model.onnx_data",
        "openvino_model.bin", "openvino_model.xml")),
    *(f"{v}/{f}" for v in ("vae", "vae_1_0") for f in (
        "config.json", "diffusion_pytorch_model.fp16.safetensors",
        "diffusion_pytorch_model.safetensors")),
    *(f"{v}/{f}" for v in ("vae_decoder", "vae_encoder") for f in (
        "config.json", "model.onnx", "openvino_model.bin", "openvino_model.xml")),
]  # fmt: skip
CONTROLNET_REPO = [
    "README.md", "config.json", "diffusion_pytorch_model.bin",
    "diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.safetensors",
]  # fmt: skip


def test_the_fetch_command_includes_exactly_the_checked_patterns():
    for source in SOURCES.values():
        command = source.download_command()
        assert command == f"hf download {source.hub_id}" + "".join(
            f" --include '{pattern}'" for pattern in source.files
        )
        assert source.download_command("me/fork").startswith("hf download me/fork --include")
        if source.variant:
            assert source.plain_files != source.files
            assert all(f".{source.variant}." not in p for p in source.plain_files)
        else:
            assert source.plain_files == source.files


def test_sdxl_fetch_takes_the_fp16_files_the_loader_reads_and_nothing_else():
    fetched = matching(SOURCES["sdxl"].files, SDXL_REPO)
    weights = [name for name in fetched if name.endswith(".safetensors")]
    assert sorted(weights) == [
        "text_encoder/model.fp16.safetensors",
        "text_encoder_2/model.fp16.safetensors",
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "vae/diffusion_pytorch_model.fp16.safetensors",
    ]
    assert not [n for n in fetched if n.endswith((".onnx", ".onnx_data", ".bin", ".xml", ".png"))]
    assert not [n for n in fetched if n.startswith(("vae_1_0/", "vae_decoder/", "vae_encoder/"))]
    assert len(fetched) == 1 + 1 + 2 * 4 + 2 * 2 + 2 * 2  # index, scheduler, tokenizers, models
    assert matching(SOURCES["controlnet_depth_sdxl"].files, CONTROLNET_REPO) == [
        "config.json",
        "diffusion_pytorch_model.fp16.safetensors",
    ]


def test_wildcards_and_shard_indexes_are_checked(tmp_path):
    (tmp_path / "transformer").mkdir()
    assert missing_files(tmp_path, ("transformer/diffusion_pytorch_model*.safetensors*",)) == [
        "transformer/diffusion_pytorch_model*.safetensors*"
    ]
    index = {"weight_map": {"a": "diffusion_pytorch_model-00001-of-00002.safetensors",
                            "b": "diffusion_pytorch_model-00002-of-00002.safetensors"}}  # fmt: skip
    (tmp_path / "transformer/diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps(index)
    )
    (tmp_path / "transformer/diffusion_pytorch_model-00001-of-00002.safetensors").write_text("x")
    assert missing_files(tmp_path, ("transformer/diffusion_pytorch_model*.safetensors*",)) == [
        "transformer/diffusion_pytorch_model-00002-of-00002.safetensors "
        "(listed in transformer/diffusion_pytorch_model.safetensors.index.json)"
    ]
    (tmp_path / "transformer/diffusion_pytorch_model-00002-of-00002.safetensors").write_text("x")
    assert missing_files(tmp_path, ("transformer/diffusion_pytorch_model*.safetensors*",)) == []


def test_variant_names_follow_diffusers_and_transformers():
    assert with_variant("unet/diffusion_pytorch_model.safetensors", "fp16") == (
        "unet/diffusion_pytorch_model.fp16.safetensors"
    )
    assert with_variant("model.safetensors", "fp16") == "model.fp16.safetensors"
    assert with_variant("model.safetensors", None) == "model.safetensors"


# --- the twins where real weights live: a Hugging Face hub cache ----------------------------


@pytest.fixture(scope="module")
def twins(tmp_path_factory):
    root = tmp_path_factory.mktemp("twins")
    build_all_twins(root)
    return root


@pytest.fixture
def twin_hf_home(twins, tmp_path, monkeypatch):
    """HF_HOME holding every twin under its production hub id, offline, no overrides."""
    home = tmp_path / "hf-home"
    snapshots = install_twins_in_hub_cache(home / "hub", tiny_dir=twins)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for source in SOURCES.values():
        monkeypatch.delenv(source.env, raising=False)
    return home, snapshots


def test_every_twin_holds_every_file_the_production_check_requires(twins):
    for key, source in SOURCES.items():
        assert missing_files(twins / key, source.plain_files) == [], key
        placed = twin_hub_files(key, twins / key)
        assert missing_files_in(sorted(placed), source.files) == [], key


def missing_files_in(names, patterns):
    return [p for p in patterns if not matching([p], names)]


_OPENED: list[str] | None = None


def _record_opens(event, args):
    if _OPENED is not None and event in ("open", "os.listdir", "os.scandir") and args:
        target = args[0]
        if isinstance(target, (str, bytes, os.PathLike)):
            _OPENED.append(os.fsdecode(target))


sys.addaudithook(_record_opens)


def _reading(call):
    """(call's result, every path it opened or listed)."""
    global _OPENED
    _OPENED = []
    try:
        return call(), _OPENED
    finally:
        _OPENED = None


def _outside(paths, home):
    """The paths outside `home`, leaving out Python's own files (imports, the interpreter)."""
    python = (sys.prefix, sys.base_prefix, str(Path(__file__).parent.parent / "datagen"))
    return [
        p for p in paths
        if p not in ("", ".", *sys.path)  # the import system lists sys.path entries
        and not Path(p).is_relative_to(home) and not p.startswith(python)
        and not p.endswith((".py", ".pyc", ".so")) and not p.startswith(("/proc", "/dev", "/sys"))
    ]  # fmt: skip


def test_production_resolves_every_model_from_the_hub_cache_and_reads_nothing_else(
    twin_hf_home, twins, monkeypatch
):
    home, snapshots = twin_hf_home
    report = check_production()
    assert [e["key"] for e in report if not e["present"]] == []
    for entry in report:
        assert Path(entry["path"]) == snapshots[entry["key"]]
        assert entry["revision"] == snapshots[entry["key"]].name
        assert entry["variant"] == SOURCES[entry["key"]].variant
    resolved, opened = _reading(lambda: {key: resolve(key, "production") for key in SOURCES})
    for key, model in resolved.items():
        assert model.path == snapshots[key] and model.path.is_relative_to(home), key
        assert model.ref == ModelRef(SOURCES[key].hub_id, snapshots[key].name)
        assert model.variant == SOURCES[key].variant
        for name in relative_files(model.path):  # every file resolves into the cache's blobs
            assert (model.path / name).resolve().is_relative_to(home / "hub"), (key, name)
    assert opened and _outside(opened, home) == []
    # The recorder sees reads elsewhere: a local directory is walked and hashed.
    monkeypatch.setenv(SOURCES["dinov2"].env, str(twins / "dinov2"))
    _, opened = _reading(lambda: resolve("dinov2", "production"))
    assert str(twins / "dinov2" / "model.safetensors") in _outside(opened, home)
    sdxl = resolved["sdxl"]
    assert (sdxl.path / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_symlink()
    assert not (sdxl.path / "unet" / "diffusion_pytorch_model.safetensors").exists()


def test_the_hub_cache_layout_is_what_huggingface_hub_reads(twin_hf_home, twins):
    from huggingface_hub import scan_cache_dir, try_to_load_from_cache

    home, snapshots = twin_hf_home
    name = "unet/diffusion_pytorch_model.fp16.safetensors"
    found = try_to_load_from_cache(SOURCES["sdxl"].hub_id, name, cache_dir=home / "hub")
    assert Path(found) == snapshots["sdxl"] / name
    scanned = scan_cache_dir(home / "hub")
    assert not scanned.warnings
    assert {repo.repo_id for repo in scanned.repos} == {s.hub_id for s in SOURCES.values()}
    again = install_twins_in_hub_cache(home / "hub", tiny_dir=twins)
    assert again == snapshots  # same bytes, same commits


def test_the_production_sdxl_loaders_load_the_fp16_named_twin_from_the_cache(twin_hf_home):
    import torch
    from diffusers import ControlNetModel, StableDiffusionXLControlNetPipeline

    sdxl, controlnet = resolve("sdxl", "production"), resolve("controlnet_depth_sdxl", "production")
    assert sdxl.variant == controlnet.variant == "fp16"
    net = ControlNetModel.from_pretrained(
        controlnet.path, variant=controlnet.variant, dtype=torch.float32
    )
    pipe = StableDiffusionXLControlNetPipeline.from_pretrained(
        sdxl.path, controlnet=net, variant=sdxl.variant, dtype=torch.float32, add_watermarker=False
    )
    ip = resolve("ip_adapter", "production")
    pipe.load_ip_adapter(
        str(ip.path), subfolder="sdxl_models", weight_name="ip-adapter_sdxl.safetensors"
    )
    assert pipe.unet.config.cross_attention_dim == net.config.cross_attention_dim


def test_a_partial_fetch_resolves_though_the_hub_lists_files_never_fetched(twin_hf_home):
    errors = pytest.importorskip("huggingface_hub.errors")
    if not hasattr(errors, "IncompleteSnapshotError"):
        pytest.skip("this huggingface_hub keeps no file listings")
    from huggingface_hub import _tree_cache, snapshot_download

    home, snapshots = twin_hf_home
    snapshot = snapshots["sdxl"]
    # huggingface_hub 2.x keeps the repository's file listing beside the snapshot after a
    # download; after `hf download --include ...` it names files that were never fetched.
    never_fetched = [n for n in SDXL_REPO if not matching(SOURCES["sdxl"].files, [n])]
    entry = {"size": 1, "blob_id": "0" * 40}
    listing = {n: entry for n in relative_files(snapshot) + never_fetched}
    tree = snapshot.parents[1] / "trees" / f"{snapshot.name}.json"
    tree.parent.mkdir()
    tree.write_text(json.dumps({"format_version": 1, "files": listing}))
    with pytest.raises(errors.IncompleteSnapshotError):  # what a plain lookup would meet
        snapshot_download(SOURCES["sdxl"].hub_id, local_files_only=True, cache_dir=home / "hub")
    assert resolve("sdxl", "production").variant == "fp16"
    # A file the patterns take, named by the listing but absent, is missing.
    listing["tokenizer/vocab.json"] = entry
    tree.write_text(json.dumps({"format_version": 1, "files": listing}))
    _tree_cache._IN_MEMORY_TREE_CACHE.clear()  # listings read are kept in memory by path
    with pytest.raises(MissingModelError, match=r"1 file\(s\) are missing \(tokenizer/vocab"):
        resolve("sdxl", "production")
    _tree_cache._IN_MEMORY_TREE_CACHE.clear()


def test_a_pattern_that_matches_nothing_is_named_with_the_fetch_command(twin_hf_home):
    home, snapshots = twin_hf_home
    snapshot = snapshots["sdxl"]
    for name in relative_files(snapshot / "tokenizer_2"):
        (snapshot / "tokenizer_2" / name).unlink()
    with pytest.raises(MissingModelError) as caught:
        resolve("sdxl", "production")
    first = str(caught.value).splitlines()[0]
    assert "lacks ['tokenizer_2/*']" in first and SOURCES["sdxl"].hub_id in first
    assert SOURCES["sdxl"].download_command() in str(caught.value)
    (entry,) = [e for e in check_production() if e["key"] == "sdxl"]
    assert entry["present"] is False and "lacks ['tokenizer_2/*']" in entry["error"]


def test_a_snapshot_with_plain_weights_resolves_without_the_variant(twin_hf_home, twins):
    home, snapshots = twin_hf_home
    snapshot = snapshots["controlnet_depth_sdxl"]
    (snapshot / "diffusion_pytorch_model.fp16.safetensors").unlink()
    with pytest.raises(MissingModelError, match=r"diffusion_pytorch_model\.fp16\.safetensors"):
        resolve("controlnet_depth_sdxl", "production")
    shutil.copyfile(
        twins / "controlnet_depth_sdxl" / "diffusion_pytorch_model.safetensors",
        snapshot / "diffusion_pytorch_model.safetensors",
    )
    assert resolve("controlnet_depth_sdxl", "production").variant is None


def test_a_local_twin_directory_resolves_with_plain_names(twins, empty_hf_cache, monkeypatch):
    monkeypatch.setenv(SOURCES["sdxl"].env, str(twins / "sdxl"))
    resolved = resolve("sdxl", "production")
    assert resolved.path == twins / "sdxl" and resolved.variant is None
