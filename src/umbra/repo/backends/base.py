"""The storage seam: every repository byte goes through a :class:`Backend`.

Names are relative, slash-separated paths such as ``data/ab/ab12…``, ``index/…``, ``points/…``,
``keys/…``, ``locks/…`` and ``config``; :func:`validate_name` rejects anything else before it
reaches an implementation ("no crap in, no crap out").
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Iterator

from umbra.errors import ObjectMissing

__all__ = ["DIRECTORIES", "Backend", "ForwardingBackend", "ObjectMissing", "validate_name"]

DIRECTORIES = ("data", "index", "points", "keys", "locks", "cdp", "verify", "sets", "forgotten")
_NAME = re.compile(r"^(config|(data/[0-9a-f]{2}|" + "|".join(DIRECTORIES[1:]) + r")/[0-9a-f][0-9a-f.-]{0,127})$")


def validate_name(name: str) -> str:
    """Return ``name`` if it is a well-formed object name, else raise ``ValueError``."""
    if not _NAME.match(name):
        raise ValueError(f"invalid repository object name {name!r}")
    return name


class Backend(ABC):
    """Where a repository's objects live.

    Contract, for every implementation:
    * ``store`` is atomic (a reader sees the whole object or nothing) and durable when it returns
      (for files: data fsynced, renamed, directory fsynced).  Storing a name that exists replaces it
      only where ``replace=True``; otherwise it raises ``FileExistsError``.
    * ``load`` of a missing name raises :class:`ObjectMissing`; a range past the end returns what
      exists (callers check lengths).
    * ``delete`` of a missing name raises :class:`ObjectMissing`.
    * I/O failures raise ``RepositoryIOError`` (``RepositoryFull`` for ENOSPC), never a bare OSError.
    """

    location: str

    @abstractmethod
    def exists(self) -> bool:
        """Whether the repository location exists and holds a ``config``."""

    @abstractmethod
    def create(self) -> None:
        """Create the empty location and its directories; refuse a non-empty one."""

    @abstractmethod
    def load(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        """Read a whole object, or ``length`` bytes from ``offset``."""

    @abstractmethod
    def store(self, name: str, data: bytes, replace: bool = False) -> None:
        """Write an object atomically and durably."""

    @abstractmethod
    def delete(self, name: str) -> None:
        """Remove an object."""

    @abstractmethod
    def size(self, name: str) -> int:
        """Size of an object in bytes."""

    @abstractmethod
    def list(self, directory: str) -> Iterator[str]:
        """Names of the objects below a top-level directory (``data``, ``index``, …)."""

    def remove_temporaries(self) -> int:
        """Delete what crashed writers left half-written (only under the exclusive lock); returns
        how many.  Backends whose stores cannot leave such leftovers have nothing to do."""
        return 0

    def local_path(self) -> str | None:
        """The directory holding the objects when it is on this machine's filesystems, else None."""
        return None


class ForwardingBackend(Backend):
    """Passes every call to ``inner``; wrappers (fault injection, crash points) override what they
    change."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.location = inner.location

    def exists(self) -> bool:
        return self.inner.exists()

    def create(self) -> None:
        self.inner.create()

    def load(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        return self.inner.load(name, offset, length)

    def store(self, name: str, data: bytes, replace: bool = False) -> None:
        self.inner.store(name, data, replace)

    def delete(self, name: str) -> None:
        self.inner.delete(name)

    def size(self, name: str) -> int:
        return self.inner.size(name)

    def list(self, directory: str) -> Iterator[str]:
        return self.inner.list(directory)

    def remove_temporaries(self) -> int:
        return self.inner.remove_temporaries()

    def local_path(self) -> str | None:
        return self.inner.local_path()
