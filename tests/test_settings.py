"""The build's settings: one definition (datagen/build/settings.py) behind the flows' parameters,
`datagen build`'s options and run-config files, each setting reaching its stage."""

from __future__ import annotations

import dataclasses
import importlib.util

import pytest
from typer.testing import CliRunner

from datagen.build.settings import (
    BuildConfig,
    BuildConfigError,
    build_config,
    read_run_config,
    settings_fields,
)
from datagen.build.stage_configs import stage_config
from datagen.cli import app
from datagen.core.package_data import package_data_dir


def load_flow(split: str):
    path = package_data_dir("flows") / f"build_{split}.py"
    spec = importlib.util.spec_from_file_location(f"test_flow_{split}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, f"build_{split}")


@pytest.fixture
def clips(tmp_path):
    (tmp_path / "clips").mkdir()
    return tmp_path / "clips"


@pytest.mark.parametrize("split", ["ct", "sft"])
def test_flow_parameters_are_the_settings_of_the_tier(split):
    flow = load_flow(split)
    names = [f.name for f in settings_fields(split)]
    assert list(flow.parameters.properties) == names + ["config", "use_ray"]
    for field in settings_fields(split):
        described = flow.parameters.properties[field.name]
        assert described["description"].startswith(field.metadata["help"]), field.name
        assert described["default"] is None  # unset: the run-config file or the default
        if field.metadata["choices"]:
            enum = described["anyOf"][0]["enum"]
            assert enum == list(field.metadata["choices"])
    other = "sft" if split == "ct" else "ct"
    only_other = {f.name for f in settings_fields(other)} - set(names)
    assert only_other, "each tier has settings of its own"
    assert not only_other & set(flow.parameters.properties)


def test_every_setting_is_a_build_option_named_after_it():
    result = CliRunner().invoke(app, ["build", "--help"], env={"COLUMNS": "400"})
    assert result.exit_code == 0
    for field in dataclasses.fields(BuildConfig):
        if not field.metadata["exposed"]:
            continue
        flag = "--style" if field.name == "styles" else "--" + field.name.replace("_", "-")
        assert flag in result.output, flag
    for older in ("--k", "--csd"):  # earlier spellings still work
        assert older in result.output


def test_stage_settings_reach_the_stage_configs(clips, tmp_path):
    values = {
        "stylize_guidance_scale": 7.5,
        "controlnet_scale": 0.8,
        "ip_adapter_scale": 0.7,
        "instantstyle_blocks": "style_layout",
        "animate_guidance_scale": 4.0,
        "flow_shift": 12.0,
        "animate_conditioning_scale": 0.9,
        "dwpose_resolution": 512,
    }
    mapped = {f.name for f in dataclasses.fields(BuildConfig) if f.metadata["stage"]}
    assert mapped == set(values), "every stage setting is exercised here"
    config = BuildConfig(source=str(clips), out=str(tmp_path / "out"), **values)
    for field in dataclasses.fields(BuildConfig):
        if field.metadata["stage"]:
            stage, name = field.metadata["stage"]
            assert getattr(stage_config(stage, config), name) == values[field.name]
    # sizes, steps and budgets from the profile's defaults unless set
    sized = BuildConfig(
        source=str(clips),
        out=str(tmp_path / "out"),
        num_frames=13,
        height=32,
        width=48,
        stylize_steps=3,
        animate_steps=4,
        stylize_resolution=128,
        caption_max_new_tokens=40,
        vlm_max_pixels=64 * 64,
        control_kind="pose",
    )
    animate = stage_config("animate", sized)
    assert (animate.num_frames, animate.height, animate.width, animate.steps) == (13, 32, 48, 4)
    stylize = stage_config("stylize", sized)
    assert (stylize.steps, stylize.resolution) == (3, 128)
    caption = stage_config("caption", sized)
    assert (caption.max_new_tokens, caption.max_pixels) == (40, 64 * 64)
    assert stage_config("control", sized).kind == "pose"
    # unset stage settings keep the stage's own defaults
    plain = stage_config("animate", BuildConfig(source=str(clips), out=str(tmp_path / "out")))
    assert plain.flow_shift == type(plain)().flow_shift


def test_a_bad_stage_setting_fails_up_front_under_its_own_name(clips, tmp_path):
    with pytest.raises(BuildConfigError, match="animate: flow_shift must be") as raised:
        BuildConfig(source=str(clips), out=str(tmp_path / "out"), flow_shift=0.0)
    assert "conditioning" not in str(raised.value)
    assert not (tmp_path / "out").exists()


def test_run_config_file_then_given_settings(clips, tmp_path):
    run = tmp_path / "run.toml"
    run.write_text(
        f'source = "{clips}"\nout = "{tmp_path / "out"}"\nnum_frames = 9\nshard_size = 3\n'
        'styles = ["ink_wash", "watercolor"]\nflow_shift = 10.0\n'
    )
    config = build_config("ct", {"num_frames": 5, "shard_size": None}, run)
    assert (config.num_frames, config.shard_size, config.flow_shift) == (5, 3, 10.0)
    run.write_text(run.read_text().replace("flow_shift = 10.0", "flow_shift = 12"))
    assert build_config("ct", {}, run).flow_shift == 12.0  # a TOML integer for a float
    assert config.styles == ("ink_wash", "watercolor")
    assert build_config("ct", {}, run).num_frames == 9


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("num_frame = 9\n", "unknown setting 'num_frame' (did you mean 'num_frames'?)"),
        ("bogus = 1\n", "unknown setting 'bogus'"),
        ("csd_threshold = 0.4\n", "'csd_threshold' is not a setting of sft builds"),
        ("split = 'ct'\n", "unknown setting 'split'"),
        ("num_frames = [\n", "run-config file"),
        ("num_frames = 'nine'\n", "num_frames = 'nine': Input should be a valid integer"),
        ("control_kind = 'edges'\n", "control_kind = 'edges': Input should be 'depth'"),
    ],
)
def test_run_config_file_refuses_unknown_keys_by_name(tmp_path, text, message):
    run = tmp_path / "run.toml"
    run.write_text(text)
    with pytest.raises(BuildConfigError, match="run-config file") as raised:
        read_run_config(run, "sft")
    assert message in str(raised.value)


