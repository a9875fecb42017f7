"""``umbra export`` (a point as an NBD disk) and ``umbra mount`` (a point as a FUSE image file)."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator
from typing import Annotated, Any

import typer

from umbra.cli.common import (
    JsonOption,
    RepoOption,
    emit_json,
    human_bytes,
    open_repository,
    stderr,
    warn_if_journal_behind,
)
from umbra.engine.parser_process import ParserProcess
from umbra.errors import TargetError, UsageError
from umbra.frontends.exports import BlockExport, OverlayExport, PointExport, RestoringExport
from umbra.frontends.serve import ServeOptions, serve
from umbra.repo.manifest import Point
from umbra.repo.repository import Repository
from umbra.repo.view import open_state
from umbra.volume.sink import open_target

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


def _overlay(base: PointExport, path: str | None, point: Point) -> OverlayExport:
    path = path or os.path.join(tempfile.gettempdir(), f"umbra-overlay-{point.id[:8]}-{os.getpid()}")
    try:
        return OverlayExport(base, path)
    except FileExistsError:
        raise UsageError(f"overlay {path} already exists; choose another --overlay") from None
    except OSError as exc:
        raise UsageError(f"cannot create overlay {path}: {exc.strerror}") from None


def _finish_restore(restoring: RestoringExport) -> None:
    restoring.stop()
    target = restoring.target
    if restoring.in_sync.is_set() and restoring.error is None:
        restoring.flush()
        target.finish()
        stderr.print(f"umbra: {target.path} holds the volume as served, every write included", markup=False)
        return
    target.abort()
    reason = f"{restoring.error}" if restoring.error else "the export stopped before the copy was done"
    raise TargetError(path=target.path, reason=f"{reason} ({restoring.copied} of {restoring.size} bytes copied)")


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
    restore_to: Annotated[
        str | None,
        typer.Option(
            "--restore-to", help="Instant recovery: copy the served volume onto this file or device meanwhile."
        ),
    ] = None,
    force: Annotated[
        bool, typer.Option(help="With --restore-to: overwrite an existing file or a busy device.")
    ] = False,
    repo: RepoOption = None,
    json_out: JsonOption = False,
) -> None:
    """Serve a point as an NBD disk at once, blocks fetched on demand, until SIGTERM or Ctrl-C."""
    if overlay and not (writable or restore_to):
        raise UsageError("--overlay goes with --writable")
    writable = writable or restore_to is not None  # a volume in use while restored takes writes
    addresses = list(nbd or ["127.0.0.1:10809"])
    with _point_export(repo, point) as (_, p, base):
        export_name = base.name = name or p.volume
        served: BlockExport = base
        overlay_export = _overlay(base, overlay, p) if writable else None
        restoring: RestoringExport | None = None
        finished = False
        try:
            if overlay_export is not None:
                served = overlay_export
            if restore_to is not None and overlay_export is not None:
                served = restoring = RestoringExport(overlay_export, open_target(restore_to, p.size, force))
                restoring.start()

            def ready(doc: dict[str, Any]) -> None:
                doc.update(point=p.id, volume=p.volume, size=p.size, writable=writable, restore_to=restore_to)
                if overlay_export is not None:
                    doc["overlay"] = overlay_export.path
                mode = "read-write (overlay)" if writable else "read-only"
                also = f"; restoring to {restore_to} meanwhile" if restore_to else ""
                _announce(
                    json_out,
                    doc,
                    f"umbra: serving point {p.short_id} of {p.volume} ({human_bytes(p.size)}, {mode}) as NBD export "
                    f"{export_name!r} at {', '.join(doc['nbd'])}{also}",
                )

            serve(ServeOptions({export_name: served}, export_name, nbd=addresses), ready)
            if restoring is not None:
                finished = True
                _finish_restore(restoring)
        finally:
            if restoring is not None and not finished:  # serving failed: no half-copied target is finished
                restoring.stop()
                restoring.target.abort()
            if overlay_export is not None:
                overlay_export.close(remove=overlay is None)


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
        tree = ParserProcess(export_.view.read, p.size, f"point {p.short_id} of {p.volume}") if files else None

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

        try:
            serve(ServeOptions({p.volume: export_}, p.volume, fuse_dir=directory, fuse_tree=tree), ready)
        finally:
            if tree is not None:
                tree.close()
