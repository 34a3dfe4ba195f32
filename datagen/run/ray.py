"""The one place where stages meet Ray: actors that load a model once and serve many batches.

Ray remote *functions* with `num_gpus > 0` default to `max_calls=1` (the worker exits after each
call), so a model in a plain task would reload every time; each stage therefore lives in an
actor (`StageActor`) that calls `Stage.setup()` once in its constructor. `StagePool` sends each
batch to a free actor of the stage, with a bound on batches in flight, so a slow stage applies
backpressure instead of flooding the object store and a slow batch never leaves the other
actors idle. A build's steps send batches of references with a `BatchJob` (core/runner.py):
the actor reads the inputs from the work store, runs the stage and saves the outputs itself,
so no media passes through the driver. Stage resources are translated to Ray options here and
nowhere else.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from datagen.core.runner import BatchJob, run_inline
from datagen.core.stage import Reject, Resources, Stage, StageStats

# A small machine's object store: Ray's default is 30% of RAM in /dev/shm.
DEFAULT_OBJECT_STORE_BYTES = 1 * 2**30

# The embedded local Ray (no $RAY_ADDRESS) stays on loopback: with this variable at "0", Ray
# takes 127.0.0.1 as the node IP of every process it starts, so the GCS, raylet, workers and
# agents listen on 127.0.0.1 only (measured: tests/test_ray_adapter.py). Without it they listen
# on all interfaces, guarded only by Ray's token. Ray reads it when it is first imported, so it
# is set here, before this module imports Ray; a cluster ($RAY_ADDRESS) is left as it is.
LOOPBACK_VARIABLE = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
if not os.environ.get("RAY_ADDRESS"):
    os.environ.setdefault(LOOPBACK_VARIABLE, "0")


def ray_options(resources: Resources) -> dict[str, Any]:
    """Ray actor options for a stage's declared resources."""
    return {"num_gpus": resources.num_gpus, "num_cpus": resources.num_cpus}


def init_ray(
    address: str | None = None,
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    object_store_bytes: int | None = None,
    runtime_env: dict | None = None,
) -> None:
    """Connect to `address` / $RAY_ADDRESS (a cluster), or start a private local instance.

    The local instance listens on loopback only (LOOPBACK_VARIABLE), runs without a dashboard,
    sends no usage stats, and caps the object store so a laptop keeps its memory.
    """
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True, runtime_env=runtime_env)
        return
    from ray._private import ray_constants

    if ray_constants.ENABLE_RAY_CLUSTER:  # Ray was imported before this module set the variable
        logging.getLogger(__name__).warning(
            "the local Ray listens on all interfaces (guarded by its token): Ray was imported "
            "before datagen could set %s=0; set it in the environment to keep Ray on loopback",
            LOOPBACK_VARIABLE,
        )
    ray.init(
        address="local",
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        object_store_memory=object_store_bytes or DEFAULT_OBJECT_STORE_BYTES,
        include_dashboard=False,
        dashboard_host="127.0.0.1",
        log_to_driver=True,
        configure_logging=False,
        runtime_env=runtime_env,
    )


def shutdown_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


class StageActor:
    """Holds one Stage: loads its model(s) once at construction, then serves batches."""

    def __init__(self, factory: Callable[[], Stage], torch_threads: int | None = None):
        from datagen.core.native_heap import arrow_on_native_heap

        arrow_on_native_heap()  # before the model loads: see datagen/core/native_heap.py
        if torch_threads:
            import torch

            torch.set_num_threads(torch_threads)  # actors sharing cores must not oversubscribe
        self.stage = factory()
        self.stage.setup()

    def process(self, batch: list) -> list:
        return self.stage(batch)

    def run(self, job: BatchJob, batch: list) -> list:
        """`job` on a batch of references: inputs read and outputs saved here, in the actor."""
        return run_inline(job, self.stage, batch)

    def stats(self) -> StageStats:
        return self.stage.stats

    def models(self) -> dict:
        return self.stage.models()

    def params(self) -> dict:
        return self.stage.params()

    def ready(self) -> tuple[str, int]:
        """Answers once the model is loaded, with where this actor's process runs."""
        return socket.gethostname(), os.getpid()


class StageStartError(RuntimeError):
    """A stage's actors did not start (not placeable on the cluster, or failed to load)."""


# How long a pool waits for its actors' models to load (a 14B model loads in about a minute;
# longer means Ray cannot place the actors, e.g. the resources are held by another job).
START_TIMEOUT_S = 900.0


