"""The ``btrfs`` provider: image files on btrfs are captured by a read-only snapshot of the
subvolume holding them; all image files of one set in the same subvolume share one snapshot.
A subvolume named as a source is snapshotted itself (read-only, beside it, in a hidden directory
named after the set, so that ``btrfs send`` names the stream after the subvolume) and stored as its
send stream.

What btrfs guarantees: each file is crash-consistent (writes completed before the snapshot are in
it).  Buffered writes still in flight while btrfs flushes them for the snapshot are not ordered
across files, so several files are consistent with each other only when their application is
paused by a writer (a script writer, say) — measured in the tests.  Uses ``btrfs`` from btrfs-progs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from typing import ClassVar

from umbra.errors import ProviderError
from umbra.providers.base import Kind, Snapshot
from umbra.providers.imagefile import ImageFileProvider, image_file
from umbra.volume import btrfs_send
from umbra.volume.mounts import BTRFS_SUBVOLUME_ROOT_INODE, VolumeInfo, filesystem_of


def subvolume_root(path: str) -> str:
    """The top directory of the btrfs subvolume that holds ``path``."""
    current = os.path.dirname(os.path.realpath(path))
    dev = os.stat(current).st_dev
    while True:
        st = os.stat(current)
        if st.st_ino == BTRFS_SUBVOLUME_ROOT_INODE or current == "/":
            return current
        parent = os.path.dirname(current)
        if os.stat(parent).st_dev != dev:
            return current
        current = parent


@dataclass
class _Shared:
    path: str
    users: int = 0


class BtrfsProvider(ImageFileProvider):
    name = "btrfs"
    kind = Kind.SOFTWARE
    description = "read-only snapshot of the btrfs subvolume holding image files (one per subvolume per set)"
    filesystems = ("btrfs",)
    # (set id, subvolume root) -> its snapshot; shared by the provider instances of a set
    _shared: ClassVar[dict[tuple[str, str], _Shared]] = {}

    def __init__(self) -> None:
        self._set_id = ""

    @classmethod
    def unavailable(cls) -> str | None:
        return None if shutil.which("btrfs") else "the btrfs command (btrfs-progs) is not installed"

    def probe(self, volume: VolumeInfo) -> str | None:
        if volume.subvolume is not None:
            return None
        return super().probe(volume)  # image files on btrfs

    def writes_to(self, volume: VolumeInfo) -> str | None:
        if volume.subvolume is not None:
            fs = filesystem_of(volume.subvolume)
            return fs.mountpoint if fs else None
        return super().writes_to(volume)

    def prepare(self, volume: VolumeInfo, set_id: str) -> None:
        self._set_id = set_id

    def _run(self, volume: VolumeInfo, *args: str) -> None:
        proc = subprocess.run(["btrfs", *args], capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise ProviderError(provider=self.name, volume=volume.source, reason=proc.stderr.strip() or "btrfs failed")

    def commit(self, volume: VolumeInfo) -> Snapshot:
        if volume.subvolume is not None:
            return self._snapshot_subvolume(volume, volume.subvolume)
        image = image_file(volume)
        assert image is not None
        root = subvolume_root(image)
        key = (self._set_id, root)
        if key not in self._shared:
            target = os.path.join(root, f".umbra-snapshot-{self._set_id[:12]}")
            self._run(volume, "subvolume", "snapshot", "-r", root, target)
            self._shared[key] = _Shared(target)
        shared = self._shared[key]
        shared.users += 1
        path = os.path.join(shared.path, os.path.relpath(os.path.realpath(image), root))
        return Snapshot(self.name, volume, path, handle={"key": key})

    def _snapshot_subvolume(self, volume: VolumeInfo, subvolume: str) -> Snapshot:
        holder = os.path.join(os.path.dirname(subvolume), f".umbra-snapshot-{self._set_id[:12]}")
        target = os.path.join(holder, os.path.basename(subvolume))
        try:
            os.makedirs(holder, mode=0o700, exist_ok=True)
        except OSError as exc:
            raise ProviderError(
                provider=self.name, volume=volume.source, reason=f"cannot create {holder}: {exc.strerror}"
            ) from exc
        try:
            self._run(volume, "subvolume", "snapshot", "-r", subvolume, target)
        except ProviderError:
            _remove_empty(holder)
            raise
        return Snapshot(self.name, volume, target, handle={"subvolume_snapshot": target}, content=btrfs_send.CONTENT)

    def delete(self, snapshot: Snapshot) -> None:
        own: str | None = snapshot.handle.get("subvolume_snapshot")
        if own is not None:
            if os.path.exists(own):
                self._run(snapshot.volume, "subvolume", "delete", own)
            _remove_empty(os.path.dirname(own))
            return
        key: tuple[str, str] | None = snapshot.handle.get("key")
        shared = self._shared.get(key) if key else None
        if key is None or shared is None:
            return
        shared.users -= 1
        if shared.users <= 0:
            del self._shared[key]
            self._run(snapshot.volume, "subvolume", "delete", shared.path)


def _remove_empty(directory: str) -> None:
    try:
        os.rmdir(directory)
    except OSError:
        return  # gone already, or it holds another set's snapshot
