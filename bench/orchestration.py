"""Orchestration overhead: N tiny clips end to end through the build-ct flow on Ray actors.

Prints the orchestration overhead per sample-step, measured directly: the time each step
spends outside its stage's calls (reading the inputs from the work files, saving the outputs,
dispatch; `StepReport.overhead_s`), over the samples it handled. Also the flow's wall time,
the stage compute measured inside the actors (`Stage.stats.compute_seconds`) and the model
load counts (each stage must load its model once per run). Exits 1 when the overhead is over
TARGET_MS or a stage loaded its model more than once. Prefect runs in ephemeral mode with
a private PREFECT_HOME unless PREFECT_API_URL points at a server.

    python bench/orchestration.py --clips 6
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGET_MS = 50.0  # per sample-step (the scale-out issue's target for the executor)
DRIVER_CPU_TARGET_MS = 5.0  # per sample, all steps (the scale-out issue: the driver moves no media)
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clips", type=int, default=6)
    parser.add_argument("--shard-size", type=int, default=2)
    parser.add_argument("--no-ray", action="store_true", help="stages in the flow process")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="datagen-bench-orch-"))
    os.environ.setdefault("PREFECT_HOME", str(work / "prefect"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from datagen.cli.build import load_flow
    from datagen.data.demo_clips import write_samples

    try:
        write_samples(work / "sources")
        started = time.perf_counter()
        summary = load_flow("ct")(
            source=str(work / "sources"),
            out=str(work / "out"),
            limit=args.clips,
            clips_per_video=2,
            shard_size=args.shard_size,
            csd_threshold=-1.0,
            styles=["ink_wash", "watercolor"],
            use_ray=not args.no_ray,
        )
        total_wall = time.perf_counter() - started
        compute = sum(summary["stage_compute_s"].values())
        overhead_ms = summary["overhead_ms_per_sample_step"]
        result = {
            "clips": summary["written"],
            "flow_wall_s": summary["wall_s"],
            "process_wall_s": round(total_wall, 2),
            "stage_compute_s": round(compute, 2),
            "overhead_ms_per_sample_step": overhead_ms,
            "driver_cpu_ms_per_sample": summary["driver_cpu_ms_per_sample"],
            "driver_bytes_per_sample": summary["driver_bytes_per_sample"],
            "startup_s": summary["startup_s"],
            "model_loads": summary["model_loads"],
            "ray": not args.no_ray,
        }
        failed = (
            overhead_ms > TARGET_MS
            or (not args.no_ray and result["driver_cpu_ms_per_sample"] > DRIVER_CPU_TARGET_MS)
            or any(n != 1 for n in summary["model_loads"].values())
        )
        if args.json:
            print(json.dumps(result, indent=2))
            sys.exit(1 if failed else 0)
        print(
            f"{result['clips']} tiny clips, ray={result['ray']}: flow wall "
            f"{result['flow_wall_s']} s (process {result['process_wall_s']} s), stage compute "
            f"{result['stage_compute_s']} s"
        )
        print(
            f"overhead per sample-step: {overhead_ms} ms (time the steps spend outside stage "
            f"calls: reading inputs, saving outputs, dispatch; target <= {TARGET_MS:g} ms); "
            f"start-up (plan, actors, model loads) {result['startup_s']} s, not included"
        )
        print(
            f"driver per sample (all steps): {result['driver_cpu_ms_per_sample']} ms CPU in the "
            f"step tasks (target <= {DRIVER_CPU_TARGET_MS:g} ms on Ray), "
            f"{result['driver_bytes_per_sample']} bytes exchanged with the runners (no media)"
        )
        print(f"model loads per stage: {result['model_loads']}")
        print(f"orchestration: {'FAIL' if failed else 'ok'}")
        if failed:
            sys.exit(1)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
