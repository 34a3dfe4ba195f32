"""`datagen filter --csd 0.5` against DuckDB's COPY ... WHERE csd_score > 0.5, in one run.

Builds a synthetic CT dataset (default 20k rows, 50 KB of incompressible bytes per video
column), then times, alternately and `--repeat` times each, in fresh subprocesses:

    datagen filter --csd 0.5 IN OUT
    duckdb: COPY (SELECT * FROM read_parquet('IN/part-*.parquet') WHERE csd_score > 0.5)
            TO 'OUT.parquet' (FORMAT parquet)

checks that both kept the same sample_ids, and prints the median time ratio and both peak RSS
(ru_maxrss of each child, from wait4). Then builds a 1M-row dataset with tiny media and times
`datagen filter --csd 0.5 --dry-run` (whole command, process start included).

Targets (issue 2): ratio <= 1.0, datagen peak RSS < 1 GiB, dry run over 1M rows < 1 s.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from datagen.data.dataset import ShardWriter, read_index  # noqa: E402
from datagen.data.synthetic import synthetic_table  # noqa: E402

DATAGEN = [sys.executable, "-m", "datagen.cli"]


def build_dataset(path: Path, rows: int, media_bytes: int, batch: int = 1000) -> float:
    if path.exists():
        shutil.rmtree(path)
    started = time.perf_counter()
    with ShardWriter(path, "ct") as writer:
        for start in range(0, rows, batch):
            writer.write(synthetic_table(start, min(batch, rows - start), media_bytes=media_bytes))
    return time.perf_counter() - started


def run_measured(command: list[str]) -> tuple[float, float]:
    """Run a command; return (wall seconds, peak RSS MiB of that child)."""
    # stderr goes to a file: an unread pipe fills up and blocks the child
    with tempfile.TemporaryFile() as log:
        started = time.perf_counter()
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log)
        _, status, usage = os.wait4(process.pid, 0)
        elapsed = time.perf_counter() - started
        if os.waitstatus_to_exitcode(status) != 0:
            log.seek(0)
            raise SystemExit(f"{command} failed: {log.read().decode()[-2000:]}")
    return elapsed, usage.ru_maxrss / 1024


def warm_page_cache(path: Path) -> None:
    for file in path.rglob("*.parquet"):
        with open(file, "rb") as handle:
            while handle.read(1 << 24):
                pass


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--media-bytes", type=int, default=50_000)
    parser.add_argument("--threshold", type=float, default=0.5)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dry-run-rows", type=int, default=1_000_000)
    parser.add_argument("--workdir", type=Path, default=ROOT / ".bench" / "filter")
    parser.add_argument("--keep", action="store_true", help="keep the built datasets")
    args = parser.parse_args()

    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    source, ours, theirs = work / "in", work / "out-datagen", work / "out-duckdb.parquet"
    built = build_dataset(source, args.rows, args.media_bytes)
    size = sum(f.stat().st_size for f in source.glob("part-*.parquet"))
    print(
        f"built {args.rows} rows ({size / 2**30:.2f} GiB, "
        f"{len(list(source.glob('part-*.parquet')))} shards) in {built:.1f} s"
    )
    warm_page_cache(source)

    duckdb_script = (
        "import duckdb; duckdb.sql(\"COPY (SELECT * FROM read_parquet('"
        f"{source}/part-*.parquet') WHERE csd_score > {args.threshold}) TO '{theirs}' "
        '(FORMAT parquet)")'
    )
    ours_runs, theirs_runs = [], []
    for _ in range(args.repeat):
        shutil.rmtree(ours, ignore_errors=True)
        ours_runs.append(
            run_measured(DATAGEN + ["filter", "--csd", str(args.threshold), str(source), str(ours)])
        )
        theirs.unlink(missing_ok=True)
        theirs_runs.append(run_measured([sys.executable, "-c", duckdb_script]))

    kept_ours = set(read_index(ours)["sample_id"].to_pylist())
    kept_theirs = set(pq.read_table(theirs, columns=["sample_id"])["sample_id"].to_pylist())
    same = kept_ours == kept_theirs
    ours_time = statistics.median(t for t, _ in ours_runs)
    theirs_time = statistics.median(t for t, _ in theirs_runs)
    ours_rss = max(r for _, r in ours_runs)
    theirs_rss = max(r for _, r in theirs_runs)
    print(
        f"datagen filter : {ours_time:6.2f} s median of {args.repeat}  "
        f"peak RSS {ours_rss:6.0f} MiB  kept {len(kept_ours)}"
    )
    print(
        f"duckdb COPY    : {theirs_time:6.2f} s median of {args.repeat}  "
        f"peak RSS {theirs_rss:6.0f} MiB  kept {len(kept_theirs)}"
    )
    print(f"same sample_ids kept: {same}")
    print(f"time ratio datagen/duckdb: {ours_time / theirs_time:.2f}  (target <= 1.0)")
    print(f"datagen peak RSS: {ours_rss:.0f} MiB  (target < 1024)")

    big = work / "dry-run-in"
    built = build_dataset(big, args.dry_run_rows, media_bytes=16, batch=100_000)
    print(f"built {args.dry_run_rows} rows with tiny media in {built:.1f} s")
    dry_runs = [
        run_measured(DATAGEN + ["filter", "--csd", str(args.threshold), "--dry-run", str(big)])
        for _ in range(args.repeat)
    ]
    dry_time = statistics.median(t for t, _ in dry_runs)
    print(
        f"datagen filter --dry-run over {args.dry_run_rows} indexed rows: {dry_time:.2f} s "
        f"median of {args.repeat}, whole command  (target < 1 s)"
    )

    if not args.keep:
        shutil.rmtree(work)
    ok = same and ours_time <= theirs_time and ours_rss < 1024 and dry_time < 1.0
    print("ALL TARGETS MET" if ok else "SOME TARGETS MISSED")
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()
