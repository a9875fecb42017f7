"""Block sources: a raw image file or a block device, read with ``pread``."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

from umbra.errors import SourceError, SourceReadError
from umbra.volume.extents import Extent

SEEK_DATA = getattr(os, "SEEK_DATA", 3)
SEEK_HOLE = getattr(os, "SEEK_HOLE", 4)


class Source(Protocol):
    """What the backup reads from: an image file or device (:class:`FileSource`), or an NBD
    export (``umbra.frontends.nbd.client.NbdSource``)."""

    path: str
    size: int
    is_block_device: bool

    def read_at(self, offset: int, length: int) -> bytes: ...
    def read_many(self, ranges: Iterable[tuple[int, int]]) -> Iterator[bytes]:
        """``read_at`` of each range, in order (a source may have several reads under way)."""

    def data_extents(self) -> list[Extent] | None: ...
    def close(self) -> None: ...


@dataclass
class FileSource:
    """An open image file or block device.  ``read_at`` never returns short inside the volume."""

    path: str
    fd: int
    size: int
    is_block_device: bool

    def read_at(self, offset: int, length: int) -> bytes:
        length = min(length, self.size - offset)
        try:
            data = os.pread(self.fd, length, offset)
        except OSError as exc:
            raise SourceReadError(path=self.path, offset=offset, reason=exc.strerror) from exc
        if len(data) != length:
            raise SourceReadError(path=self.path, offset=offset + len(data), reason="unexpected end of data")
        return data

    def read_many(self, ranges: Iterable[tuple[int, int]]) -> Iterator[bytes]:
        for offset, length in ranges:
            yield self.read_at(offset, length)

    def data_extents(self) -> list[Extent] | None:
        """Where an image file has data (SEEK_DATA/SEEK_HOLE); None for devices or if unsupported.

        The file is fsynced first: some filesystems report dirty pages as holes (OpenZFS #15526).
        """
        if self.is_block_device:
            return None
        try:
            os.fsync(self.fd)
            return data_extents(self.fd, 0, self.size)
        except OSError as exc:
            if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                return None
            raise SourceError(path=self.path, reason=f"cannot map holes: {exc.strerror}") from exc

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> FileSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def data_extents(fd: int, start: int, end: int) -> list[Extent]:
    """Where a file has data between ``start`` and ``end`` (SEEK_DATA/SEEK_HOLE); raises OSError
    (EINVAL, EOPNOTSUPP) where the filesystem cannot tell."""
    extents: list[Extent] = []
    pos = start
    while pos < end:
        try:
            data = os.lseek(fd, pos, SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # nothing but a hole up to the end of the file
                break
            raise
        if data >= end:
            break
        hole = min(os.lseek(fd, data, SEEK_HOLE), end)
        extents.append((data, hole))
        pos = hole
    return extents


def open_source(path: str) -> FileSource:
    """Open an image file or block device for reading.

    Raises:
        SourceError: missing, unreadable, or neither a regular file nor a block device.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise SourceError(path=path, reason=exc.strerror) from exc
    st = os.fstat(fd)
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        os.close(fd)
        raise SourceError(path=path, reason="not an image file or block device")
    size = os.lseek(fd, 0, os.SEEK_END)
    return FileSource(path, fd, size, stat.S_ISBLK(st.st_mode))
