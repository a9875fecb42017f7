"""Block views that front ends serve: the live protected volume and its read-only snapshots."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from typing import Protocol

from umbra.cow.engine import CowVolume
from umbra.volume.source import SEEK_DATA, SEEK_HOLE

Run = tuple[int, int, bool]  # start, end, has data (False: reads as zeros)


class BlockExport(Protocol):
    name: str
    size: int
    read_only: bool
    description: str

    def read(self, offset: int, length: int) -> bytes: ...
    def write(self, offset: int, data: bytes, fua: bool) -> None: ...
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

    def read(self, offset: int, length: int) -> bytes:
        return self.volume.read(offset, length)

    def write(self, offset: int, data: bytes, fua: bool) -> None:
        self.volume.write(offset, data, fua)

    def zero(self, offset: int, length: int, fua: bool) -> None:
        self.volume.zero(offset, length, fua)

    def flush(self) -> None:
        self.volume.flush()

    def allocation(self, offset: int, length: int) -> Iterator[Run]:
        backing = self.volume.backing
        end = offset + length
        if backing.is_block_device:
            yield offset, end, True
            return
        pos = offset
        while pos < end:
            try:
                data = os.lseek(backing.fd, pos, SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # only a hole up to the end of the file
                    yield pos, end, False
                    return
                yield pos, end, True  # cannot tell: claim data
                return
            if data > pos:
                yield pos, min(data, end), False
                pos = min(data, end)
                continue
            hole = min(os.lseek(backing.fd, pos, SEEK_HOLE), end)
            yield pos, hole, True
            pos = hole


class SnapshotExport:
    """One snapshot, read-only; chunks it does not protect read as zeros and are reported as holes."""

    read_only = True

    def __init__(self, volume: CowVolume, snapshot: str) -> None:
        self.volume = volume
        self.snapshot = snapshot
        self.name = f"{volume.name}@{snapshot}"
        self.size = volume.size
        self.description = f"snapshot {snapshot} of umbra protected volume {volume.name}"

    def read(self, offset: int, length: int) -> bytes:
        return self.volume.read_snapshot(self.snapshot, offset, length)

    def write(self, offset: int, data: bytes, fua: bool) -> None:
        raise OSError(errno.EPERM, "snapshots are read-only")

    def zero(self, offset: int, length: int, fua: bool) -> None:
        raise OSError(errno.EPERM, "snapshots are read-only")

    def flush(self) -> None:
        return None  # nothing is ever written through a snapshot

    def allocation(self, offset: int, length: int) -> Iterator[Run]:
        return self.volume.snapshot_allocation(self.snapshot, offset, length)


def exports_of(volume: CowVolume) -> dict[str, BlockExport]:
    """The volume and each usable snapshot, by export name (``V`` and ``V@SNAPSHOT``)."""
    out: dict[str, BlockExport] = {volume.name: VolumeExport(volume)}
    for snap in volume.snapshots():
        if snap.failed is None:
            export = SnapshotExport(volume, snap.name)
            out[export.name] = export
    return out
