"""Loop devices and mounts for tests (root only); everything is detached in ``finally``."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def loop_device(image: Path, read_only: bool = False) -> Iterator[str]:
    args = ["losetup", "--find", "--show"] + (["--read-only"] if read_only else []) + [str(image)]
    dev = subprocess.run(args, check=True, capture_output=True, text=True).stdout.strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


@contextmanager
def mounted(device: str, where: Path, options: str = "ro") -> Iterator[Path]:
    where.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-o", options, device, str(where)], check=True, capture_output=True)
    try:
        yield where
    finally:
        for _ in range(50):  # a process that just let go of it (a freeze watchdog exiting) may still hold it
            if subprocess.run(["umount", str(where)], check=False, capture_output=True).returncode == 0:
                break
            time.sleep(0.1)


@contextmanager
def small_filesystem(where: Path, mib: int, fstype: str = "ext4") -> Iterator[Path]:
    """A writable filesystem of ``mib`` MiB mounted at ``where``: tmpfs, or ext4 on a loop device
    (O_DIRECT works there), to run out of space for real."""
    if fstype == "tmpfs":
        where.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={mib}m", "tmpfs", str(where)], check=True)
        try:
            yield where
        finally:
            subprocess.run(["umount", str(where)], check=False)
        return
    image = where.parent / f"{where.name}.img"
    with open(image, "wb") as f:
        f.truncate(mib << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", str(image)], check=True, capture_output=True)
    with loop_device(image) as dev, mounted(dev, where, "rw") as mnt:
        yield mnt
