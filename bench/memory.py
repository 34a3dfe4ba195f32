"""Bounded memory: peak RSS of `datagen filter` and `datagen build` as the data grows 10x.

Each command runs in a fresh process; its peak RSS comes from wait4. The filter runs over
synthetic CT datasets of N and 10N rows (default 5 KB per video column); the build runs the tiny
profile with every stage in the flow process (`--no-ray`, so one process holds everything) over
M and 10M clip samples. Flat means the 10x run's peak is within `--tolerance` of the small one.

    python bench/memory.py --rows 10000 --clips 3
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from datagen.samples import write_samples  # noqa: E402
from datagen.store import ShardWriter  # noqa: E402
from datagen.testing import synthetic_table  # noqa: E402

DATAGEN = [sys.executable, "-m", "datagen.cli"]


def peak_rss_mib(command: list[str], env: dict | None = None) -> float:
    # stderr goes to a file: an unread pipe fills up and blocks the child's logging
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log, env=env)
        _, status, usage = os.wait4(process.pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            log.seek(0)
            raise SystemExit(f"{command[3:6]} failed: {log.read().decode()[-2000:]}")
    return usage.ru_maxrss / 1024


def filter_peaks(work: Path, rows: int, media_bytes: int) -> list[tuple[int, float]]:
    peaks = []
    for count in (rows, rows * 10):
        source = work / f"in-{count}"
        with ShardWriter(source, "ct") as writer:
            for start in range(0, count, 1000):
                writer.write(
                    synthetic_table(start, min(1000, count - start), media_bytes=media_bytes)
                )
        peaks.append(
            (
                count,
                peak_rss_mib(
                    DATAGEN + ["filter", "--csd", "0.5", str(source), str(work / f"out-{count}")]
                ),
            )
        )
        shutil.rmtree(source)
        shutil.rmtree(work / f"out-{count}")
    return peaks


def build_peaks(work: Path, clips: int) -> list[tuple[int, float]]:
    sources = work / "sources"
    write_samples(sources)
    env = os.environ | {
        "PREFECT_HOME": str(work / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_API_URL": "",
    }
    peaks = []
    for count in (clips, clips * 10):
        command = DATAGEN + [
            "build",
            "ct",
            "--source",
            str(sources),
            "--out",
            str(work / f"build-{count}"),
            "--limit",
            str(count),
            "--clips-per-video",
            "10",
            "--shard-size",
            "4",
            "--csd",
            "-1",
            "--no-ray",
        ]
        peaks.append((count, peak_rss_mib(command, env)))
    return peaks


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument(
        "--media-bytes",
        type=int,
        default=5_000,
        help="bytes per video column; small, so the 10x run stays on disk and "
        "both runs are past the first row groups (steady state)",
    )
    parser.add_argument("--clips", type=int, default=3)
    parser.add_argument("--tolerance", type=float, default=0.15)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="datagen-bench-memory-"))
    try:
        flat = True
        for label, peaks in (
            ("filter", filter_peaks(work, args.rows, args.media_bytes)),
            ("build", build_peaks(work, args.clips)),
        ):
            (small, small_rss), (large, large_rss) = peaks
            growth = large_rss / small_rss - 1
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
