"""Bounded memory: peak RSS of `datagen filter` and `datagen build` as the data grows 10x.

Each command runs in a fresh process; its peak RSS comes from wait4. The filter runs over
synthetic CT datasets of N and 10N rows (default 1 KB per video column); the build runs the tiny
profile with every stage in the flow process (`--no-ray`, so one process holds everything) over
M and 10M clip samples; `--compare-default-heap` repeats it with glibc's default malloc settings
instead of datagen's bounded native heap (datagen/core/native_heap.py), as the peer. Flat means the
10x run's peak is within `--tolerance` of the small one.

    python bench/memory.py --rows 100000 --clips 8 [--only filter|build] [--compare-default-heap]
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from datagen.data.dataset import ShardWriter  # noqa: E402
from datagen.data.demo_clips import write_samples  # noqa: E402
from datagen.data.synthetic import synthetic_table  # noqa: E402

DATAGEN = [sys.executable, "-m", "datagen.cli"]


def run_for_peak(command: list[str], env: dict | None = None) -> tuple[float, str]:
    """Run `command`; its peak RSS in MiB and its standard output."""
    # output goes to files: an unread pipe fills up and blocks the child's logging
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as log:
        process = subprocess.Popen(command, stdout=out, stderr=log, env=env)
        _, status, usage = os.wait4(process.pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            log.seek(0)
            raise SystemExit(f"{command[3:6]} failed: {log.read().decode()[-2000:]}")
        out.seek(0)
        return usage.ru_maxrss / 1024, out.read().decode()


def peak_rss_mib(command: list[str], env: dict | None = None) -> float:
    return run_for_peak(command, env)[0]


def filter_peaks(
    work: Path, rows: int, media_bytes: int, repeats: int = 3
) -> list[tuple[int, float]]:
    """Peak RSS of `datagen filter --csd 0.5` over N and 10N rows: the median of `repeats`
    runs on the same dataset, as one run's peak moves by several percent with the timing of
    the prefetch thread against the writer (more on a busy machine)."""
    peaks = []
    for count in (rows, rows * 10):
        source, out = work / f"in-{count}", work / f"out-{count}"
        with ShardWriter(source, "ct") as writer:
            for start in range(0, count, 1000):
                writer.write(
                    synthetic_table(start, min(1000, count - start), media_bytes=media_bytes)
                )
        runs = []
        for _ in range(repeats):
            shutil.rmtree(out, ignore_errors=True)
            runs.append(peak_rss_mib(DATAGEN + ["filter", "--csd", "0.5", str(source), str(out)]))
        peaks.append((count, statistics.median(runs)))
        shutil.rmtree(source)
        shutil.rmtree(out)
    return peaks


def build_peaks(
    work: Path, clips: int, native_heap: str = "bounded", repeats: int = 3
) -> list[tuple[int, float]]:
    """Peak RSS of a tiny build of `clips` and 10x `clips` samples (4 per shard), the median of
    `repeats` fresh builds, with the native heap bounded (datagen/core/native_heap.py) or left at
    glibc's defaults. Each build must write every sample it was asked for."""
    sources = work / "sources"
    if not sources.exists():
        write_samples(sources)
    # enough clips from each source video for the larger build
    clips_per_video = math.ceil(clips * 10 / len(list(sources.glob("*.mp4"))))
    env = os.environ | {
        "PREFECT_HOME": str(work / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_API_URL": "",
        "DATAGEN_NATIVE_HEAP": native_heap,
    }
    peaks = []
    for count in (clips, clips * 10):
        out = work / f"build-{native_heap}-{count}"
        command = DATAGEN + [
            "build",
            "ct",
            "--source",
            str(sources),
            "--out",
            str(out),
            "--limit",
            str(count),
            "--clips-per-video",
            str(clips_per_video),
            "--shard-size",
            "4",
            "--csd",
            "-1",
            "--no-ray",
        ]
        runs = []
        for _ in range(repeats):
            shutil.rmtree(out, ignore_errors=True)
            peak, output = run_for_peak(command, env)
            if not re.search(rf"^{count} pairs written", output, re.MULTILINE):
                raise SystemExit(f"the {count}-sample build did not write {count}: {output}")
            runs.append(peak)
        peaks.append((count, statistics.median(runs)))
        shutil.rmtree(out)
    return peaks


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--rows",
        type=int,
        default=100_000,
        help="rows of the smaller filter run; 100,000 = past the first index batches "
        "(65,536 rows), so both runs reach the filter's steady state",
    )
    parser.add_argument(
        "--media-bytes",
        type=int,
        default=1_000,
        help="bytes per video column; small, so the 10x run (~3 GB) stays on disk",
    )
    parser.add_argument(
        "--clips",
        type=int,
        default=8,
        help="samples of the smaller build; 8 = two shards, so both builds reach the flow's "
        "steady state of shards_in_flight=2 shards at once",
    )
    parser.add_argument(
        "--compare-default-heap",
        action="store_true",
        help="also run both builds with glibc's default malloc settings (the peer)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="runs of each size; the median peak counts (one run's peak moves by a few "
        "percent with thread timing)",
    )
    parser.add_argument(
        "--only", choices=["filter", "build"], help="measure only the filter or only the build"
    )
    parser.add_argument("--tolerance", type=float, default=0.05)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="datagen-bench-memory-"))
    try:
        flat = True
        runs = []
        if args.only in (None, "filter"):
            runs.append(("filter", filter_peaks(work, args.rows, args.media_bytes, args.repeats)))
        if args.only in (None, "build"):
            runs.append(("build", build_peaks(work, args.clips, repeats=args.repeats)))
        if args.compare_default_heap and args.only != "filter":  # the peer: not part of the verdict
            runs.append(
                (
                    "build, glibc default heap",
                    build_peaks(work, args.clips, "default", args.repeats),
                )
            )
        for label, peaks in runs:
            (small, small_rss), (large, large_rss) = peaks
            growth = large_rss / small_rss - 1
            if "default" not in label:
                flat &= growth <= args.tolerance
            print(
                f"{label}: {small} -> {large} ({large // small}x): peak RSS "
                f"{small_rss:.0f} MiB -> {large_rss:.0f} MiB ({growth:+.0%})"
            )
        print("FLAT" if flat else f"NOT FLAT (tolerance {args.tolerance:.0%})")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