class StagePool:
    """A stage's actors and a backpressured `map` over batches, results as they complete.

    Failure handling: an actor that dies mid-batch is replaced (its model loads again) and the
    batch retried once; a second death of the same batch raises, for Prefect's task retry. A
    call that exceeds `call_timeout_s` is a hung call: the actor is killed and replaced, and
    the batch's samples come back as rejects with reason `stage_timeout`.
    """

    def __init__(
        self,
        factory: Callable[[], Stage],
        resources: Resources,
        size: int = 1,
        max_in_flight: int | None = None,
        torch_threads: int | None = None,
        call_timeout_s: float | None = None,
        name: str | None = None,
        env: dict[str, str] | None = None,
        start_timeout_s: float = START_TIMEOUT_S,
    ):
        """`env`: environment variables of the actors' processes (Ray merges them with the
        job's runtime_env); never a secret, as Ray keeps runtime_envs in its control store."""
        import ray

        if size < 1:
            raise ValueError(f"pool size must be >= 1, got {size}")
        self.size = size
        self.max_in_flight = max_in_flight or 2 * size
        if self.max_in_flight < 1:
            raise ValueError("max_in_flight must be >= 1")
        if call_timeout_s is not None and call_timeout_s <= 0:
            raise ValueError("call_timeout_s must be > 0")
        self.call_timeout_s = call_timeout_s
        self.name = name or getattr(factory, "name", "stage")
        options = ray_options(resources)
        if env:
            options["runtime_env"] = {"env_vars": dict(env)}
        self._remote_class = ray.remote(StageActor).options(**options)
        self._factory, self._torch_threads = factory, torch_threads
        self.replacements = 0
        self._processes: list[tuple[str, int]] = []  # every actor process ever started
        self.resources = resources
        self.actors = [self._start_actor() for _ in range(size)]
        self._load = [0] * size  # batches in flight per actor (shard tasks share the pool)
        self._load_lock = threading.Lock()
        deadline = time.monotonic() + start_timeout_s
        for index, actor in enumerate(self.actors):  # models are loaded once these answer
            try:
                left = max(deadline - time.monotonic(), 0.1)
                self._processes.append(ray.get(actor.ready.remote(), timeout=left))
            except ray.exceptions.RayActorError:
                self._replace(index, actor)  # died while loading: one more try
            except ray.exceptions.GetTimeoutError:
                free, total = ray.available_resources(), ray.cluster_resources()
                self.shutdown(wait_s=0)
                raise StageStartError(
                    f"{self.name}: {size} actor(s) asking {resources.num_gpus:g} GPU + "
                    f"{resources.num_cpus:g} CPU each did not start within "
                    f"{start_timeout_s:g} s; the cluster has {_gpus_cpus(total)}, "
                    f"{_gpus_cpus(free)} free"
                ) from None

    def _start_actor(self):
        return self._remote_class.remote(self._factory, self._torch_threads)

    def _replace(self, index: int, failed) -> None:
        """Replace the actor at `index` if it is still the one that failed."""
        import ray

        if self.actors[index] is not failed:
            return
        with contextlib.suppress(Exception):
            ray.kill(self.actors[index])
        self.actors[index] = self._start_actor()
        self._processes.append(ray.get(self.actors[index].ready.remote()))
        self.replacements += 1

    def map(self, batches: Iterable[list]) -> Iterator[list]:
        """Process batches of stage inputs on the actors, yielding each batch's results as it
        completes."""
        return self._dispatch(batches, lambda actor, batch: actor.process.remote(batch))

    def run(self, job: BatchJob, batches: Iterable[list]) -> Iterator[list]:
        """`job` over batches of references on the actors (each reads and saves its samples
        itself), yielding each batch's outcomes as it completes. The job goes to the object
        store once, not with every batch."""
        import ray

        job_ref = ray.put(job)
        return self._dispatch(batches, lambda actor, batch: actor.run.remote(job_ref, batch))

    def _dispatch(self, batches: Iterable[list], submit: Callable) -> Iterator[list]:
        """Each batch goes to a free actor (not round-robin; with every actor busy, it waits
        for the first to finish), and at most `max_in_flight` batches are submitted but not
        yet consumed."""
        pending: dict = {}  # ref -> (batch, actor index, actor), oldest first
        for batch in batches:
            # wait for a free actor rather than queue behind a busy one (a straggler would
            # hold the queued batch up); a pool busy with other shards' batches is queued on
            while pending and (len(pending) >= self.max_in_flight or min(self._load) > 0):
                yield self._next_done(pending, submit)
            with self._load_lock:
                index = min(range(self.size), key=self._load.__getitem__)
                self._load[index] += 1
            actor = self.actors[index]
            pending[submit(actor, batch)] = (batch, index, actor)
        while pending:
            yield self._next_done(pending, submit)

    def _next_done(self, pending: dict, submit: Callable) -> list:
        import ray

        ready, _ = ray.wait(list(pending), num_returns=1, timeout=self.call_timeout_s)
        ref = ready[0] if ready else next(iter(pending))  # none done in time: the oldest hung
        batch, index, actor = pending.pop(ref)
        with self._load_lock:
            self._load[index] -= 1
        return self._collect(batch, index, actor, ref, submit)

    def _collect(self, batch: list, index: int, actor, ref, submit: Callable) -> list:
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError

        for attempt in (1, 2):
            try:
                return ray.get(ref, timeout=self.call_timeout_s)
            except GetTimeoutError:
                self._replace(index, actor)
                return [
                    Reject(
                        getattr(item, "sample_id", repr(item)),
                        self.name,
                        "stage_timeout",
                        f"no answer within {self.call_timeout_s:g} s",
                    )
                    for item in batch
                ]
            except RayActorError:
                # batches queued on the same dead actor find it replaced already
                self._replace(index, actor)
                if attempt == 2:
                    raise
                actor = self.actors[index]
                ref = submit(actor, batch)
        raise AssertionError("unreachable")

    def stats(self) -> list[StageStats]:
        import ray

        return ray.get([actor.stats.remote() for actor in self.actors])

    def models(self) -> dict:
        import ray

        return ray.get(self.actors[0].models.remote())

    def params(self) -> dict:
        import ray

        return ray.get(self.actors[0].params.remote())

    def shutdown(self, wait_s: float = 15.0) -> None:
        """Kill the actors and, for those on this machine, wait until their processes are
        gone (ray.kill only asks), so a finished build leaves no process behind."""
        import ray

        for actor in self.actors:
            with contextlib.suppress(Exception):
                ray.kill(actor)
        self.actors = []
        here = socket.gethostname()
        local = [pid for host, pid in self._processes if host == here]
        deadline = time.monotonic() + wait_s
        while any(_alive(pid) for pid in local) and time.monotonic() < deadline:
            time.sleep(0.1)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process now holds the number
        return False
    return True


def _gpus_cpus(resources: dict) -> str:
    return f"{resources.get('GPU', 0):g} GPU + {resources.get('CPU', 0):g} CPU"
