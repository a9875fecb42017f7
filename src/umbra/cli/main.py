"""Entry point: builds the typer app and is the one place that turns errors into exit codes."""

from __future__ import annotations

import logging
import os
import sys
import traceback
from typing import Annotated

import typer

from umbra import __version__
from umbra.cli import (
    backup,
    files,
    init_keys,
    maintenance,
    points,
    protect,
    restore,
    serve_points,
    shadow,
    timeline,
)
from umbra.errors import EXIT_INTERNAL, UmbraError

app = typer.Typer(
    name="umbra",
    help="Consistent point-in-time copies of live volumes, kept safe.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def global_options(
    password_file: Annotated[
        str | None, typer.Option(help="Read the repository passphrase from this file (like UMBRA_PASSWORD_FILE).")
    ] = None,
    password_command: Annotated[
        str | None, typer.Option(help="Run this command for the passphrase (like UMBRA_PASSWORD_COMMAND).")
    ] = None,
) -> None:
    """Consistent point-in-time copies of live volumes, kept safe."""
    if password_file:
        os.environ.pop("UMBRA_PASSWORD", None)
        os.environ["UMBRA_PASSWORD_FILE"] = password_file
    if password_command:
        os.environ.pop("UMBRA_PASSWORD", None)
        os.environ.pop("UMBRA_PASSWORD_FILE", None)
        os.environ["UMBRA_PASSWORD_COMMAND"] = password_command


app.command()(init_keys.init)
app.add_typer(init_keys.key_app, name="key")
app.command()(backup.backup)
app.command("list")(points.list_points)
app.command()(restore.restore)
app.command()(maintenance.check)
app.command()(maintenance.prune)
app.command()(maintenance.verify)
app.command()(points.diff)
app.command()(shadow.providers)
app.command()(shadow.writers)
app.command()(protect.protect)
app.command()(protect.status)
app.add_typer(protect.snapshot_app, name="snapshot")
app.command()(protect.journal)
app.command()(serve_points.export)
app.command()(serve_points.mount)
app.command()(files.ls)
app.command()(files.extract)
app.command()(timeline.bookmark)
app.command()(timeline.timeline)
app.add_typer(timeline.cdp_app, name="cdp")


@app.command()
def version() -> None:
    """Print umbra's version."""
    print(__version__)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING, format="umbra: %(message)s")
    try:
        app(args=argv, prog_name="umbra")  # usage errors: message and exit code 2, by click
    except UmbraError as exc:
        print(f"umbra: error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        print("umbra: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception:  # noqa: BLE001 - a bug: show everything
        traceback.print_exc()
        print(
            f"umbra: internal error (umbra {__version__}); please report it with the traceback above", file=sys.stderr
        )
        sys.exit(EXIT_INTERNAL)


if __name__ == "__main__":
    main()
