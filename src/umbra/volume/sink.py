"""Restore targets: an image file (written sparse) or a block device (zeros written explicitly).

Data goes out through O_DIRECT where the target allows it: on this kind of VM a page-cache write
costs 2 to 3 s of system time per GiB (SPEC section 7), and a restore is written once and not read
back.  Each writing thread copies adjacent blocks into its own page-aligned buffer and writes them
in one ``pwrite``; several threads write at once.

A target is refused, unless forced, when it is a mounted or otherwise busy block device, a device
smaller than the volume, an existing non-empty file, or a file that backs a loop device.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import mmap
import os
import stat
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from umbra.errors import TargetBusy, TargetError, TargetTooSmall
from umbra.volume.blockio import open_direct, pwrite_all, pwrite_direct, staging_buffer, write_zeros, zero_device


def loop_backing_files() -> dict[str, str]:
    """Map of realpath of backing file → loop device, for attached loop devices."""
    out = {}
    for path in glob.glob("/sys/block/loop*/loop/backing_file"):
        try:
            with open(path) as f:
                backing = f.read().strip()
        except OSError:
            continue
        out[os.path.realpath(backing.removesuffix(" (deleted)"))] = "/dev/" + path.split("/")[3]
    return out


RUN_BYTES = 4 << 20  # adjacent blocks written in one go (each writing thread's buffer)


@dataclass
class Target:
    path: str
    fd: int
    is_block_device: bool
    direct_fd: int | None = None  # the same file or device opened with O_DIRECT, where it can be
    ordered = False  # True: written strictly in order, from one thread (a stream)
    _local: threading.local = field(default_factory=threading.local, repr=False)

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """A failed write (a full disk, an I/O error) is one TargetError saying what is left."""
        try:
            yield
        except OSError as exc:
            reason = f"{exc.strerror or exc}; the target is incomplete, restore again once that is fixed"
            raise TargetError(path=self.path, reason=reason) from None

    def write_at(self, offset: int, data: bytes | memoryview) -> None:
        with self._writing():
            pwrite_all(self.fd, data, offset)

    def write_many(self, pieces: Iterable[tuple[int, bytes | memoryview]], block_size: int) -> None:
        """Write (offset, data) pieces, in offset order; from several threads at once if not
        ``ordered``.  Adjacent pieces go out in one write, through O_DIRECT where possible.

        Raises:
            TargetError: a write failed.
        """
        with self._writing():
            self._write_pieces(pieces, block_size)

    def _write_pieces(self, pieces: Iterable[tuple[int, bytes | memoryview]], block_size: int) -> None:
        if self.direct_fd is None:
            for offset, data in pieces:
                self.write_at(offset, data)
            return
        buf = staging_buffer(self._local, max(RUN_BYTES, block_size))
        start = used = 0
        for offset, data in pieces:
            if used and (offset != start + used or used + len(data) > len(buf)):
                self._write_run(buf, start, used)
                used = 0
            if not used:
                start = offset
            buf[used : used + len(data)] = data
            used += len(data)
        if used:
            self._write_run(buf, start, used)

    def _write_run(self, buf: mmap.mmap, offset: int, length: int) -> None:
        assert self.direct_fd is not None
        with memoryview(buf) as view:
            pwrite_direct(self.direct_fd, self.fd, view[:length], offset)

    def zero_range(self, offset: int, length: int) -> None:
        """Make a range read as zeros (only block devices need this: files start as holes)."""
        if self.is_block_device and length > 0:
            with self._writing():
                zero_device(self.fd, offset, length)

    def write_zeros(self, offset: int, length: int) -> None:
        """Write zeros over a range that may hold data (a damaged block, a journal's zeroing)."""
        with self._writing():
            write_zeros(self.fd, offset, length)

    def finish(self) -> None:
        with self._writing():
            os.fsync(self.fd)  # (the inode, the device's cache: for the O_DIRECT writes too)
        self.abort()

    def abort(self) -> None:
        if self.direct_fd is not None:
            os.close(self.direct_fd)
            self.direct_fd = None
        os.close(self.fd)


def open_target(path: str, size: int, force: bool = False) -> Target:
    """Open (or create) a restore target for a volume of ``size`` bytes.

    Raises:
        TargetTooSmall, TargetBusy, TargetError.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise TargetError(path=path, reason=exc.strerror) from exc
    if st is not None and stat.S_ISBLK(st.st_mode):
        return _open_device(path, size, force)
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise TargetError(path=path, reason="not a regular file or block device")
    if st is not None and not force:
        loops = loop_backing_files()
        if os.path.realpath(path) in loops:
            raise TargetBusy(path=path, reason=f"attached to {loops[os.path.realpath(path)]}")
        if st.st_size > 0:
            raise TargetError(path=path, reason="it exists and is not empty (use --force to overwrite it)")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        os.ftruncate(fd, size)
    except OSError as exc:
        raise TargetError(path=path, reason=exc.strerror) from exc
    return Target(path, fd, False, open_direct(path))


def _open_device(path: str, size: int, force: bool) -> Target:
    flags = os.O_WRONLY | os.O_CLOEXEC | (0 if force else os.O_EXCL)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            raise TargetBusy(path=path, reason="mounted or in use") from exc
        raise TargetError(path=path, reason=exc.strerror) from exc
    dev_size = os.lseek(fd, 0, os.SEEK_END)
    if dev_size < size:  # even --force cannot make a device larger
        os.close(fd)
        raise TargetTooSmall(path=path, size=dev_size, needed=size)
    return Target(path, fd, True, open_direct(path))
