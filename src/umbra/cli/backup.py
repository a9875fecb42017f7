"""``umbra backup``."""

from __future__ import annotations

from typing import Annotated

import typer

from umbra.cli.common import JsonOption, RepoOption, RichProgress, emit_json, human_bytes, open_repository, stdout
from umbra.engine import backup as engine_backup


def backup(
    source: Annotated[str, typer.Argument(help="Image file or block device.")],
    volume: Annotated[str, typer.Option("--volume", "-v", help="Volume name the point belongs to.")],
    repo: RepoOption = None,
    type_: Annotated[str, typer.Option("--type", "-t", help="full, incremental or differential.")] = "full",
    tag: Annotated[list[str] | None, typer.Option("--tag", help="Tag the point (repeatable).")] = None,
    all_blocks: Annotated[bool, typer.Option(help="Read every block, free space too.")] = False,
    json_out: JsonOption = False,
) -> None:
    """Back up a volume into a new point."""
    opts = engine_backup.BackupOptions(source, volume, type_, tag or [], all_blocks)
    with open_repository(repo) as r:
        result = engine_backup.run(r, opts, RichProgress(not json_out))
    p, s = result.point, result.stats
    if json_out:
        emit_json({"point": p.to_dict(), "stats": s})
        return
    stdout.print(f"point {p.id[:8]} of {p.volume} ({p.type}) at {p.time.astimezone():%Y-%m-%d %H:%M:%S}")
    stdout.print(
        f"  scanned {human_bytes(s['bytes_scanned'])}, read {human_bytes(s['bytes_read'])}, "
        f"new {human_bytes(s['bytes_new'])}, stored {human_bytes(s['bytes_stored'])} in {s['duration_s']:.2f} s"
    )
