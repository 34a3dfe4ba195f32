"""How many actors each step gets, and what each asks for, on the cluster at hand.

Pure arithmetic, no Ray: the Ray executor passes the nodes' resources in. Three rules:

1. Every step gets one actor that can be placed, or the build fails at once with a message
   naming what was asked and what the cluster has (a request no node can hold would otherwise
   leave Ray waiting forever, silently).
2. With fewer GPUs than the steps ask for one actor each and rule 3 out of reach (one GPU,
   say), the steps share GPUs: each GPU step
   asks the fraction of a GPU its models take (`gpu_memory_gb` of the cost table over the
   GPU's memory), the whole set must fit one GPU's memory, and each step keeps one actor.
3. The heavy step (the costliest per sample: animate, about 95% of the GPU time) gets one
   GPU's compute per actor and the light steps share GPUs, each asking its memory's fraction:
   - where the heavy step's models and all the light ones fit one GPU together (an H200's
     141 GB holds animate's 60 GB and the others' 60 GB), every GPU holds one heavy actor
     (asking more than half a GPU, so Ray never puts two on one) with room beside it for the
     light steps, which get enough actors for their compute to keep up and at least one per
     node: all N GPUs animate;
   - otherwise (80 GB GPUs), where the light steps fit one GPU together, they get L GPUs of
     their own, one actor of each per GPU, and the heavy step every other GPU, whole. L
     balances the two: co-located steps share one GPU's compute, so their costs add up; on 32
     GPUs with the production costs that is 1 GPU for five steps and 31 animate actors.
4. Otherwise the GPUs left over go, one actor at a time, to the step that limits the pairs per
   second (the fewest actors per second of its cost per sample). Runs without GPUs keep one
   actor per step (more copies of a model on the same cores add memory, not speed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from datagen.core.stage import Resources

# Fractions of a GPU are asked in hundredths (Ray accepts 0.0001; hundredths read better).
GPU_QUANTUM = 0.01


class PlacementError(RuntimeError):
    """The build's steps cannot all be placed on this cluster."""


@dataclass(frozen=True)
class StepDemand:
    """What one step asks of the cluster."""

    name: str
    resources: Resources  # one actor's declared request
    cost_s: float  # device seconds per sample (the cost table, or measured)
    gpu_memory_gb: float  # what one actor's models take on a GPU
    max_actors: int | None = None


@dataclass(frozen=True)
class Node:
    node_id: str
    cpus: float
    gpus: float


@dataclass(frozen=True)
class PoolPlan:
    name: str
    actors: int
    resources: Resources  # of each actor
    # the node of each actor, where the plan lays actors out GPU by GPU (rule 3): Ray places
    # a fractional request by the node's total (a node with 0.46 + 1.0 free GPU takes a 0.54
    # request, finds no single GPU to give it and leaves it pending, measured on Ray 2.60
    # with two nodes of two logical GPUs), so the executor pins each actor to its node
    nodes: tuple[str, ...] = ()


def plan_pools(
    demands: list[StepDemand], nodes: list[Node], gpu_memory_gb: float = 80.0
) -> dict[str, PoolPlan]:
    """An actor count and per-actor request for every step (see the module docstring)."""
    if not nodes:
        raise PlacementError("the Ray cluster has no live nodes")
    have_gpus = any(node.gpus >= GPU_QUANTUM for node in nodes)
    requests = {d.name: _fit_cpus(d.resources, len(demands), nodes) for d in demands}
    if not have_gpus:
        requests = {name: Resources(0.0, r.num_cpus) for name, r in requests.items()}
    else:
        _check_whole_gpus(demands, nodes)
        colocated = _colocated(demands, requests, nodes, gpu_memory_gb)
        if colocated:
            return colocated
    free = _free(nodes)
    shared = not _place_all(requests, free)
    if shared:
        requests = _shared_gpu_requests(demands, requests, nodes, gpu_memory_gb)
        free = _free(nodes)
        if not _place_all(requests, free):
            raise PlacementError(_describe(requests, nodes, "cannot place one actor per step"))
    actors = dict.fromkeys(requests, 1)
    # Steps that share a GPU share its compute too: a second actor there adds no speed.
    while have_gpus and not shared:
        # the bottleneck: the step with the fewest samples per second
        growable = [d for d in demands if d.max_actors is None or actors[d.name] < d.max_actors]
        if not growable:
            break
        slowest = min(growable, key=lambda d: actors[d.name] / max(d.cost_s, 1e-9))
        if requests[slowest.name].num_gpus == 0 or _place(requests[slowest.name], free) is None:
            break  # more of anything else would not raise the pairs per second
        actors[slowest.name] += 1
    return {name: PoolPlan(name, actors[name], requests[name]) for name in requests}


