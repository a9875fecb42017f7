"""The ``reflink`` provider: an image file on a filesystem that can clone extents (XFS, btrfs) is
snapshotted with FICLONE into a sibling file: instant, and sharing every block until either side
changes.  Covers image files (VM disks) and loop devices backed by such files."""

from __future__ import annotations

import fcntl
import os

from umbra.errors import ProviderError
from umbra.providers.base import Kind, Snapshot
from umbra.providers.imagefile import ImageFileProvider, image_file
from umbra.volume.mounts import VolumeInfo

FICLONE = 0x40049409
REFLINK_FILESYSTEMS = ("xfs", "btrfs", "ocfs2", "bcachefs")


class ReflinkProvider(ImageFileProvider):
    name = "reflink"
    kind = Kind.SOFTWARE
    description = "FICLONE of an image file (or a loop device's backing file) on XFS or btrfs"
    filesystems = REFLINK_FILESYSTEMS

    def __init__(self) -> None:
        self._targets: dict[str, str] = {}

    def prepare(self, volume: VolumeInfo, set_id: str) -> None:
        image = image_file(volume)
        assert image is not None
        target = os.path.join(os.path.dirname(image), f".umbra-snapshot-{set_id[:12]}-{os.path.basename(image)}")
        try:
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.close(fd)
        except OSError as exc:
            raise ProviderError(
                provider=self.name, volume=volume.source, reason=f"cannot create {target}: {exc.strerror}"
            ) from exc
        self._targets[volume.source] = target

    def commit(self, volume: VolumeInfo) -> Snapshot:
        image, target = image_file(volume), self._targets[volume.source]
        assert image is not None
        try:
            with open(image, "rb") as src, open(target, "r+b") as dst:
                fcntl.ioctl(dst.fileno(), FICLONE, src.fileno())
        except OSError as exc:
            raise ProviderError(
                provider=self.name, volume=volume.source, reason=f"FICLONE failed: {exc.strerror}"
            ) from exc
        return Snapshot(self.name, volume, target, handle={"file": target})

    def delete(self, snapshot: Snapshot) -> None:
        try:
            os.unlink(snapshot.handle["file"])
        except FileNotFoundError:
            return

    def abort(self, volume: VolumeInfo) -> None:
        target = self._targets.pop(volume.source, None)
        if target:
            try:
                os.unlink(target)
            except FileNotFoundError:
                return
