"""A build on a real multi-node Ray cluster on this machine (`ray.cluster_utils.Cluster`, as
Ray's own tests do), with logical GPUs, kept on loopback (shared/FINDINGS.md): a step's actors
on both nodes and the output complete and valid; one node lost mid-run and the build still
accounts for every sample exactly once."""

from __future__ import annotations

import threading
import time

import pytest

from datagen.run.ray import shutdown_ray

pytestmark = pytest.mark.slow

NODE = {"num_cpus": 4, "num_gpus": 1, "node_ip_address": "127.0.0.1"}


@pytest.fixture
def two_nodes():
    """A head and a worker node of 1 logical GPU each; yields (cluster, worker node)."""
    import ray
    from ray.cluster_utils import Cluster

    shutdown_ray()
    cluster = Cluster(initialize_head=True, head_node_args={**NODE, "object_store_memory": 2**28})
    worker = cluster.add_node(**NODE, object_store_memory=2**28)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    yield cluster, worker
    ray.shutdown()
    cluster.shutdown()


def build_config(tmp_path, clips: int):
    from datagen.build.settings import BuildConfig
    from datagen.data.demo_clips import SAMPLE_CLIPS, write_samples

    write_samples(tmp_path / "sources", SAMPLE_CLIPS[:clips])
    return BuildConfig(
        source=str(tmp_path / "sources"),
        out=str(tmp_path / "out"),
        csd_threshold=-1.0,
        shard_size=2,
        tiny_dir=str(tmp_path / "tiny"),
    )


def test_a_build_on_two_nodes_runs_the_animate_actors_on_both(two_nodes, tmp_path):
    from datagen.data.dataset import Dataset
    from datagen.run.executors import stage_runners
    from datagen.run.local import build_in_process
    from datagen.tools.validate import validate_dataset

    config = build_config(tmp_path, clips=4)
    with stage_runners(config, use_ray=True) as runners:
        assert len(set(runners["animate"].nodes())) == 2  # one animate actor per node's GPU
        build_in_process(config, runners)
    assert len(Dataset(config.dataset_dir).index()) == 4
    assert validate_dataset(config.dataset_dir).ok


def test_a_node_lost_mid_build_loses_and_duplicates_nothing(two_nodes, tmp_path):
    from datagen.run.executors import stage_runners
    from datagen.run.local import build_in_process
    from datagen.tools.audit import audit_build
    from datagen.tools.validate import validate_dataset

    cluster, worker = two_nodes
    config = build_config(tmp_path, clips=6)
    outcome: dict = {}
    with stage_runners(config, use_ray=True) as runners:
        animate = runners["animate"]
        assert len(set(animate.nodes())) == 2

        def build() -> None:
            try:
                outcome["result"] = build_in_process(config, runners)
            except BaseException as error:  # for the assertion below, with its cause
                outcome["error"] = error

        thread = threading.Thread(target=build)
        thread.start()
        # kill the worker node (its raylet and every process on it) once pairs are being
        # animated, so that samples are in flight on its actors
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and thread.is_alive():
            if any(config.work_root.glob("shard-*/animate/*.done")):
                break
            time.sleep(0.2)
        assert thread.is_alive(), "the build finished before the node could be killed"
        cluster.remove_node(worker, allow_graceful=False)
        thread.join(timeout=600)
        assert not thread.is_alive(), "the build did not finish after the node was lost"
        lost = animate.replacements
    assert "error" not in outcome, outcome.get("error")
    assert lost >= 1  # the animate actor on the lost node was replaced (or its start tried)
    report = audit_build(config)
    assert report.ok, report.problems
    assert report.committed + report.rejected == report.planned == 6
    assert validate_dataset(config.dataset_dir).ok


@pytest.fixture
def one_node_then_two():
    """A head node of 1 logical GPU; the test adds a second node while the pools run."""
    import ray
    from ray.cluster_utils import Cluster

    shutdown_ray()
    cluster = Cluster(initialize_head=True, head_node_args={**NODE, "object_store_memory": 2**28})
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def test_the_pools_grow_onto_a_node_that_joins(one_node_then_two, tmp_path, monkeypatch):
    from datagen.run import resize
    from datagen.run.executors import stage_runners
    from datagen.run.local import build_in_process
    from datagen.tools.audit import audit_build
    from datagen.tools.validate import validate_dataset

    monkeypatch.setattr(resize, "RESIZE_INTERVAL_S", 1.0)  # 10 s in a build
    cluster = one_node_then_two
    config = build_config(tmp_path, clips=4)
    with stage_runners(config, use_ray=True) as runners:
        animate = runners["animate"]
        assert animate.size == 1  # one GPU: one animate actor
        cluster.add_node(**NODE, object_store_memory=2**28)
        cluster.wait_for_nodes()
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and len(animate.actors) < 2:
            time.sleep(0.5)
        assert len(animate.actors) == 2, f"animate did not grow: {animate.layout()}"
        assert len(set(animate.nodes())) == 2  # the new actor is on the new node's GPU
        assert animate.added == 1
        build_in_process(config, runners)
    report = audit_build(config)
    assert report.ok and report.committed == 4, report.problems
    assert validate_dataset(config.dataset_dir).ok
