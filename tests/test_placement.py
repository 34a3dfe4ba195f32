"""Pool sizes and per-actor requests on a cluster (datagen/run/placement.py): every step
placed or a clear error at once, steps share a scarce GPU, spare GPUs go to the bottleneck."""

from __future__ import annotations

import pytest

from datagen.core.stage import Resources
from datagen.run.costs import PRODUCTION, TINY
from datagen.run.placement import Node, PlacementError, StepDemand, plan_pools

# What the stages declare today (their default Resources) for a CT build with judge off.
DECLARED = {
    "control": Resources(0.25, 1),
    "describe": Resources(1, 1),
    "stylize": Resources(1, 1),
    "animate": Resources(1, 1),
    "caption": Resources(1, 1),
    "score": Resources(0.25, 1),
}


def demands(costs=PRODUCTION) -> list[StepDemand]:
    return [
        StepDemand(name, resources, costs[name].seconds_per_sample, costs[name].gpu_memory_gb)
        for name, resources in DECLARED.items()
    ]


def nodes(*gpus: float, cpus: float = 32) -> list[Node]:
    return [Node(f"node-{i}", cpus, g) for i, g in enumerate(gpus)]


def test_light_steps_share_one_gpu_and_animate_takes_every_other_gpu_whole():
    plans = plan_pools(demands(), nodes(8, 8))
    light = {n: p for n, p in plans.items() if n != "animate"}
    assert {n: p.actors for n, p in light.items()} == dict.fromkeys(light, 1)
    # five steps' models (60 GB) on one 80 GB GPU, each asking its memory's fraction
    assert all(0 < p.resources.num_gpus < 1 for p in light.values())
    assert sum(p.resources.num_gpus for p in light.values()) <= 1
    assert plans["animate"].actors == 15 and plans["animate"].resources.num_gpus == 1
    # on 32 GPUs: 31 animate actors (1 GPU's compute keeps up with them: 21 s vs 732/31 s)
    assert plan_pools(demands(), nodes(8, 8, 8, 8))["animate"].actors == 31


def test_the_light_steps_get_more_shared_gpus_when_one_cannot_keep_up():
    # 2 x 64 GPUs: 21 s of light steps per sample on one GPU would be slower than animate's
    # 732 s / 127; on 4 GPUs, 5.25 s, they keep up with 124 animate actors (5.9 s)
    plans = plan_pools(demands(), nodes(64, 64, cpus=256))
    assert plans["stylize"].actors == 4 and plans["animate"].actors == 124


def test_a_light_step_grows_when_it_becomes_the_bottleneck():
    cheap_animate = [
        StepDemand(d.name, d.resources, 0.1 if d.name == "animate" else d.cost_s, 1.0)
        for d in demands()
    ]
    plans = plan_pools(cheap_animate, nodes(8))
    assert plans["stylize"].actors > 1  # now the slowest step per sample


def test_one_gpu_is_shared_by_memory_when_the_models_fit():
    plans = plan_pools(demands(TINY), nodes(1))
    assert all(p.actors == 1 for p in plans.values())
    assert sum(p.resources.num_gpus for p in plans.values()) <= 1
    assert all(p.resources.num_gpus > 0 for p in plans.values())


def test_two_gpus_hold_what_asks_four_and_a_half_with_an_animate_actor_on_each():
    plans = plan_pools(demands(TINY), nodes(1, 1))
    # the twins' models fit beside each other: one animate actor per GPU, more than half of it
    assert plans["animate"].actors == 2 and plans["animate"].resources.num_gpus > 0.5
    light = [p for p in plans.values() if p.name != "animate"]
    # one actor of each light step per node
    assert all(p.actors == 2 and 0 < p.resources.num_gpus < 0.5 for p in light)


def test_a_node_short_of_cpus_gets_fewer_light_sets_not_a_shared_animate_gpu():
    # one node, two GPUs and two logical CPUs (a laptop's Ray): the twelve actors of two light
    # sets do not fit the CPUs, one set does, and each GPU keeps its animate actor
    plans = plan_pools(demands(TINY), [Node("node-0", 2, 2)])
    assert plans["animate"].actors == 2 and plans["animate"].resources.num_gpus > 0.5
    assert all(p.actors == 1 for p in plans.values() if p.name != "animate")
    asked = sum(p.actors * p.resources.num_cpus for p in plans.values())
    assert asked <= 2


def test_on_gpus_that_hold_every_model_each_gpu_animates_with_the_light_steps_beside():
    plans = plan_pools(demands(), nodes(8, 8), gpu_memory_gb=141)  # H200s
    assert plans["animate"].actors == 16
    beside = sum(p.resources.num_gpus for p in plans.values() if p.name != "animate")
    assert plans["animate"].resources.num_gpus + beside <= 1
    # one actor of each light step per node, pinned there
    light = [p for p in plans.values() if p.name != "animate"]
    assert all(sorted(p.nodes) == ["node-0", "node-1"] for p in light), light


def test_production_models_that_do_not_fit_one_gpu_fail_at_once_with_what_was_asked():
    with pytest.raises(PlacementError) as raised:
        plan_pools(demands(), nodes(1), gpu_memory_gb=80)
    message = str(raised.value)
    assert "ask 4.5 GPUs" in message and "has 1" in message
    assert "120 GB together" in message and "80 GB" in message
    # an H200's 141 GB holds them all
    plans = plan_pools(demands(), nodes(1), gpu_memory_gb=141)
    assert plans["animate"].resources.num_gpus == pytest.approx(0.54)  # the rest beside it


def test_a_request_larger_than_every_node_is_an_error_naming_both():
    greedy = [*demands(), StepDemand("huge", Resources(4, 1), 1.0, 1.0)]
    with pytest.raises(PlacementError, match=r"'huge' asks 4 GPUs per actor.*largest node has 2"):
        plan_pools(greedy, nodes(2, 2))


def test_without_gpus_every_step_runs_on_cpu_with_one_actor():
    plans = plan_pools(demands(), nodes(0, cpus=2))
    assert all(p.actors == 1 and p.resources.num_gpus == 0 for p in plans.values())
    # CPUs shared out so that every actor starts on two cores
    assert sum(p.resources.num_cpus for p in plans.values()) <= 2


def test_max_actors_caps_a_pool():
    capped = [
        StepDemand(d.name, d.resources, d.cost_s, d.gpu_memory_gb, max_actors=2) for d in demands()
    ]
    assert plan_pools(capped, nodes(8))["animate"].actors == 2


def test_fractions_are_packed_per_gpu_not_per_node():
    # 3 x 0.6 GPU fits 2 GPUs by the total (1.8), not by GPU (Ray puts a fraction on one GPU)
    steps = [StepDemand(name, Resources(0.6, 1), 1.0, 1.0) for name in ("a", "b", "c")]
    plans = plan_pools(steps, nodes(2))
    assert all(p.resources.num_gpus < 0.6 for p in plans.values()), plans
    # 2 x 0.6 do fit: one per GPU, as declared
    two = plan_pools(steps[:2], nodes(2))
    assert [p.resources.num_gpus for p in two.values()] == [0.6, 0.6]
