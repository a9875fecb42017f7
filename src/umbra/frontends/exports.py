"""Block views that front ends serve: the live protected volume and its read-only snapshots, points
of the repository, and a local overlay that makes any read-only view writable."""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Iterator
from typing import Protocol

from umbra.cow.bitmap import Bitmap
from umbra.cow.engine import CowVolume
from umbra.repo.view import BlockView
from umbra.volume.blockio import punch_hole, pwrite_all, write_zeros
from umbra.volume.sink import Target
from umbra.volume.source import data_extents

Run = tuple[int, int, bool]  # start, end, has data (False: reads as zeros)


class BlockExport(Protocol):
    name: str
    size: int
    read_only: bool
    description: str
    # small reads and writes cost about a page-cache copy: the NBD server does them in its event
    # loop instead of a worker thread (never for views that may fetch from a repository or sync)
    inline: bool

    def read(self, offset: int, length: int) -> bytes: ...
    def write(self, offset: int, data: bytes | memoryview, fua: bool) -> None: ...
    def zero(self, offset: int, length: int, fua: bool) -> None: ...
    def flush(self) -> None: ...
    def allocation(self, offset: int, length: int) -> Iterator[Run]: ...


class VolumeExport:
    """The live volume, read-write; every write goes through the cow engine."""

    read_only = False

    def __init__(self, volume: CowVolume) -> None:
        self.volume = volume
        self.name = volume.name
        self.size = volume.size
        self.description = f"umbra protected volume {volume.name}"
        self.inline = not volume.sync  # with --sync every write waits for the disk

    def read(self, offset: int, length: int) -> bytes:
        return self.volume.read(offset, length)

    def write(self, offset: int, data: bytes | memoryview, fua: bool) -> None:
        self.volume.write(offset, data, fua)

    def zero(self, offset: int, length: int, fua: bool) -> None:
        self.volume.zero(offset, length, fua)

    def flush(self) -> None:
        self.volume.flush()

    def allocation(self, offset: int, length: int) -> Iterator[Run]:
        backing = self.volume.backing
        end = offset + length
        try:
            data = [(offset, end)] if backing.is_block_device else data_extents(backing.fd, offset, end)
        except OSError:
            data = [(offset, end)]  # cannot tell: claim data
        pos = offset
        for start, stop in data:
            if start > pos:
                yield pos, start, False
            yield start, stop, True
            pos = stop
        if pos < end:
            yield pos, end, False


class SnapshotExport:
    """One snapshot, read-only; chunks it does not protect read as zeros and are reported as holes."""

    read_only = True
    inline = True

    def __init__(self, volume: CowVolume, snapshot: str) -> None:
        self.volume = volume
        self.snapshot = snapshot
        self.name = f"{volume.name}@{snapshot}"
        self.size = volume.size
        self.description = f"snapshot {snapshot} of umbra protected volume {volume.name}"

    def read(self, offset: int, length: int) -> bytes:
        return self.volume.read_snapshot(self.snapshot, offset, length)

    def write(self, offset: int, data: bytes | memoryview, fua: bool) -> None:
        raise OSError(errno.EPERM, "snapshots are read-only")

    def zero(self, offset: int, length: int, fua: bool) -> None:
        raise OSError(errno.EPERM, "snapshots are read-only")

    def flush(self) -> None:
        return None  # nothing is ever written through a snapshot

    def allocation(self, offset: int, length: int) -> Iterator[Run]:
        return self.volume.snapshot_allocation(self.snapshot, offset, length)


class PointExport:
    """A point of the repository (or a state between points), read-only, its blocks fetched on
    demand (:mod:`umbra.repo.view`)."""

    read_only = True
    inline = False  # a block may be fetched from the repository (a server, a slow disk)

    def __init__(self, view: BlockView, name: str) -> None:
        self.view = view
        self.name = name
        self.size = view.size
        self.description = f"umbra point {view.point.id} of {view.point.volume} ({view.point.time.isoformat()})"

    def read(self, offset: int, length: int) -> bytes:
        return self.view.read(offset, length)

    def write(self, offset: int, data: bytes | memoryview, fua: bool) -> None:
        raise OSError(errno.EROFS, "points are read-only (export with --writable for an overlay)")

    def zero(self, offset: int, length: int, fua: bool) -> None:
        raise OSError(errno.EROFS, "points are read-only (export with --writable for an overlay)")

    def flush(self) -> None:
        return None  # nothing is ever written through a point

    def allocation(self, offset: int, length: int) -> Iterator[Run]:
        return self.view.allocation(offset, length)


