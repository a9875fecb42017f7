"""Reflink-capable volumes for shadow-copy tests: an XFS "host" filesystem on a loop device, holding
ext4 image files that are themselves loop-attached and mounted (root only)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from pathlib import Path

from tests.loopdev import loop_device, mounted
from umbra.testing.volumes import make_ext4

MiB = 1 << 20


@contextmanager
def host_filesystem(tmp_path: Path, fstype: str, mountpoint: str, size: int = 400 * MiB) -> Iterator[Path]:
    """A fresh filesystem of ``fstype`` (xfs, btrfs) on a loop device, mounted read-write."""
    img = tmp_path / f"host-{fstype}.img"
    with open(img, "wb") as f:
        f.truncate(size)
    subprocess.run([f"mkfs.{fstype}", "-q", "-f", str(img)], check=True, capture_output=True)
    with loop_device(img) as dev, mounted(dev, tmp_path / mountpoint, "rw") as mnt:
        yield mnt


def xfs_host(tmp_path: Path, size: int = 400 * MiB) -> AbstractContextManager[Path]:
    return host_filesystem(tmp_path, "xfs", "host", size)


def btrfs_host(tmp_path: Path, size: int = 400 * MiB) -> AbstractContextManager[Path]:
    return host_filesystem(tmp_path, "btrfs", "btrfs", size)


@contextmanager
def ext4_volumes(host: Path, tmp_path: Path, names: list[str], size: int = 48 * MiB) -> Iterator[dict[str, Path]]:
    """Mounted ext4 filesystems whose images live on ``host``; yields name → mount point."""
    with ExitStack() as stack:
        out = {}
        for name in names:
            img = make_ext4(host / f"{name}.img", size, None, garbage=False)
            dev = stack.enter_context(loop_device(img))
            out[name] = stack.enter_context(mounted(dev, tmp_path / f"mnt-{name}", "rw"))
        yield out
