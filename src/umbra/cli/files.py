"""``umbra ls`` and ``umbra extract``: files inside an image point, without mounting it."""

from __future__ import annotations

import os
import stat
from datetime import datetime
from typing import Annotated

import typer

from umbra.cli.common import JsonOption, RepoOption, emit_json, human_bytes, open_repository, stderr, stdout
from umbra.engine import files as engine_files
from umbra.volume.filesystem import Entry

_SINGULAR = {
    "files": "file",
    "directories": "directory",
    "symlinks": "symlink",
    "hard links": "hard link",
    "special files": "special file",
}
PointArgument = Annotated[str, typer.Argument(help="Point: id prefix, VOLUME@latest or VOLUME@TIME.")]


def _line(entry: Entry, show_path: bool) -> str:
    when = datetime.fromtimestamp(entry.mtime_ns / 1e9).strftime("%Y-%m-%d %H:%M")
    name = (entry.path if show_path else entry.name).decode(errors="replace")
    size = f"{entry.rdev[0]}, {entry.rdev[1]}" if entry.kind in ("char", "block") else str(entry.size)
    line = f"{stat.filemode(entry.st_mode)} {entry.nlink:>3} {entry.uid:>5} {entry.gid:>5} {size:>12} {when} {name}"
    if entry.kind == "symlink":
        line += " -> " + entry.link_target.decode(errors="replace")
    return line


def ls(
    point: PointArgument,
    path: Annotated[str, typer.Argument(help="Path inside the filesystem.")] = "/",
    recursive: Annotated[bool, typer.Option("--recursive", "-R", help="Everything below PATH.")] = False,
    repo: RepoOption = None,
    json_out: JsonOption = False,
) -> None:
    """List files inside a point's filesystem (ext2/3/4, FAT, exFAT, NTFS, ...) without mounting it."""
    with open_repository(repo) as r:
        p, _, fs = engine_files.open_filesystem(r, point)
        top = fs.lookup(path)
        if recursive:
            entries = list(engine_files.walk(fs, top))[1:] if top.kind == "dir" else [top]
        else:
            entries = list(fs.children(top)) if top.kind == "dir" else [top]
    entries.sort(key=lambda e: e.path)
    if json_out:
        emit_json({"point": p.id, "filesystem": fs.type_name, "entries": [engine_files.describe(e) for e in entries]})
        return
    for entry in entries:
        stdout.print(_line(entry, recursive), markup=False)


def extract(
    point: PointArgument,
    path: Annotated[str, typer.Argument(help="File or directory inside the filesystem ('/' for everything).")],
    dest: Annotated[str, typer.Argument(help="Directory to extract into (created if missing).")],
    repo: RepoOption = None,
    json_out: JsonOption = False,
) -> None:
    """Restore files from a point's filesystem into DEST, reading only the blocks they need."""
    with open_repository(repo) as r:
        p, view, fs = engine_files.open_filesystem(r, point)
        result = engine_files.extract(fs, path, dest)
    for warning in result.warnings:
        stderr.print(f"warning: {warning}", markup=False)
    if json_out:
        emit_json(
            {
                "point": p.id,
                "path": path,
                "dest": os.path.abspath(dest),
                "counts": result.counts,
                "bytes_written": result.bytes_written,
                "bytes_fetched": view.bytes_fetched,
                "warnings": result.warnings,
            }
        )
        return
    counts = ", ".join(f"{n} {kind if n != 1 else _SINGULAR[kind]}" for kind, n in sorted(result.counts.items()))
    counts = counts or "nothing"
    stdout.print(
        f"extracted {counts} ({human_bytes(result.bytes_written)} of data) from point {p.short_id} of {p.volume} "
        f"into {dest}; read {human_bytes(view.bytes_fetched)} of the {human_bytes(p.size)} image",
        markup=False,
    )
