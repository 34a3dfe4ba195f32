"""Scale-out: the Ray executor on N = 1..32 logical GPUs over 1 to 4 nodes, and Ray Data beside it.

Every step is replaced by a COST-FAITHFUL STAND-IN (a bench-only Stage, never used by a build):
it holds its actor's logical GPU for the step's production time per sample, scaled down
(`--seconds-per-minute`, default 1 s of sleep per real minute, from datagen/run/costs.py with
its sources), and uses no CPU. Everything else is the product's: the cost table, the placement
(run/placement.py plan_pools), the actor pools (run/ray.py StagePool), the step runner and its
jobs (build/execute.py run_step / StepJob: the actors read their inputs from and save their
outputs to the work files; the driver passes references) and the shard window
(run/executors.py shards_in_flight, which the Prefect flow uses; the bench runs the shard chains
on threads, as Prefect's thread-pool task runner does, without the Prefect server).

The cluster is real: `ray.cluster_utils.Cluster` with logical GPUs, on loopback (as Ray's own
tests do). Engines:
- `pools`: datagen's executor (above);
- `raydata`: the same stand-ins and jobs as a Ray Data pipeline, one `map_batches` per step over
  an actor pool of the planned size (`concurrency`), streaming with Ray Data's backpressure.

For each N it prints pairs per minute (from the first animate call, when the actors are up, to
the last pair out: the pipeline's fill and drain included), speedup over N = 1, the busy
fraction of the animate actors in steady state (from when the last of them started its first
call to when the first finished its last), the orchestration
overhead per sample-step (pools: StepReport.overhead_s) and the
driver's CPU per sample; then the driver's peak RSS at 1x and 10x samples. Exits 1 when a
target of the scale-out issue is missed (speedup >= 0.9 N, animate busy >= 95%, overhead
<= 50 ms, driver RSS flat within 20%). The last line reads `scale: efficiency E at N=32`.

    python bench/scale.py                       # both engines, N = 1, 2, 4, 8, 16, 32
    python bench/scale.py --gpus 1,2 --engines pools --rounds 2   # a quick look
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import resource
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # every Ray process on 127.0.0.1
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from datagen.build.execute import StepJob, run_step  # noqa: E402
from datagen.build.settings import BuildConfig  # noqa: E402
from datagen.build.stage_configs import stage_factories  # noqa: E402
from datagen.build.step_io import Saved  # noqa: E402
from datagen.build.steps import Step, steps_for  # noqa: E402
from datagen.build.workdir import ShardWork  # noqa: E402
from datagen.core.runner import run_inline  # noqa: E402
from datagen.core.stage import Reject, Resources, Stage  # noqa: E402
from datagen.run.costs import PRODUCTION  # noqa: E402
from datagen.run.executors import ray_nodes, shards_in_flight  # noqa: E402
from datagen.run.placement import StepDemand, plan_pools  # noqa: E402
from datagen.stages.plan import PlannedSample  # noqa: E402

TARGET_EFFICIENCY = 0.9
TARGET_BUSY = 0.95
TARGET_OVERHEAD_MS = 50.0
TARGET_RSS_GROWTH = 1.2
GPUS_PER_NODE = 8
CPUS_PER_NODE = 64  # logical: the stand-ins use none, Ray schedules actors by these counts


@dataclass(frozen=True)
class Token:
    """A stand-in's input and output: the sample's reference."""

    sample_id: str


class CostStandIn(Stage):
    """COST-FAITHFUL STAND-IN for a step's stage (bench only): sleeps the step's production
    time per sample, scaled, holding its actor's logical GPU; records each call's interval."""

    name = "stand-in"

    def __init__(self, step: str, seconds_per_sample: float, log_dir: str, resources: Resources):
        super().__init__(resources)
        self.step, self.seconds, self.log_dir = step, seconds_per_sample, log_dir
        self.name = step

    def _load(self) -> None:
        self.log = open(Path(self.log_dir) / f"{self.step}-{os.getpid()}.jsonl", "a")  # noqa: SIM115

    def _process(self, batch):
        began = time.time()
        time.sleep(self.seconds * len(batch))
        self.log.write(json.dumps([began, time.time()]) + "\n")
        self.log.flush()
        return [Token(item.sample_id) for item in batch]


def stand_in_steps(config: BuildConfig) -> list[Step]:
    """The build's steps with their reads and saves cut down to a reference and a marker."""
    return [
        replace(
            step,
            reads=("plan.sample",),
            read=lambda reads, context: Token(reads.sample.sample_id),
            save=_saved_marker(step.name),
            writes=(f"{step.name}.done",),
        )
        for step in steps_for(config)
    ]


