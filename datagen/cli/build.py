"""`datagen build`: run the build-ct or build-sft flow. The command's options are generated from
the build's settings (datagen/build/settings.py) when it is asked for, so that the other
commands never import them."""

from __future__ import annotations

from pathlib import Path

import typer

from datagen.cli.common import fail, say


def load_flow(split: str):
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
        fail(f"split must be ct or sft, got {split!r}", code=2)
    from datagen.build.settings import BuildConfigError, build_config, split_problems
    from datagen.core.api_keys import ApiKeyUnavailableError

    given = {name: value for name, value in settings.items() if value is not None}
    other_tier = split_problems(split, given)
    if other_tier:
        fail("; ".join(other_tier), code=2)
    parameters = given | ({"config": str(config)} if config else {})
    try:
        # Checked here too, so bad settings fail at once, before a temporary Prefect server
        # starts (the flow checks them again: deployments do not come through here).
        build_config(split, given, config)
        flow = load_flow(split)
        from datagen.run.progress import terminal_view

        with terminal_view():  # live bars per step when stderr is a terminal
            summary = flow(**_flow_values(parameters), use_ray=use_ray)
    except (BuildConfigError, ApiKeyUnavailableError) as error:
        fail(str(error))
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


def click_command():
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
