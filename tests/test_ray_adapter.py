"""Ray adapter: models load once per actor, batches go to the least busy actor and come back
as they complete, in-flight is bounded."""

from __future__ import annotations

import time

import pytest

from datagen.core.stage import Reject, Resources, Stage
from datagen.run.ray import StagePool, init_ray, ray_options, shutdown_ray


class SquareStage(Stage):
    """A real Stage with trivial compute: rejects negative numbers, squares the rest."""

    name = "square"

    def __init__(self, delay: float = 0.0):
        super().__init__(Resources(num_cpus=0.25))
        self.delay = delay

    def _load(self) -> None:
        self.model = lambda x: x * x

    def _process(self, batch):
        time.sleep(self.delay)
        return [
            self.reject(str(x), "negative", f"{x} < 0") if x < 0 else self.model(x) for x in batch
        ]


def test_ray_options_translate_declared_resources():
    assert ray_options(Resources(num_gpus=0.25, num_cpus=2)) == {"num_gpus": 0.25, "num_cpus": 2}
    with pytest.raises(ValueError, match="num_gpus"):
        Resources(num_gpus=-1)
    with pytest.raises(ValueError, match="whole number"):
        Resources(num_gpus=1.5)


def test_each_actor_loads_once_and_serves_every_batch(ray_local):
    pool = StagePool(SquareStage, Resources(num_cpus=0.25), size=2)
    batches = [[i, -i, i + 1] for i in range(1, 9)]
    results = list(pool.map(batches))
    assert sorted(r[0] for r in results) == [i * i for i in range(1, 9)]
    assert all(isinstance(r[1], Reject) and r[1].reason == "negative" for r in results)
    stats = pool.stats()
    assert [s.loads for s in stats] == [1, 1], "one model load per actor per run"
    assert sum(s.batches for s in stats) == 8 and sum(s.rejects for s in stats) == 8
    pool.shutdown()


def test_backpressure_bounds_batches_in_flight(ray_local):
    pool = StagePool(
        lambda: SquareStage(delay=0.05), Resources(num_cpus=0.25), size=1, max_in_flight=2
    )
    submitted = []

    def batches():
        for i in range(6):
            submitted.append(i)
            yield [i]

    consumed = 0
    for _ in pool.map(batches()):
        consumed += 1
        assert len(submitted) - consumed <= 2
    assert consumed == 6
    pool.shutdown()


class FragileStage(Stage):
    """Dies (the whole worker process) the first time it sees 'die', hangs on 'hang'."""

    name = "fragile"

    def __init__(self, marker: str):
        super().__init__(Resources(num_cpus=0.25))
        self.marker = marker

    def _load(self) -> None:
        self.model = str.upper

    def _process(self, batch):
        import os

        if "die" in batch and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            os._exit(1)
        if "hang" in batch:
            time.sleep(3600)
        return [self.model(x) for x in batch]


class FragileFactory:
    def __init__(self, marker: str):
        self.marker = marker

    def __call__(self):
        return FragileStage(self.marker)


def test_a_dead_actor_is_replaced_and_its_batch_retried_once(ray_local, tmp_path):
    pool = StagePool(
        FragileFactory(str(tmp_path / "died")), Resources(num_cpus=0.25), name="fragile"
    )
    results = list(pool.map([["a"], ["die", "b"], ["c"]]))
    # the batch an actor died under runs again sample by sample, each once
    assert sorted(r for batch in results for r in batch) == ["A", "B", "C", "DIE"]
    assert pool.replacements == 1 and (tmp_path / "died").exists()
    pool.shutdown()


class PoisonStage(FragileStage):
    """Kills its worker process on 'poison', every time."""

    def _process(self, batch):
        import os

        if "poison" in batch:
            os._exit(1)
        return [self.model(x) for x in batch]


class PoisonFactory(FragileFactory):
    def __call__(self):
        return PoisonStage(self.marker)


def test_a_sample_that_kills_its_actor_twice_is_rejected_and_its_batch_mates_are_not(
    ray_local, tmp_path
):
    pool = StagePool(PoisonFactory(""), Resources(num_cpus=0.25), size=2, name="fragile")
    results = [r for batch in pool.map([["a", "poison", "b"], ["c"]]) for r in batch]
    (reject,) = [r for r in results if isinstance(r, Reject)]
    assert (reject.sample_id, reject.stage, reject.reason) == ("'poison'", "fragile", "actor_died")
    assert sorted(r for r in results if isinstance(r, str)) == ["A", "B", "C"]
    assert pool.replacements == 2  # one per death, started in the background
    assert sorted(pool.map([["d"]])) == [["D"]]
    deadline = time.monotonic() + 60
    while len(pool.actors) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert len(pool.actors) == 2  # whole again
    pool.shutdown()


