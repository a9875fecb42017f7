"""The ``cow`` provider: a snapshot taken by umbra's own protect daemon.

For a protected volume (``umbra protect``), named by its volume name, its source, its FUSE block
file, its loop device or the mount point of the filesystem on that loop device.  Commit is one
control request: the daemon raises a barrier, waits for writes in flight, and starts a snapshot and
a tracking generation.  When the filesystem on the volume is frozen (the coordinator froze it),
only the blocks it uses are protected.  The backup reads the snapshot over the daemon's NBD socket,
releases each run once read, and, given the tracking generation of its parent point, reads only
the chunks written since.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from umbra.errors import ProtectError, ProviderError, UsageError
from umbra.frontends.control import ControlClient, find_protected
from umbra.providers.base import Kind, Provider, Snapshot
from umbra.volume.extents import Extent
from umbra.volume.mounts import VolumeInfo, filesystem_of


class CowProvider(Provider):
    name = "cow"
    kind = Kind.SOFTWARE
    description = "copy-on-write snapshot of a protected volume (umbra protect), with changed-block tracking"

    def __init__(self) -> None:
        self._names: dict[str, str] = {}

    @staticmethod
    def _daemon(volume: VolumeInfo) -> dict[str, Any] | None:
        return find_protected(volume.source, volume.device, volume.backing_file)

    def _client(self, volume: VolumeInfo) -> tuple[ControlClient, dict[str, Any]]:
        doc = self._daemon(volume)
        if doc is None:
            raise ProviderError(provider=self.name, volume=volume.source, reason="not a protected volume")
        return ControlClient(doc["name"], Path(doc["state"])), doc

    def probe(self, volume: VolumeInfo) -> str | None:
        doc = self._daemon(volume)
        if doc is None:
            return "not a protected volume (umbra protect)"
        try:
            ControlClient(doc["name"], Path(doc["state"]), timeout=10).call("status")
        except ProtectError as exc:
            return str(exc)
        return None

    def writes_to(self, volume: VolumeInfo) -> str | None:
        """The daemon appends a snapshot mark to its journal in the state directory."""
        doc = self._daemon(volume)
        fs = filesystem_of(doc["state"]) if doc else None
        return fs.mountpoint if fs else None

    def prepare(self, volume: VolumeInfo, set_id: str) -> None:
        self._names[volume.source] = f"umbra-set-{set_id[:12]}"

    def commit(self, volume: VolumeInfo) -> Snapshot:
        client, doc = self._client(volume)
        name = self._names[volume.source]
        # frozen by the coordinator: the filesystem's bitmaps are exact, protect only used blocks
        used = "fs" if volume.mount is not None else "all"
        try:
            snap = client.call("snapshot-create", name=name, used=used)
        except ProtectError as exc:
            raise ProviderError(provider=self.name, volume=volume.source, reason=exc.message) from exc

        def release(extents: list[Extent]) -> None:
            client.call("release", name=name, extents=[[start, end] for start, end in extents])

        def changed(generation: str) -> list[Extent] | None:
            extents = client.call("changed", name=name, since=generation)
            return None if extents is None else [(int(a), int(b)) for a, b in extents]

        return Snapshot(
            self.name,
            volume,
            snap["nbd"],
            consistency_hint="crash-consistent",
            handle={"volume": doc["name"], "state": doc["state"], "snapshot": name},
            tracking_generation=snap["generation"],
            on_read=release,
            changed_since=changed,
            cdp=(
                {"journal": snap["journal"], "seq": snap["journal_seq"], "time_ns": snap["created_ns"]}
                if snap.get("journal")
                else {}
            ),
        )

    def delete(self, snapshot: Snapshot) -> None:
        client = ControlClient(snapshot.handle["volume"], Path(snapshot.handle["state"]))
        # already gone (UsageError), or the daemon stopped and its snapshots went with it
        with contextlib.suppress(UsageError, ProtectError):
            client.call("snapshot-delete", name=snapshot.handle["snapshot"])
