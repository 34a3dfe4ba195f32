"""`datagen review`: the human review of SFT candidates from the command line.

    datagen review SFT_DIR [--host H] [--port P] [--reviewer NAME]   start the review web app
    datagen review finalize SFT_DIR OUT [--overwrite] [--json]          write the accepted rows

Registered in `datagen.cli` with `app.add_typer(review_app, name="review")`. The library code
is in `datagen.review` (imported when a command runs: the web stack and pyarrow are not
loaded by other `datagen` commands); this module only parses options and prints.
"""

from __future__ import annotations

import json
import webbrowser
from contextlib import contextmanager
from pathlib import Path

import click
import typer
from typer.core import TyperGroup

from datagen.cli.common import fail, say, user_errors
from datagen.review.defaults import DEFAULT_HOST, DEFAULT_PORT, LOOPBACK_HOSTS


class _ServeByDefault(TyperGroup):
    """`datagen review SFT_DIR ...` runs `datagen review serve SFT_DIR ...`.

    A click group cannot take a positional argument before its sub-commands (it would read
    `finalize` as SFT_DIR), so anything that is not a sub-command name or --help goes to
    `serve`.
    """

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ctx.help_option_names:
            args = ["serve", *args]
        return super().parse_args(ctx, args)


review_app = typer.Typer(
    cls=_ServeByDefault,
    help=(
        "Human review of SFT candidates in the browser. `datagen review SFT_DIR` starts the "
        "review app (short for `datagen review serve SFT_DIR`); `datagen review finalize "
        "SFT_DIR OUT` writes the accepted samples."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@contextmanager
def _review_errors():
    """The CLI's one-line errors, for the review's refusals too."""
    from datagen.review.journal import ReviewError

    with user_errors():
        try:
            yield
        except ReviewError as error:
            fail(str(error))


@review_app.command("serve")
def serve_command(
    sft_dir: Path = typer.Argument(
        ..., metavar="SFT_DIR", help="SFT candidates (the build-sft output, e.g. OUT/sft)."
    ),
    host: str = typer.Option(
        DEFAULT_HOST, "--host", help="Address to listen on (0.0.0.0: every interface)."
    ),
    port: int = typer.Option(
        DEFAULT_PORT, "--port", min=0, max=65535, help="Port to listen on (0: any free port)."
    ),
    reviewer: str | None = typer.Option(
        None, "--reviewer", help="Name recorded with each decision (default: $USER)."
    ),
    open_browser: bool = typer.Option(
        False, "--open", help="Open the page in the default browser."
    ),
    cache_mb: int = typer.Option(
        256, "--cache-mb", min=1, help="Memory for row groups read from the shards."
    ),
) -> None:
    """Start the review web app over the SFT candidates of SFT_DIR.

    Each decision is saved to SFT_DIR/_review/decisions.jsonl as it is made; the shards are
    never modified. Ctrl-C stops the app.
    """
    from datagen.review.app import ReviewServer
    from datagen.review.session import ReviewSession

    with _review_errors():
        session = ReviewSession(sft_dir, reviewer=reviewer, cache_bytes=cache_mb * 2**20)
        server = ReviewServer(session, host=host, port=port)
    progress = session.progress()
    say(
        f"reviewing {progress['total']} candidates in {session.path} as {session.reviewer}: "
        f"{progress['reviewed']} reviewed ({progress['accepted']} accepted, "
        f"{progress['rejected']} rejected), {progress['pending']} pending"
    )
    say(f"decisions: {session.journal.path}")
    if host not in LOOPBACK_HOSTS:
        say(f"warning: listening on {host}: anyone who can reach it can record decisions")
    say(f"open {server.url}  (Ctrl-C to stop)")
    if open_browser:
        webbrowser.open(server.url)
    try:
        with _review_errors():
            server.run()
    except KeyboardInterrupt:  # uvicorn shuts down gracefully, then re-raises Ctrl-C
        pass
    progress = session.progress()
    say(
        f"stopped: {progress['reviewed']} of {progress['total']} reviewed, every decision "
        f"saved in {session.journal.path}"
    )


@review_app.command("finalize")
def finalize_command(
    sft_dir: Path = typer.Argument(..., metavar="SFT_DIR", help="The reviewed SFT candidates."),
    out_dir: Path = typer.Argument(..., metavar="OUT", help="New SFT dataset directory."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty OUT."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Write the accepted samples of SFT_DIR to OUT as a new SFT dataset.

    Accepted rows get their review fields filled; rejected ones go to OUT's rejects (stage
    "review", reason = the reviewer's code); samples still pending are left out and counted.
    SFT_DIR is never modified; OUT appears only when complete.
    """
    from datagen.review.finalize import finalize_review

    with _review_errors():
        result = finalize_review(sft_dir, out_dir, overwrite=overwrite)
    if as_json:
        say(json.dumps(result.as_dict(), indent=2))
        return
    say(f"finalized {result.total} candidates of {sft_dir}")
    say(f"accepted {result.accepted}  rejected {result.rejected}  pending {result.pending}")
    for reason, count in result.reasons.items():
        say(f"  {reason}: {count}")
    if result.pending:
        say(f"{result.pending} pending candidate(s) were not reviewed and are left out")
    if result.unknown_decisions:
        say(
            f"warning: {result.unknown_decisions} decision(s) in the journal name samples "
            f"that {sft_dir} does not hold; ignored"
        )
    say(
        f"wrote {result.accepted} accepted row(s) in {len(result.shards)} shard(s) to "
        f"{result.out}; rejects: {result.rejected} from review + {result.carried_rejects} "
        f"from the build"
    )


if __name__ == "__main__":  # `python -m datagen.cli.review ...`: the review commands alone
    review_app()