def test_a_hung_call_times_out_into_rejects_and_the_pool_goes_on(ray_local, tmp_path):
    pool = StagePool(
        FragileFactory(str(tmp_path / "m")),
        Resources(num_cpus=0.25),
        call_timeout_s=3,
        name="fragile",
    )
    first, second = list(pool.map([["hang", "x"], ["y"]]))
    assert [r.reason for r in first] == ["stage_timeout", "stage_timeout"]
    assert all(isinstance(r, Reject) and r.stage == "fragile" for r in first)
    assert second == ["Y"]
    pool.shutdown()


class MemoryHungryStage(Stage):
    """Runs out of (simulated) accelerator memory on batches of more than two samples, and
    always on a sample named 'huge'."""

    name = "hungry"

    def _load(self) -> None:
        self.model = len

    def _process(self, batch):
        import torch

        if len(batch) > 2 or "huge" in batch:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return [self.model(x) for x in batch]


def test_out_of_memory_retries_smaller_batches_then_rejects():
    stage = MemoryHungryStage()
    results = stage(["a", "bb", "ccc", "huge", "eeeee"])
    assert results[:3] == [1, 2, 3] and results[4] == 5
    assert isinstance(results[3], Reject) and results[3].reason == "out_of_memory"
    assert stage.stats.extra["oom_splits"] >= 2


def test_other_errors_are_not_mistaken_for_memory_errors():
    class Broken(MemoryHungryStage):
        def _process(self, batch):
            raise ValueError("a bug")

    with pytest.raises(ValueError, match="a bug"):
        Broken()(["a"])


class DiesWhileLoading(FragileStage):
    """Its first actor dies while loading the model (e.g. killed, or a node lost)."""

    def _load(self) -> None:
        import os

        if not os.path.exists(self.marker):
            open(self.marker, "w").close()
            os._exit(1)
        super()._load()


class DiesWhileLoadingFactory(FragileFactory):
    def __call__(self):
        return DiesWhileLoading(self.marker)


def test_an_actor_that_dies_while_loading_is_started_again(ray_local, tmp_path):
    pool = StagePool(
        DiesWhileLoadingFactory(str(tmp_path / "m")), Resources(num_cpus=0.25), name="fragile"
    )
    assert pool.replacements == 1
    assert list(pool.map([["a"]])) == [["A"]]
    pool.shutdown()


def test_a_build_gives_its_stage_timeout_to_every_stage_pool(ray_local, tmp_path, monkeypatch):
    # What a build hands each pool; the pool's own timeout behaviour is tested above.
    import datagen.run.ray
    from datagen.build.settings import BuildConfig
    from datagen.data.demo_clips import write_samples
    from datagen.run.executors import stage_runners

    handed: dict[str, dict] = {}

    class RecordingPool:
        def __init__(self, factory, resources, **options):
            handed[options["name"]] = options

        def shutdown(self):
            pass

    monkeypatch.setattr(datagen.run.ray, "StagePool", RecordingPool)
    write_samples(tmp_path / "sources")
    config = BuildConfig(
        source=str(tmp_path / "sources"), out=str(tmp_path / "out"), stage_timeout_s=123.0
    )
    with stage_runners(config, use_ray=True):
        pass
    assert set(handed) == {"control", "describe", "stylize", "animate", "caption", "score"}
    assert {options["call_timeout_s"] for options in handed.values()} == {123.0}


def test_shutdown_waits_until_the_actor_processes_are_gone(ray_local):
    import os

    pool = StagePool(SquareStage, Resources(num_cpus=0.25), size=2)
    assert sorted(pool.map([[2], [3]])) == [[4], [9]]
    pids = [pid for _, pid in pool._processes]
    assert len(set(pids)) == 2 and os.getpid() not in pids
    pool.shutdown()
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


class SlowOnce(Stage):
    """Sleeps 3 s on the batch [0] only: a straggler."""

    name = "slow_once"

    def __init__(self):
        super().__init__(Resources(num_cpus=0.25))

    def _load(self) -> None:
        self.model = abs

    def _process(self, batch):
        if batch == [0]:
            time.sleep(3)
        return [self.model(x) for x in batch]


def test_batches_go_to_the_free_actor_and_a_straggler_holds_no_one_up(ray_local):
    pool = StagePool(SlowOnce, Resources(num_cpus=0.25), size=2, max_in_flight=4)
    started = time.monotonic()
    results = list(pool.map([[i] for i in range(8)]))
    assert sorted(r[0] for r in results) == list(range(8))
    # the other actor served the seven fast batches meanwhile; the slow one came back last
    assert results[-1] == [0]
    assert time.monotonic() - started < 3 + 2.5
    per_actor = sorted(s.batches for s in pool.stats())
    # at the tail, with an actor idle, the slow batch (past 3x the median) was re-sent there
    assert per_actor == [1, 8] and pool.resent == 1
    pool.shutdown()


def test_actors_that_cannot_start_are_an_error_naming_the_request(ray_local):
    from datagen.run.ray import StageStartError

    started = time.monotonic()
    with pytest.raises(StageStartError, match=r"asking 0 GPU \+ 64 CPU each.*cluster has"):
        StagePool(SquareStage, Resources(num_cpus=64), name="square", start_timeout_s=2)
    assert time.monotonic() - started < 10


