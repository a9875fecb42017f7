"""What a source path is: an image file, a block device, or a mounted filesystem, and what backs it.

Reads ``/proc/self/mountinfo`` and ``/sys/block/loop*/loop/backing_file``; nothing is cached, since
mounts change under us.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from umbra.errors import SourceError


@dataclass(frozen=True)
class Mount:
    mountpoint: str
    device: str  # e.g. /dev/loop3, or the fs source as the kernel reports it
    fstype: str
    dev: int  # st_dev of the mounted filesystem
    read_only: bool


def _unescape(text: str) -> str:
    return text.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")


def mounts() -> list[Mount]:
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields, rfields = left.split(), right.split()
            major, minor = (int(x) for x in fields[2].split(":"))
            out.append(
                Mount(
                    mountpoint=_unescape(fields[4]),
                    device=_unescape(rfields[1]),
                    fstype=rfields[0],
                    dev=os.makedev(major, minor),
                    read_only="ro" in fields[5].split(","),
                )
            )
    return out


def mount_of(path: str) -> Mount | None:
    """The mount whose mount point is exactly ``path``."""
    real = os.path.realpath(path)
    found = [m for m in mounts() if m.mountpoint == real]
    return found[-1] if found else None


def mounts_of_device(device: str) -> list[Mount]:
    """Mounts of a block device (matched by device number)."""
    try:
        rdev = os.stat(device).st_rdev
    except OSError:
        return []
    return [m for m in mounts() if m.dev == rdev]


def filesystem_of(path: str) -> Mount | None:
    """The mount that holds ``path`` (a file or directory): the longest mount point above its real
    path.  (Not by st_dev: files in btrfs subvolumes report a device number of their own.)"""
    real = os.path.realpath(path)
    best: Mount | None = None
    for m in mounts():  # later entries over-mount earlier ones at the same point
        inside = real == m.mountpoint or real.startswith(m.mountpoint.rstrip("/") + "/")
        if inside and (best is None or len(m.mountpoint) >= len(best.mountpoint)):
            best = m
    return best


def loop_backing_file(device: str) -> str | None:
    """The file behind a loop device, if it is one."""
    name = os.path.basename(os.path.realpath(device))
    try:
        text = Path(f"/sys/block/{name}/loop/backing_file").read_text().strip()
    except OSError:
        return None
    return None if text.endswith("(deleted)") else text


def _same_file(st: os.stat_result, target: os.stat_result) -> bool:
    if stat.S_ISBLK(target.st_mode):
        return stat.S_ISBLK(st.st_mode) and st.st_rdev == target.st_rdev
    return (st.st_dev, st.st_ino) == (target.st_dev, target.st_ino)


def open_for_writing(path: str) -> list[int]:
    """Pids of processes holding ``path`` open for writing (from /proc/*/fdinfo)."""
    try:
        target = os.stat(path)
    except OSError:
        return []
    pids = []
    for pid in (p for p in os.listdir("/proc") if p.isdigit()):
        fd_dir = f"/proc/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            try:
                if not _same_file(os.stat(f"{fd_dir}/{fd}"), target):
                    continue
                with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                    flags = int(f.read().split("flags:")[1].split()[0], 8)
            except (OSError, IndexError, ValueError):
                continue
            if flags & (os.O_WRONLY | os.O_RDWR) and int(pid) != os.getpid():
                pids.append(int(pid))
                break
    return pids


@dataclass(frozen=True)
class VolumeInfo:
    """A source as the user named it, resolved: what to read, and what is mounted from it."""

    source: str
    device: str  # the image file or block device holding the volume
    is_block_device: bool
    mount: Mount | None  # where its filesystem is mounted, if it is
    backing_file: str | None  # for a loop device: the image file behind it
    subvolume: str | None = None  # a btrfs subvolume (then ``device`` is its directory, nothing is mounted)


BTRFS_SUBVOLUME_ROOT_INODE = 256  # BTRFS_FIRST_FREE_OBJECTID: every subvolume's top directory


def is_btrfs_subvolume(path: str) -> bool:
    """Whether ``path`` is the top directory of a btrfs subvolume."""
    fs = filesystem_of(path)
    if fs is None or fs.fstype != "btrfs" or not os.path.isdir(path):
        return False
    return os.stat(path).st_ino == BTRFS_SUBVOLUME_ROOT_INODE


def resolve_source(source: str) -> VolumeInfo:
    """Resolve a mount point, block device, image file or btrfs subvolume (a subvolume's directory
    that is not itself a mount point: a mount point stands for its whole device).

    Raises:
        SourceError: it does not exist, or a directory that is neither a mount point nor a subvolume.
    """
    try:
        st = os.stat(source)
    except OSError as exc:
        raise SourceError(path=source, reason=exc.strerror) from exc
    if stat.S_ISDIR(st.st_mode):
        m = mount_of(source)
        if m is None and is_btrfs_subvolume(source):
            real = os.path.realpath(source)
            return VolumeInfo(source, real, False, None, None, subvolume=real)
        if m is None:
            raise SourceError(path=source, reason="a directory that is neither a mount point nor a btrfs subvolume")
        if not m.device.startswith("/dev/"):
            raise SourceError(path=source, reason=f"its filesystem ({m.fstype}) has no block device to image")
        return VolumeInfo(source, m.device, True, m, loop_backing_file(m.device))
    if stat.S_ISBLK(st.st_mode):
        found = mounts_of_device(source)
        return VolumeInfo(source, source, True, found[0] if found else None, loop_backing_file(source))
    if stat.S_ISREG(st.st_mode):
        return VolumeInfo(source, source, False, None, None)
    raise SourceError(path=source, reason="not an image file, block device or mount point")
