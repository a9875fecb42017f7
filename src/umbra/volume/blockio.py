"""Writes that restore targets and protected volumes share: whole writes and zeroing."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import os
import struct

BLKZEROOUT = 0x127F
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
_ZERO_CHUNK = bytes(1 << 20)

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def sync_path(path: os.PathLike[str] | str, data_only: bool = False) -> None:
    """fsync (or fdatasync) a file or directory by name."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if data_only:
            os.fdatasync(fd)
        else:
            os.fsync(fd)
    finally:
        os.close(fd)


def pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    """``pwrite`` until every byte is written (a single call may write less)."""
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def write_zeros(fd: int, offset: int, length: int) -> None:
    """Write zeros a megabyte at a time (never a buffer the size of the range)."""
    end = offset + length
    while offset < end:
        n = min(len(_ZERO_CHUNK), end - offset)
        pwrite_all(fd, memoryview(_ZERO_CHUNK)[:n], offset)
        offset += n


def zero_device(fd: int, offset: int, length: int) -> None:
    """Zero a block device range: BLKZEROOUT, or zeros written where the device cannot."""
    try:
        fcntl.ioctl(fd, BLKZEROOUT, struct.pack("QQ", offset, length))
    except OSError:
        write_zeros(fd, offset, length)


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Make a file range read as zeros and free its space (FALLOC_FL_PUNCH_HOLE), or write zeros
    where the filesystem cannot punch holes."""
    if length <= 0:
        return
    if _libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        err = ctypes.get_errno()
        if err not in (errno.EOPNOTSUPP, errno.ENOSYS):
            raise OSError(err, os.strerror(err))
        write_zeros(fd, offset, length)
