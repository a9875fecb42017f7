"""Shared ground of providers that snapshot image files (or the files behind loop devices) by
asking the filesystem that holds them: which file, whether that filesystem can, where it writes."""

from __future__ import annotations

from typing import ClassVar

from umbra.providers.base import Provider
from umbra.volume.mounts import VolumeInfo, filesystem_of


def image_file(volume: VolumeInfo) -> str | None:
    """The image file of a volume: itself, or the backing file of a loop device."""
    return volume.backing_file if volume.is_block_device else volume.device


class ImageFileProvider(Provider):
    filesystems: ClassVar[tuple[str, ...]]  # filesystem types that can snapshot a file

    def probe(self, volume: VolumeInfo) -> str | None:
        if volume.subvolume is not None:
            return "a btrfs subvolume, not an image file"
        image = image_file(volume)
        if image is None:
            return "not an image file or a loop device backed by one"
        fs = filesystem_of(image)
        if fs is None or fs.fstype not in self.filesystems:
            where = fs.fstype if fs else "an unknown filesystem"
            return f"{image} is on {where}, not {' or '.join(self.filesystems)}"
        return None

    def writes_to(self, volume: VolumeInfo) -> str | None:
        image = image_file(volume)
        fs = filesystem_of(image) if image else None
        return fs.mountpoint if fs else None
