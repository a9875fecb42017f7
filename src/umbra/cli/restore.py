"""``umbra restore``."""

from __future__ import annotations

from typing import Annotated

import typer

from umbra.cli import serve_points
from umbra.cli.common import (
    JsonOption,
    RepoOption,
    RichProgress,
    emit_json,
    human_bytes,
    open_repository,
    stderr,
    stdout,
    warn_if_journal_behind,
)
from umbra.engine import restore as engine_restore
from umbra.errors import EXIT_WARNING, UsageError
from umbra.repo.cdp import extent_map, instant
from umbra.repo.pointref import parse_point_ref


def restore(
    point: Annotated[str, typer.Argument(help="Point: id prefix, VOLUME@latest or VOLUME@TIME.")],
    target: Annotated[
        str, typer.Argument(help="Image file or block device to write (a btrfs subvolume: a directory on btrfs).")
    ],
    repo: RepoOption = None,
    force: Annotated[bool, typer.Option(help="Overwrite an existing file or a busy device.")] = False,
    from_export: Annotated[
        bool,
        typer.Option(
            "--from-export",
            help="Instant recovery: serve the point over NBD (--nbd) at once, writable, restoring meanwhile.",
        ),
    ] = False,
    nbd: Annotated[list[str] | None, typer.Option("--nbd", help="With --from-export: HOST:PORT or unix:PATH.")] = None,
    allow_damaged: Annotated[
        bool,
        typer.Option(
            help="Write missing or damaged blocks as zeros and list them instead of failing (see check --repair)."
        ),
    ] = False,
    json_out: JsonOption = False,
) -> None:
    """Restore a point to a file or block device, in one pass (or, with --from-export, while in use)."""
    if from_export:  # the same as `umbra export POINT --nbd ADDR --restore-to TARGET`
        serve_points.export(point, nbd, restore_to=target, force=force, repo=repo, json_out=json_out)
        return
    if nbd:
        raise UsageError("--nbd goes with --from-export")
    with open_repository(repo) as r:
        inst = instant(r, parse_point_ref(point))
        warn_if_journal_behind(inst)
        p = inst.point
        extents = extent_map(inst.records, p.size) if inst.records else None
        result = engine_restore.run(
            r, p, target, force, RichProgress(not json_out), extents=extents, allow_damaged=allow_damaged
        )
    damaged = result.stats.get("damaged_blocks", [])
    journal = {"records": len(inst.records), "until_ns": inst.time_ns} if inst.records else None
    if json_out:
        emit_json({"point": p.id, "target": target, "stats": result.stats, "journal": journal})
    else:
        replay = f" + {len(inst.records)} journal records" if inst.records else ""
        stdout.print(
            f"restored point {p.id[:8]} of {p.volume}{replay} to {target}: {human_bytes(p.size)}, "
            f"{human_bytes(result.stats['bytes_written'])} of data in {result.stats['duration_s']:.2f} s"
        )
    if damaged:
        shown = ", ".join(str(b * p.block_size) for b in damaged[:20]) + (", ..." if len(damaged) > 20 else "")
        stderr.print(f"warning: {len(damaged)} damaged blocks were written as zeros, at byte offsets {shown}")
        raise typer.Exit(EXIT_WARNING)
