"""``umbra export`` (a point as an NBD disk) and ``umbra mount`` (a point as a FUSE image file)."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator
from typing import Annotated, Any

import typer

from umbra.cli.common import JsonOption, RepoOption, emit_json, human_bytes, open_repository, warn_if_journal_behind
from umbra.errors import UsageError
from umbra.frontends.exports import BlockExport, OverlayExport, PointExport
from umbra.frontends.serve import ServeOptions, serve
from umbra.repo.manifest import Point
from umbra.repo.repository import Repository
from umbra.repo.view import open_state
from umbra.volume.filesystem import FileSystem

PointArgument = Annotated[str, typer.Argument(help="Point: id prefix, VOLUME@latest or VOLUME@TIME.")]


@contextlib.contextmanager
def _point_export(repo: str | None, point: str) -> Iterator[tuple[Repository, Point, PointExport]]:
    """The point's read-only export, under a shared lock so that prune cannot remove its data."""
    with open_repository(repo) as r, r.lock(exclusive=False):
        inst, view = open_state(r, point)
        warn_if_journal_behind(inst)
        yield r, inst.point, PointExport(view, inst.point.volume)


def _announce(json_out: bool, doc: dict[str, Any], line: str) -> None:
    if json_out:
        emit_json(doc)
    else:
        print(line)
    sys.stdout.flush()


def export(
    point: PointArgument,
    nbd: Annotated[
        list[str] | None, typer.Option("--nbd", help="Serve at HOST:PORT or unix:PATH (repeatable).")
    ] = None,
    name: Annotated[str | None, typer.Option("--name", help="Export name (default: the point's volume).")] = None,
    writable: Annotated[
        bool, typer.Option("--writable", help="Accept writes into a local overlay; the point is never changed.")
    ] = False,
    overlay: Annotated[
        str | None, typer.Option("--overlay", help="Overlay file for --writable (must not exist; kept).")
    ] = None,
    repo: RepoOption = None,
    json_out: JsonOption = False,
) -> None:
    """Serve a point as an NBD disk at once, blocks fetched on demand, until SIGTERM or Ctrl-C."""
    if overlay and not writable:
        raise UsageError("--overlay goes with --writable")
    addresses = list(nbd or ["127.0.0.1:10809"])
    with _point_export(repo, point) as (_, p, base):
        export_name = name or p.volume
        base.name = export_name
        target: BlockExport = base
        overlay_export: OverlayExport | None = None
        if writable:
            keep = overlay is not None
            path = overlay or os.path.join(tempfile.gettempdir(), f"umbra-overlay-{p.id[:8]}-{os.getpid()}")
            try:
                overlay_export = OverlayExport(base, path)
            except FileExistsError:
                raise UsageError(f"overlay {path} already exists; choose another --overlay") from None
            except OSError as exc:
                raise UsageError(f"cannot create overlay {path}: {exc.strerror}") from None
            target = overlay_export

        def ready(doc: dict[str, Any]) -> None:
            doc.update(point=p.id, volume=p.volume, size=p.size, writable=writable)
            if overlay_export is not None:
                doc["overlay"] = overlay_export.path
            mode = "read-write (overlay)" if writable else "read-only"
            _announce(
                json_out,
                doc,
                f"umbra: serving point {p.short_id} of {p.volume} ({human_bytes(p.size)}, {mode}) as NBD export "
                f"{export_name!r} at {', '.join(doc['nbd'])}",
            )

        try:
            serve(ServeOptions({export_name: target}, export_name, nbd=addresses), ready)
        finally:
            if overlay_export is not None:
                overlay_export.close(remove=not keep)


def mount(
    point: PointArgument,
    directory: Annotated[str, typer.Argument(help="Empty directory to mount on.")],
    files: Annotated[
        bool, typer.Option("--files", help="Mount the filesystem's files instead of the image (no loop device).")
    ] = False,
    repo: RepoOption = None,
    json_out: JsonOption = False,
) -> None:
    """Mount a point read-only until unmounted or Ctrl-C: the image file DIR/VOLUME.img
    (loop-mountable), or with --files the files inside it."""
    if not os.path.isdir(directory):
        raise UsageError(f"mount point {directory} is not a directory")
    with _point_export(repo, point) as (_, p, export_):
        tree = FileSystem(export_.view.read, p.size, f"point {p.short_id} of {p.volume}") if files else None

        def ready(doc: dict[str, Any]) -> None:
            doc.update(point=p.id, volume=p.volume, size=p.size, mountpoint=directory)
            what = f"its {tree.type_name} files" if tree is not None else ", ".join(doc["files"])
            if tree is not None:
                doc["filesystem"] = tree.type_name
            _announce(
                json_out,
                doc,
                f"umbra: point {p.short_id} of {p.volume} mounted at {directory}: {what} "
                f"(read-only; `umount {directory}` or Ctrl-C to stop)",
            )

        serve(ServeOptions({p.volume: export_}, p.volume, fuse_dir=directory, fuse_tree=tree), ready)
