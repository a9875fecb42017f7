"""Entry point: builds the typer app and is the one place that turns errors into exit codes."""

from __future__ import annotations

import importlib
import logging
import os
import sys
import traceback
from typing import Annotated

import typer

from umbra import __version__
from umbra.errors import EXIT_INTERNAL, UmbraError

# command -> (module under umbra.cli, attribute, whether it is a group of subcommands).  Only the
# module of the command being run is imported: importing all of umbra costs a third of a second.
COMMANDS: dict[str, tuple[str, str, bool]] = {
    "init": ("init_keys", "init", False),
    "key": ("init_keys", "key_app", True),
    "backup": ("backup", "backup", False),
    "list": ("points", "list_points", False),
    "restore": ("restore", "restore", False),
    "check": ("maintenance", "check", False),
    "prune": ("maintenance", "prune", False),
    "verify": ("maintenance", "verify", False),
    "diff": ("points", "diff", False),
    "providers": ("shadow", "providers", False),
    "writers": ("shadow", "writers", False),
    "protect": ("protect", "protect", False),
    "status": ("protect", "status", False),
    "snapshot": ("protect", "snapshot_app", True),
    "journal": ("protect", "journal", False),
    "export": ("serve_points", "export", False),
    "mount": ("serve_points", "mount", False),
    "ls": ("files", "ls", False),
    "extract": ("files", "extract", False),
    "bookmark": ("timeline", "bookmark", False),
    "timeline": ("timeline", "timeline", False),
    "cdp": ("timeline", "cdp_app", True),
    "serve": ("server", "serve", False),
    "token": ("server", "token_app", True),
}
GLOBAL_OPTIONS_WITH_VALUE = ("--password-file", "--password-command")

app = typer.Typer(
    name="umbra",
    help="Consistent point-in-time copies of live volumes, kept safe.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
_registered: set[str] = set()


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


def register(names: list[str] | None = None) -> typer.Typer:
    """Add commands to the app (all of them by default), importing only their modules."""
    for name in COMMANDS if names is None else names:
        if name in _registered or name not in COMMANDS:
            continue
        module, attribute, group = COMMANDS[name]
        target = getattr(importlib.import_module(f"umbra.cli.{module}"), attribute)
        if group:
            app.add_typer(target, name=name)
        else:
            app.command(name)(target)
        _registered.add(name)
    if "version" not in _registered:
        app.command()(version)
        _registered.add("version")
    return app


def command_in(argv: list[str]) -> str | None:
    """The command named in ``argv`` (after the global options), or None (help, a typo)."""
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in GLOBAL_OPTIONS_WITH_VALUE:
            i += 2
            continue
        if arg.startswith("-"):
            i += 1
            continue
        return arg if arg in COMMANDS or arg == "version" else None
    return None


def version() -> None:
    """Print umbra's version."""
    print(__version__)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING, format="umbra: %(message)s")
    args = sys.argv[1:] if argv is None else argv
    command = command_in(args)
    register([command] if command else None)  # help or a typo lists every command
    try:
        app(args=args, prog_name="umbra")  # usage errors: message and exit code 2, by click
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
