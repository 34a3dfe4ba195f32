"""The command line, as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from datagen.cli import app
from datagen.data.dataset import read_index

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def test_filter_prints_kept_dropped_and_missing(dataset, tmp_path):
    result = invoke("filter", "--csd", "0.5", dataset, tmp_path / "out")
    assert result.exit_code == 0, result.output
    kept = read_index(tmp_path / "out").num_rows
    assert f"kept {kept}" in result.output
    assert "missing-score 1" in result.output
    assert "csd_below_threshold" in result.output


def test_filter_json_and_dry_run(dataset):
    result = invoke("filter", "--csd", "0.5", "--dry-run", "--json", dataset)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["total"] == 40 and summary["out"] is None
    assert summary["kept"] + summary["dropped"] + summary["missing"] == 40


@pytest.mark.parametrize("threshold", ["1.5", "-1.01"])
def test_threshold_outside_range_is_a_usage_error(dataset, tmp_path, threshold):
    result = invoke("filter", "--csd", threshold, dataset, tmp_path / "out")
    assert result.exit_code == 2
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["missing", "no_shards", "out_is_in", "not_empty", "no_criteria"])
def test_filter_refusals_exit_non_zero_with_one_clear_line(dataset, tmp_path, case):
    (tmp_path / "empty").mkdir()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    args = {
        "missing": ["--csd", "0.5", tmp_path / "nope", tmp_path / "o"],
        "no_shards": ["--csd", "0.5", tmp_path / "empty", tmp_path / "o"],
        "out_is_in": ["--csd", "0.5", dataset, dataset],
        "not_empty": ["--csd", "0.5", dataset, tmp_path / "full"],
        "no_criteria": [dataset, tmp_path / "o"],
    }[case]
    result = invoke("filter", *args)
    assert result.exit_code == 1
    assert result.output.startswith("error: ")
    assert "Traceback" not in result.output


def test_inspect_shows_counts_scores_and_schema(dataset):
    result = invoke("inspect", dataset)
    assert result.exit_code == 0, result.output
    assert "ct dataset, schema ct_row v2" in result.output
    assert "40 rows (40 unique sample_ids) in 4 shards" in result.output
    assert "csd_score" in result.output and "rejects: 3" in result.output
    summary = json.loads(invoke("inspect", "--json", dataset).output)
    assert summary["scores"]["csd_score"]["missing"] == 1
    assert summary["rejects"]["by_stage_reason"] == {"plan/too_few_frames": 3}


def test_validate_exit_codes(dataset, tmp_path):
    assert invoke("validate", dataset).exit_code == 0
    from conftest import write_dataset

    from datagen.data.synthetic import make_row

    bad = make_row(1)
    bad["caption_ns"] = "an anime girl runs"
    path = write_dataset(tmp_path / "bad", [make_row(0), bad])
    result = invoke("validate", path)
    assert result.exit_code == 1
    assert "row 1 [s00000001]: caption_ns_style_words" in result.output
    assert "1 violation(s)" in result.output


def test_installed_command_runs_without_importing_torch(dataset):
    code = (
        "import sys, runpy; sys.argv = ['datagen', 'filter', '--csd', '0.5', '--dry-run', "
        f"{str(dataset)!r}];\n"
        "try:\n    runpy.run_module('datagen.cli', run_name='__main__')\n"
        "except SystemExit as e:\n    assert not e.code, e.code\n"
        "assert 'torch' not in sys.modules, 'datagen filter imported torch'\n"
        "print('ok')"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("ok")


def test_build_with_an_empty_prefect_api_url_runs_on_a_healthy_temporary_server(tmp_path):
    """`PREFECT_API_URL=` (empty) means no server, as unset does: the flow runs on the temporary
    server and Prefect's events client works (left empty, it failed on every event)."""
    code = (
        "from datagen.cli.build import load_flow\n"
        "load_flow('ct')\n"
        "from prefect import flow, task\n"
        "probe = task(lambda i: i, name='probe')\n"
        "@flow\n"
        "def probes():\n"
        "    return [probe.submit(i).result() for i in range(3)]\n"
        "assert probes() == [0, 1, 2]\n"
    )
    env = os.environ | {"PREFECT_API_URL": "", "PREFECT_HOME": str(tmp_path / "prefect")}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Starting temporary server" in result.stderr + result.stdout
    assert "EventsWorker' failed" not in result.stderr, result.stderr[-3000:]


def recording_flow(monkeypatch) -> list[dict]:
    """Replace the flow `datagen build` runs by one that records its parameters, after binding
    them to the real flow's signature (so a name the flow does not take fails the test)."""
    import inspect

    from datagen.cli import build

    calls: list[dict] = []
    real_load = build.load_flow

    def load(split: str):
        signature = inspect.signature(real_load(split).fn)

        def flow(**parameters):
            signature.bind(**parameters)
            calls.append({"split": split, **parameters})
            return {"written": 0, "out": parameters["out"], "rejected": 0, "filtered": 0}

        return flow

    monkeypatch.setattr(build, "load_flow", load)
    return calls


