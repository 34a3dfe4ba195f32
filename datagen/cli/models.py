"""`datagen models tiny` and `datagen models check`: the model weights."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from datagen.cli.common import fail, out, say

models_app = typer.Typer(
    help="Model weights: build tiny twins, check production weights.", no_args_is_help=True
)


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
        fail(f"unknown model key(s) {unknown}; known: {', '.join(SOURCES)}", code=2)
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
        fail(
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
