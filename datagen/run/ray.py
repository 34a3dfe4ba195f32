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

import concurrent.futures
import contextlib
import logging
import os
import queue
import socket
import statistics
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
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

    def node(self) -> str:
        """The Ray node this actor runs on."""
        import ray

        return ray.get_runtime_context().get_node_id()


class StageStartError(RuntimeError):
    """A stage's actors did not start (not placeable on the cluster, or failed to load)."""


# How long a pool waits for its actors' models to load (a 14B model loads in about a minute;
# longer means Ray cannot place the actors, e.g. the resources are held by another job).
START_TIMEOUT_S = 900.0
# A call running longer than this many times the median of the pool's finished calls is a
# straggler: at the tail of the work (no batch waiting, an actor idle) it is sent to a second
# actor as well, and the first answer is taken.
STRAGGLER_FACTOR = 3.0
STRAGGLER_HISTORY = 5  # finished calls needed before there is a median to compare with
DEATHS_TO_REJECT = 2  # a sample whose actor died this many times under it is rejected
WATCH_INTERVAL_S = 0.5  # how often the pool looks for hung calls and stragglers
MAX_FAILED_STARTS = 3  # replacements in a row that die while loading: the stage cannot load


@dataclass(eq=False)
class _Task:
    """A batch a caller gave the pool; after an actor died under it, split into single-sample
    children (so one sample that kills actors cannot take its batch-mates with it)."""

    batch: list
    send: Callable  # (actor, batch) -> ObjectRef
    future: concurrent.futures.Future | None = None  # the caller's, on the root task only
    parent: _Task | None = None
    collected: list = field(default_factory=list)  # result lists of the finished children
    children_left: int = 0
    live_calls: int = 0  # calls running for this task (two while a straggler is re-sent)
    resent: bool = False
    resolved: bool = False


@dataclass(eq=False)
class _Call:
    task: _Task
    actor: Any
    began: float


