"""API keys from Prefect Secret blocks (datagen/core/api_keys.py), against a real temporary Prefect
server (`prefect_test_harness`, one per module) and the fake HTTP services: the key from the
block is what reaches the service, and it appears in no repr, log, error, pickle or row params.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import socket
from pathlib import Path

import numpy as np
import pytest
from fake_image_edit_server import FakeImageEditServer, invert
from fake_openai_server import FakeOpenAIServer, Reply
from helpers import private_prefect

from datagen.build.row import collect_provenance
from datagen.core.api_keys import (
    ApiKeyUnavailableError,
    SecretValue,
    check_key_source,
    describe_key_source,
    resolve_api_key,
)
from datagen.core.stage import Resources, Stage
from datagen.data.styles import Style
from datagen.run.local import LocalRunner
from datagen.stages.caption import CaptionConfig, CaptionInput, CaptionOutput, CaptionStage
from datagen.stages.judge import JudgeConfig, JudgeInput, JudgeOutput, JudgeStage
from datagen.stages.stylize import (
    IMAGE_EDIT_FAILED,
    StylizeConfig,
    StylizeInput,
    StylizeOutput,
    StylizeStage,
)
from datagen.stages.vlm import VLMServerError

TESTS = Path(__file__).resolve().parent

VLM_BLOCK = "datagen-test-vlm-key"
VLM_KEY = "sk-block-vlm-0123456789-secret"
EDIT_BLOCK = "datagen-test-edit-key"
EDIT_KEY = "sk-block-edit-9876543210-secret"
NUMERIC_BLOCK = "datagen-test-numeric-key"
NUMERIC_KEY = "0012345"  # JSON-decodable: must still come back as this exact string
DICT_BLOCK = "datagen-test-dict-secret"
DICT_VALUE = "dict-secret-value-42"
EMPTY_BLOCK = "datagen-test-empty-key"
SECRETS = (VLM_KEY, EDIT_KEY, DICT_VALUE)

CLEAN_NS = "A man walks a dog along a beach while the camera pans left."
STY = "A man walks a dog along a beach, painted in soft watercolor washes."
PASS = '{"same_content_and_motion": "yes", "style_applied": "yes", "artifacts": "no"}'


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory):
    """A temporary Prefect server (its own SQLite database) holding the test Secret blocks."""
    from prefect.blocks.system import Secret
    from prefect.testing.utilities import prefect_test_harness

    home = tmp_path_factory.mktemp("prefect-home")
    # the 2-core machine is shared: allow a slow start
    with private_prefect(home), prefect_test_harness(server_startup_timeout=180):
        Secret(value=VLM_KEY).save(VLM_BLOCK, overwrite=True)
        Secret(value=EDIT_KEY).save(EDIT_BLOCK, overwrite=True)
        Secret(value=NUMERIC_KEY).save(NUMERIC_BLOCK, overwrite=True)
        Secret(value={"key": DICT_VALUE}).save(DICT_BLOCK, overwrite=True)
        Secret(value="").save(EMPTY_BLOCK, overwrite=True)
        yield


def clip(frames: int = 9, height: int = 32, width: int = 48) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (frames, height, width, 3), np.uint8)


def caption_item(sample_id: str = "s1") -> CaptionInput:
    raw = clip()
    return CaptionInput(sample_id, raw, 255 - raw, "Watercolor", "soft watercolor washes")


def is_sty(request) -> bool:
    return any("rendered in this visual style" in t for t in request.texts())


def edit_sample(sample_id: str = "e1", refs: int = 2) -> StylizeInput:
    rng = np.random.default_rng(1)
    frames = [rng.integers(0, 256, (32, 48, 3), dtype=np.uint8) for _ in range(refs + 1)]
    style = Style("ink", "Ink", "ink wash painting", "photo")
    return StylizeInput(sample_id, frames, [f.copy() for f in frames], style, seed=3)


def assert_hidden(texts: list[str]) -> None:
    for text in texts:
        for secret in SECRETS:
            assert secret not in text


# --- without Prefect -------------------------------------------------------------------------


def test_secret_value_shows_itself_nowhere():
    value = SecretValue(VLM_KEY)
    assert value.reveal() == VLM_KEY and value and not SecretValue("")
    assert VLM_KEY not in repr(value) and VLM_KEY not in str(value) and VLM_KEY not in f"{value}"
    assert value.redact(f"echo Bearer {VLM_KEY}!") == "echo Bearer [redacted]!"
    assert SecretValue("").redact("text") == "text"
    with pytest.raises(TypeError, match="not pickled"):
        pickle.dumps(value)
    with pytest.raises(TypeError, match="not pickled"):
        pickle.dumps({"nested": [value]})


@pytest.mark.parametrize(
    ("env", "block", "message"),
    [
        ("SOME_KEY", "some-block", "not both"),
        ("has space", None, "NAME of an environment variable"),
        (None, "Upper-Case", "NAME of a Prefect Secret block"),
        (None, "under_score", "NAME of a Prefect Secret block"),
        (None, "secret/slug", "NAME of a Prefect Secret block"),
        (None, "", "NAME of a Prefect Secret block"),
        (None, "a" * 101, "NAME of a Prefect Secret block"),
        (None, "sk-0123abcdef", "looks like an API key"),
    ],
)
def test_bad_key_sources_are_config_errors_that_never_echo_the_value(env, block, message):
    with pytest.raises(ValueError, match=message) as raised:
        check_key_source(env, block)
    for value in (env, block):
        if value and value not in ("SOME_KEY", "some-block"):
            assert value not in str(raised.value)


def test_env_source_and_no_source(monkeypatch):
    monkeypatch.setenv("DATAGEN_TEST_SECRETS_KEY", VLM_KEY)
    assert resolve_api_key("DATAGEN_TEST_SECRETS_KEY", None, "test").reveal() == VLM_KEY
    monkeypatch.delenv("DATAGEN_TEST_SECRETS_KEY")
    unset = resolve_api_key("DATAGEN_TEST_SECRETS_KEY", None, "test")
    assert isinstance(unset, SecretValue) and not unset  # the caller decides
    assert resolve_api_key(None, None, "test") is None
    assert describe_key_source("X", None) == "$X"
    assert describe_key_source(None, "vlm-key") == "Prefect Secret block 'vlm-key'"


def test_a_block_replaces_the_default_variable_and_both_named_is_an_error():
    caption = CaptionConfig(backend="openai", api_key_block=VLM_BLOCK)
    assert caption.api_key_env is None and caption.api_key_block == VLM_BLOCK
    stylize = StylizeConfig(backend="http", url="http://127.0.0.1:9/e", api_key_block=EDIT_BLOCK)
    assert stylize.api_key_env is None
    with pytest.raises(ValueError, match="not both"):
        CaptionConfig(api_key_env="MY_KEY", api_key_block=VLM_BLOCK)
    with pytest.raises(ValueError, match="StylizeConfig: .*not both"):
        StylizeConfig(api_key_env="MY_KEY", api_key_block=EDIT_BLOCK)


# --- against a real Prefect server ---------------------------------------------------------


def test_the_key_comes_from_the_block(prefect_api):
    assert resolve_api_key(None, VLM_BLOCK, "test").reveal() == VLM_KEY
    numeric = resolve_api_key(None, NUMERIC_BLOCK, "test").reveal()
    assert numeric == NUMERIC_KEY and isinstance(numeric, str)  # not JSON-decoded to 12345


def test_a_missing_block_says_which_and_how_to_create_it(prefect_api):
    with pytest.raises(ApiKeyUnavailableError) as missing:
        resolve_api_key(None, "no-such-block", "caption VLM")
    message = str(missing.value)
    assert message.startswith("caption VLM: the Prefect Secret block 'no-such-block' does not")
    assert "prefect block create secret" in message
    assert "Secret(value=...).save('no-such-block')" in message
    assert "127.0.0.1" in message  # which Prefect API was asked


def test_a_block_that_is_not_a_string_key_is_refused_without_its_value(prefect_api):
    with pytest.raises(ApiKeyUnavailableError, match="holds a dict") as wrong:
        resolve_api_key(None, DICT_BLOCK, "test")
    assert DICT_VALUE not in str(wrong.value)
    with pytest.raises(ApiKeyUnavailableError, match="is empty"):
        resolve_api_key(None, EMPTY_BLOCK, "test")


def test_an_unreachable_prefect_api_is_a_clear_error(prefect_api):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    dead = {PREFECT_API_URL: f"http://127.0.0.1:{port}/api"}
    with temporary_settings(dead), pytest.raises(ApiKeyUnavailableError) as down:
        resolve_api_key(None, VLM_BLOCK, "stylize (http backend)")
    message = str(down.value)
    assert "unreachable" in message and "PREFECT_API_URL" in message
    assert f"127.0.0.1:{port}/api" in message and VLM_BLOCK in message


def test_caption_sends_the_block_key_and_shows_it_nowhere(prefect_api, caplog):
    caplog.set_level(logging.DEBUG)
    echo = {"echo": f"Bearer {VLM_KEY}"}  # a careless server that echoes the header
    with FakeOpenAIServer(api_key=VLM_KEY, models=("fake-vlm",)) as server:
        server.script = lambda request: STY if is_sty(request) else CLEAN_NS
        config = CaptionConfig(
            backend="openai",
            base_url=server.base_url,
            model="fake-vlm",
            api_key_block=VLM_BLOCK,
            num_frames=3,
            retry_backoff_s=0.01,
        )
        stage = CaptionStage(config)
        (result,) = stage([caption_item()])
        assert result == CaptionOutput("s1", CLEAN_NS, STY, attempts=1)
        # the fake answers 401 to anything else: the key from the block is what was sent
        assert {r.headers["authorization"] for r in server.requests} == {f"Bearer {VLM_KEY}"}

        provenance = collect_provenance({"caption": LocalRunner(stage)})
        params = provenance["caption"]["params"]
        assert params["api_key_block"] == VLM_BLOCK and params["api_key_env"] is None

        shipped = pickle.dumps(stage)  # a loaded stage travels as its config
        clone = pickle.loads(shipped)
        assert not clone.loaded and clone.backend is None
        server.requests.clear()
        (again,) = clone([caption_item("s2")])  # reads the key from the block itself
        assert isinstance(again, CaptionOutput)
        assert {r.headers["authorization"] for r in server.requests} == {f"Bearer {VLM_KEY}"}

        server.script = lambda request: Reply(401, echo)
        with pytest.raises(VLMServerError) as refused:
            stage([caption_item("s3")])
    assert VLM_BLOCK in str(refused.value)  # the hint names where the key came from
    assert_hidden(
        [
            repr(stage),
            repr(stage.config),
            repr(stage.backend),
            repr(vars(stage.backend)),
            repr(result),
            json.dumps(provenance),
            str(refused.value),
            caplog.text,
        ]
    )
    assert VLM_KEY.encode() not in shipped
    stage.teardown()
    clone.teardown()


def test_judge_reads_its_key_from_the_block(prefect_api):
    with FakeOpenAIServer(api_key=VLM_KEY, models=("fake-vlm",)) as server:
        server.script = lambda request: PASS
        config = JudgeConfig(
            backend="openai",
            base_url=server.base_url,
            model="fake-vlm",
            api_key_block=VLM_BLOCK,
            num_frames=2,
        )
        stage = JudgeStage(config)
        raw = clip(8)
        (verdict,) = stage([JudgeInput("j1", raw, 255 - raw, "ink wash")])
    assert isinstance(verdict, JudgeOutput) and verdict.verdict == "pass"
    assert server.requests and all(
        r.headers["authorization"] == f"Bearer {VLM_KEY}" for r in server.requests
    )
    assert stage.params()["api_key_block"] == VLM_BLOCK
    assert_hidden([json.dumps(stage.params()), repr(stage), repr(stage.backend)])
    assert VLM_KEY.encode() not in pickle.dumps(stage)
    stage.teardown()


def test_stylize_http_sends_the_block_key_and_shows_it_nowhere(prefect_api, caplog):
    caplog.set_level(logging.DEBUG)
    with FakeImageEditServer(api_key=EDIT_KEY) as server:
        config = StylizeConfig(
            backend="http",
            url=server.url,
            api_key_block=EDIT_BLOCK,
            num_style_refs=2,
            max_retries=1,
            retry_backoff_s=0.0,
            http_concurrency=1,
            timeout_s=10,
        )
        stage = StylizeStage(config)
        sample = edit_sample()
        (result,) = stage([sample])
        assert isinstance(result, StylizeOutput), result
        assert np.array_equal(result.stylized_first_frame, invert(sample.frames[0]))
        assert {r.headers["Authorization"] for r in server.requests} == {f"Bearer {EDIT_KEY}"}

        # A service that echoes the key in an error body: the reject gets it scrubbed.
        server.fail_next(400, message=f"bad request from {EDIT_KEY}")
        (rejected,) = stage([edit_sample("e2")])
        assert rejected.reason == IMAGE_EDIT_FAILED and "from ***" in rejected.detail
        server.fail_next(503, times=2, message=f"busy, {EDIT_KEY}")  # logged retries
        (unavailable,) = stage([edit_sample("e3")])

        provenance = collect_provenance({"stylize": LocalRunner(stage)})
        shipped, backend_shipped = pickle.dumps(stage), pickle.dumps(stage.backend)
        clone = pickle.loads(shipped)
        server.requests.clear()
        (again,) = clone([edit_sample("e4")])  # the clone reads the block itself
        assert isinstance(again, StylizeOutput)
        assert {r.headers["Authorization"] for r in server.requests} == {f"Bearer {EDIT_KEY}"}
    assert caplog.records  # the retries were logged
    assert_hidden(
        [
            repr(stage),
            repr(stage.config),
            repr(stage.backend),
            repr(rejected),
            repr(unavailable),
            json.dumps(result.params),
            json.dumps(provenance),
            caplog.text,
        ]
    )
    assert EDIT_BLOCK in repr(stage.backend)
    assert EDIT_KEY.encode() not in shipped and EDIT_KEY.encode() not in backend_shipped
    stage.teardown()
    clone.teardown()


def test_stages_with_a_missing_block_fail_at_setup_naming_it(prefect_api):
    caption = CaptionStage(
        CaptionConfig(
            backend="openai", base_url="http://127.0.0.1:9/v1", api_key_block="missing-vlm-key"
        )
    )
    with pytest.raises(ApiKeyUnavailableError, match="'missing-vlm-key' does not exist"):
        caption.setup()
    stylize = StylizeStage(
        StylizeConfig(backend="http", url="http://127.0.0.1:9/e", api_key_block="missing-edit-key")
    )
    with pytest.raises(ApiKeyUnavailableError, match="stylize.*'missing-edit-key' does not"):
        stylize.setup()
    assert not caption.loaded and not stylize.loaded


# --- a whole build, the key in a block on the build's Prefect server ------------------------


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    from datagen.data.demo_clips import SAMPLE_CLIPS, write_samples

    folder = tmp_path_factory.mktemp("clips")
    write_samples(folder, SAMPLE_CLIPS[:2])
    return folder


def prefect_records() -> list[str]:
    """Everything the Prefect server tells about runs: flow runs with their parameters, task
    runs, artifacts and logs (sent logs flushed first)."""
    from prefect import get_client
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()  # blocks until the logs queued for the API are sent
    texts: list[str] = []
    with get_client(sync_client=True) as client:
        for read in (
            client.read_flow_runs,
            client.read_task_runs,
            client.read_artifacts,
            client.read_logs,
        ):
            offset = 0
            while page := read(limit=200, offset=offset):
                texts += [json.dumps(item.model_dump(mode="json")) for item in page]
                offset += len(page)
    return texts


def build_ct(clips, out, **parameters) -> dict:
    """The build-ct flow that `datagen build ct` and the deployments run, with caption on an
    OpenAI-compatible server. Called directly, as tests/test_flows.py does: Prefect's console
    log handler keeps the stream it first wrote to, and a CliRunner's (or capfd's) stream is
    closed by the time the next run logs."""
    from datagen.cli.build import load_flow

    return load_flow("ct")(
        source=str(clips),
        out=str(out),
        styles=["watercolor"],
        caption_backend="openai",
        caption_model="fake-vlm",
        **parameters,
    )


@pytest.mark.slow
def test_a_build_on_ray_reads_the_vlm_key_from_its_block_and_records_it_nowhere(
    prefect_api, clips, tmp_path
):
    """A build with caption on a VLM server that requires the key, the key only in a Secret
    block: every request carries it, the rows are written, and the key is in no file of the
    output and no Prefect record (parameters, logs, artifacts). The caption stage's Ray actor
    is a process of its own, without this test's Prefect settings (PREFECT_API_URL is not in
    the environment): it reaches the block through the PREFECT_API_URL the build gives it."""
    from datagen.tools.validate import validate_dataset

    assert "PREFECT_API_URL" not in os.environ  # Ray's workers cannot inherit it
    out = tmp_path / "out"
    with FakeOpenAIServer(api_key=VLM_KEY, models=("fake-vlm",)) as server:
        server.script = lambda request: STY if is_sty(request) else CLEAN_NS
        summary = build_ct(
            clips,
            out,
            caption_base_url=server.base_url,
            vlm_api_key_block=VLM_BLOCK,
            use_ray=True,
        )
    assert summary["written"] == 2 and summary["failed_shards"] == []
    assert server.chat_requests(), "caption went through the fake VLM server"
    assert {r.headers["authorization"] for r in server.requests} == {f"Bearer {VLM_KEY}"}
    report = validate_dataset(out / "ct")
    assert report.ok and report.rows == 2, [str(v) for v in report.violations]

    files = [path for path in out.rglob("*") if path.is_file()]
    assert any(path.suffix == ".parquet" for path in files)
    for path in files:
        assert VLM_KEY.encode() not in path.read_bytes(), path
    records = prefect_records()
    assert any(VLM_BLOCK in text for text in records), "the flow run's parameters name the block"
    assert any("caption shard-00000" in text for text in records), "the run's logs came back"
    assert_hidden(records + [json.dumps(summary)])


@pytest.mark.slow
def test_a_build_naming_a_missing_block_fails_before_any_work(prefect_api, clips, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ApiKeyUnavailableError) as missing:
        build_ct(
            clips,
            out,
            caption_base_url="http://127.0.0.1:9/v1",
            vlm_api_key_block="no-vlm-key",
            use_ray=False,
        )
    message = str(missing.value)
    assert message.startswith(
        "caption and describe: the Prefect Secret block 'no-vlm-key' does not exist"
    )
    assert "prefect block create secret" in message
    assert not out.exists(), "nothing planned, locked or written"


class PrefectApiProbe(Stage):
    """Reads the test's VLM block when it loads, as a stage with a block-held key does, and
    answers with the PREFECT_API_URL of its process and a digest of the key it read."""

    name = "prefect-api-probe"

    def __init__(self):
        super().__init__(Resources(num_cpus=0.25))

    def _load(self) -> None:
        key = resolve_api_key(None, VLM_BLOCK, "probe")
        self.found = (
            os.environ.get("PREFECT_API_URL"),
            hashlib.sha256(key.reveal().encode()).hexdigest(),
        )

    def _process(self, batch):
        return [self.found for _ in batch]


def test_stage_actors_get_the_prefect_api_of_the_flow(prefect_api):
    from datagen.run.executors import prefect_api_url
    from datagen.run.ray import StagePool, init_ray, shutdown_ray

    url = prefect_api_url()
    assert url.startswith("http://127.0.0.1:") and url.endswith("/api")
    # The actor imports this module from the tests folder; PREFECT_API_URL reaches it only
    # through the pool's env (the harness sets it in this process's settings, not environ).
    shutdown_ray()
    init_ray(num_cpus=2, runtime_env={"env_vars": {"PYTHONPATH": str(TESTS)}})
    try:
        pool = StagePool(PrefectApiProbe, Resources(num_cpus=0.25), env={"PREFECT_API_URL": url})
        (answers,) = pool.map([["a", "b"]])
        pool.shutdown()
    finally:
        shutdown_ray()
    assert answers == [(url, hashlib.sha256(VLM_KEY.encode()).hexdigest())] * 2
