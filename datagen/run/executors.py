"""Starting the runners of a build: one per step, in Ray actor pools or in this process."""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
from typing import Any

from datagen.build.settings import BuildConfig
from datagen.build.stage_configs import stage_factories
from datagen.core.stage import Resources
from datagen.run.local import ComputeThreadRunner, LocalRunner


def local_resources(declared: Resources, stages: int, cpus: float, gpus: float) -> Resources:
    """Fit a stage's declared resources on a small local Ray: without GPUs, none are asked
    for; CPUs are shared out so every stage's actor can start (Ray schedules by logical
    resources, and five actors asking one CPU each never all start on two cores)."""
    num_gpus = declared.num_gpus if gpus >= 1 else 0.0
    num_cpus = min(declared.num_cpus, max(cpus / (stages + 1), 0.05))
    return Resources(num_gpus=num_gpus, num_cpus=round(num_cpus, 2))


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
    """Start one runner per stage (Ray actor pools, or in-process stages) and stop them.

    A stage whose API key is in a Prefect Secret block reads the block in its actor, when it
    loads: its actors get PREFECT_API_URL, the API this flow uses (nothing secret: Prefect
    Cloud's PREFECT_API_KEY must already be in the Ray workers' environment).
    """
    factories = stage_factories(config)
    blocks = config.key_blocks()
    runners: dict[str, Any] = {}
    compute = None
    started_ray = False
    try:
        if use_ray:
            import ray

            from datagen.run.ray import StagePool, init_ray

            started_ray = not ray.is_initialized()
            init_ray()
            total = ray.cluster_resources()
            cluster = bool(os.environ.get("RAY_ADDRESS"))
            prefect_env = {"PREFECT_API_URL": prefect_api_url()} if blocks else None
            for name, factory in factories.items():
                declared = factory().resources
                resources = (
                    declared
                    if cluster
                    else local_resources(
                        declared, len(factories), total.get("CPU", 1), total.get("GPU", 0)
                    )
                )
                runners[name] = StagePool(
                    factory,
                    resources,
                    size=1,
                    torch_threads=None if cluster else 1,
                    call_timeout_s=config.stage_timeout_s,
                    name=name,
                    env=prefect_env if name in blocks else None,
                )
        else:
            compute = concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="datagen-compute"
            )
            for name, factory in factories.items():
                runners[name] = ComputeThreadRunner(LocalRunner(factory()), compute)
        yield runners
    finally:
        if compute is not None:
            compute.shutdown(wait=True)  # no batch runs on while its stage tears down
        for runner in runners.values():
            with contextlib.suppress(Exception):
                runner.shutdown()
        if started_ray:  # a Ray this run started (or connected to) ends with it
            from datagen.run.ray import shutdown_ray

            shutdown_ray()