def two_clip_build(tmp_path):
    """The settings of a build of two demo clips with every pair kept."""
    from datagen.build.settings import BuildConfig
    from datagen.data.demo_clips import SAMPLE_CLIPS, write_samples

    write_samples(tmp_path / "sources", SAMPLE_CLIPS[:2])
    return BuildConfig(
        source=str(tmp_path / "sources"),
        out=str(tmp_path / "out"),
        csd_threshold=-1.0,
        tiny_dir=str(tmp_path / "tiny"),
    )


@pytest.mark.slow
@pytest.mark.parametrize("gpus", [1, 2])
def test_a_build_runs_on_fewer_gpus_than_its_steps_ask(gpus, tmp_path):
    # The stages ask 4.5 GPUs between them: on 1 or 2 (logical) GPUs they share, by memory.
    from datagen.data.dataset import Dataset
    from datagen.run.executors import stage_runners
    from datagen.run.local import build_in_process
    from datagen.tools.validate import validate_dataset

    shutdown_ray()
    init_ray(num_cpus=2, num_gpus=gpus)
    try:
        config = two_clip_build(tmp_path)
        with stage_runners(config, use_ray=True) as runners:
            asked = {name: runner.resources.num_gpus for name, runner in runners.items()}
            light = [share for name, share in asked.items() if name != "animate"]
            assert all(0 < share < 1 for share in light), asked
            # an animate actor on each GPU (more than half of it), the others beside it
            assert asked["animate"] > 0.5 and runners["animate"].size == gpus, asked
            build_in_process(config, runners)
        assert len(Dataset(config.dataset_dir).index()) == 2
        assert validate_dataset(config.dataset_dir).ok
    finally:
        shutdown_ray()


LOOPBACK = {"127.0.0.1", "::ffff:127.0.0.1", "::1"}


def test_the_embedded_ray_listens_on_loopback_only(tmp_path):
    # A fresh process, as `datagen build` is: every Ray process it starts binds loopback.
    code = (
        "import os, psutil\n"
        "os.environ.pop('RAY_ADDRESS', None)\n"
        "from datagen.run.ray import init_ray, shutdown_ray\n"
        "import ray\n"
        "init_ray(num_cpus=1)\n"
        "ray.get(ray.remote(lambda: 1).remote())\n"
        "me = psutil.Process()\n"
        "found = set()\n"
        "for process in [me, *me.children(recursive=True)]:\n"
        "    try:\n"
        "        for c in process.net_connections(kind='inet'):\n"
        "            if c.status == psutil.CONN_LISTEN:\n"
        "                found.add((process.name(), c.laddr.ip))\n"
        "    except psutil.Error:\n"
        "        pass\n"
        "print(sorted(found))\n"
        "print(ray.util.get_node_ip_address())\n"
        "shutdown_ray()\n"
    )
    import ast
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ENABLE")}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=180, env=env
    )
    assert result.returncode == 0, result.stderr[-2000:]
    listeners_line, node_ip = result.stdout.strip().splitlines()[-2:]
    listeners = ast.literal_eval(listeners_line)
    assert node_ip == "127.0.0.1"
    names = {name for name, _ in listeners}
    assert {"gcs_server", "raylet"} <= names, listeners
    assert {ip for _, ip in listeners} <= LOOPBACK, listeners


@pytest.mark.slow
def test_the_driver_moves_no_media_the_actors_read_and_write_the_work_files(
    ray_local, tmp_path, monkeypatch
):
    # Every step runs on Ray actors while this (the driver's) process cannot touch a media
    # file: any read or write of the work files' videos and images here fails the test.
    from datagen.build import step_io
    from datagen.build.execute import run_step
    from datagen.build.plan import plan_build
    from datagen.build.steps import step
    from datagen.build.workdir import ShardWork
    from datagen.run.executors import stage_runners

    config = two_clip_build(tmp_path)
    (shard,) = plan_build(config).shards
    work = ShardWork(config.work_root, shard)

    def no_media_here(*args, **kwargs):
        raise AssertionError("the driver touched media")

    with stage_runners(config, use_ray=True) as runners, monkeypatch.context() as driver:
        for name in ("save", "video", "image", "images", "png_bytes"):
            driver.setattr(ShardWork, name, no_media_here)
        driver.setattr(step_io, "read_clip", no_media_here)
        reports = [run_step(step(name), work, config, runners[name]) for name in runners]
    assert [(r.stage, r.done, r.rejected) for r in reports] == [(n, 2, 0) for n in runners]
    media = sum(p.stat().st_size for p in work.root.rglob("*") if p.suffix in (".mkv", ".png"))
    shipped = sum(r.driver_bytes for r in reports)
    assert shipped < media / 10, (shipped, media)  # references and outcomes only
    assert all(r.driver_bytes / r.done < 2048 for r in reports), [r.driver_bytes for r in reports]
