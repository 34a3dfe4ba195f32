"""Orchestration overhead: N tiny clips end to end through the build-ct flow on Ray actors.

Compares the flow's wall time with the sum of stage compute measured inside the actors
(`Stage.stats.compute_seconds`), and prints the overhead per clip-stage in ms and the model
load counts (each stage must load its model once per run). Prefect runs in ephemeral mode with
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
        clip_stages = summary["written"] * len(summary["stage_compute_s"])
        steady = summary["wall_s"] - summary["startup_s"]
        overhead_ms = 1000 * (steady - compute) / max(clip_stages, 1)
        result = {
            "clips": summary["written"],
            "flow_wall_s": summary["wall_s"],
            "process_wall_s": round(total_wall, 2),
            "stage_compute_s": round(compute, 2),
            "overhead_ms_per_clip_stage": round(overhead_ms, 1),
            "model_loads": summary["model_loads"],
            "ray": not args.no_ray,
        }
        if args.json:
            print(json.dumps(result, indent=2))
            return
        print(
            f"{result['clips']} tiny clips, ray={result['ray']}: flow wall "
            f"{result['flow_wall_s']} s (process {result['process_wall_s']} s), stage compute "
            f"{result['stage_compute_s']} s"
        )
        print(
            f"overhead per clip-stage: {result['overhead_ms_per_clip_stage']} ms "
            "(wall minus stage compute, includes actor start and model loads)"
        )
        print(f"model loads per stage: {result['model_loads']}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
