"""Writes that restore targets and protected volumes share: whole writes and zeroing."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import mmap
import os
import struct
import threading

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


DIRECT_ALIGN = 4096  # offsets and lengths of O_DIRECT writes (any device's logical block divides it)


def open_direct(path: str | os.PathLike[str]) -> int | None:
    """``path`` opened again for O_DIRECT writes, or None where the filesystem refuses it."""
    try:
        return os.open(path, os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC)
    except OSError:
        return None


def staging_buffer(local: threading.local, size: int) -> mmap.mmap:
    """This thread's page-aligned buffer (kept in ``local``) of at least ``size`` bytes, for
    O_DIRECT writes of data that arrived in ordinary memory."""
    buf: mmap.mmap | None = getattr(local, "buffer", None)
    if buf is None or len(buf) < size:
        if buf is not None:
            buf.close()
        buf = local.buffer = mmap.mmap(-1, max(size, 1))
    return buf


def pwrite_direct(direct_fd: int, fd: int, view: memoryview, offset: int) -> None:
    """Write ``view`` (page-aligned memory) at ``offset`` of a file open twice: its whole 4 KiB
    blocks in one O_DIRECT ``pwrite`` through ``direct_fd`` when ``offset`` is aligned, and through
    ``fd`` (the page cache) the unaligned end, what a short write left (a filling disk: the next
    write reports ENOSPC), or everything where O_DIRECT is refused after all (EINVAL)."""
    written = 0
    direct = 0 if offset % DIRECT_ALIGN else len(view) // DIRECT_ALIGN * DIRECT_ALIGN
    if direct:
        try:
            written = os.pwrite(direct_fd, view[:direct], offset)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
    if written < len(view):
        pwrite_all(fd, view[written:], offset + written)


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