def test_build_backend_and_key_block_options_reach_the_flow(monkeypatch, tmp_path):
    calls = recording_flow(monkeypatch)
    (tmp_path / "clips").mkdir()
    common = ["--source", tmp_path / "clips", "--out", tmp_path / "out", "--no-ray"]
    vlm = [
        "--caption-backend",
        "openai",
        "--caption-base-url",
        "http://127.0.0.1:8000/v1",
        "--caption-model",
        "served-vlm",
        "--vlm-api-key-block",
        "vlm-key",
    ]
    stylize = ["--stylize-backend", "http", "--stylize-url", "http://127.0.0.1:9/edit"]
    stylize += ["--stylize-api-key-block", "edit-key"]
    result = invoke("build", "sft", *common, *vlm, *stylize)
    assert result.exit_code == 0, result.output
    result = invoke("build", "ct", *common, *vlm, "--vlm-judge")
    assert result.exit_code == 0, result.output
    sft, ct = calls
    for call in (sft, ct):
        assert call["caption_backend"] == "openai" and call["caption_model"] == "served-vlm"
        assert call["caption_base_url"] == "http://127.0.0.1:8000/v1"
        assert call["vlm_api_key_block"] == "vlm-key" and call["use_ray"] is False
    assert (sft["stylize_backend"], sft["stylize_url"], sft["stylize_api_key_block"]) == (
        "http",
        "http://127.0.0.1:9/edit",
        "edit-key",
    )
    assert ct["vlm_judge"] is True and "stylize_backend" not in ct


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["ct", "--vlm-api-key-block", "vlm-key"], 1, "only used with caption_backend 'openai'"),
        (["sft", "--stylize-api-key-block", "edit-key"], 1, "only used with stylize_backend"),
        (["sft", "--stylize-backend", "http"], 1, "needs stylize_url"),
        (["ct", "--caption-backend", "openai", "--vlm-api-key-block", "sk-live-123"], 1, "looks"),
        (["ct", "--stylize-backend", "http", "--stylize-url", "http://h/e"], 2, "for sft builds"),
        (["ct", "--num-frames", "10"], 1, "num_frames must be 4k+1"),
        (["ct", "--controlnet-scale", "-1"], 1, "stylize: controlnet_scale must be"),
    ],
)
def test_build_refuses_bad_combinations_before_starting_anything(
    monkeypatch, tmp_path, args, code, message
):
    calls = recording_flow(monkeypatch)
    (tmp_path / "clips").mkdir()
    split, *rest = args
    result = invoke(
        "build", split, "--source", tmp_path / "clips", "--out", tmp_path / "out", *rest
    )
    assert result.exit_code == code, result.output
    assert message in result.output and result.output.startswith("error: ")
    assert "sk-live-123" not in result.output
    assert calls == [] and not (tmp_path / "out").exists()


def test_build_options_with_choices_are_checked_by_the_command_line(monkeypatch, tmp_path):
    calls = recording_flow(monkeypatch)
    (tmp_path / "clips").mkdir()
    paths = ["--source", tmp_path / "clips", "--out", tmp_path / "out"]
    for option, value, choices in [
        ("--profile", "huge", "'tiny', 'production'"),
        ("--instantstyle-blocks", "all", "'style', 'style_layout'"),
    ]:
        result = invoke("build", "ct", *paths, option, value)
        words = " ".join(result.output.replace("│", " ").split())  # the error box wraps
        assert result.exit_code == 2 and f"'{value}' is not one of {choices}" in words
    assert calls == []


def test_build_reports_an_unreadable_key_block_in_one_line(monkeypatch, tmp_path):
    from datagen.cli import build
    from datagen.core.api_keys import ApiKeyUnavailableError

    def load(split: str):
        def flow(**parameters):
            # what the flow raises when the block is missing (tests/test_api_keys.py)
            raise ApiKeyUnavailableError(
                f"caption: the Prefect Secret block {parameters['vlm_api_key_block']!r} does "
                "not exist on http://127.0.0.1:4200/api; create it with ..."
            )

        return flow

    monkeypatch.setattr(build, "load_flow", load)
    (tmp_path / "clips").mkdir()
    paths = ["--source", tmp_path / "clips", "--out", tmp_path / "out"]
    vlm = ["--caption-backend", "openai", "--vlm-api-key-block", "missing-key"]
    result = invoke("build", "ct", *paths, *vlm)
    assert result.exit_code == 1
    assert result.output.startswith("error: caption: the Prefect Secret block 'missing-key'")
    assert "Traceback" not in result.output


@pytest.mark.slow
def test_build_on_a_terminal_draws_progress_bars_instead_of_task_logs(tmp_path):
    """`datagen build` on a terminal (a pseudo-terminal here) shows a live bar per step with
    its counts, rate and ETA, and the shards written; the task runs' INFO lines stay in the
    Prefect API, off the screen."""
    import pty

    from datagen.data.demo_clips import SAMPLE_CLIPS, write_samples

    clips = tmp_path / "clips"
    write_samples(clips, SAMPLE_CLIPS[:2])
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"} | {
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "COLUMNS": "220",
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    command = [sys.executable, "-m", "datagen.cli", "build", "ct", "--no-ray"]
    command += ["--source", str(clips), "--out", str(tmp_path / "out"), "--shard-size", "1"]
    primary, secondary = pty.openpty()
    process = subprocess.Popen(
        command, stdin=secondary, stdout=secondary, stderr=secondary, env=env
    )
    os.close(secondary)
    chunks = []
    while True:
        try:
            chunk = os.read(primary, 65536)
        except OSError:  # the build ended and closed its side
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(primary)
    assert process.wait(timeout=600) == 0, b"".join(chunks).decode(errors="replace")[-4000:]
    text = b"".join(chunks).decode(errors="replace")
    final = text[text.rindex("control") :]  # the bars' last frame
    for step in ("control", "describe", "stylize", "animate", "caption", "score"):
        line = next(line for line in final.splitlines() if line.strip().startswith(step))
        assert "2/2" in line and "2 done" in line and "0 rejected" in line, line
        assert "samples/" in line and "ETA 0:00" in line and "1 actor" in line, line
    shards = next(line for line in final.splitlines() if line.strip().startswith("shards"))
    assert "2/2" in shards and "pairs written" in shards, shards
    assert "Task run" not in text, text[-4000:]  # no scroll of task logs
    assert "pairs written to" in final
