"""Resizing the step pools during a run, as the cluster and the measured costs change.

Every RESIZE_INTERVAL_S the resizer plans the pools again (run/placement.py, the same rules as
at the start) on the cluster's live nodes, with each step's cost per sample as measured in its
pool so far (the cost table's until the pool has finished a few calls), each step held
between its min and max actors (the `pool_sizes` setting). A step whose planned actors differ
from its pool's in two plans in a row is resized (one plan alone may be noise, and a model
load costs a minute at production sizes): idle actors are retired first, where the pool has
more than planned, then new ones are started where the plan puts them. A node that joins the
cluster is thus given actors, and a step measured slower than the table says gets more of the
GPUs that are shared. A plan that gives a step another request per actor (the cluster changed
layout, say from GPUs of their own for the light steps to beside animate) leaves that step as
it is: a running actor's request cannot change, and restarting a pool would lose its loaded
models.

Executor-side and step-agnostic: it sees pools (their sizes, layouts, measured times) and the
steps' demands, never what a step does.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from datagen.run.placement import PlacementError, PoolPlan, StepDemand, plan_pools

RESIZE_INTERVAL_S = 10.0  # how often the pools are planned again
AGREEING_PLANS = 2  # a change is made once this many plans in a row ask for it

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Bounds:
    """A step's least and most actors (None: no most)."""

    least: int = 1
    most: int | None = None

    def clamp(self, actors: int) -> int:
        actors = max(actors, self.least)
        return actors if self.most is None else min(actors, self.most)


@dataclass(frozen=True)
class Resize:
    """What to do to one pool: retire idle actors on these nodes, start actors on those."""

    step: str
    retire: tuple[str | None, ...] = ()
    add: tuple[str | None, ...] = ()


def resizes(
    plans: dict[str, PoolPlan],
    layouts: dict[str, list[str | None]],
    requests: dict,
    bounds: dict[str, Bounds],
) -> list[Resize]:
    """The changes that take each pool (its actors' nodes in `layouts`, its per-actor request
    in `requests`) to its plan, within its bounds. Pinned pools (the plan names each actor's
    node) change node by node; the others by count, wherever Ray places them."""
    changes = []
    for step, plan in plans.items():
        if step not in layouts or plan.resources != requests[step]:
            continue  # another layout: a running actor's request cannot change
        have = layouts[step]
        target = bounds.get(step, Bounds()).clamp(plan.actors)
        if plan.nodes and all(have):
            want = Counter(plan.nodes)
            want[None] += max(target - plan.actors, 0)  # a least above the plan: Ray's choice
            have_count = Counter(have)
            retire = (have_count - want).elements()
            add = (want - have_count).elements()
            retire, add = tuple(retire), tuple(add)
            if len(have) - len(retire) + len(add) > target:  # the most cuts the plan's adds
                add = add[: max(target - len(have) + len(retire), 0)]
        else:
            retire = (None,) * max(len(have) - target, 0)
            add = (None,) * max(target - len(have), 0)
        if retire or add:
            changes.append(Resize(step, tuple(retire), tuple(add)))
    return changes


class PoolResizer:
    """A thread that plans the pools again every RESIZE_INTERVAL_S and carries out the
    changes two plans in a row agree on (see the module docstring)."""

    def __init__(
        self,
        pools: dict,
        demands: list[StepDemand],
        nodes: Callable[[], list],
        gpu_memory_gb: float,
        bounds: dict[str, Bounds],
        interval_s: float | None = None,
    ):
        self.pools, self.demands, self.nodes = pools, demands, nodes
        self.gpu_memory_gb, self.bounds = gpu_memory_gb, bounds
        self.interval_s = interval_s or RESIZE_INTERVAL_S
        self.log: list[Resize] = []  # every change made, in order
        self._asked: list[Resize] | None = None  # the last plan's changes
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="pool-resizer", daemon=True)

    def start(self) -> PoolResizer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.step()
            except Exception:  # a failed plan must not end the build: the pools stay as they are
                log.exception("resizing the pools failed; they stay as they are")

    def measured(self) -> list[StepDemand]:
        """The steps' demands with their costs as measured in their pools, where measured."""
        demands = []
        for demand in self.demands:
            pool = self.pools.get(demand.name)
            seconds = pool.seconds_per_sample() if pool is not None else None
            cost = seconds if seconds is not None else demand.cost_s
            most = self.bounds.get(demand.name, Bounds()).most
            demands.append(dataclasses.replace(demand, cost_s=cost, max_actors=most))
        return demands

    def step(self) -> list[Resize]:
        """Plan once; make the changes this plan and the last one agree on. Returns them."""
        try:
            plans = plan_pools(self.measured(), self.nodes(), self.gpu_memory_gb)
        except PlacementError as error:  # a node going down, say: try again next time
            log.info("the pools were not planned again: %s", error)
            return []
        asked = resizes(
            plans,
            {name: pool.layout() for name, pool in self.pools.items()},
            {name: pool.resources for name, pool in self.pools.items()},
            self.bounds,
        )
        agreed = [change for change in asked if change in (self._asked or [])]
        self._asked = asked
        for change in agreed:
            self._apply(change)
        return agreed

    def _apply(self, change: Resize) -> None:
        pool = self.pools[change.step]
        retired = sum(pool.retire(node) for node in change.retire)
        for node in change.add:
            pool.grow(node)
        if retired or change.add:
            log.info(
                "%s: %d actor(s) retired, %d started (now %d)",
                change.step,
                retired,
                len(change.add),
                pool.size,
            )
            self.log.append(Resize(change.step, change.retire[:retired], change.add))
            self._asked = None  # the pools changed: the next two plans decide afresh
