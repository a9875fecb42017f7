"""The provider interface and the snapshot it returns."""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from umbra.volume.extents import Extent
from umbra.volume.mounts import VolumeInfo


class Kind(enum.IntEnum):
    """Priority order: a hardware provider is preferred to a software one, and both to system."""

    HARDWARE = 0
    SOFTWARE = 1
    SYSTEM = 2


@dataclass
class Snapshot:
    """A point-in-time copy of one volume, readable at ``path`` (image file or block device)."""

    provider: str
    volume: VolumeInfo
    path: str
    consistency_hint: str = "crash-consistent"  # what the provider alone guarantees
    handle: dict[str, Any] = field(default_factory=dict)
    exclude_extents: list[Extent] = field(default_factory=list)  # device ranges left out (--exclude-file)
    # changed-block tracking (cow): this snapshot's generation, and the extents written since an
    # older generation (None when unknown); on_read releases extents once the backup has read them
    tracking_generation: str | None = None
    changed_since: Callable[[str], list[Extent] | None] | None = None
    on_read: Callable[[list[Extent]], None] | None = None
    # CDP (cow): {"journal": id, "seq": n, "time_ns": t} of the snapshot's journal mark
    cdp: dict[str, Any] = field(default_factory=dict)
    # called once the backup has read everything, before its manifest is written (hold: the thaw,
    # raising if the hold limit passed first); returns manifest fields to update
    finish_read: Callable[[], dict[str, Any]] | None = None
    content: str = "image"  # "btrfs-send": ``path`` is a read-only subvolume, stored as its send stream


class Provider(ABC):
    """A snapshot implementation.

    Contract: ``prepare`` may be slow (allocation, checks) and runs before anything is frozen;
    ``commit`` must be fast (milliseconds) because filesystems and writers are frozen while it
    runs, and must not write to a filesystem of the set; ``release`` runs after the thaw; ``delete``
    removes the snapshot after the backup and must be idempotent.  Failures raise ``ProviderError``.
    """

    name: ClassVar[str]
    kind: ClassVar[Kind]
    description: ClassVar[str]
    opt_in: ClassVar[bool] = False  # chosen only when named (--provider), never automatically
    holds_freeze: ClassVar[bool] = False  # the filesystem stays frozen until the backup has read it

    @classmethod
    def unavailable(cls) -> str | None:
        """Why this provider cannot work on this machine at all, or None."""
        return None

    @abstractmethod
    def probe(self, volume: VolumeInfo) -> str | None:
        """Why this provider cannot snapshot ``volume``, or None if it can."""

    def writes_to(self, volume: VolumeInfo) -> str | None:
        """The mount point this provider writes to when committing ``volume`` (it must not be frozen)."""
        return None

    @abstractmethod
    def prepare(self, volume: VolumeInfo, set_id: str) -> None: ...

    @abstractmethod
    def commit(self, volume: VolumeInfo) -> Snapshot: ...

    def release(self, snapshot: Snapshot) -> None:
        """After the thaw; most providers have nothing to do."""
        return None

    @abstractmethod
    def delete(self, snapshot: Snapshot) -> None: ...

    def abort(self, volume: VolumeInfo) -> None:
        """Undo ``prepare`` when the set fails before or during commit."""
        return None
