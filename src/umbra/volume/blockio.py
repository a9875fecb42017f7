"""Writes that restore targets and protected volumes share: whole writes and zeroing."""

from __future__ import annotations

import fcntl
import os
import struct

BLKZEROOUT = 0x127F
_ZERO_CHUNK = bytes(1 << 20)


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