class StagePool:
    """A stage's actors and a backpressured `map` over batches, results as they complete.

    Dispatch: a batch goes to an idle actor at once, or waits in the pool's queue (oldest
    first, from every caller) until one is idle; it never queues behind a busy actor, so a slow
    batch holds no other up. Each caller has at most `max_in_flight` batches given and not yet
    answered. Completions arrive as ObjectRef futures on the pool's own thread, so an actor
    that finishes is given the next batch at once, whichever caller it belongs to.

    Faults: an actor that dies (killed, out of host memory, its node lost) is replaced in the
    background and its batch is run again on other actors, split into single samples; a sample
    under which actors died twice is rejected (`actor_died`) instead of retried forever. A
    replacement that cannot be placed (the node and its GPUs are gone) leaves the pool smaller,
    not stuck. A call slower than `call_timeout_s` is hung: its actor is killed and replaced and
    the batch's samples come back as rejects (`stage_timeout`). Stragglers are re-sent (see
    STRAGGLER_FACTOR). A stage's own exception (a bug) is raised to the caller.
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
        straggler_factor: float | None = STRAGGLER_FACTOR,
        nodes: tuple[str, ...] = (),
    ):
        """`env`: environment variables of the actors' processes (Ray merges them with the
        job's runtime_env); never a secret, as Ray keeps runtime_envs in its control store.
        `nodes`: the Ray node of each actor (the placement's layout), or () to let Ray choose;
        a replacement prefers its predecessor's node and goes elsewhere if that is gone."""
        import ray

        if size < 1:
            raise ValueError(f"pool size must be >= 1, got {size}")
        if nodes and len(nodes) != size:
            raise ValueError(f"{len(nodes)} nodes given for {size} actors")
        if max_in_flight is not None and max_in_flight < 1:
            raise ValueError("max_in_flight must be >= 1")
        self._max_in_flight = max_in_flight
        if call_timeout_s is not None and call_timeout_s <= 0:
            raise ValueError("call_timeout_s must be > 0")
        self.call_timeout_s = call_timeout_s
        self.straggler_factor = straggler_factor
        self.start_timeout_s = start_timeout_s
        self.name = name or getattr(factory, "name", "stage")
        options = ray_options(resources)
        if env:
            options["runtime_env"] = {"env_vars": dict(env)}
        self._actor_class, self._options = ray.remote(StageActor), options
        self._factory, self._torch_threads = factory, torch_threads
        self.resources = resources
        self.replacements = 0  # actors started in place of dead or hung ones
        self.added = 0  # actors started as the pool was resized (run/resize.py)
        self.retired = 0  # idle actors stopped as the pool was resized
        self.resent = 0  # straggler calls sent to a second actor
        self._processes: list[tuple[str, int]] = []  # every actor process ever started
        self._lock = threading.RLock()
        self._queue: deque[_Task] = deque()
        self._calls: dict = {}  # ObjectRef -> _Call
        self._durations: deque[float] = deque(maxlen=101)
        self._per_sample: deque[float] = deque(maxlen=101)  # seconds of a call per sample
        self._deaths: Counter[str] = Counter()
        self._starting: list = []  # replacement actors not answering yet
        self._lost_at: float | None = None  # since when the pool has had no live actor
        self._failed_starts = 0  # replacements in a row that died while loading
        self._closed = threading.Event()
        # Ray runs an ObjectRef's done-callbacks on its own thread, where calling Ray again
        # can deadlock: the callbacks only post here, and the pool's thread does the rest.
        self._events: queue.Queue = queue.Queue()
        self._node_of: dict = {}  # actor -> the node it was pinned to (None: Ray's choice)
        self.actors = [self._start(node) for node in (nodes or [None] * size)]
        self._await_start(size, resources)
        self._idle: deque = deque(self.actors)
        self._thread = threading.Thread(target=self._loop, name=f"{self.name}-pool", daemon=True)
        self._thread.start()

    @property
    def size(self) -> int:
        """The pool's actors: live ones and those starting (replacements, or added)."""
        return len(self.actors) + len(self._starting)

    @property
    def max_in_flight(self) -> int:
        """Batches one caller may have given and not had answered: twice the pool's actors
        (as the pool is resized) unless set."""
        return self._max_in_flight or max(2 * self.size, 1)

    def _start(self, node: str | None, soft: bool = False):
        """A new actor, on `node` if given (`soft`: there if that node is still alive)."""
        options = dict(self._options)
        if node:
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node, soft=soft)
        actor = self._actor_class.options(**options).remote(self._factory, self._torch_threads)
        self._node_of[actor] = node
        return actor

    def _await_start(self, size: int, resources: Resources) -> None:
        import ray

        deadline = time.monotonic() + self.start_timeout_s
        for index, actor in enumerate(list(self.actors)):  # models are loaded once these answer
            try:
                left = max(deadline - time.monotonic(), 0.1)
                self._processes.append(ray.get(actor.ready.remote(), timeout=left))
            except ray.exceptions.RayActorError:  # died while loading: one more try
                self.actors[index] = self._start(self._node_of.get(actor))
                self._processes.append(ray.get(self.actors[index].ready.remote()))
                self.replacements += 1
            except ray.exceptions.GetTimeoutError:
                free, total = ray.available_resources(), ray.cluster_resources()
                self.shutdown(wait_s=0)
                raise StageStartError(
                    f"{self.name}: {size} actor(s) asking {resources.num_gpus:g} GPU + "
                    f"{resources.num_cpus:g} CPU each did not start within "
                    f"{self.start_timeout_s:g} s; the cluster has {_gpus_cpus(total)}, "
                    f"{_gpus_cpus(free)} free"
                ) from None

    # --- what callers use

    def map(self, batches: Iterable[list]) -> Iterator[list]:
        """Process batches of stage inputs on the actors, yielding each batch's results as it
        completes (a batch split after an actor died comes back as several)."""
        return self._stream(batches, lambda actor, batch: actor.process.remote(batch))

    def run(self, job: BatchJob, batches: Iterable[list]) -> Iterator[list]:
        """`job` over batches of references on the actors (each reads and saves its samples
        itself), yielding each batch's outcomes as it completes. The job goes with each call,
        by value: a step's job is about a kilobyte, which Ray inlines in the call (above
        100 KB it puts an argument in the object store itself), and a `ray.put` of its own
        cost the driver 0.43 ms of CPU per step and shard against 0.06 ms more per call
        (measured on Ray 2.60: most shards' steps are one or two calls)."""
        return self._stream(batches, lambda actor, batch: actor.run.remote(job, batch))

    def _stream(self, batches: Iterable[list], send: Callable) -> Iterator[list]:
        waiting: set[concurrent.futures.Future] = set()
        for batch in batches:
            while len(waiting) >= self.max_in_flight:
                yield from self._answers(waiting)
            waiting.add(self._submit(_Task(batch, send, concurrent.futures.Future())))
        while waiting:
            yield from self._answers(waiting)

    @staticmethod
    def _answers(waiting: set) -> Iterator[list]:
        done, _ = concurrent.futures.wait(waiting, return_when="FIRST_COMPLETED")
        for future in done:
            waiting.discard(future)
            yield from future.result()  # the batch's result list(s); a stage's error raises

    # --- dispatch (under the lock; callbacks arrive on Ray's threads)

    def _submit(self, task: _Task, first: bool = False) -> concurrent.futures.Future | None:
        with self._lock:
            if self._closed.is_set():
                raise RuntimeError(f"{self.name}: the pool is shut down")
            (self._queue.appendleft if first else self._queue.append)(task)
            self._assign()
        return task.future

    def _assign(self) -> None:
        while self._queue and self._idle:
            self._call(self._queue.popleft(), self._idle.popleft())

    def _call(self, task: _Task, actor) -> None:
        ref = task.send(actor, task.batch)
        self._calls[ref] = _Call(task, actor, time.monotonic())
        task.live_calls += 1
        ref.future().add_done_callback(
            lambda future, ref=ref: self._events.put((self._finished, ref, future))
        )

    def _finished(self, ref, future: concurrent.futures.Future) -> None:
        with self._lock:
            call = self._calls.pop(ref, None)
            if call is None or self._closed.is_set():
                return  # timed out and handled already, or shutting down
            try:
                self._settle(call, future)
                self._assign()
            except Exception as error:  # a callback must not lose a caller's batch
                self._fail(call.task, error)

    def _settle(self, call: _Call, future: concurrent.futures.Future) -> None:
        from ray.exceptions import RayActorError

        task = call.task
        task.live_calls -= 1
        try:
            value = future.result()
        except RayActorError:
            self._lost(call.actor)
            if not task.resolved and task.live_calls == 0:
                self._split_after_death(task)
        except Exception as error:  # the stage raised: a bug, for the caller (and Prefect)
            self._idle.append(call.actor)
            if not task.resolved:
                self._fail(task, error)
        else:
            took = time.monotonic() - call.began
            self._durations.append(took)
            self._per_sample.append(took / max(len(task.batch), 1))
            self._idle.append(call.actor)
            if not task.resolved:  # else a re-sent straggler's twin answered first
                self._resolve(task, [value])

    def _split_after_death(self, task: _Task) -> None:
        """Run the batch's samples again one by one; reject those that killed actors twice."""
        killers = []
        for item in task.batch:
            self._deaths[_key(item)] += 1
            if self._deaths[_key(item)] >= DEATHS_TO_REJECT:
                killers.append(item)
        again = [item for item in task.batch if item not in killers]
        if killers:
            task.collected.append(
                [
                    Reject(_key(item), self.name, "actor_died", "its actor died twice under it")
                    for item in killers
                ]
            )
        task.children_left = len(again)
        if not again:
            self._resolve(task, task.collected)
        for item in reversed(again):  # retries go first, on whichever actor is idle
            self._submit(_Task([item], task.send, parent=task), first=True)

    def _resolve(self, task: _Task, result_lists: list) -> None:
        task.resolved = True
        if task.parent is None:
            if not task.future.done():
                task.future.set_result(result_lists)
            return
        parent = task.parent
        parent.collected.extend(result_lists)
        parent.children_left -= 1
        if parent.children_left == 0:
            self._resolve(parent, parent.collected)

    def _fail(self, task: _Task, error: BaseException) -> None:
        task.resolved = True
        while task.parent is not None:
            task = task.parent
        if not task.future.done():
            task.future.set_exception(error)

    # --- actors lost and replaced

    def _lost(self, actor) -> None:
        """`actor` died or was killed: forget it and start another in the background."""
        import ray

        if actor not in self.actors:
            return  # another call of the same actor reported it first
        self.actors.remove(actor)
        with contextlib.suppress(ValueError):
            self._idle.remove(actor)
        with contextlib.suppress(Exception):
            ray.kill(actor)
        if not self.actors and self._lost_at is None:
            self._lost_at = time.monotonic()
        self._launch(self._node_of.get(actor), soft=True)
        self.replacements += 1

    def _launch(self, node: str | None, soft: bool) -> None:
        """Start an actor in the background; it joins the pool once its model is loaded."""
        actor = self._start(node, soft=soft)
        self._starting.append(actor)
        actor.ready.remote().future().add_done_callback(
            lambda future: self._events.put((self._started, actor, future))
        )

    # --- resizing (run/resize.py decides; the pool carries it out)

    def grow(self, node: str | None = None) -> None:
        """One more actor, on `node` (pinned, as the placement laid it out) or where Ray
        chooses; it takes work once its model is loaded."""
        with self._lock:
            if self._closed.is_set():
                return
            self._launch(node, soft=False)
            self.added += 1

    def retire(self, node: str | None = None) -> bool:
        """Stop one idle actor (on `node`, if given); False when none is idle there (a busy
        actor is never stopped: the resizer tries again later)."""
        import ray

        with self._lock:
            idle = [a for a in self._idle if node is None or self._node_of.get(a) == node]
            if not idle or len(self.actors) <= 1:
                return False
            actor = idle[-1]  # the longest idle is first; keep it, it is the warmest
            self._idle.remove(actor)
            self.actors.remove(actor)
            self.retired += 1
        with contextlib.suppress(Exception):
            ray.kill(actor)
        return True

    def layout(self) -> list[str | None]:
        """The node each actor (live or starting) was placed on; None where Ray chose."""
        with self._lock:
            return [self._node_of.get(actor) for actor in [*self.actors, *self._starting]]

    def seconds_per_sample(self) -> float | None:
        """The median time an actor spends per sample, over the pool's recent calls (inputs
        read, stage run, outputs saved); None before STRAGGLER_HISTORY calls have finished."""
        with self._lock:
            if len(self._per_sample) < STRAGGLER_HISTORY:
                return None
            return statistics.median(self._per_sample)

    def _started(self, actor, future: concurrent.futures.Future) -> None:
        with self._lock:
            if actor in self._starting:
                self._starting.remove(actor)
            if self._closed.is_set():
                return
            try:
                self._processes.append(future.result())
            except Exception:  # died while loading, e.g. on a node going down: try again
                self._failed_starts += 1
                if self._failed_starts < MAX_FAILED_STARTS:
                    self.actors.append(actor)
                    self._lost(actor)
                elif not self.actors:
                    self._give_up()
                return
            self._failed_starts = 0
            self.actors.append(actor)
            self._idle.append(actor)
            self._lost_at = None
            self._assign()

    # --- the pool's thread: completions, starts, hung calls and stragglers

    def _loop(self) -> None:
        watched = time.monotonic()
        while not self._closed.is_set():
            try:
                handle, what, future = self._events.get(timeout=WATCH_INTERVAL_S)
                handle(what, future)
            except queue.Empty:
                pass
            if time.monotonic() - watched >= WATCH_INTERVAL_S:
                watched = time.monotonic()
                self._watch()

    def _watch(self) -> None:
        with self._lock:
            now = time.monotonic()
            for ref, call in list(self._calls.items()):
                age = now - call.began
                if self.call_timeout_s is not None and age > self.call_timeout_s:
                    self._hung(ref, call)
                elif self._straggles(call.task, age):
                    call.task.resent = True
                    self.resent += 1
                    self._call(call.task, self._idle.popleft())
            if self._lost_at is not None and now - self._lost_at > self.start_timeout_s:
                self._give_up()

    def _hung(self, ref, call: _Call) -> None:
        del self._calls[ref]
        task = call.task
        task.live_calls -= 1
        self._lost(call.actor)
        if not task.resolved and task.live_calls == 0:
            detail = f"no answer within {self.call_timeout_s:g} s"
            self._resolve(
                task, [[Reject(_key(i), self.name, "stage_timeout", detail) for i in task.batch]]
            )
        self._assign()

    def _straggles(self, task: _Task, age: float) -> bool:
        if self.straggler_factor is None or task.resent or task.resolved:
            return False
        if self._queue or not self._idle or len(self._durations) < STRAGGLER_HISTORY:
            return False  # new work first; re-sending is for the tail
        return age > self.straggler_factor * statistics.median(self._durations)

    def _give_up(self) -> None:
        """No actor left and none starting (every replacement unplaceable for
        start_timeout_s, or dying while it loads): fail what waits."""
        error = StageStartError(
            f"{self.name}: every actor was lost and none could be started again "
            f"(within {self.start_timeout_s:g} s, or {MAX_FAILED_STARTS} died loading)"
        )
        while self._queue:
            self._fail(self._queue.popleft(), error)
        for call in self._calls.values():
            self._fail(call.task, error)
        self._calls.clear()

    # --- the rest of the runner contract

    def nodes(self) -> list[str]:
        """The Ray node of each live actor."""
        import ray

        return ray.get([actor.node.remote() for actor in list(self.actors)])

    def stats(self) -> list[StageStats]:
        import ray

        return ray.get([actor.stats.remote() for actor in list(self.actors)])

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

        self._closed.set()
        self._events.put((lambda what, future: None, None, None))  # wakes the pool's thread
        with self._lock:
            doomed = [*self.actors, *self._starting]
            self.actors, self._starting = [], []
            for call in self._calls.values():
                self._fail(call.task, RuntimeError(f"{self.name}: the pool was shut down"))
            self._calls.clear()
        for actor in doomed:
            with contextlib.suppress(Exception):
                ray.kill(actor)
        here = socket.gethostname()
        local = [pid for host, pid in self._processes if host == here]
        deadline = time.monotonic() + wait_s
        while any(_alive(pid) for pid in local) and time.monotonic() < deadline:
            time.sleep(0.1)


def _key(item) -> str:
    return getattr(item, "sample_id", None) or repr(item)


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
