"""``umbra providers`` and ``umbra writers``: what the shadow copy service can use here."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from umbra.cli.common import JsonOption, emit_json, stdout
from umbra.engine.jobs import build_writers
from umbra.providers import registry


def providers(json_out: JsonOption = False) -> None:
    """List snapshot providers in priority order, with whether each works on this machine."""
    rows = registry.statuses()
    if json_out:
        emit_json([r.__dict__ for r in rows])
        return
    table = Table("provider", "kind", "available", "what it does")
    for r in rows:
        available = ("yes, if chosen" if r.opt_in else "yes") if r.available else f"no: {r.reason}"
        table.add_row(r.name, r.kind, available, r.description)
    stdout.print(table)


def writers(
    pre_snapshot: Annotated[str | None, typer.Option(help="Script writer: pre-snapshot command.")] = None,
    post_snapshot: Annotated[str | None, typer.Option(help="Script writer: post-snapshot command.")] = None,
    post_backup: Annotated[str | None, typer.Option(help="Script writer: post-backup command.")] = None,
    sqlite: Annotated[list[str] | None, typer.Option(help="SQLite database (repeatable).")] = None,
    postgres: Annotated[list[str] | None, typer.Option(help="PostgreSQL connection string (repeatable).")] = None,
    json_out: JsonOption = False,
) -> None:
    """Print the metadata document of each writer a backup with these options would use."""
    docs = [w.metadata() for w in build_writers(pre_snapshot, post_snapshot, post_backup, sqlite, postgres)]
    if json_out:
        emit_json(docs)
        return
    if not docs:
        stdout.print(
            "no writers configured (writer types: script via --pre-snapshot/--post-snapshot/--post-backup, sqlite)"
        )
    for d in docs:
        stdout.print(d)
