"""Storage backends: where repository objects live (local filesystem, memory; object storage later)."""

from __future__ import annotations

from umbra.repo.backends.base import Backend, ObjectMissing, validate_name
from umbra.repo.backends.local import LocalBackend
from umbra.repo.backends.mem import MemBackend
from umbra.testing_knobs import testonly_int, testonly_str

__all__ = ["Backend", "LocalBackend", "MemBackend", "ObjectMissing", "open_backend", "validate_name"]


def open_backend(location: str) -> Backend:
    """A backend for a location string: a filesystem path (``file://`` prefix optional)."""
    if location.startswith("file://"):
        location = location[len("file://") :]
    backend: Backend = LocalBackend(location)
    crash_at, crash_log = testonly_int("CRASH_AT"), testonly_str("CRASH_LOG")
    if crash_at is not None or crash_log is not None:
        from umbra.repo.backends.crashpoints import CrashPoints

        backend = CrashPoints(backend, crash_at, crash_log)
    return backend
