"""Model registry: tiny twins built once and atomically; production weights found or named."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from datagen.cli import app
from datagen.models import (
    SOURCES,
    MissingModelError,
    build_twin,
    check_production,
    directory_revision,
    resolve,
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
    (snapshot / "config.json").write_text("{}")
    refs = snapshot.parent.parent / "refs"
    refs.mkdir()
    (refs / "main").write_text("a" * 40)
    resolved = resolve("dinov2", "production")
    assert resolved.path == snapshot
    assert resolved.ref.id == "facebook/dinov2-base" and resolved.ref.revision == "a" * 40


def test_a_local_directory_overrides_the_hub(empty_hf_cache, tmp_path, monkeypatch):
    local = tmp_path / "my-dinov2"
    local.mkdir()
    (local / "config.json").write_text("{}")
    monkeypatch.setenv(SOURCES["dinov2"].env, str(local))
    resolved = resolve("dinov2", "production")
    assert resolved.path == local and resolved.ref.revision.startswith("sha256:")
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
