"""Restore targets: an image file (written sparse) or a block device (zeros written explicitly).

A target is refused, unless forced, when it is a mounted or otherwise busy block device, a device
smaller than the volume, an existing non-empty file, or a file that backs a loop device.
"""

from __future__ import annotations

import errno
import glob
import os
import stat
from dataclasses import dataclass

from umbra.errors import TargetBusy, TargetError, TargetTooSmall
from umbra.volume.blockio import pwrite_all, zero_device


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


@dataclass
class Target:
    path: str
    fd: int
    is_block_device: bool

    def write_at(self, offset: int, data: bytes | memoryview) -> None:
        pwrite_all(self.fd, data, offset)

    def zero_range(self, offset: int, length: int) -> None:
        """Make a range read as zeros (only block devices need this: files start as holes)."""
        if self.is_block_device and length > 0:
            zero_device(self.fd, offset, length)

    def finish(self) -> None:
        os.fsync(self.fd)
        os.close(self.fd)

    def abort(self) -> None:
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
    return Target(path, fd, False)


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
    return Target(path, fd, True)