def _colocated(
    demands: list[StepDemand], requests: dict[str, Resources], nodes: list[Node], memory: float
) -> dict[str, PoolPlan] | None:
    """Rule 3: one heavy actor per GPU with the light steps beside it, or the light steps on L
    GPUs of their own; None where the rule does not apply or the plan does not place."""
    on_gpu = [d for d in demands if requests[d.name].num_gpus > 0]
    if len(on_gpu) < 2:
        return None
    heavy = max(on_gpu, key=lambda d: d.cost_s)
    light = [d for d in on_gpu if d is not heavy]
    whole_gpus = sum(int(node.gpus + 1e-9) for node in nodes)
    if requests[heavy.name].num_gpus < 1 or whole_gpus < 1:
        return None
    fractions = {
        d.name: Resources(_memory_fraction(d.gpu_memory_gb, memory), requests[d.name].num_cpus)
        for d in light
    }
    beside = sum(r.num_gpus for r in fractions.values())
    light_cost = sum(d.cost_s for d in light)  # per sample, when they share one GPU's compute
    if (
        requests[heavy.name].num_gpus == 1
        and beside < 0.5
        and _memory_fraction(heavy.gpu_memory_gb, memory) <= 1 - beside
    ):
        # Every GPU holds one heavy actor (asking more than half a GPU, so never two) and
        # room for the light steps beside it; the light steps have as many actors as it takes
        # for their compute (stolen from the heavy actors they sit beside) to keep up.
        heavy_request = Resources(round(1 - beside, 2), requests[heavy.name].num_cpus)
        heavy_gpus = whole_gpus
        # at least one set per node with GPUs: the light work is the same however many
        # actors share it, more of them fill the pipeline sooner and a lost node takes none
        # of a step's only actor with it (the cost is their model loads)
        keep_up = math.ceil(light_cost * whole_gpus / heavy.cost_s)
        light_sets = min(whole_gpus, max(keep_up, sum(1 for n in nodes if n.gpus >= 1)))
    elif whole_gpus >= 2 and sum(d.gpu_memory_gb for d in light) <= memory:
        heavy_request, per_heavy = requests[heavy.name], int(requests[heavy.name].num_gpus)
        # L GPUs of light steps against the rest for the heavy pool: the slower sets the pace
        light_sets = min(
            range(1, whole_gpus),
            key=lambda n: max(
                light_cost / n, heavy.cost_s / max((whole_gpus - n) // per_heavy, 1e-9)
            ),
        )
        heavy_gpus = whole_gpus - light_sets
    else:
        return None
    with_gpus = [i for i, node in enumerate(nodes) if node.gpus >= 1]
    fewest = min(light_sets, len(with_gpus))
    # Fewer light sets where the nodes' CPUs do not hold them all, down to one set per node;
    # then smaller CPU shares (a laptop's Ray with two logical CPUs and two GPUs).
    tries = [(sets, heavy_request, fractions) for sets in range(light_sets, fewest - 1, -1)]
    most_per_node = max(int(nodes[i].gpus + 1e-9) for i in with_gpus) + len(light) * math.ceil(
        fewest / len(with_gpus)
    )
    cpu_only = sum(1 for r in requests.values() if r.num_gpus == 0)
    share = round(min(node.cpus for node in nodes) / (most_per_node + cpu_only + 1) - 0.005, 2)
    if share >= GPU_QUANTUM:
        tries.append((fewest, _at_most(heavy_request, share), _at_most(fractions, share)))
    for sets, heavy_ask, light_asks in tries:
        placed = _lay_out(
            nodes, requests, heavy, heavy_ask, heavy_gpus, light_asks, light, sets, with_gpus
        )
        if placed is not None:
            asks = {**requests, heavy.name: heavy_ask, **light_asks}
            return {
                name: PoolPlan(name, len(placed[name]), asks[name], tuple(placed[name]))
                for name in requests
            }
    return None  # the nodes' shapes did not allow it: fall back to rules 2 and 4


def _at_most(asked, cpus: float):
    """`asked` (a Resources, or a dict of them) asking at most `cpus` CPUs per actor."""
    if isinstance(asked, dict):
        return {name: _at_most(request, cpus) for name, request in asked.items()}
    return Resources(asked.num_gpus, min(asked.num_cpus, cpus))


def _lay_out(
    nodes: list[Node],
    requests: dict[str, Resources],
    heavy: StepDemand,
    heavy_request: Resources,
    heavy_gpus: int,
    fractions: dict[str, Resources],
    light: list[StepDemand],
    light_sets: int,
    with_gpus: list[int],
) -> dict[str, list[str]] | None:
    """Rule 3's layout: the heavy actors GPU by GPU, then the light sets over the nodes; the
    node of each actor per step, or None where some step got none."""
    free = _free(nodes)
    placed: dict[str, list[str]] = {name: [] for name in requests}  # step -> node per actor

    def place(name: str, request: Resources, first_room: int = 0) -> bool:
        rooms = free[first_room:] + free[:first_room]
        node = _place(request, rooms)
        if node is not None:
            placed[name].append(node)
        return node is not None

    while (
        _below_max(heavy, len(placed[heavy.name]))
        and len(placed[heavy.name]) * heavy_request.num_gpus < heavy_gpus
        and place(heavy.name, heavy_request)
    ):
        pass
    for number in range(light_sets):  # one of each light step per set, the sets over the nodes
        for d in light:
            if _below_max(d, len(placed[d.name])):
                place(d.name, fractions[d.name], with_gpus[number % len(with_gpus)])
    for name, request in requests.items():  # steps on CPUs only: one actor, as before
        if request.num_gpus == 0:
            place(name, request)
    return placed if all(placed.values()) else None


def _below_max(demand: StepDemand, actors: int) -> bool:
    return demand.max_actors is None or actors < demand.max_actors


def _memory_fraction(gpu_memory_gb: float, memory: float) -> float:
    fraction = math.ceil(gpu_memory_gb / memory / GPU_QUANTUM) * GPU_QUANTUM
    return round(max(fraction, GPU_QUANTUM), 2)


def _fit_cpus(resources: Resources, steps: int, nodes: list[Node]) -> Resources:
    """CPU-only or not, an actor asks at most its share of the smallest node's CPUs, so every
    step's actor can start on a small machine (Ray schedules by logical CPUs)."""
    share = max(min(node.cpus for node in nodes) / (steps + 1), 0.05)
    return Resources(resources.num_gpus, round(min(resources.num_cpus, share), 2))


def _check_whole_gpus(demands: list[StepDemand], nodes: list[Node]) -> None:
    largest = max(node.gpus for node in nodes)
    for demand in demands:
        if demand.resources.num_gpus > max(largest, 1.0):
            raise PlacementError(
                f"step {demand.name!r} asks {demand.resources.num_gpus:g} GPUs per actor, "
                f"but the largest node has {largest:g} ({_cluster(nodes)})"
            )


def _shared_gpu_requests(
    demands: list[StepDemand], requests: dict[str, Resources], nodes, gpu_memory_gb: float
) -> dict[str, Resources]:
    """GPU steps share a GPU: each asks the fraction its models take of a GPU's memory."""
    on_gpu = [d for d in demands if d.resources.num_gpus > 0]
    total = sum(d.gpu_memory_gb for d in on_gpu)
    if total > gpu_memory_gb:
        needs = ", ".join(f"{d.name} {d.gpu_memory_gb:g}" for d in on_gpu)
        raise PlacementError(
            f"the steps ask {sum(d.resources.num_gpus for d in on_gpu):g} GPUs and the "
            f"cluster has {sum(n.gpus for n in nodes):g} ({_cluster(nodes)}); sharing GPUs, "
            f"their models need {total:g} GB together ({needs}) and a GPU has "
            f"{gpu_memory_gb:g} GB (setting gpu_memory_gb): add GPUs or use larger ones"
        )
    shared = dict(requests)
    for demand in on_gpu:
        fraction = _memory_fraction(demand.gpu_memory_gb, gpu_memory_gb)
        shared[demand.name] = Resources(fraction, requests[demand.name].num_cpus)
    return shared


class _Room:
    """What is left on a node: CPUs, and each GPU's free fraction (as Ray assigns a fractional
    request to one GPU, two halves on different GPUs do not make a whole one)."""

    def __init__(self, node: Node):
        self.node_id = node.node_id
        whole = int(node.gpus + 1e-9)
        self.cpus = node.cpus
        self.gpus = [1.0] * whole + ([node.gpus - whole] if node.gpus - whole > 1e-9 else [])

    def take(self, request: Resources) -> bool:
        if self.cpus + 1e-9 < request.num_cpus:
            return False
        if request.num_gpus >= 1:
            idle = [i for i, left in enumerate(self.gpus) if left > 1 - 1e-9]
            if len(idle) < int(request.num_gpus):
                return False
            for i in idle[: int(request.num_gpus)]:
                self.gpus[i] = 0.0
        elif request.num_gpus > 0:
            fits = [i for i, left in enumerate(self.gpus) if left + 1e-9 >= request.num_gpus]
            if not fits:
                return False
            fullest = min(fits, key=self.gpus.__getitem__)  # best fit: keep whole GPUs whole
            self.gpus[fullest] -= request.num_gpus
        self.cpus -= request.num_cpus
        return True


def _free(nodes: list[Node]) -> list[_Room]:
    return [_Room(node) for node in nodes]


def _place_all(requests: dict[str, Resources], free: list[_Room]) -> bool:
    # largest GPU requests first: a whole-GPU actor must not find its GPU split already
    order = sorted(requests.values(), key=lambda r: (-r.num_gpus, -r.num_cpus))
    return all(_place(request, free) is not None for request in order)


def _place(request: Resources, free: list[_Room]) -> str | None:
    """Take `request` from the first node that holds it; that node's id, or None."""
    return next((room.node_id for room in free if room.take(request)), None)


def _cluster(nodes: list[Node]) -> str:
    return "; ".join(f"{n.node_id[:12]}: {n.cpus:g} CPUs, {n.gpus:g} GPUs" for n in nodes)


def _describe(requests: dict[str, Resources], nodes: list[Node], what: str) -> str:
    asked = ", ".join(
        f"{name} {r.num_gpus:g} GPU + {r.num_cpus:g} CPU" for name, r in requests.items()
    )
    return f"{what}: asked {asked}; the cluster has {_cluster(nodes)}"
