"""``umbra bookmark`` (a named consistent instant in a protected volume's journal) and
``umbra timeline`` (points and bookmarks of a volume, to pick a VOLUME@TIME from)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

import typer
from rich.table import Table

from umbra.cli.common import JsonOption, RepoOption, emit_json, open_repository, stdout
from umbra.coordinator.snapshot_set import SetOptions
from umbra.engine import compact as engine_compact
from umbra.engine import timeline as engine_timeline
from umbra.engine.jobs import build_writers
from umbra.repo.retention import parse_duration


def _local(ns: int) -> str:
    """Local time with nanoseconds: exactly what VOLUME@TIME needs to name this instant."""
    moment = datetime.fromtimestamp(ns // 10**9, UTC).astimezone()
    return moment.strftime("%Y-%m-%dT%H:%M:%S") + f".{ns % 10**9:09d}" + moment.strftime("%z")


def bookmark(
    volume: Annotated[str, typer.Argument(help="Protected volume (its name, loop device or mount point).")],
    name: Annotated[str, typer.Argument(help="Bookmark name.")],
    pre_snapshot: Annotated[str | None, typer.Option(help="Command run before the instant; non-zero aborts.")] = None,
    post_snapshot: Annotated[str | None, typer.Option(help="Command run right after the instant.")] = None,
    sqlite: Annotated[list[str] | None, typer.Option(help="SQLite database to make consistent (repeatable).")] = None,
    postgres: Annotated[
        list[str] | None, typer.Option(help="PostgreSQL server to checkpoint (libpq connection string).")
    ] = None,
    freeze_timeout: Annotated[float, typer.Option(help="Limit for writers to freeze, seconds.")] = 60.0,
    json_out: JsonOption = False,
) -> None:
    """Mark a consistent instant in a protected volume's journal (writers frozen, filesystem held)."""
    writers = build_writers(pre_snapshot, post_snapshot, None, sqlite, postgres)
    doc = engine_timeline.bookmark(volume, name, writers, SetOptions(freeze_timeout=freeze_timeout))
    if json_out:
        emit_json(doc)
        return
    stdout.print(
        f"bookmark {name!r} of {doc['volume']} at {_local(doc['time_ns'])} ({doc['consistency']}); "
        f"restore it as {doc['volume']}@{_local(doc['time_ns'])}",
        markup=False,
    )


def timeline(
    volume: Annotated[str, typer.Argument(help="Volume name.")],
    repo: RepoOption = None,
    json_out: JsonOption = False,
) -> None:
    """Points and bookmarks of a volume, oldest first, with the shipped journal's span."""
    with open_repository(repo) as r:
        events, span = engine_timeline.timeline(r, volume)
    if json_out:
        emit_json({"volume": volume, "events": [e.to_dict() for e in events], "journal": span})
        return
    table = Table("time (use as VOLUME@TIME)", "kind", "name", "consistency")
    for e in events:
        name = e.name[:8] if e.kind == "point" else e.name
        if e.kind == "gap":
            name = f"writes missing until {_local(int(e.detail['until_ns']))}: {e.name}"
        table.add_row(_local(e.time_ns), e.kind, name, e.consistency)
    stdout.print(table)
    if span["records"]:
        gaps = " except from a gap to the next point after it" if any(e.kind == "gap" for e in events) else ""
        stdout.print(
            f"journal: {span['records']} records shipped, {_local(span['first_ns'])} .. {_local(span['last_ns'])}: "
            f"any instant in between can be restored{gaps}",
            markup=False,
        )
    else:
        stdout.print("journal: none shipped (points only)")


cdp_app = typer.Typer(help="Continuous data protection in the repository.", no_args_is_help=True)


@cdp_app.command("compact")
def compact(
    volume: Annotated[str, typer.Argument(help="Volume name.")],
    keep_within: Annotated[str, typer.Option(help="Keep every write this recent (e.g. 24h).")] = "24h",
    every: Annotated[str, typer.Option(help="Older than that, keep one state per interval (e.g. 1h).")] = "1h",
    dry_run: Annotated[bool, typer.Option(help="Show the points it would make; change nothing.")] = False,
    repo: RepoOption = None,
    json_out: JsonOption = False,
) -> None:
    """Turn journal older than --keep-within into points (one per --every and per bookmark) and
    drop the journal they replace; every write inside the window stays."""
    with open_repository(repo) as r, r.lock(exclusive=not dry_run):
        result = engine_compact.compact(r, volume, parse_duration(keep_within), parse_duration(every), dry_run)
    if json_out:
        emit_json(
            {
                "volume": volume,
                "dry_run": dry_run,
                "planned": [{"time_ns": t, "why": why, "consistency": c} for t, why, c in result.planned],
                "points": [p.id for p in result.points],
                "skipped": result.skipped,
                "batches_deleted": result.batches_deleted,
                "records_dropped": result.records_dropped,
            }
        )
        return
    for t, why, consistency in result.planned:
        done = "skipped (inside a journal gap)" if t in result.skipped else "made"
        stdout.print(f"{'would make' if dry_run else done} a point at {_local(t)} ({why}, {consistency})", markup=False)
    if not dry_run:
        stdout.print(
            f"{len(result.points)} points made; {result.batches_deleted} journal batches "
            f"({result.records_dropped} records) replaced by them",
            markup=False,
        )
