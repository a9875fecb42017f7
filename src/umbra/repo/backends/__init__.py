"""Storage backends: where repository objects live (local filesystem, memory; object storage later)."""

from __future__ import annotations

from umbra.repo.backends.base import Backend, ObjectMissing, validate_name
from umbra.repo.backends.local import LocalBackend
from umbra.repo.backends.mem import MemBackend

__all__ = ["Backend", "LocalBackend", "MemBackend", "ObjectMissing", "open_backend", "validate_name"]


def open_backend(location: str) -> Backend:
    """A backend for a location string: a filesystem path (``file://`` prefix optional)."""
    if location.startswith("file://"):
        location = location[len("file://") :]
    return LocalBackend(location)
