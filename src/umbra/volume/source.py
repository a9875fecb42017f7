"""Block sources: a raw image file or a block device, read with ``pread``."""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass
from typing import TYPE_CHECKING, Union

from umbra.errors import SourceError, SourceReadError
from umbra.volume.extents import Extent

SEEK_DATA = getattr(os, "SEEK_DATA", 3)
SEEK_HOLE = getattr(os, "SEEK_HOLE", 4)


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

    def data_extents(self) -> list[Extent] | None:
        """Where an image file has data (SEEK_DATA/SEEK_HOLE); None for devices or if unsupported.

        The file is fsynced first: some filesystems report dirty pages as holes (OpenZFS #15526).
        """
        if self.is_block_device:
            return None
        try:
            os.fsync(self.fd)
            extents: list[Extent] = []
            pos = 0
            while pos < self.size:
                try:
                    start = os.lseek(self.fd, pos, SEEK_DATA)
                except OSError as exc:
                    if exc.errno == errno.ENXIO:
                        break
                    raise
                end = min(os.lseek(self.fd, start, SEEK_HOLE), self.size)
                extents.append((start, end))
                pos = end
            return extents
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


def open_source(path: str) -> Source:
    """Open an image file, a block device or an NBD export (``nbd://…``, ``nbd+unix://…``) for reading.

    Raises:
        SourceError: missing, unreadable, or neither a regular file nor a block device.
    """
    from umbra.volume.nbdsource import is_nbd_uri, open_nbd

    if is_nbd_uri(path):
        return open_nbd(path)
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


if TYPE_CHECKING:
    from umbra.volume.nbdsource import NbdSource

Source = Union[FileSource, "NbdSource"]
