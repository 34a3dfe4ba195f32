"""What the `datagen` commands share: output, one-line errors and progress bars."""

from __future__ import annotations

from contextlib import contextmanager

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)


def say(text: str) -> None:
    """Print data as it is: no rich markup (sample ids look like [tags]) or highlighting."""
    out.print(text, markup=False, highlight=False)


def fail(message: str, code: int = 1) -> None:
    err.print(f"error: {message}", markup=False, highlight=False)
    raise typer.Exit(code)


@contextmanager
def user_errors():
    """Turn the library's expected errors into one clear line and a non-zero exit."""
    from datagen.data.dataset import DatasetError
    from datagen.data.schema import SchemaError
    from datagen.tools.filter import FilterError

    try:
        yield
    except (FilterError, SchemaError, DatasetError, OSError) as error:
        fail(str(error))


@contextmanager
def progress_bar(label: str):
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