class OverlayExport:
    """A read-only view made writable: written pages go to a sparse local file, the rest is read
    from the view.  The base is never written; the overlay lives as long as this object."""

    read_only = False
    inline = False  # reads fall through to the view below
    PAGE = 4096

    def __init__(self, base: BlockExport, overlay_path: str) -> None:
        self.base = base
        self.name = base.name
        self.size = base.size
        self.description = f"{base.description}, writes kept in {overlay_path}"
        self.path = overlay_path
        self.fd = os.open(overlay_path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        os.ftruncate(self.fd, self.size)
        self.pages = Bitmap(-(-self.size // self.PAGE))
        self._lock = threading.Lock()  # page state and read-modify-write of partial pages
        self.bytes_written = 0

    def close(self, remove: bool = True) -> None:
        os.close(self.fd)
        if remove:
            os.unlink(self.path)

    def _runs(self, offset: int, length: int) -> Iterator[tuple[int, int, bool]]:
        """(start, end, in overlay) runs of pages covering the byte range."""
        end = offset + length
        pos = offset
        while pos < end:
            page = pos // self.PAGE
            inside = self.pages.test(page)
            stop = pos
            while stop < end and self.pages.test(stop // self.PAGE) == inside:
                stop = min(end, (stop // self.PAGE + 1) * self.PAGE)
            yield pos, stop, inside
            pos = stop

    def read(self, offset: int, length: int) -> bytes:
        length = max(0, min(length, self.size - offset))
        with self._lock:
            runs = list(self._runs(offset, length))
        parts = [
            os.pread(self.fd, stop - start, start) if inside else self.base.read(start, stop - start)
            for start, stop, inside in runs
        ]
        return b"".join(parts)

    def write(self, offset: int, data: bytes | memoryview, fua: bool) -> None:
        if offset < 0 or offset + len(data) > self.size:
            raise OSError(errno.ENOSPC, "write past the end of the volume")
        if not data:
            return
        with self._lock:
            first, last = offset // self.PAGE, (offset + len(data) - 1) // self.PAGE
            for page in {first, last}:  # edge pages not yet in the overlay: copy the base in first
                if not self.pages.test(page):
                    start = page * self.PAGE
                    pwrite_all(self.fd, self.base.read(start, min(self.PAGE, self.size - start)), start)
            pwrite_all(self.fd, data, offset)
            self.pages.set_range(first, last + 1)
            self.bytes_written += len(data)
        if fua:
            os.fdatasync(self.fd)

    def zero(self, offset: int, length: int, fua: bool) -> None:
        """Zero (or trim) a range: partial pages at its edges are written, whole pages become a
        hole in the overlay, so trimming a whole disk (mkfs does) costs no space and no writes."""
        if offset < 0 or offset + length > self.size:
            raise OSError(errno.ENOSPC, "zero past the end of the volume")
        end = offset + length
        first, last = -(-offset // self.PAGE) * self.PAGE, end // self.PAGE * self.PAGE
        if first >= last:  # no whole page inside
            self.write(offset, bytes(length), fua)
            return
        if offset < first:
            self.write(offset, bytes(first - offset), False)
        if last < end:
            self.write(last, bytes(end - last), False)
        with self._lock:
            punch_hole(self.fd, first, last - first)
            self.pages.set_range(first // self.PAGE, last // self.PAGE)
        if fua:
            os.fdatasync(self.fd)

    def flush(self) -> None:
        os.fdatasync(self.fd)

    def allocation(self, offset: int, length: int) -> Iterator[Run]:
        with self._lock:
            runs = list(self._runs(offset, length))
        for start, stop, inside in runs:
            if inside:
                yield start, stop, True
            else:
                yield from self.base.allocation(start, stop - start)


class RestoringExport:
    """Instant recovery: a writable export that is copied onto real storage in the background
    while it is in use.  A copy cursor moves through the volume; a client write below the cursor
    goes to the target as well, one above it is picked up when the cursor gets there, so once the
    cursor reaches the end the target holds exactly what the clients see, and stays so."""

    read_only = False
    inline = False
    CHUNK = 4 << 20

    def __init__(self, overlay: OverlayExport, target: Target) -> None:
        self.overlay = overlay
        self.target = target
        self.name, self.size = overlay.name, overlay.size
        self.description = f"{overlay.description}, being restored to {target.path}"
        self.copied = 0  # the cursor: everything below it is on the target
        self.error: BaseException | None = None
        self.in_sync = threading.Event()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._copy, name="umbra-restore", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _copy(self) -> None:
        try:
            while self.copied < self.size and not self._stop.is_set():
                with self._lock:
                    n = min(self.CHUNK, self.size - self.copied)
                    data = self.overlay.read(self.copied, n)
                    if data.count(0) == len(data):
                        self.target.zero_range(self.copied, n)  # files start as holes; devices need zeros
                    else:
                        self.target.write_at(self.copied, data)
                    self.copied += n
            if self.copied >= self.size:
                os.fsync(self.target.fd)
                self.in_sync.set()
        except BaseException as exc:  # noqa: BLE001 - reported by the command when it stops
            self.error = exc

    def read(self, offset: int, length: int) -> bytes:
        return self.overlay.read(offset, length)

    def write(self, offset: int, data: bytes | memoryview, fua: bool) -> None:
        with self._lock:
            self.overlay.write(offset, data, fua)
            below = max(0, min(len(data), self.copied - offset))
            if below:
                self.target.write_at(offset, memoryview(data)[:below])

    def zero(self, offset: int, length: int, fua: bool) -> None:
        with self._lock:
            self.overlay.zero(offset, length, fua)
            below = max(0, min(length, self.copied - offset))
            if below:
                write_zeros(self.target.fd, offset, below)

    def flush(self) -> None:
        with self._lock:
            self.overlay.flush()
            os.fsync(self.target.fd)

    def allocation(self, offset: int, length: int) -> Iterator[Run]:
        return self.overlay.allocation(offset, length)


def exports_of(volume: CowVolume) -> dict[str, BlockExport]:
    """The volume and each usable snapshot, by export name (``V`` and ``V@SNAPSHOT``)."""
    out: dict[str, BlockExport] = {volume.name: VolumeExport(volume)}
    for snap in volume.snapshots():
        if snap.failed is None:
            export = SnapshotExport(volume, snap.name)
            out[export.name] = export
    return out
