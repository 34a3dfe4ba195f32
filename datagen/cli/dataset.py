"""`datagen filter`, `inspect`, `validate` and `samples`: the commands over datasets."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from datagen.cli.common import err, out, progress_bar, say, user_errors


def filter_command(
    in_dir: Path = typer.Argument(..., metavar="IN", help="Dataset directory to read."),
    out_dir: Path | None = typer.Argument(
        None, metavar="OUT", help="New dataset directory (not needed with --dry-run)."
    ),
    csd: float | None = typer.Option(
        None, "--csd", min=-1.0, max=1.0, help="Keep rows with csd_score > CSD."
    ),
    dino: float | None = typer.Option(
        None, "--dino", min=-1.0, max=1.0, help="Keep rows with dino_score > DINO."
    ),
    vlm_pass: bool = typer.Option(False, "--vlm-pass", help="Keep rows whose VLM judge passed."),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Only count, from the index; write nothing."
    ),
    rejects: bool = typer.Option(
        False, "--rejects", help="Also write the dropped rows, in full, to OUT/_dropped."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty OUT."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Keep the rows of IN that pass the thresholds and write them to OUT.

    Rows whose needed score is null are counted as missing and dropped. IN is never modified;
    OUT appears only when complete, with its own index and rejects (IN's rejects plus the
    filter's drops, with reasons).
    """
    from datagen.tools.filter import FilterCriteria, filter_dataset

    with user_errors():
        criteria = FilterCriteria(csd=csd, dino=dino, vlm_pass=vlm_pass)
        with progress_bar("copying rows") as (set_total, advance):
            result = filter_dataset(
                in_dir,
                out_dir,
                criteria,
                dry_run=dry_run,
                overwrite=overwrite,
                write_dropped=rejects,
                on_start=set_total,
                on_rows=advance,
            )
    if as_json:
        out.print_json(json.dumps(result.as_dict()))
        return
    say(f"filter {result.criteria} over {result.total} rows{' (dry run)' if dry_run else ''}")
    say(f"kept {result.kept}  dropped {result.dropped}  missing-score {result.missing}")
    for reason, count in sorted(result.reasons.items()):
        say(f"  {reason}: {count}")
    if result.out:
        say(f"wrote {len(result.shards)} shard(s) to {result.out}")
        if rejects:
            say(
                f"wrote {result.dropped_rows_written} dropped row(s) to "
                f"{Path(result.out) / '_dropped'}"
            )


def inspect_command(
    path: Path = typer.Argument(..., help="Dataset directory."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Print counts, score summaries and the schema version of a dataset."""
    from datagen.tools.inspect import summarize

    with user_errors():
        summary = summarize(path)
    if as_json:
        out.print_json(json.dumps(summary))
        return
    say(f"{summary['path']}: {summary['split']} dataset, schema {', '.join(summary['schema'])}")
    say(
        f"{summary['rows']} rows ({summary['unique_sample_ids']} unique sample_ids) in "
        f"{summary['shards']} shards, {summary['bytes'] / 2**20:.1f} MiB"
    )
    columns = ("min", "p10", "median", "mean", "p90", "max")
    say(f"{'score':<12}{'count':>8}{'missing':>9}" + "".join(f"{c:>8}" for c in columns))
    for column, stats in summary["scores"].items():
        cells = "".join(f"{stats[c]:>8.3f}" if c in stats else f"{'-':>8}" for c in columns)
        say(f"{column:<12}{stats['count']:>8}{stats['missing']:>9}{cells}")
    for title in ("vlm_verdict", "review_status", "control_kinds", "styles"):
        if title in summary and summary[title]:
            counts = ", ".join(f"{k}: {v}" for k, v in list(summary[title].items())[:12])
            say(f"{title}: {counts}")
    rejects = summary["rejects"]
    say(f"rejects: {rejects['count']}")
    for key, count in rejects["by_stage_reason"].items():
        say(f"  {key}: {count}")
    if summary["leftover_temporaries"]:
        say(
            f"leftover temporaries of interrupted writers: "
            f"{summary['leftover_temporaries']} (hidden, safe to delete)"
        )


def validate_command(
    path: Path = typer.Argument(..., help="Dataset directory."),
    decode: bool = typer.Option(
        True, "--decode/--no-decode", help="Decode every video (default) or only read headers."
    ),
    max_report: int = typer.Option(
        50, "--max-report", min=1, help="Print at most this many violations."
    ),
) -> None:
    """Check the schema and the pair invariants of every row; exit 1 on any violation."""
    from datagen.tools.validate import validate_dataset

    with user_errors(), progress_bar("validating rows") as (_, advance):
        report = validate_dataset(path, decode_videos=decode, on_rows=advance)
    for warning in report.warnings:
        err.print(f"warning: {warning}", markup=False, highlight=False)
    for violation in report.violations[:max_report]:
        say(str(violation))
    if len(report.violations) > max_report:
        say(f"... and {len(report.violations) - max_report} more")
    verdict = "OK" if report.ok else f"{len(report.violations)} violation(s)"
    say(f"{report.path}: {report.rows} rows in {report.shards} shards: {verdict}")
    if not report.ok:
        raise typer.Exit(1)


def samples_command(
    directory: Path = typer.Argument(..., metavar="DIR", help="Where to write the clips."),
) -> None:
    """Make the demo source clips offline: camera pans and zooms over scikit-image's photos."""
    from datagen.data.demo_clips import write_samples

    with user_errors():
        paths = write_samples(directory)
    for path in paths:
        say(str(path))
