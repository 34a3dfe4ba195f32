"""The build flows end to end on the tiny profile, through Prefect (a temporary local server)."""

from __future__ import annotations

import pytest
from helpers import private_prefect
from typer.testing import CliRunner

from datagen.cli import app
from datagen.cli.build import load_flow
from datagen.data.dataset import Dataset, list_shards
from datagen.data.demo_clips import SAMPLE_CLIPS, write_samples
from datagen.tools.validate import validate_dataset

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def prefect_env(tmp_path_factory):
    """A private PREFECT_HOME, so the temporary server never shares a SQLite database."""
    home = tmp_path_factory.mktemp("prefect-home")
    with private_prefect(home):
        yield home


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sources")
    write_samples(folder, SAMPLE_CLIPS[:4])
    return folder


def test_build_ct_on_ray_then_rerun_adds_nothing(prefect_env, sources, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    build_ct = load_flow("ct")
    summary = build_ct(
        source=str(sources),
        out=str(out),
        styles=["ink_wash", "watercolor"],
        shard_size=2,
        csd_threshold=-1.0,
        use_ray=True,
    )
    assert summary["written"] == 4 and summary["failed_shards"] == []
    # every model loaded exactly once for the whole run, in its Ray actor
    assert summary["model_loads"] == {
        s: 1 for s in ("control", "describe", "stylize", "animate", "caption", "score")
    }
    report = validate_dataset(out / "ct")
    assert report.ok and report.rows == 4, [str(v) for v in report.violations]
    styles = {r["style_id"] for r in Dataset(out / "ct").index().to_pylist()}
    assert styles <= {"ink_wash", "watercolor"}

    result = CliRunner().invoke(
        app, ["filter", "--csd", "0.5", str(out / "ct"), str(out / "filtered")]
    )
    assert result.exit_code == 0, result.output
    assert "kept 4" in result.output  # the tiny CSD twin scores ~0.96

    shards = list_shards(out / "ct")
    again = build_ct(
        source=str(sources),
        out=str(out),
        styles=["ink_wash", "watercolor"],
        shard_size=2,
        csd_threshold=-1.0,
        use_ray=False,
    )
    assert again["written"] == 0 and again["already_committed"] == 4
    assert list_shards(out / "ct") == shards
    assert Dataset(out / "ct").index().num_rows == 4


def test_build_sft_writes_pending_candidates(prefect_env, sources, tmp_path_factory):
    out = tmp_path_factory.mktemp("out-sft")
    summary = load_flow("sft")(
        source=str(sources), out=str(out), styles=["pixel_art"], limit=2, use_ray=False
    )
    assert summary["written"] == 2
    index = Dataset(out / "sft").index()
    assert set(index["review_status"].to_pylist()) == {"pending"}
    assert validate_dataset(out / "sft").ok


def test_bad_parameters_fail_the_flow_before_any_work(prefect_env, sources, tmp_path):
    result = CliRunner().invoke(
        app,
        [
            "build",
            "ct",
            "--source",
            str(sources),
            "--out",
            str(tmp_path / "out"),
            "--style",
            "nope",
            "--no-ray",
        ],
    )
    assert result.exit_code == 1
    assert "unknown style 'nope'" in result.output
    assert not (tmp_path / "out").exists()
