"""The ``direct`` provider: a volume that nothing has mounted and no process holds open for
writing is quiescent already, so it is read as it is (consistency class ``offline``)."""

from __future__ import annotations

from umbra.errors import ProviderError
from umbra.providers.base import Kind, Provider, Snapshot
from umbra.volume.mounts import VolumeInfo, open_for_writing


class DirectProvider(Provider):
    name = "direct"
    kind = Kind.SYSTEM
    description = "read an unmounted volume that no process has open for writing, as it is"

    def probe(self, volume: VolumeInfo) -> str | None:
        if volume.subvolume is not None:
            return "a btrfs subvolume is read through a snapshot (btrfs provider)"
        if volume.mount is not None:
            return f"mounted at {volume.mount.mountpoint}"
        writers = open_for_writing(volume.device)
        if writers:
            return f"open for writing by pid {', '.join(map(str, writers))}"
        return None

    def prepare(self, volume: VolumeInfo, set_id: str) -> None:
        return None

    def commit(self, volume: VolumeInfo) -> Snapshot:
        reason = self.probe(volume)  # re-checked at the instant of the set
        if reason:
            raise ProviderError(provider=self.name, volume=volume.source, reason=reason)
        return Snapshot(self.name, volume, volume.device, consistency_hint="offline")

    def delete(self, snapshot: Snapshot) -> None:
        return None
