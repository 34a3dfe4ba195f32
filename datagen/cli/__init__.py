"""The `datagen` command line: thin wrappers that parse, build a config and call the library.

Heavy libraries (torch, diffusers, ...) are never imported here, so `datagen filter` starts fast.
"""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from datagen import __version__
from datagen.cli.review import review_app


class _Commands(typer.core.TyperGroup):
    """The commands, with `build` made only when asked for: its options come from the
    build's settings (datagen/build/settings.py), whose stage modules `datagen filter` never needs
    to import."""

    def list_commands(self, ctx) -> list[str]:
        return sorted({*super().list_commands(ctx), "build"})

    def get_command(self, ctx, name: str):
        if name == "build":
            return _build_click_command()
        return super().get_command(ctx, name)


app = typer.Typer(
    name="datagen",
    help="Paired video stylization training data: build, inspect, validate and filter shards.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    cls=_Commands,
)
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)


def say(text: str) -> None:
    """Print data as it is: no rich markup (sample ids look like [tags]) or highlighting."""
    out.print(text, markup=False, highlight=False)


def _fail(message: str, code: int = 1) -> None:
    err.print(f"error: {message}", markup=False, highlight=False)
    raise typer.Exit(code)


@contextmanager
def _user_errors():
    """Turn the library's expected errors into one clear line and a non-zero exit."""
    from datagen.data.dataset import DatasetError
    from datagen.data.schema import SchemaError
    from datagen.tools.filter import FilterError

    try:
        yield
    except (FilterError, SchemaError, DatasetError, OSError) as error:
        _fail(str(error))


@contextmanager
def _progress(label: str):
    """A progress bar on a terminal (stderr); silent when piped or in CI logs."""
    progress = Progress(
        TextColumn(label),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        disable=not err.is_terminal,
        transient=True,
    )
    task = progress.add_task(label, total=None)
    with progress:
        yield (
            lambda total: progress.update(task, total=total),
            lambda n: progress.advance(task, n),
        )


def _version_callback(value: bool) -> None:
    if value:
        out.print(f"datagen {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(
        False,
        "--version",
        callback=_version_callback,
        is_eager=True,
        help="Print the version and exit.",
    ),
) -> None:
    """datagen command line."""
    from datagen.core.native_heap import bound_native_heap

    bound_native_heap()  # before any thread allocates: see datagen/core/native_heap.py


@app.command("filter")
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

    with _user_errors():
        criteria = FilterCriteria(csd=csd, dino=dino, vlm_pass=vlm_pass)
        with _progress("copying rows") as (set_total, advance):
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


