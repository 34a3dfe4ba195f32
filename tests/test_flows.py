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
    state = build_ct(
        source=str(sources),
        out=str(out),
        styles=["ink_wash", "watercolor"],
        shard_size=2,
        csd_threshold=-1.0,
        use_ray=True,
        return_state=True,
    )
    summary = state.result()
    assert summary["written"] == 4 and summary["failed_shards"] == []
    task_runs, artifacts = flow_run_records(state.state_details.flow_run_id)
    # one task run per shard (every step, then the write) and the plan: not one per step
    assert sorted(task_runs) == ["plan", "shard-00000", "shard-00001"]
    assert set(task_runs.values()) == {"COMPLETED"}
    steps = ("control", "describe", "stylize", "animate", "caption", "score")
    for name in steps:  # each step's live progress artifact, at its final count
        progress = artifacts[f"ct-{name}-progress"]
        assert progress.data == 100.0, (name, progress)
        assert progress.description.startswith(f"{name}: 4 done, 0 rejected, 0 skipped, "), (
            progress.description
        )
        assert "0 in flight of 4" in progress.description and "1 actor" in progress.description
    shards = artifacts["ct-build-progress"]
    assert shards.data == 100.0 and shards.description.startswith("shards written of 2: 2;")
    # the pools at the end (one CPU-only actor per step here: nothing to resize)
    assert summary["pools"]["animate"] == {"actors": 1, "added": 0, "retired": 0, "replaced": 0}
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


def flow_run_records(flow_run_id) -> tuple[dict, dict]:
    """The flow run's task runs (name -> state type) and artifacts (key -> newest), from the
    Prefect API."""
    from prefect import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowRunFilter,
        FlowRunFilterId,
    )

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    return {r.name: r.state.type.value for r in runs}, {a.key: a for a in artifacts}


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


def test_shard_task_runs_stay_bounded_however_many_shards():
    from datagen.run.prefect import group_name, shard_groups

    few = [f"shard-{n:05d}" for n in range(7)]
    assert shard_groups(few) == [[s] for s in few]  # one task run per shard
    many = [f"shard-{n:05d}" for n in range(2500)]
    groups = shard_groups(many)
    assert len(groups) <= 1000 and {len(g) for g in groups} <= {3, 1}
    assert [s for g in groups for s in g] == many  # every shard once, in order
    assert group_name(groups[0]) == "shard-00000..shard-00002"
    assert group_name(["shard-00004"]) == "shard-00004"