def test_missing_run_config_and_missing_source_are_clear(tmp_path):
    with pytest.raises(BuildConfigError, match="does not exist"):
        build_config("ct", {}, tmp_path / "absent.toml")
    with pytest.raises(BuildConfigError, match="source and out must be given"):
        build_config("ct", {"limit": 1})
    with pytest.raises(BuildConfigError, match="unknown setting 'limits'"):
        build_config("ct", {"limits": 1})


def test_cli_config_file_reaches_the_flow_as_a_parameter(monkeypatch, clips, tmp_path):
    from datagen.cli import build

    calls = []

    def load(split):
        def flow(**parameters):
            calls.append(parameters)
            return {"written": 0, "rejected": 0, "filtered": 0, "out": parameters.get("out")}

        return flow

    monkeypatch.setattr(build, "load_flow", load)
    run = tmp_path / "run.toml"
    run.write_text(f'source = "{clips}"\nout = "{tmp_path / "out"}"\nanimate_steps = 3\n')
    result = CliRunner().invoke(
        app, ["build", "ct", "--config", str(run), "--num-frames", "5", "--no-ray"]
    )
    assert result.exit_code == 0, result.output
    [call] = calls
    assert call == {"config": str(run), "num_frames": 5, "use_ray": False}
    # the same file as a deployment parameter: the flow validates it like any other
    flow = load_flow("ct")
    assert flow.validate_parameters({"config": str(run)})["config"] == str(run)
    run.write_text('source = "x"\nnum_framez = 5\n')
    result = CliRunner().invoke(app, ["build", "ct", "--config", str(run)])
    assert result.exit_code == 1 and "unknown setting 'num_framez'" in result.output


def test_settings_are_checked_strictly_but_never_converted(monkeypatch, tmp_path):
    # An int given for a float setting stays an int: the work-dir key hashes the values as
    # given, and this is the key earlier releases gave these settings (before pydantic checked
    # them); tests/test_pipeline.py pins more keys.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "clips").mkdir()
    given = BuildConfig(
        source="clips",
        out="out",
        fps=8,
        flow_shift=10,
        csd_threshold=1,
        stage_timeout_s=100,
        controlnet_scale=1,
    )
    assert type(given.fps) is int and type(given.flow_shift) is int
    assert given.work_root.as_posix() == "out/_work/ct-69db3f82bd4e"
    message = "limit must be a valid integer, got 'x'; seed must be a valid integer, got True"
    with pytest.raises(BuildConfigError, match=message):
        BuildConfig(source="clips", out="out", limit="x", seed=True)
    with pytest.raises(BuildConfigError, match=r"k_refs must be <= 16, got 17; crf must be >= 0"):
        BuildConfig(source="clips", out="out", k_refs=17, crf=-1)
