"""Starting the runners of a build: one per step, in Ray actor pools or in this process."""

from __future__ import annotations

import concurrent.futures
import contextlib
import math
import os
from typing import Any

from datagen.build.settings import BuildConfig
from datagen.build.stage_configs import stage_factories
from datagen.run.costs import step_cost
from datagen.run.local import ComputeThreadRunner, LocalRunner
from datagen.run.placement import Node, PoolPlan, StepDemand, plan_pools
from datagen.run.resize import Bounds, PoolResizer

DEFAULT_GPU_MEMORY_GB = 80.0  # an H100 (80 GB); an H200 has 141


def step_demands(config: BuildConfig, factories: dict) -> list[StepDemand]:
    """What each step asks of the cluster: its request, the cost table's seconds per sample
    and GPU memory, and its most actors (the `pool_sizes` setting)."""
    bounds = config.pool_bounds()
    demands = []
    for name, factory in factories.items():
        cost = step_cost(config.profile, name)
        most = bounds.get(name, (1, None))[1]
        demands.append(
            StepDemand(name, factory().resources, cost.seconds_per_sample, cost.gpu_memory_gb, most)
        )
    return demands


def pool_plans(config: BuildConfig, factories: dict, nodes: list[Node]) -> dict[str, PoolPlan]:
    """Each step's actor count and per-actor request on `nodes` (run/placement.py)."""
    return plan_pools(step_demands(config, factories), nodes, gpu_memory(config))


def gpu_memory(config: BuildConfig) -> float:
    return config.gpu_memory_gb or DEFAULT_GPU_MEMORY_GB


def shards_in_flight(config: BuildConfig, runners: dict) -> int:
    """How many shards a build keeps between plan and write: the setting, or enough that every
    actor of the largest pool has work twice over. On Ray the driver holds references only, so
    a wide window costs it no memory; in process (pools of one) it stays at 2."""
    if config.shards_in_flight:
        return config.shards_in_flight
    widest = max((getattr(runner, "size", 1) for runner in runners.values()), default=1)
    return max(2, math.ceil(2 * widest / config.shard_size) + 1)


def ray_nodes() -> list[Node]:
    """The live nodes of the connected Ray cluster, with their logical CPUs and GPUs."""
    import ray

    return [
        Node(n["NodeID"], n["Resources"].get("CPU", 0.0), n["Resources"].get("GPU", 0.0))
        for n in ray.nodes()
        if n.get("Alive")
    ]


def prefect_api_url() -> str:
    """The Prefect API this process talks to, without credentials. Without PREFECT_API_URL
    that is the temporary server `datagen build` runs the flow on, which only this process
    knows of."""
    from prefect import get_client

    from datagen.core.api_keys import without_credentials

    with get_client(sync_client=True) as client:
        return without_credentials(str(client.api_url))


@contextlib.contextmanager
def stage_runners(config: BuildConfig, use_ray: bool):
    """Start one runner per step (Ray actor pools sized by run/placement.py and resized
    during the run by run/resize.py, or in-process stages) and stop them.

    A stage whose API key is in a Prefect Secret block reads the block in its actor, when it
    loads: its actors get PREFECT_API_URL, the API this flow uses (nothing secret: Prefect
    Cloud's PREFECT_API_KEY must already be in the Ray workers' environment).
    """
    factories = stage_factories(config)
    blocks = config.key_blocks()
    runners: dict[str, Any] = {}
    compute = None
    resizer = None
    started_ray = False
    try:
        if use_ray:
            import ray

            from datagen.run.ray import StagePool, init_ray

            started_ray = not ray.is_initialized()
            init_ray()
            cluster = bool(os.environ.get("RAY_ADDRESS"))
            prefect_env = {"PREFECT_API_URL": prefect_api_url()} if blocks else None
            plans = pool_plans(config, factories, ray_nodes())  # fails at once if unplaceable
            # the largest requests first, as placement planned them: an animate actor asking
            # 0.54 of a GPU must find a GPU that no light steps split before it
            order = sorted(factories, key=lambda name: -plans[name].resources.num_gpus)
            for name in order:
                factory = factories[name]
                runners[name] = StagePool(
                    factory,
                    plans[name].resources,
                    size=plans[name].actors,
                    nodes=plans[name].nodes,
                    torch_threads=None if cluster else 1,
                    call_timeout_s=config.stage_timeout_s,
                    name=name,
                    env=prefect_env if name in blocks else None,
                )
            runners = {name: runners[name] for name in factories}  # in step order again
            bounds = {name: Bounds(*b) for name, b in config.pool_bounds().items()}
            resizer = PoolResizer(
                runners, step_demands(config, factories), ray_nodes, gpu_memory(config), bounds
            ).start()
        else:
            compute = concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="datagen-compute"
            )
            for name, factory in factories.items():
                runners[name] = ComputeThreadRunner(LocalRunner(factory()), compute)
        yield runners
    finally:
        if resizer is not None:
            resizer.stop()
        if compute is not None:
            compute.shutdown(wait=True)  # no batch runs on while its stage tears down
        for runner in runners.values():
            with contextlib.suppress(Exception):
                runner.shutdown()
        if started_ray:  # a Ray this run started (or connected to) ends with it
            from datagen.run.ray import shutdown_ray

            shutdown_ray()
