"""A read-write volume held exclusively: the storage under a protected volume.

Block devices are opened with ``O_EXCL`` (the kernel refuses it while the device is mounted or
held by anyone else); image files take an exclusive ``flock`` that umbra's other commands honour.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from dataclasses import dataclass

from umbra.errors import SourceError, VolumeBusy
from umbra.volume.blockio import punch_hole, pwrite_all, zero_device


@dataclass
class Backing:
    path: str
    fd: int
    size: int
    is_block_device: bool

    def pread(self, length: int, offset: int) -> bytes:
        data = os.pread(self.fd, length, offset)
        if len(data) < length:  # a file shorter than its nominal size reads as zeros past its end
            data += bytes(length - len(data))
        return data

    def pwrite(self, data: bytes | memoryview, offset: int) -> None:
        pwrite_all(self.fd, data, offset)

    def zero(self, offset: int, length: int) -> None:
        """Make the range read as zeros, freeing its space where the storage can."""
        if length <= 0:
            return
        if self.is_block_device:
            zero_device(self.fd, offset, length)
        else:
            punch_hole(self.fd, offset, length)

    def flush(self) -> None:
        os.fdatasync(self.fd)

    def close(self) -> None:
        os.close(self.fd)


def open_backing(path: str) -> Backing:
    """Open ``path`` read-write and exclusively.

    Raises:
        SourceError: missing or not an image file / block device.
        TargetBusy: mounted, or already held (another ``umbra protect``, a loop device, …).
    """
    try:
        st = os.stat(path)
    except OSError as exc:
        raise SourceError(path=path, reason=exc.strerror) from exc
    flags = os.O_RDWR | os.O_CLOEXEC
    if stat.S_ISBLK(st.st_mode):
        flags |= os.O_EXCL
    elif not stat.S_ISREG(st.st_mode):
        raise SourceError(path=path, reason="not an image file or block device")
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            raise VolumeBusy(path=path, reason="it is mounted or held by another program") from exc
        raise SourceError(path=path, reason=exc.strerror) from exc
    if not stat.S_ISBLK(st.st_mode):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            os.close(fd)
            raise VolumeBusy(path=path, reason="another umbra process protects it") from exc
    size = os.lseek(fd, 0, os.SEEK_END)
    return Backing(path, fd, size, stat.S_ISBLK(st.st_mode))
