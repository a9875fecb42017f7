"""``umbra list`` and ``umbra diff``."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table

from umbra.cli.common import JsonOption, RepoOption, emit_json, human_bytes, open_repository, stderr, stdout
from umbra.engine.diff import diff_states
from umbra.errors import EXIT_WARNING
from umbra.repo.manifest import Point
from umbra.repo.repository import Repository


def list_points(
    repo: RepoOption = None,
    volume: Annotated[str | None, typer.Option("--volume", "-v", help="Only this volume.")] = None,
    phases: Annotated[
        bool, typer.Option("--phases", help="Also each snapshot-set phase: outcome and duration.")
    ] = False,
    json_out: JsonOption = False,
) -> None:
    """List points, oldest first."""
    with open_repository(repo) as r:
        points, problems = r.scan_points(volume)
        verified = _verified(r)
        outcomes = r.set_outcomes()
    for problem in problems:
        stderr.print(f"warning: damaged {problem}")
    if json_out:
        emit_json(
            [
                {**p.to_dict(), "verified": verified.get(p.id), "set_outcome": outcomes.get(p.set_id or "")}
                for p in points
            ]
        )
    else:
        _print_points(points, verified, outcomes)
        if phases:
            _print_phases(points, outcomes)
    if problems:
        raise typer.Exit(EXIT_WARNING)


def _verified(repo: Repository) -> dict[str, bool]:
    """Each point's newest `umbra verify` verdict; points never verified are absent."""
    return {pid: bool(doc.get("clean")) for pid, doc in repo.latest_verifications().items()}


def _set_status(point: Point, outcomes: dict[str, dict[str, Any]]) -> str:
    """How the point's snapshot set ended: ok, failed, notify-failed (a writer's backup-complete
    notification failed), ? (no outcome stored: the run was cut short) or - (not a set)."""
    if not point.set_id:
        return "-"
    outcome = outcomes.get(point.set_id)
    if outcome is None:
        return "?"
    if outcome.get("status") != "ok":
        return "failed"
    return "ok" if all(n.get("ok") for n in outcome.get("notified", [])) else "notify-failed"


def _print_points(points: list[Point], verified: dict[str, bool], outcomes: dict[str, dict[str, Any]]) -> None:
    table = Table("id", "volume", "time", "type", "consistency", "set", "size", "new", "verified", "tags")
    for p in points:
        table.add_row(
            p.short_id,
            p.volume,
            f"{p.time.astimezone():%Y-%m-%d %H:%M:%S.%f}"[:-3],
            p.type,
            p.consistency or "-",
            _set_status(p, outcomes),
            human_bytes(p.size),
            human_bytes(p.stats.get("bytes_new", 0)),
            {True: "clean", False: "NOT CLEAN", None: "-"}[verified.get(p.id)],
            ",".join(p.tags),
        )
    stdout.print(table)


def _print_phases(points: list[Point], outcomes: dict[str, dict[str, Any]]) -> None:
    """One line per point of a snapshot set: its phases in order (the set's backup-complete from
    the stored outcome), each with ok/FAILED and its duration."""
    for p in points:
        if not p.phases:
            continue
        recorded = list(p.phases)
        outcome = outcomes.get(p.set_id or "")
        if outcome is not None:
            recorded += [ph for ph in outcome.get("phases", []) if ph.get("name") == "backup-complete"]
        parts = [
            f"{ph['name']} {'ok' if ph.get('ok') else 'FAILED'} {float(ph.get('duration_s', 0)):.3f}s"
            + (f" ({ph['error']})" if ph.get("error") else "")
            for ph in recorded
        ]
        stdout.print(f"{p.short_id}  " + " · ".join(parts), soft_wrap=True, markup=False, highlight=False)


def diff(
    old: Annotated[str, typer.Argument(help="Older point (id, VOLUME@latest, VOLUME@TIME).")],
    new: Annotated[str, typer.Argument(help="Newer point.")],
    repo: RepoOption = None,
    json_out: JsonOption = False,
) -> None:
    """Show the byte ranges that differ between two points."""
    with open_repository(repo) as r:
        old_state, new_state, result = diff_states(r, old, new)
        a, b = old_state.point, new_state.point
    if json_out:
        emit_json(
            {
                "old": a.id,
                "new": b.id,
                "size_old": result.size_old,
                "size_new": result.size_new,
                "changed_bytes": result.changed_bytes,
                "ranges": [{"offset": s, "length": e - s} for s, e in result.ranges],
            }
        )
        return
    for s, e in result.ranges:
        stdout.print(f"{s:>14} +{e - s}")
    stdout.print(
        f"{len(result.ranges)} ranges, {human_bytes(result.changed_bytes)} changed ({a.short_id} → {b.short_id})"
    )
