"""Write activity of a block device, from ``/sys/class/block/<dev>/stat`` (writes completed,
sectors written, I/Os in flight): the write-inactivity detector of the coordinator watches it."""

from __future__ import annotations

import os
from pathlib import Path

from umbra.volume.mounts import VolumeInfo, filesystem_of


def stat_path(device: str) -> Path | None:
    name = os.path.basename(os.path.realpath(device))
    path = Path(f"/sys/class/block/{name}/stat")
    return path if path.exists() else None


def write_activity(path: Path) -> tuple[int, int, int]:
    """(writes completed, sectors written, I/Os in flight)."""
    fields = path.read_text().split()
    return int(fields[4]), int(fields[6]), int(fields[8])


def device_to_watch(volume: VolumeInfo) -> Path | None:
    """The stat file that sees the volume's writes: its own device, or for an image file the
    device of the filesystem holding it (coarser: other files' writes count too)."""
    if volume.is_block_device:
        return stat_path(volume.device)
    fs = filesystem_of(volume.device)
    if fs is not None and fs.device.startswith("/dev/"):
        return stat_path(fs.device)
    return None
