"""`--profile production` end to end, with the weights where real users keep them.

The tiny twins are placed in a Hugging Face cache under the production hub ids
(`datagen models tiny --hub-cache`; the CSD twin in the official checkpoint format, SDXL and its
ControlNet under their fp16 file names), and the build runs with `HF_HOME` pointing there and
`HF_HUB_OFFLINE=1`: the production loading code, settings and file checks, tiny sizes and steps
through the build's own options. Every weight file the build opens must come from that cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import private_prefect
from typer.testing import CliRunner

from datagen.cli import app
from datagen.data.dataset import Dataset
from datagen.data.demo_clips import SAMPLE_CLIPS, write_samples
from datagen.models.registry import SOURCES
from datagen.tools.validate import validate_dataset

pytestmark = pytest.mark.slow


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".onnx", ".ckpt")
# `datagen build` in a fresh process, as a user runs it, with an audit hook that records every
# weight file it opens (with --no-ray, every model loads in that process).
RUN_WITH_AUDIT = f"""
import atexit, json, os, sys
opened = []
def record(event, args):
    if event == "open" and args and isinstance(args[0], (str, bytes)):
        path = os.fsdecode(args[0])
        if path.endswith({WEIGHT_SUFFIXES!r}):
            opened.append(path)
sys.addaudithook(record)
atexit.register(lambda: open(os.environ["OPENED_LOG"], "w").write(json.dumps(opened)))
from datagen.cli import app
sys.argv = ["datagen", *sys.argv[1:]]
app()
"""


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("hf-home")
    twins = tmp_path_factory.mktemp("twins")
    result = CliRunner().invoke(
        app, ["models", "tiny", str(twins), "--hub-cache", str(home / "hub")]
    )
    assert result.exit_code == 0, result.output
    for source in SOURCES.values():
        assert source.hub_id in result.output
    return home


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("sources")
    write_samples(folder, SAMPLE_CLIPS[:2])
    return folder


@pytest.fixture(scope="module")
def prefect_env(tmp_path_factory):
    with private_prefect(tmp_path_factory.mktemp("prefect-home")):
        yield


@pytest.fixture
def offline_cache(hf_home, tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    for source in SOURCES.values():
        monkeypatch.delenv(source.env, raising=False)
    # the tiny profile's twins must not be built or read: point it at a folder never made
    monkeypatch.setenv("DATAGEN_TINY_MODELS", str(tmp_path / "no-tiny-models"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # style exemplars
    return hf_home


# tiny sizes and steps through the run-config file; the control kind through an option
RUN_CONFIG = """
limit = 2
shard_size = 2
num_frames = 5
height = 32
width = 48
fps = 8.0
stylize_steps = 1
stylize_resolution = 64
animate_steps = 1
caption_max_new_tokens = 8
describe_max_new_tokens = 8
vlm_max_pixels = 12544
vlm_accept_truncated = true  # the random-weight VLM never ends a sentence
csd_threshold = -1.0  # keep every pair: the twins' scores mean nothing
styles = ["watercolor", "ink_wash"]
"""


@pytest.mark.parametrize("control_kind", ["depth", "pose", "dwpose"])
def test_production_profile_builds_from_the_hub_cache_only(
    offline_cache, sources, prefect_env, tmp_path, control_kind
):
    run = tmp_path / "run.toml"
    run.write_text(RUN_CONFIG)
    out = tmp_path / "out"
    command = ["build", "ct", "--profile", "production", "--config", str(run), "--no-ray"]
    command += ["--source", str(sources), "--out", str(out), "--control-kind", control_kind]
    log = tmp_path / "opened.json"
    environment = os.environ | {"OPENED_LOG": str(log)}
    result = subprocess.run(
        [sys.executable, "-c", RUN_WITH_AUDIT, *command],
        env=environment,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "2 pairs written" in result.stdout, result.stdout[-2000:]
    opened = json.loads(log.read_text())

    report = validate_dataset(out / "ct")
    assert report.ok and report.rows == 2, [str(v) for v in report.violations]
    dataset = Dataset(out / "ct")
    row = dataset.get(dataset.index(columns=["sample_id"])["sample_id"][0].as_py())
    assert (row["num_frames"], row["height"], row["width"]) == (5, 32, 48)
    models = dict(row["models"])
    snapshots = {
        source.hub_id: offline_cache / "hub" / ("models--" + source.hub_id.replace("/", "--"))
        for source in SOURCES.values()
    }
    for role, ref in models.items():
        assert ref["id"] in snapshots, (role, ref)  # production hub ids, not tiny/...
        if role == "score.csd":  # the checkpoint file's hash (its released weights vary)
            cached = snapshots[ref["id"]] / "snapshots"
            [checkpoint] = cached.glob("*/pytorch_model.bin")
            assert ref["revision"].removeprefix("sha256:") == sha256(checkpoint.read_bytes())
        else:
            assert (snapshots[ref["id"]] / "snapshots" / ref["revision"]).is_dir(), role
    expected = {"sdxl", "controlnet_depth_sdxl", "ip_adapter", "wan_vace", "qwen_vl", "csd"}
    used = {ref["id"] for ref in models.values()}
    assert {SOURCES[k].hub_id for k in expected} <= used
    pose_model = {"depth": "depth_anything", "pose": "annotators", "dwpose": "dwpose"}
    assert SOURCES[pose_model[control_kind]].hub_id in used
    params = json.loads(row["params"])
    assert params["control"]["kind"] == control_kind == row["control_kind"]
    assert params["control"]["stylize_control"] == "depth"
    assert params["stylize"]["controlnet_condition"] == "depth"
    assert params["stylize"]["ip_adapter_scale_map"] == {"up": {"block_0": [0.0, 1.0, 0.0]}}
    assert params["animate"]["raw"]["flow_shift"] == 16.0
    content = params["describe"]["content"].strip().rstrip(".")
    assert content and params["stylize"]["prompt"].startswith(content)
    assert params["animate"]["raw"]["prompt"].startswith(content)

    assert opened, "the audit hook saw the weights being read"
    libraries = (sys.prefix, sys.base_prefix)  # packages' own data (text_unidecode's table)
    outside = [
        p
        for p in opened
        if not Path(p).resolve().is_relative_to(offline_cache) and not p.startswith(libraries)
    ]
    assert outside == [], outside
    assert not (tmp_path / "no-tiny-models").exists(), "no tiny twin was built or read"
