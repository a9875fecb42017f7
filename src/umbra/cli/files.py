"""``umbra ls`` and ``umbra extract``: files inside an image point, without mounting it."""

from __future__ import annotations

import os
from datetime import datetime
from typing import Annotated, Any

import typer

from umbra.cli.common import JsonOption, RepoOption, emit_json, human_bytes, open_repository, stderr, stdout
from umbra.engine import files as engine_files
from umbra.engine.parser_process import ParserProcess

_SINGULAR = {
    "files": "file",
    "directories": "directory",
    "symlinks": "symlink",
    "hard links": "hard link",
    "special files": "special file",
}
PointArgument = Annotated[str, typer.Argument(help="Point: id prefix, VOLUME@latest or VOLUME@TIME.")]


def _line(doc: dict[str, Any], show_path: bool) -> str:
    """One ``ls -l`` style line of an entry as :func:`umbra.engine.files.describe` gives it."""
    when = datetime.fromtimestamp(int(doc["mtime_ns"]) / 1e9).strftime("%Y-%m-%d %H:%M")
    name = str(doc["path"] if show_path else doc["name"])
    size = f"{doc['rdev'][0]}, {doc['rdev'][1]}" if "rdev" in doc else str(doc["size"])
    line = f"{doc['mode_string']} {doc['nlink']:>3} {doc['uid']:>5} {doc['gid']:>5} {size:>12} {when} {name}"
    if "target" in doc:
        line += " -> " + str(doc["target"])
    return line


def _printable(text: str) -> str:
    """A name as the terminal shows it: undecodable bytes as \\xNN (they came in as surrogates)."""
    return text.encode(errors="surrogateescape").decode(errors="backslashreplace")


def ls(
    point: PointArgument,
    path: Annotated[str, typer.Argument(help="Path inside the filesystem.")] = "/",
    recursive: Annotated[bool, typer.Option("--recursive", "-R", help="Everything below PATH.")] = False,
    repo: RepoOption = None,
    json_out: JsonOption = False,
) -> None:
    """List files inside a point's filesystem (ext2/3/4, FAT, exFAT, NTFS, ...) without mounting it."""
    with open_repository(repo) as r:
        image = engine_files.open_image(r, point)
        with ParserProcess(image.view.read, image.view.size, image.label) as fs:
            listing = engine_files.list_files(image, fs, path, recursive)
    if json_out:
        emit_json(listing)
        return
    for doc in listing["entries"]:
        stdout.print(_printable(_line(doc, recursive)), markup=False)


def extract(
    point: PointArgument,
    path: Annotated[str, typer.Argument(help="File or directory inside the filesystem ('/' for everything).")],
    dest: Annotated[str, typer.Argument(help="Directory to extract into (created if missing).")],
    repo: RepoOption = None,
    json_out: JsonOption = False,
) -> None:
    """Restore files from a point's filesystem into DEST, reading only the blocks they need."""
    with open_repository(repo) as r:
        image = engine_files.open_image(r, point)
        with ParserProcess(image.view.read, image.view.size, image.label) as fs:
            result = engine_files.extract_files(image, fs, path, dest)
    for warning in result["warnings"]:
        stderr.print(f"warning: {warning}", markup=False)
    if json_out:
        emit_json(
            {
                "point": result["point"],
                "path": path,
                "dest": os.path.abspath(dest),
                "counts": result["counts"],
                "bytes_written": result["bytes_written"],
                "bytes_fetched": result["bytes_fetched"],
                "warnings": result["warnings"],
            }
        )
        return
    counts = ", ".join(f"{n} {kind if n != 1 else _SINGULAR[kind]}" for kind, n in sorted(result["counts"].items()))
    counts = counts or "nothing"
    stdout.print(
        f"extracted {counts} ({human_bytes(result['bytes_written'])} of data) from point {result['short_id']} of "
        f"{result['volume']} into {dest}; read {human_bytes(result['bytes_fetched'])} of the "
        f"{human_bytes(result['size'])} image",
        markup=False,
    )