def _saved_marker(name: str):
    return lambda given, output, context: Saved(values={"done": True})


def cluster_shape(gpus: int) -> list[int]:
    """GPUs per node: 1 node up to 2 GPUs, 2 up to 8, then nodes of 8 (4 nodes at N = 32)."""
    nodes = 1 if gpus <= 2 else 2 if gpus <= 8 else math.ceil(gpus / GPUS_PER_NODE)
    return [gpus // nodes + (1 if i < gpus % nodes else 0) for i in range(nodes)]


def start_cluster(gpus: int):
    from ray.cluster_utils import Cluster

    shape = cluster_shape(gpus)
    node = {"num_cpus": CPUS_PER_NODE, "node_ip_address": "127.0.0.1"}
    cluster = Cluster(
        initialize_head=True,
        head_node_args={**node, "num_gpus": shape[0], "object_store_memory": 2**28},
    )
    for extra in shape[1:]:
        cluster.add_node(**node, num_gpus=extra, object_store_memory=2**28)
    cluster.wait_for_nodes()
    return cluster, shape


def declared() -> dict[str, Resources]:
    """What the production profile's stages ask per actor (their own Resources; no model is
    loaded to know it)."""
    with tempfile.TemporaryDirectory() as tmp:
        config = BuildConfig(source=tmp, out=tmp, profile="production")
        return {name: make().resources for name, make in stage_factories(config).items()}


def plan_for(memory_gb: float) -> dict:
    """The product's pool plan on the connected cluster (run/placement.py, run/costs.py)."""
    demands = [
        StepDemand(
            name, resources, PRODUCTION[name].seconds_per_sample, PRODUCTION[name].gpu_memory_gb
        )
        for name, resources in declared().items()
    ]
    return plan_pools(demands, ray_nodes(), memory_gb)


def write_shards(config: BuildConfig, samples: int) -> list[str]:
    shards = []
    for first in range(0, samples, config.shard_size):
        shard = f"shard-{first // config.shard_size:05d}"
        planned = [
            PlannedSample(
                f"s{i:06d}", "file:///x.mp4", "/x.mp4", 0, 81, 16.0, 480, 832, "ink_wash", i
            )
            for i in range(first, min(first + config.shard_size, samples))
        ]
        ShardWork(config.work_root, shard).write_manifest(planned)
        shards.append(shard)
    return shards


def factory(step: str, seconds: float, log_dir: str, resources: Resources):
    def make() -> Stage:
        return CostStandIn(step, seconds, log_dir, resources)

    make.name = step
    return make


def run_pools(config, steps, plans, seconds, log_dir, shards) -> dict:
    """datagen's executor: a StagePool per step sized by the plan, the shard window."""
    from datagen.run.ray import StagePool

    order = sorted(steps, key=lambda s: -plans[s.name].resources.num_gpus)
    pools = {}
    for step in order:
        plan = plans[step.name]
        pools[step.name] = StagePool(
            factory(step.name, seconds[step.name], log_dir, plan.resources),
            plan.resources,
            size=plan.actors,
            name=step.name,
            nodes=plan.nodes,
        )
    done_at: list[float] = []
    reports = []
    lock = threading.Lock()

    def chain(shard: str) -> None:
        work = ShardWork(config.work_root, shard)
        for step in steps:
            report = run_step(step, work, config, pools[step.name])
            with lock:
                reports.append(report)
        with lock:
            done_at.extend([time.time()] * len(work.samples()))

    window = shards_in_flight(config, pools)
    began, cpu = time.time(), process_cpu()
    with ThreadPoolExecutor(max_workers=window) as threads:  # the flow's shard window
        list(threads.map(chain, shards))
    cpu = process_cpu() - cpu
    for pool in pools.values():
        pool.shutdown()
    handled = sum(r.done + r.rejected for r in reports)
    return {
        "began": began,
        "done_at": done_at,
        "window": window,
        "overhead_ms": 1000 * sum(r.overhead_s for r in reports) / max(handled, 1),
        "driver_cpu_s": cpu,
    }


class StepUDF:
    """A Ray Data callable class: a stand-in stage run through the same StepJob."""

    def __init__(self, step: Step, seconds: float, log_dir: str, config: BuildConfig, resources):
        self.step, self.config = step, config
        self.stage = CostStandIn(step.name, seconds, log_dir, resources)
        self.stage.setup()

    def __call__(self, batch: dict) -> dict:
        samples = [PlannedSample(**json.loads(s)) for s in batch["sample"]]
        kept: set[str] = set()
        for shard in dict.fromkeys(str(s) for s in batch["shard"]):  # a job is per shard
            mine = [s for s, of in zip(samples, batch["shard"], strict=True) if of == shard]
            job = StepJob(self.step.name, str(self.config.work_root), shard, self.config, self.step)
            outcomes = run_inline(job, self.stage, mine)
            kept |= {o.sample_id for o in outcomes if not isinstance(o, Reject)}
        rows = [i for i, s in enumerate(samples) if s.sample_id in kept]  # rejects go no further
        return {"shard": batch["shard"][rows], "sample": batch["sample"][rows]}


def run_raydata(config, steps, plans, seconds, log_dir, shards) -> dict:
    """The same stand-ins and jobs as a Ray Data pipeline: one map_batches per step."""
    import ray.data

    logging.getLogger("ray.data").setLevel(logging.ERROR)  # its notes on experimental options
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    rows = [
        {"shard": shard, "sample": json.dumps(asdict(sample))}
        for shard in shards
        for sample in ShardWork(config.work_root, shard).samples()
    ]
    # one block per batch of the light steps: a batch then holds one shard's samples
    dataset = ray.data.from_items(rows, override_num_blocks=max(1, len(rows) // config.batch_size))
    for step in steps:
        plan = plans[step.name]
        dataset = dataset.map_batches(
            StepUDF,
            fn_constructor_args=(step, seconds[step.name], log_dir, config, plan.resources),
            batch_size=step.batch_size(config),
            compute=ray.data.ActorPoolStrategy(size=plan.actors),
            num_gpus=plan.resources.num_gpus,
            num_cpus=plan.resources.num_cpus,
            batch_format="numpy",
        )
    done_at = []
    began, cpu = time.time(), process_cpu()
    for _ in dataset.iter_rows():
        done_at.append(time.time())
    return {
        "began": began,
        "done_at": done_at,
        "window": None,
        "overhead_ms": None,
        "driver_cpu_s": process_cpu() - cpu,
    }


def process_cpu() -> float:
    """CPU-seconds of this (the driver's) process, all its threads: Ray's own included."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def calls(log_dir: str, step: str) -> list[list[tuple[float, float]]]:
    """Each actor's (start, end) of its stand-in calls, one list per actor."""
    return [
        [tuple(json.loads(line)) for line in path.read_text().splitlines()]
        for path in Path(log_dir).glob(f"{step}-*.jsonl")
    ]


def steady_busy(per_actor: list[list[tuple[float, float]]]) -> float:
    """Busy fraction of the actors in steady state: from the moment the last of them started
    its first call (the pipeline primed) to the moment the first finished its last (the work
    running out)."""
    start = max(min(a for a, _ in own) for own in per_actor)
    end = min(max(b for _, b in own) for own in per_actor)
    if end <= start:
        return float("nan")
    held = sum(max(0.0, min(b, end) - max(a, start)) for own in per_actor for a, b in own)
    return held / (len(per_actor) * (end - start))


def measure(engine: str, gpus: int, args) -> dict:
    import ray

    scale = args.seconds_per_minute / 60.0
    seconds = {name: cost.seconds_per_sample * scale for name, cost in PRODUCTION.items()}
    with tempfile.TemporaryDirectory(prefix="datagen-bench-scale-") as tmp:
        (Path(tmp) / "sources").mkdir()
        config = BuildConfig(
            source=str(Path(tmp) / "sources"),
            out=str(Path(tmp) / "out"),
            shard_size=args.shard_size,
        )
        steps = stand_in_steps(config)
        log_dir = str(Path(tmp) / "calls")
        Path(log_dir).mkdir()
        cluster, shape = start_cluster(gpus)
        try:
            ray.init(address=cluster.address, log_to_driver=False)
            plans = plan_for(args.gpu_memory_gb)
            animate = plans["animate"].actors
            samples = args.samples or args.rounds * animate
            shards = write_shards(config, samples)
            run = run_pools if engine == "pools" else run_raydata
            result = run(config, steps, plans, seconds, log_dir, shards)
        finally:
            ray.shutdown()
            cluster.shutdown()
        done = sorted(result["done_at"])
        if len(done) != samples:
            raise RuntimeError(f"{engine} at N={gpus}: {len(done)} of {samples} samples came out")
        animated = calls(log_dir, "animate")
        if len(animated) != animate:
            raise RuntimeError(
                f"{engine} at N={gpus}: {len(animated)} of {animate} animate actors ran"
            )
        # from the first animate call (the actors are up) to the last pair out: pipeline fill
        # and drain included
        first = min(a for own in animated for a, _ in own)
        rate = 60.0 * samples / max(done[-1] - first, 1e-9)
        busy = steady_busy(animated)
    return {
        "engine": engine,
        "gpus": gpus,
        "nodes": len(shape),
        "animate_actors": animate,
        "samples": samples,
        "window": result["window"],
        "pairs_per_min": round(rate, 2),
        "animate_busy": round(busy, 3),
        "overhead_ms": None if result["overhead_ms"] is None else round(result["overhead_ms"], 2),
        "driver_cpu_ms_per_sample": round(1000 * result["driver_cpu_s"] / samples, 2),
        "wall_s": round(done[-1] - result["began"], 1),
    }


def driver_rss(engine: str, gpus: int, samples: int, args) -> float:
    """Peak RSS (MB) of a fresh driver process running `samples` samples at a fast time scale."""
    import subprocess

    command = [
        sys.executable, __file__, "--engines", engine, "--gpus", str(gpus), "--samples",
        str(samples), "--seconds-per-minute", str(args.rss_seconds_per_minute), "--print-rss",
    ]  # fmt: skip
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return float(output.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--gpus", default="1,2,4,8,16,32")
    parser.add_argument("--engines", default="pools,raydata")
    parser.add_argument("--rounds", type=int, default=6, help="samples per animate actor")
    parser.add_argument("--samples", type=int, default=0, help="instead of --rounds")
    parser.add_argument("--seconds-per-minute", type=float, default=1.0)
    parser.add_argument("--shard-size", type=int, default=8)
    parser.add_argument("--gpu-memory-gb", type=float, default=141.0, help="an H200")
    parser.add_argument("--rss-gpus", type=int, default=8)
    parser.add_argument("--rss-samples", type=int, default=48)
    parser.add_argument("--rss-seconds-per-minute", type=float, default=0.1)
    parser.add_argument("--no-rss", action="store_true")
    parser.add_argument("--print-rss", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    engines = args.engines.split(",")
    counts = [int(n) for n in args.gpus.split(",")]
    if args.print_rss:
        measure(engines[0], counts[0], args)
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        return

    results, failures = [], []
    for engine in engines:
        base = None
        for gpus in counts:
            row = measure(engine, gpus, args)
            base = base or row["pairs_per_min"] / gpus
            row["speedup"] = round(row["pairs_per_min"] / base, 2)
            row["efficiency"] = round(row["speedup"] / gpus, 3)
            results.append(row)
            print(
                f"{engine:8s} N={gpus:2d} ({row['nodes']} node(s), {row['animate_actors']:2d} "
                f"animate actors, {row['samples']} pairs): {row['pairs_per_min']:7.2f} pairs/min,"
                f" speedup {row['speedup']:5.2f} (E {row['efficiency']:.2f}), animate busy "
                f"{100 * row['animate_busy']:5.1f}%, overhead {row['overhead_ms']} ms/sample-step,"
                f" driver CPU {row['driver_cpu_ms_per_sample']} ms/sample, wall {row['wall_s']} s",
                flush=True,
            )
            if engine == "pools":
                if row["efficiency"] < TARGET_EFFICIENCY:
                    failures.append(f"{engine} N={gpus}: efficiency {row['efficiency']}")
                if row["animate_busy"] < TARGET_BUSY:
                    failures.append(f"{engine} N={gpus}: animate busy {row['animate_busy']}")
                if row["overhead_ms"] > TARGET_OVERHEAD_MS:
                    failures.append(f"{engine} N={gpus}: overhead {row['overhead_ms']} ms")
    if not args.no_rss:
        for engine in engines:
            small = driver_rss(engine, args.rss_gpus, args.rss_samples, args)
            large = driver_rss(engine, args.rss_gpus, 10 * args.rss_samples, args)
            print(
                f"{engine:8s} driver peak RSS at N={args.rss_gpus}: {small:.0f} MB with "
                f"{args.rss_samples} pairs, {large:.0f} MB with {10 * args.rss_samples}",
                flush=True,
            )
            if engine == "pools" and large > TARGET_RSS_GROWTH * small:
                failures.append(f"{engine}: driver RSS {small:.0f} -> {large:.0f} MB")
    if args.json:
        print(json.dumps(results, indent=2))
    for failure in failures:
        print(f"target missed: {failure}")
    last = [r for r in results if r["engine"] == "pools"] or results
    print(f"scale: efficiency {last[-1]['efficiency']:.2f} at N={last[-1]['gpus']}")
    if failures:
        sys.exit(1)


if __name__ == "__main__":
    main()
