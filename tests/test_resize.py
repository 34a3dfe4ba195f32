"""Resizing the step pools during a run (datagen/run/resize.py): the changes a new plan asks
for, within each step's bounds, and a real Ray pool grown and shrunk by the resizer."""

from __future__ import annotations

import time

import pytest

from datagen.build.settings import BuildConfigError
from datagen.core.stage import Resources
from datagen.run.placement import PoolPlan, StepDemand
from datagen.run.resize import Bounds, PoolResizer, Resize, resizes

WHOLE, SHARED = Resources(0.54, 1.0), Resources(0.12, 0.5)


def test_a_node_that_joins_gets_the_actors_its_plan_puts_there():
    plans = {"animate": PoolPlan("animate", 4, WHOLE, ("a", "a", "b", "b"))}
    changes = resizes(plans, {"animate": ["a", "a"]}, {"animate": WHOLE}, {})
    assert changes == [Resize("animate", retire=(), add=("b", "b"))]


def test_a_pool_with_more_actors_than_planned_retires_where_the_plan_has_fewer():
    plans = {"caption": PoolPlan("caption", 1, SHARED, ("a",))}
    changes = resizes(plans, {"caption": ["a", "b"]}, {"caption": SHARED}, {})
    assert changes == [Resize("caption", retire=("b",), add=())]


def test_the_bounds_hold_the_pool_between_least_and_most():
    plans = {"animate": PoolPlan("animate", 4, WHOLE, ("a", "a", "b", "b"))}
    capped = resizes(plans, {"animate": ["a", "a"]}, {"animate": WHOLE}, {"animate": Bounds(1, 3)})
    assert capped == [Resize("animate", retire=(), add=("b",))]
    plans = {"score": PoolPlan("score", 1, Resources(0.0, 0.5))}  # unpinned: by count
    raised = resizes(plans, {"score": [None]}, {"score": Resources(0.0, 0.5)}, {"score": Bounds(3)})
    assert raised == [Resize("score", retire=(), add=(None, None))]


def test_a_plan_with_another_request_per_actor_changes_nothing():
    plans = {"animate": PoolPlan("animate", 2, Resources(1.0, 1.0), ("a", "b"))}
    assert resizes(plans, {"animate": ["a"]}, {"animate": WHOLE}, {}) == []
    same = {"animate": PoolPlan("animate", 2, WHOLE, ("a", "b"))}
    assert resizes(same, {"animate": ["a", "b"]}, {"animate": WHOLE}, {}) == []


def test_pool_sizes_setting_names_the_steps_and_their_bounds(tmp_path):
    from datagen.build.settings import BuildConfig

    (tmp_path / "src").mkdir()
    config = BuildConfig(
        source=str(tmp_path / "src"), out=str(tmp_path / "out"), pool_sizes="animate=2:8,score=3"
    )
    assert config.pool_bounds() == {"animate": (2, 8), "score": (3, 3)}
    base = {"source": str(tmp_path / "src"), "out": str(tmp_path / "out")}
    with pytest.raises(BuildConfigError, match="no step 'anmate' in this build"):
        BuildConfig(**base, pool_sizes="anmate=2:8")
    with pytest.raises(BuildConfigError, match="needs 1 <= LEAST <= MOST"):
        BuildConfig(**base, pool_sizes="animate=4:2")
    with pytest.raises(BuildConfigError, match="is not STEP=LEAST:MOST"):
        BuildConfig(**base, pool_sizes="animate=many")
    # bounds change how a build runs, not what it makes: the work folder is the same
    assert config.work_root == BuildConfig(**base).work_root


def test_the_resizer_grows_and_shrinks_a_real_pool_when_two_plans_agree(ray_local):
    from test_ray_adapter import SquareStage

    from datagen.run.executors import ray_nodes
    from datagen.run.ray import StagePool

    pool = StagePool(SquareStage, Resources(num_cpus=0.25), size=1)
    try:
        demand = StepDemand("square", Resources(num_cpus=0.25), 1.0, 0.0)
        grow = PoolResizer({"square": pool}, [demand], ray_nodes, 80.0, {"square": Bounds(2, 2)})
        assert grow.step() == []  # one plan asking is not enough
        assert grow.step() == [Resize("square", add=(None,))]
        assert pool.size == 2 and pool.added == 1
        deadline = time.monotonic() + 60
        while len(pool.actors) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(pool.actors) == 2, "the added actor did not start"
        results = list(pool.map([[i] for i in range(12)]))
        assert sorted(r[0] for r in results) == [i * i for i in range(12)]
        assert pool.seconds_per_sample() is not None  # measured: the next plans use it
        assert {s.loads for s in pool.stats()} == {1}  # the new actor loaded its model once

        shrink = PoolResizer({"square": pool}, [demand], ray_nodes, 80.0, {"square": Bounds(1, 1)})
        shrink.step()
        assert shrink.step() == [Resize("square", retire=(None,))]
        assert pool.size == 1 and pool.retired == 1
        assert [r[0] for r in pool.map([[3]])] == [9]  # the pool goes on with its other actor
    finally:
        pool.shutdown()
