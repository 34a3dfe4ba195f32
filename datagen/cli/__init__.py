"""The `datagen` command line: thin wrappers that parse, build a config and call the library.

This module builds the app and registers the commands of each area: datasets
(datagen/cli/dataset.py: filter, inspect, validate, samples), builds (build.py), model weights
(models.py) and the human review (review.py); what they share is in common.py. Heavy libraries
(torch, diffusers, ...) are never imported here, so `datagen filter` starts fast.
"""

from __future__ import annotations

import typer

from datagen import __version__
from datagen.cli.common import out
from datagen.cli.dataset import filter_command, inspect_command, samples_command, validate_command
from datagen.cli.models import models_app
from datagen.cli.review import review_app


class _Commands(typer.core.TyperGroup):
    """The commands, with `build` made only when asked for: its options come from the
    build's settings (datagen/build/settings.py), whose stage modules `datagen filter` never needs
    to import."""

    def list_commands(self, ctx) -> list[str]:
        return sorted({*super().list_commands(ctx), "build"})

    def get_command(self, ctx, name: str):
        if name == "build":
            from datagen.cli.build import click_command

            return click_command()
        return super().get_command(ctx, name)


app = typer.Typer(
    name="datagen",
    help="Paired video stylization training data: build, inspect, validate and filter shards.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    cls=_Commands,
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


app.command("filter")(filter_command)
app.command("inspect")(inspect_command)
app.command("validate")(validate_command)
app.command("samples")(samples_command)
app.add_typer(models_app, name="models")
app.add_typer(review_app, name="review")


def run() -> None:  # pragma: no cover - console entry point alias
    app()
