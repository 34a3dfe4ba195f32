"""Time each model stage per sample and print its share of the pipeline's compute.

Runs the real pipeline functions (plan -> control -> describe -> stylize -> animate -> caption ->
score [-> judge] -> write) over demo clips with every stage in this process, and reads each stage's
own counters (model load time, compute time inside `Stage.__call__`). Tiny profile on a CPU by
default; on a GPU machine pass `--profile production` (with the weights in the HF cache) or
keep `tiny` and a larger `--height/--width/--frames` to see how the shares move.

    python bench/stages.py --clips 4
    python bench/stages.py --profile production --clips 2 --frames 81 --height 480 --width 832
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from datagen.build.execute import run_step  # noqa: E402
from datagen.build.plan import plan_build  # noqa: E402
from datagen.build.row import collect_provenance  # noqa: E402
from datagen.build.settings import BuildConfig  # noqa: E402
from datagen.build.stage_configs import stage_factories  # noqa: E402
from datagen.build.steps import step  # noqa: E402
from datagen.build.workdir import ShardWork  # noqa: E402
from datagen.build.write import run_write  # noqa: E402
from datagen.data.demo_clips import write_samples  # noqa: E402
from datagen.run.local import LocalRunner  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clips", type=int, default=4)
    parser.add_argument("--profile", default="tiny", choices=["tiny", "production"])
    parser.add_argument("--frames", type=int, default=None)
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--judge", action="store_true", help="include the VLM judge")
    parser.add_argument("--tiny-dir", default=None)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="datagen-bench-stages-"))
    try:
        sources = work / "sources"
        write_samples(sources)
        config = BuildConfig(
            source=str(sources),
            out=str(work / "out"),
            profile=args.profile,
            tiny_dir=args.tiny_dir,
            limit=args.clips,
            shard_size=args.clips,
            num_frames=args.frames,
            height=args.height,
            width=args.width,
            vlm_judge=args.judge,
            csd_threshold=-1.0,
            styles=("ink_wash", "watercolor"),
        )
        runners = {}
        for name, factory in stage_factories(config).items():
            runners[name] = LocalRunner(factory())
        plan = plan_build(config)
        started = time.perf_counter()
        reports = []
        for shard in plan.shards:
            shard_work = ShardWork(config.work_root, shard)
            for name in runners:
                reports.append(run_step(step(name), shard_work, config, runners[name]))
            run_write(shard_work, config, collect_provenance(runners))
        wall = time.perf_counter() - started
        rows = []
        total = sum(r.stage.stats.compute_seconds for r in runners.values())
        for name, runner in runners.items():
            stats = runner.stage.stats
            rows.append(
                {
                    "stage": name,
                    "load_s": round(stats.load_seconds, 2),
                    "samples": stats.samples,
                    "rejects": stats.rejects,
                    "s_per_sample": round(stats.compute_seconds / max(stats.samples, 1), 3),
                    "share": round(stats.compute_seconds / total, 3) if total else 0.0,
                }
            )
        settings = config.clip_settings()
        result = {
            "profile": args.profile,
            "clips": plan.planned,
            "clip": f"{settings.num_frames}x{settings.height}x{settings.width}",
            "wall_s": round(wall, 2),
            "stage_compute_s": round(total, 2),
            "stages": rows,
        }
        if args.json:
            print(json.dumps(result, indent=2))
            return
        print(
            f"profile {args.profile}, {plan.planned} clips of {result['clip']}, "
            f"wall {wall:.1f} s (models already loaded), stage compute {total:.1f} s"
        )
        print(f"{'stage':<10}{'load s':>8}{'samples':>9}{'rejects':>9}{'s/sample':>10}{'share':>8}")
        for row in rows:
            print(
                f"{row['stage']:<10}{row['load_s']:>8.2f}{row['samples']:>9}"
                f"{row['rejects']:>9}{row['s_per_sample']:>10.3f}{row['share']:>8.1%}"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
