"""Block views that front ends serve: the live protected volume and its read-only snapshots."""

from __future__ import annotations

import errno
from collections.abc import Iterator
from typing import Protocol

from umbra.cow.engine import CowVolume
from umbra.volume.source import data_extents

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
