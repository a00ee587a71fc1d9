"""The ``zimage`` command: its options, its commands, and the mapping of errors to exit codes."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from ..config import ENV_KEY, ENV_URL, VERSION, ConfigError
from ..errors import ZImageError
from . import exit_codes, jobs
from .adapters import app as adapters_app
from .batch import batch
from .options import Connection, err
from .webhooks import app as webhooks_app

app = typer.Typer(
    name="zimage",
    help="Generate and edit images with the Z-Image job service. After make up, source .run/env: it sets "
    "ZIMAGE_API_URL and ZIMAGE_API_KEY.",
    epilog=exit_codes.HELP,
    no_args_is_help=True,
    rich_markup_mode="markdown",
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.command()(jobs.generate)
app.command()(jobs.edit)
app.command()(batch)
app.command()(jobs.status)
app.command()(jobs.cancel)
app.command()(jobs.models)
app.add_typer(adapters_app, name="adapters")
app.add_typer(webhooks_app, name="webhooks")


def _version(value: bool) -> None:
    if value:
        print(f"zimage {VERSION}")
        raise typer.Exit()


@app.callback()
def options(
    ctx: typer.Context,
    api_url: Annotated[
        str | None, typer.Option(envvar=ENV_URL, help="The service, e.g. http://127.0.0.1:8000.")
    ] = None,
    api_key: Annotated[str | None, typer.Option(envvar=ENV_KEY, help="A tenant's API key.", show_default=False)] = None,
    timeout: Annotated[float, typer.Option(help="Seconds for one HTTP request.")] = 30.0,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Generate and edit images with the Z-Image job service (ZIMAGE_API_URL, ZIMAGE_API_KEY)."""
    ctx.obj = Connection(api_url, api_key, timeout)


def main() -> None:
    """Entry point of the ``zimage`` console script."""
    try:
        app()
    except (ZImageError, ConfigError) as exc:
        err.print(f"[red]error[/]: {exc}")
        sys.exit(exit_codes.for_error(exc))
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(exit_codes.INTERRUPTED)
