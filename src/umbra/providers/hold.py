"""The ``hold`` provider: a mounted filesystem on a block device nothing else can snapshot.

Without device-mapper (this kind of kernel has none) a filesystem mounted straight on a disk
partition has no snapshot at all.  ``hold`` makes one the old way: the coordinator's flush-and-hold
(FIFREEZE) is not released after the commit but kept until the backup has read the device, so the
device *is* the snapshot.  Applications keep running but their writes wait, so it is opt-in
(``--provider hold``) and bounded by ``--hold-limit``: the freeze watchdog thaws the filesystem at
that limit (or at once if umbra dies) and the backup then fails rather than keep a torn image.
For a volume that must stay writable, protect it instead (``umbra protect --loop``).
"""

from __future__ import annotations

import os

from umbra.providers.base import Kind, Provider, Snapshot
from umbra.volume.mounts import VolumeInfo


class HoldProvider(Provider):
    name = "hold"
    kind = Kind.SYSTEM
    description = (
        "a mounted filesystem kept frozen (FIFREEZE) while the backup reads its device; "
        "writes wait meanwhile, so opt-in (--provider hold) and bounded by --hold-limit"
    )
    opt_in = True
    holds_freeze = True

    @classmethod
    def unavailable(cls) -> str | None:
        return None if os.geteuid() == 0 else "FIFREEZE needs root (CAP_SYS_ADMIN)"

    def probe(self, volume: VolumeInfo) -> str | None:
        if volume.mount is None:
            return "not a mounted filesystem"
        if not volume.is_block_device:
            return "not on a block device"
        return None

    def prepare(self, volume: VolumeInfo, set_id: str) -> None:
        return None

    def commit(self, volume: VolumeInfo) -> Snapshot:
        # the filesystem is frozen now and stays so until the coordinator releases the hold
        return Snapshot(self.name, volume, volume.device, consistency_hint="filesystem-frozen")

    def delete(self, snapshot: Snapshot) -> None:
        return None