@app.command("inspect")
def inspect_command(
    path: Path = typer.Argument(..., help="Dataset directory."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Print counts, score summaries and the schema version of a dataset."""
    from datagen.tools.inspect import summarize

    with _user_errors():
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


@app.command("validate")
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

    with _user_errors(), _progress("validating rows") as (_, advance):
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


@app.command("samples")
def samples_command(
    directory: Path = typer.Argument(..., metavar="DIR", help="Where to write the clips."),
) -> None:
    """Make the demo source clips offline: camera pans and zooms over scikit-image's photos."""
    from datagen.data.demo_clips import write_samples

    with _user_errors():
        paths = write_samples(directory)
    for path in paths:
        say(str(path))


def _load_flow(split: str):
    """The flow object of flows/build_<split>.py (the same file the deployments run)."""
    import importlib.util
    import os

    # Without PREFECT_API_URL the flow starts a temporary local server; on a busy machine it
    # can take longer than Prefect's default 20 s to answer.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # An empty PREFECT_API_URL means no server, as an unset one does; left in place, Prefect
    # starts its temporary server but its events client fails on the empty URL all run long.
    # (Prefect reads its settings when first imported, which is after this.)
    if os.environ.get("PREFECT_API_URL") == "":
        del os.environ["PREFECT_API_URL"]

    from datagen.core.package_data import package_data_dir

    path = package_data_dir("flows") / f"build_{split}.py"
    spec = importlib.util.spec_from_file_location(f"datagen_flows_build_{split}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, f"build_{split}")


def _build_command(split: str, config: Path | None, use_ray: bool, **settings) -> None:
    """Run the build-ct or build-sft flow directly (a temporary local Prefect server when
    PREFECT_API_URL is not set), for users without a Prefect server.

    Every setting of datagen/build/settings.py is an option named after it (--num-frames,
    --flow-shift, ...); --config reads them from a run-config file (TOML, the same names),
    and the options given win over it. A Secret block named here must exist on the Prefect
    server the flow uses; without PREFECT_API_URL that is the local database in PREFECT_HOME
    (create the block with `prefect block create secret` in the same environment).
    """
    if split not in ("ct", "sft"):
        _fail(f"split must be ct or sft, got {split!r}", code=2)
    from datagen.build.settings import BuildConfigError, build_config, split_problems
    from datagen.core.api_keys import ApiKeyUnavailableError

    given = {name: value for name, value in settings.items() if value is not None}
    other_tier = split_problems(split, given)
    if other_tier:
        _fail("; ".join(other_tier), code=2)
    parameters = given | ({"config": str(config)} if config else {})
    try:
        # Checked here too, so bad settings fail at once, before a temporary Prefect server
        # starts (the flow checks them again: deployments do not come through here).
        build_config(split, given, config)
        summary = _load_flow(split)(**_flow_values(parameters), use_ray=use_ray)
    except (BuildConfigError, ApiKeyUnavailableError) as error:
        _fail(str(error))
    say(
        f"{summary['written']} pairs written to {summary['out']} "
        f"({summary['rejected']} rejected, {summary['filtered']} filtered out)"
    )


def _flow_values(parameters: dict) -> dict:
    """Flow parameters travel as JSON: paths as strings."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in parameters.items()}


def _build_signature():
    """`datagen build`'s parameters: the split, --config, --ray/--no-ray and one option per
    setting of either tier (datagen/build/settings.py; the other tier's are refused by name)."""
    import inspect

    from datagen.build.settings import BuildConfig, cli_options

    fixed = [
        inspect.Parameter(
            "split",
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
            default=typer.Argument(..., metavar="ct|sft", help="Which tier to build."),
            annotation=str,
        ),
        inspect.Parameter(
            "config",
            inspect.Parameter.KEYWORD_ONLY,
            default=typer.Option(
                None, "--config", help="Run-config file (TOML) of settings; options win."
            ),
            annotation=Path | None,
        ),
        inspect.Parameter(
            "use_ray",
            inspect.Parameter.KEYWORD_ONLY,
            default=typer.Option(True, "--ray/--no-ray", help="Models in Ray actors."),
            annotation=bool,
        ),
    ]
    options = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=kind)
        for name, kind, option in cli_options(BuildConfig)
    ]
    return inspect.Signature(fixed + options)


def _build_click_command():
    """`datagen build` as a click command, its options generated from the settings."""
    _build_command.__signature__ = _build_signature()
    _build_command.__annotations__ = {
        p.name: p.annotation for p in _build_command.__signature__.parameters.values()
    }
    build = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    # the docstring's paragraphs, each on one line: the help text wraps them to the terminal
    paragraphs = (" ".join(p.split()) for p in _build_command.__doc__.split("\n\n"))
    build.command("build", help="\n\n".join(paragraphs))(_build_command)
    return typer.main.get_command(build)


models_app = typer.Typer(
    help="Model weights: build tiny twins, check production weights.", no_args_is_help=True
)
app.add_typer(models_app, name="models")
app.add_typer(review_app, name="review")


@models_app.command("tiny")
def models_tiny_command(
    directory: Path = typer.Argument(
        None, metavar="DIR", help="Where to build (default: the tiny profile's dir)."
    ),
    only: list[str] = typer.Option(None, "--only", help="Build only these model keys."),
    force: bool = typer.Option(False, "--force", help="Rebuild twins that already exist."),
    hub_cache: Path = typer.Option(
        None,
        "--hub-cache",
        metavar="DIR",
        help="Also place the twins in this Hugging Face hub cache ($HF_HOME/hub) under their "
        "production hub ids, as `--profile production` finds real weights.",
    ),
) -> None:
    """Build every tiny random-weight twin offline, deterministically, in hub folder layouts."""
    from datagen.models.registry import (
        SOURCES,
        build_twin,
        default_tiny_dir,
        install_twins_in_hub_cache,
    )

    root = directory or default_tiny_dir()
    keys = only or list(SOURCES)
    unknown = [k for k in keys if k not in SOURCES]
    if unknown:
        _fail(f"unknown model key(s) {unknown}; known: {', '.join(SOURCES)}", code=2)
    for key in keys:
        built = build_twin(key, root, force=force)
        say(f"{key:<24} {built.path}  {built.ref.revision}")
    if hub_cache:
        for key, snapshot in install_twins_in_hub_cache(hub_cache, root, keys).items():
            say(f"{key:<24} {SOURCES[key].hub_id} -> {snapshot}")


@models_app.command("check")
def models_check_command(
    profile: str = typer.Option(
        "production", "--profile", help="Only 'production' has weights to check."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """List which production weights are present locally and how to fetch the missing ones.

    Exit code 1 when any is missing."""
    from datagen.models.registry import check_production

    if profile != "production":
        _fail(
            "only the production profile loads real weights; the tiny profile builds its "
            "own (`datagen models tiny`)",
            code=2,
        )
    report = check_production()
    if as_json:
        out.print_json(json.dumps(report))
    else:
        for entry in report:
            if entry["present"]:
                say(f"present  {entry['key']:<24} {entry['hub_id']} @ {entry['revision']}")
            else:
                say(f"MISSING  {entry['key']:<24} {entry['hub_id']}  ({entry['purpose']})")
                say(f"         fetch: {entry['fetch']}")
    missing = sum(not e["present"] for e in report)
    say(f"{len(report) - missing} present, {missing} missing")
    if missing:
        raise typer.Exit(1)


def run() -> None:  # pragma: no cover - console entry point alias
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
