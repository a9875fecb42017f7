"""The writer interface and the context a snapshot set hands to writers."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

from umbra.errors import WriterVeto

__all__ = ["SetContext", "Writer", "WriterVeto"]


@dataclass
class SetContext:
    """What writers may know of the set: used for script environments and for logging."""

    set_id: str
    volumes: list[str]
    providers: list[str] = field(default_factory=list)
    status: str = "running"  # running, ok, failed
    error: str = ""
    points: list[str] = field(default_factory=list)


class Writer(ABC):
    """An application taking part in a snapshot set.

    Contract: ``freeze`` returns once the application's data on disk is consistent and stays so
    until ``thaw`` (it may raise :class:`WriterVeto`, retryable or fatal); ``thaw`` is always called
    after a successful ``freeze``, even when the set fails, and must not raise; ``held`` says
    whether the freeze really held through the commit; ``backup_complete`` runs last, with the
    outcome (e.g. to truncate logs), and must not raise.
    """

    name: str

    @abstractmethod
    def metadata(self) -> dict[str, Any]:
        """The writer metadata document: components, files, volumes, excludes, restore method."""

    @abstractmethod
    def freeze(self, ctx: SetContext) -> None: ...

    @abstractmethod
    def thaw(self, ctx: SetContext) -> None: ...

    def held(self) -> bool:
        return True

    def snapshot_failed(self, ctx: SetContext) -> None:
        """The snapshot could not be taken (``thaw`` and then ``backup_complete`` follow)."""
        return None

    def backup_complete(self, ctx: SetContext) -> None:
        return None
